-- Quota alerts: one row per UTC day, tenant, metric and threshold, the record of what fired
-- (quota/alerts.go). Redis decides a crossing first (SET NX); an instance records the alert only if
-- it claims its row here: a new row, or one whose claim went stale unrecorded (a crash, an event the
-- spool refused). Reconciliation fires the thresholds a counter passed that have no recorded or
-- fresh row, so an alert fires once even after Redis lost its marks, and is not lost with them.
-- Only today's and yesterday's rows are kept (each claim deletes older days'), so a tenant
-- erasure's DELETE by tenant_id scans a small table.
CREATE TABLE quota_alerts (
    day         date NOT NULL,
    tenant_id   uuid NOT NULL,
    metric      text NOT NULL,
    threshold   int NOT NULL,
    claimed_at  timestamptz NOT NULL DEFAULT now(),
    recorded_at timestamptz,
    PRIMARY KEY (day, tenant_id, metric, threshold)
);
