CREATE TABLE IF NOT EXISTS analytics.events
(
    tenant_id   UUID,
    ts          DateTime,
    id          UUID,
    received_at DateTime,
    event       LowCardinality(String),
    source      LowCardinality(String),
    user_id     String,
    props       String CODEC(ZSTD(3)),
    ip          String,
    request_id  String
)
ENGINE = MergeTree
PARTITION BY toYYYYMMDD(ts)
ORDER BY (tenant_id, ts, id)
TTL ts + INTERVAL 90 DAY
SETTINGS index_granularity = 8192, ttl_only_drop_parts = 1;

CREATE TABLE IF NOT EXISTS analytics.usage_increments
(
    tenant_id UUID,
    ts        DateTime,
    id        UUID,
    metric    LowCardinality(String),
    n         Int64
)
ENGINE = MergeTree
PARTITION BY toYYYYMMDD(ts)
ORDER BY (tenant_id, ts, id)
TTL ts + INTERVAL 90 DAY
SETTINGS index_granularity = 8192, ttl_only_drop_parts = 1;

CREATE TABLE IF NOT EXISTS analytics.daily_usage
(
    tenant_id UUID,
    date      Date,
    metric    LowCardinality(String),
    count     Int64
)
ENGINE = SummingMergeTree(count)
PARTITION BY toYYYYMM(date)
ORDER BY (tenant_id, metric, date);

CREATE MATERIALIZED VIEW IF NOT EXISTS analytics.daily_usage_events_mv TO analytics.daily_usage AS
SELECT tenant_id, toDate(ts) AS date, event AS metric, toInt64(count()) AS count
FROM analytics.events
GROUP BY tenant_id, date, metric;

CREATE MATERIALIZED VIEW IF NOT EXISTS analytics.daily_usage_increments_mv TO analytics.daily_usage AS
SELECT tenant_id, toDate(ts) AS date, metric, sum(n) AS count
FROM analytics.usage_increments
GROUP BY tenant_id, date, metric;

CREATE TABLE IF NOT EXISTS analytics.usage_quarter_hour
(
    tenant_id UUID,
    metric    LowCardinality(String),
    slot      DateTime,
    count     Int64
)
ENGINE = SummingMergeTree(count)
PARTITION BY toYYYYMMDD(slot)
ORDER BY (tenant_id, metric, slot)
TTL slot + INTERVAL 90 DAY
SETTINGS index_granularity = 8192, ttl_only_drop_parts = 1;

CREATE MATERIALIZED VIEW IF NOT EXISTS analytics.usage_quarter_hour_events_mv TO analytics.usage_quarter_hour AS
SELECT tenant_id, event AS metric, toStartOfFifteenMinutes(ts) AS slot, toInt64(count()) AS count
FROM analytics.events
GROUP BY tenant_id, metric, slot;

CREATE MATERIALIZED VIEW IF NOT EXISTS analytics.usage_quarter_hour_increments_mv TO analytics.usage_quarter_hour AS
SELECT tenant_id, metric, toStartOfFifteenMinutes(ts) AS slot, sum(n) AS count
FROM analytics.usage_increments
GROUP BY tenant_id, metric, slot;

