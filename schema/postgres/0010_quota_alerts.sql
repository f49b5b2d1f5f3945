-- Quota alerts fired: one row per UTC day, tenant, metric and threshold. Redis decides at the
-- crossing which instance fires (SET NX); the instance then records the alert only if its INSERT
-- adds this row, so an alert fires once even after Redis lost its marks (a flush, a failover), when
-- a counter restarting from its live counts crosses again. Rows of days before yesterday are deleted
-- as alerts fire; a tenant's erasure deletes its rows.
CREATE TABLE quota_alerts (
    day       date NOT NULL,
    tenant_id uuid NOT NULL,
    metric    text NOT NULL,
    threshold int NOT NULL,
    fired_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (day, tenant_id, metric, threshold)
);
