-- Which registered instances erase a user id with NUL bytes by the id itself (user_bytes, 0012):
-- instances of a release before it read only user_id and would erase nothing for such an id (and
-- scrub nothing from their quarantine). An erasure of such an id is refused while one of those is
-- live, instead of being left half done (found by review).
ALTER TABLE erasure_instances ADD COLUMN exact_user_ids boolean NOT NULL DEFAULT false;
