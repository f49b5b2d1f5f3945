-- `analyticsd import` (issue 20): what an import from a Postgres database holding the guide's tables has
-- done, so an interrupted import resumes where it stopped and a repeated one adds nothing.
-- source names the imported database (host, port and database name; never credentials).

-- import_tenants: which analyticsd tenant each source tenant went to (created or mapped). A resumed import
-- keeps the tenant it chose the first time.
CREATE TABLE import_tenants (
    source           text NOT NULL,
    source_tenant_id uuid NOT NULL,
    tenant_id        uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    created          boolean NOT NULL,
    at               timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (source, source_tenant_id)
);

-- import_days: one row per imported tenant (each source tenant has an analyticsd tenant of its own) and
-- UTC day the import has started on.
--   inserting: daily aggregates (days older than retention) are being added to ClickHouse daily_usage;
--              before_total is the tenant's daily_usage total for the day before, delta_total what the
--              import adds, so a resumed import can tell whether that insert landed.
--   stored:    ClickHouse holds the day (events, increments or aggregates).
--   billed:    the rollup has reconciled the day for the tenant into analytics_daily_usage.
CREATE TABLE import_days (
    source       text NOT NULL,
    tenant_id    uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    day          date NOT NULL,
    state        text NOT NULL CHECK (state IN ('inserting', 'stored', 'billed')),
    before_total bigint,
    delta_total  bigint,
    updated_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (source, tenant_id, day)
);
