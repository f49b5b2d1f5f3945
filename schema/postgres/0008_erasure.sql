-- erasure_jobs (issue 21): one row per request to erase a user's events or all of a tenant's data.
-- The job's state lives here so that a server restarted mid-way resumes it (any instance may: a job
-- whose heartbeat stopped is taken over), and each step is safe to run twice.
-- tenant_id has no foreign key: a tenant's erasure is kept as a record after the tenant is deleted.
-- user_id is needed only while the job runs and is blanked when it is done; user_hash (hex SHA-256 of
-- tenant id, NUL, user id) stays, so a later request about the same person can be matched without
-- keeping the id itself.
CREATE TABLE erasure_jobs (
    id           uuid PRIMARY KEY,
    tenant_id    uuid NOT NULL,
    kind         text NOT NULL CHECK (kind IN ('user', 'tenant')),
    user_id      text NOT NULL DEFAULT '',
    user_hash    text NOT NULL DEFAULT '',
    status       text NOT NULL CHECK (status IN ('queued', 'running', 'done', 'failed')),
    step         text NOT NULL DEFAULT '',
    rows_erased  bigint NOT NULL DEFAULT 0,
    actor        text NOT NULL,
    error        text NOT NULL DEFAULT '',
    created_at   timestamptz NOT NULL DEFAULT now(),
    started_at   timestamptz,
    heartbeat_at timestamptz,
    finished_at  timestamptz
);
CREATE INDEX erasure_jobs_open_idx ON erasure_jobs (created_at) WHERE status IN ('queued', 'running');
CREATE INDEX erasure_jobs_tenant_idx ON erasure_jobs (tenant_id, created_at);
