-- The alert webhook's outbox (quota/webhook.go). The transaction that records an alert in
-- quota_alerts also stores the webhook's payload and makes it due, so that a delivery outlives a
-- crash, a shutdown and a receiver that is down: any instance with QUOTA_ALERT_WEBHOOK_URL set takes
-- due rows (FOR UPDATE SKIP LOCKED), marks them taken for a lease, posts them and records the outcome.
-- Delivery is at least once; the payload's id is stable, for receivers to drop a repeat. Rows leave
-- with their alert's (two days after its day), after the last retry.
ALTER TABLE quota_alerts
    ADD COLUMN webhook_body      text,                      -- the JSON posted, fixed when the alert is recorded
    ADD COLUMN webhook_due_at    timestamptz,               -- next attempt, or the lease's end while one runs; NULL: nothing to send
    ADD COLUMN webhook_attempts  int NOT NULL DEFAULT 0,    -- attempts taken so far (a taken lease counts)
    ADD COLUMN webhook_outcome   text,                      -- 'delivered' or 'abandoned' (every attempt failed)
    ADD COLUMN webhook_done_at   timestamptz;

CREATE INDEX quota_alerts_webhook_due ON quota_alerts (webhook_due_at) WHERE webhook_due_at IS NOT NULL;
