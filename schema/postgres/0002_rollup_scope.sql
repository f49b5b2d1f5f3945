-- Rollup runs cover every tenant (tenant_id NULL: the scheduler and the CLI) or one tenant (a tenant
-- admin's POST /api/analytics/rollup). A day counts as reconciled for a tenant when an ok run of either
-- kind exists for it. scheduled_for ties a scheduler run to its daily slot, so replicas that take the
-- scheduler's lock one after another reconcile each date once per slot.
ALTER TABLE rollup_runs ADD COLUMN tenant_id uuid REFERENCES tenants (id) ON DELETE CASCADE;
ALTER TABLE rollup_runs ADD COLUMN scheduled_for timestamptz;
CREATE INDEX rollup_runs_ok_date_idx ON rollup_runs (date, tenant_id) WHERE status = 'ok';
