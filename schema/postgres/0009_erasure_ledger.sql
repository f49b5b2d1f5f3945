-- The erasure ledger (issue 21): what a user's erasure took out of the raw events, so that the rollup's
-- and the quota reconciler's truth (raw events + increments) keeps the counts the aggregates hold.
--
-- A user's erasure runs in rounds. A round is recorded here, in one transaction, before its delete is
-- issued: the exact ids of the rows it deletes (erasure_rounds.ids) and their counts per day, event and
-- received minute (erased_usage). Until the round is applied (its delete finished on every replica and
-- its ids are gone) readers leave exactly those rows out of the raw counts and add the recorded counts
-- instead; after, the rows are gone and the counts stay. Either way raw + erased is what was stored.
-- The counts hold no personal data (tenant, day, event name, minute, count); ids are random event ids,
-- and are emptied once the round is applied.
CREATE TABLE erasure_rounds (
    job_id      uuid NOT NULL REFERENCES erasure_jobs (id),
    round       int NOT NULL,
    tenant_id   uuid NOT NULL,
    -- hex SHA-256 of the user id alone, the predicate ClickHouse evaluates (SHA256(user_id)); blanked
    -- once applied. Statements sent to ClickHouse carry this digest, never the user id.
    user_digest text NOT NULL,
    ids         uuid[] NOT NULL,
    rows        bigint NOT NULL,
    applied     boolean NOT NULL DEFAULT false,
    recorded_at timestamptz NOT NULL DEFAULT now(),
    applied_at  timestamptz,
    applied_by  uuid,          -- the job whose runner confirmed the delete (a re-submitted request
                               -- finishes a failed job's rounds and counts their rows as its own)
    PRIMARY KEY (job_id, round)
);
CREATE INDEX erasure_rounds_pending_idx ON erasure_rounds (tenant_id) WHERE NOT applied;

CREATE TABLE erased_usage (
    tenant_id uuid NOT NULL,
    date      date NOT NULL,   -- toDate(ts), the rollup's day
    metric    text NOT NULL,   -- the event name (the quota reconciler maps it to its daily metric)
    minute    bigint NOT NULL, -- unix minute of received_at, the quota counters' unit
    n         bigint NOT NULL,
    job_id    uuid NOT NULL,
    round     int NOT NULL,
    PRIMARY KEY (job_id, round, tenant_id, date, metric, minute),
    FOREIGN KEY (job_id, round) REFERENCES erasure_rounds (job_id, round)
);
CREATE INDEX erased_usage_day_idx ON erased_usage (date, tenant_id);

-- One row, incremented in the transaction that records a round and in the one that applies it:
-- readers compare it before and after their ClickHouse count (one row read, however many rounds exist).
CREATE TABLE erasure_ledger_version (
    one boolean PRIMARY KEY DEFAULT true CHECK (one),
    v   bigint NOT NULL
);
INSERT INTO erasure_ledger_version (one, v) VALUES (true, 0);

-- Bounded retries: a job that fails Config.MaxAttempts times is 'failed' with its last error; between
-- attempts its heartbeat_at is set so that runners take it again after a backoff. An instance's heartbeat and its acknowledgements of open jobs:
-- a job deletes only once every live instance has shipped its spool and scrubbed its quarantine.
ALTER TABLE erasure_jobs ADD COLUMN attempts int NOT NULL DEFAULT 0;

CREATE TABLE erasure_instances (
    id           text PRIMARY KEY,
    started_at   timestamptz NOT NULL DEFAULT now(),
    heartbeat_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE erasure_acks (
    job_id   uuid NOT NULL REFERENCES erasure_jobs (id),
    instance text NOT NULL,
    scrubbed bigint NOT NULL DEFAULT 0,
    acked_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (job_id, instance)
);
