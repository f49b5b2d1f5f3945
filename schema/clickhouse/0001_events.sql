-- On a cluster (CLICKHOUSE_CLUSTER) each table below is a replicated "<name>_local" table on every
-- shard plus a Distributed table under the plain name, sharded by tenant so a tenant's rows stay on one
-- shard; the materialized views read and write the local tables, so each shard aggregates its own rows.
-- On one server the names are the plain ones and nothing else changes (see schema.Layout).

-- events: one row per tracked event, kept RetentionDays days.
--
-- ORDER BY (tenant_id, ts, id): every read is tenant-scoped and time-bounded, so the tenant leads and time
-- follows; the events API pages newest-first by the keyset (ts, id), so id completes the key and makes the
-- order total (many events share one second). Event-name filters scan a tenant's time range, which the
-- key already narrows; a separate (tenant_id, event, ts) key did not pay for the slower paging it causes.
-- PARTITION BY day: retention drops whole days (TTL on modern servers, the sweeper on servers without TTL),
-- and a day is also what the rollup reconciles.
CREATE TABLE IF NOT EXISTS {{.Local "events"}}{{.OnCluster}}
(
    tenant_id   UUID,
    ts          DateTime,
    id          UUID,
    received_at DateTime,
    event       {{.LowCardinalityString}},
    source      {{.LowCardinalityString}},
    user_id     String,
    props       String{{.Codec "ZSTD(3)"}},
    ip          String,
    request_id  String
)
ENGINE = {{.Engine "events" "MergeTree"}}
PARTITION BY toYYYYMMDD(ts)
ORDER BY (tenant_id, ts, id)
{{- if .TTL}}
TTL ts + INTERVAL {{.RetentionDays}} DAY
SETTINGS index_granularity = 8192, ttl_only_drop_parts = 1
{{- else}}
SETTINGS index_granularity = 8192
{{- end}};
{{.Distributed "events"}}

-- usage_increments: explicit increment_usage calls (metric, n), kept like events so the rollup can check
-- the daily aggregate against them while a day is inside retention. Sorted like events (tenant, then time).
CREATE TABLE IF NOT EXISTS {{.Local "usage_increments"}}{{.OnCluster}}
(
    tenant_id UUID,
    ts        DateTime,
    id        UUID,
    metric    {{.LowCardinalityString}},
    n         Int64
)
ENGINE = {{.Engine "usage_increments" "MergeTree"}}
PARTITION BY toYYYYMMDD(ts)
ORDER BY (tenant_id, ts, id)
{{- if .TTL}}
TTL ts + INTERVAL {{.RetentionDays}} DAY
SETTINGS index_granularity = 8192, ttl_only_drop_parts = 1
{{- else}}
SETTINGS index_granularity = 8192
{{- end}};
{{.Distributed "usage_increments"}}

-- daily_usage: per tenant, day and metric, the count of events (metric = event name) plus explicit
-- increments, kept indefinitely. SummingMergeTree folds rows on merge, but merges are eventual: always
-- read it with sum(count) ... GROUP BY. ORDER BY (tenant_id, metric, date) serves the usage series and
-- KPIs, which ask for a few metrics of one tenant over a date range; monthly partitions stay few forever.
CREATE TABLE IF NOT EXISTS {{.Local "daily_usage"}}{{.OnCluster}}
(
    tenant_id UUID,
    date      Date,
    metric    {{.LowCardinalityString}},
    count     Int64
)
ENGINE = {{.Engine "daily_usage" "SummingMergeTree" "count"}}
PARTITION BY toYYYYMM(date)
ORDER BY (tenant_id, metric, date);
{{.Distributed "daily_usage"}}

CREATE MATERIALIZED VIEW IF NOT EXISTS {{.DB}}.daily_usage_events_mv{{.OnCluster}} TO {{.Local "daily_usage"}} AS
SELECT tenant_id, toDate(ts) AS date, event AS metric, toInt64(count()) AS count
FROM {{.Local "events"}}
GROUP BY tenant_id, date, metric;

CREATE MATERIALIZED VIEW IF NOT EXISTS {{.DB}}.daily_usage_increments_mv{{.OnCluster}} TO {{.Local "daily_usage"}} AS
SELECT tenant_id, toDate(ts) AS date, metric, sum(n) AS count
FROM {{.Local "usage_increments"}}
GROUP BY tenant_id, date, metric;
