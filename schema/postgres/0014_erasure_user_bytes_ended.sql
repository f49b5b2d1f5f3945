-- A user erasure whose id holds NUL bytes, during a rolling upgrade from a release before 0012: that
-- release reads only user_id, a form to show which (for such ids) is longer than any user id an
-- event can hold, so it erases nothing, and then marks the job done — without blanking
-- user_bytes, which kept the erased user's id for good on a job that said done (found by review).
-- An ended job holds no bytes: the previous release's finishing statements now fail, the job stays
-- running until its heartbeat is stale, and an instance of this release takes it over and erases
-- the user. Jobs that ended before this check have their bytes blanked first.
UPDATE erasure_jobs SET user_bytes = NULL WHERE status IN ('done', 'failed');
ALTER TABLE erasure_jobs ADD CONSTRAINT erasure_jobs_no_bytes_once_ended CHECK (status NOT IN ('done', 'failed') OR user_bytes IS NULL);
