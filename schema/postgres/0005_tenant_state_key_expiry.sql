-- Operator controls (issue 17): a tenant can be disabled without deleting it, and an API key can be
-- rotated with an overlap, after which the old key expires.
-- tenants.disabled_at: set while the tenant is disabled; its API keys and JWTs are refused with 403
-- (within the auth cache's 5 s), its data and keys are kept, and enabling clears it.
ALTER TABLE tenants ADD COLUMN disabled_at timestamptz;
-- api_keys.expires_at: the key stops working at this instant (NULL: never). `apikey rotate` sets it on
-- the old key to now + the overlap.
ALTER TABLE api_keys ADD COLUMN expires_at timestamptz;
-- last_used_at is written about once a minute per key by the servers (from memory, never per request).
