-- The alert webhook's leases, and what a level's owed alert crossed (quota/webhook.go, alerts.go).
--
-- A take of a due row now names itself (webhook_lease), and its outcome is recorded only under that
-- name; webhook_attempts counts posts whose outcome was recorded (0011 counted takes, so takes that
-- died unposted spent the attempts), webhook_leases every take. Takes without an outcome end the
-- row unposted only once as many as the attempts have happened and the attempts' whole span has
-- passed since the alert was recorded. (Every alert recorded now gets its payload, whether or not
-- the recording instance has QUOTA_ALERT_WEBHOOK_URL: the instances that have it deliver it.)
ALTER TABLE quota_alerts
    ADD COLUMN webhook_lease   uuid,
    ADD COLUMN webhook_leases  int NOT NULL DEFAULT 0,
    -- A level's owed alert (SetLevel writes the row in the transaction that sets the value across
    -- the threshold): the value and limit of the crossing, which the catch-up fires with.
    ADD COLUMN level_value     double precision,
    ADD COLUMN level_limit     double precision;
