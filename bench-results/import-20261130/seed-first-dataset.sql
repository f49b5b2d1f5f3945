-- The source of the import benchmark: the guide's tables verbatim (importer/testdata/guide_schema.sql)
-- in schema import_src, 8 tenants, :n events over the last 120 days (today included), daily usage
-- rows as the guide's rollup job keeps them. Run: psql "$POSTGRES_URL" -v n=1000000 -f seed.sql
DROP SCHEMA IF EXISTS import_src CASCADE;
CREATE SCHEMA import_src;
SET search_path = import_src;
CREATE TABLE tenants (id uuid PRIMARY KEY, slug text);
\i ../../importer/testdata/guide_schema.sql
INSERT INTO tenants (id, slug)
SELECT ('00000000-0000-4000-8000-0000000000' || lpad(i::text, 2, '0'))::uuid, 'bench-' || i FROM generate_series(1, 8) AS i;
INSERT INTO analytics_events (id, tenant_id, user_id, source, event, ts, props, ip, request_id)
SELECT gen_random_uuid(),
       ('00000000-0000-4000-8000-0000000000' || lpad((1 + i % 8)::text, 2, '0'))::uuid,
       'user-' || (i % 9973),
       CASE WHEN i % 9 = 0 THEN NULL ELSE (ARRAY['app','api','webhook','job','payments','files','builder','agent'])[1 + i % 8] END,
       (ARRAY['auth.user.login','auth.user.registered','apikey.request','builder.generate.completed','email.sent',
              'webhook.delivered','files.uploaded','payments.checkout.created','apikey.rate_limited',
              'webhook.failed','email.failed','payments.subscription.active'])[1 + (i * 7) % 12],
       (date_trunc('day', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC')
         - make_interval(days => (i * 31) % 120) + make_interval(secs => (i::bigint * 7919) % 86400),
       CASE WHEN i % 8 = 0 THEN NULL ELSE jsonb_build_object('plan', 'pro', 'n', i, 'path', '/app/' || (i % 100)) END,
       '10.' || (i % 256) || '.' || (i % 199) || '.' || (i % 97),
       'req-' || i
FROM generate_series(1, :n) AS i;
INSERT INTO analytics_daily_usage (tenant_id, date, metric, count, meta)
SELECT tenant_id, (ts AT TIME ZONE 'UTC')::date, 'api_requests_daily', count(*) * 3, '{"from": "redis"}'
FROM analytics_events GROUP BY 1, 2;
ANALYZE analytics_events;
SELECT count(*) AS events, count(DISTINCT tenant_id) AS tenants, min(ts), max(ts) FROM analytics_events;
