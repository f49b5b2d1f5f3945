-- Level metrics (e.g. storage_gb): a current value that is set, not a daily count that is added to.
-- Postgres keeps them durably; Redis keeps only the daily counters (which it can rebuild).
CREATE TABLE usage_levels (
    tenant_id  uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    metric     text NOT NULL,
    value      double precision NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, metric)
);
