-- A user erasure's user id as bytes. Events can hold any UTF-8 user id, NUL included (sent as
-- \u0000), and Postgres text cannot: such an erasure was refused with a 503 and the user could never
-- be erased. user_bytes holds the id exactly, while the job runs (blanked with user_id when it ends);
-- user_id keeps a form to show, NUL shown as U+FFFD. Readers take user_bytes when it is set (jobs
-- queued by an older release have only user_id).
ALTER TABLE erasure_jobs ADD COLUMN user_bytes bytea;
