-- Tenants, their API keys, billed daily usage, the audit trail and rollup bookkeeping.
-- Postgres is the system of record for these; ClickHouse holds the raw events.

CREATE TABLE tenants (
    id              uuid PRIMARY KEY,
    slug            text NOT NULL UNIQUE CHECK (slug ~ '^[a-z0-9][a-z0-9-]{0,62}$'),
    name            text NOT NULL DEFAULT '',
    quota_overrides jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at      timestamptz NOT NULL DEFAULT now()
);

-- Only a SHA-256 of each key is stored; prefix is the public, unique part used to find the row.
CREATE TABLE api_keys (
    id           uuid PRIMARY KEY,
    tenant_id    uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    name         text NOT NULL DEFAULT '',
    prefix       text NOT NULL UNIQUE,
    hash         bytea NOT NULL,
    scopes       text[] NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    last_used_at timestamptz,
    revoked_at   timestamptz
);
CREATE INDEX api_keys_tenant_idx ON api_keys (tenant_id);

-- The primary key (tenant_id, date, metric) also serves the guide's (tenant_id, date) index.
CREATE TABLE analytics_daily_usage (
    tenant_id uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    date      date NOT NULL,
    metric    text NOT NULL,
    count     bigint NOT NULL DEFAULT 0,
    meta      jsonb NOT NULL DEFAULT '{}'::jsonb,
    PRIMARY KEY (tenant_id, date, metric)
);

CREATE TABLE audit_log (
    id        bigserial PRIMARY KEY,
    tenant_id uuid,
    actor     text NOT NULL,
    action    text NOT NULL,
    target    text NOT NULL DEFAULT '',
    meta      jsonb NOT NULL DEFAULT '{}'::jsonb,
    at        timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX audit_log_tenant_at_idx ON audit_log (tenant_id, at);

CREATE TABLE rollup_runs (
    id          bigserial PRIMARY KEY,
    date        date NOT NULL,
    started_at  timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz,
    rows        bigint NOT NULL DEFAULT 0,
    status      text NOT NULL CHECK (status IN ('running', 'ok', 'failed')),
    error       text NOT NULL DEFAULT '',
    trigger     text NOT NULL DEFAULT ''
);
CREATE INDEX rollup_runs_date_idx ON rollup_runs (date, started_at);
