CREATE TABLE IF NOT EXISTS analytics.events_local ON CLUSTER analytics_cluster
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
ENGINE = ReplicatedMergeTree('/clickhouse/tables/analytics_cluster/{shard}/analytics/events_local', '{replica}')
PARTITION BY toYYYYMMDD(ts)
ORDER BY (tenant_id, ts, id)
TTL ts + INTERVAL 90 DAY
SETTINGS index_granularity = 8192, ttl_only_drop_parts = 1;

CREATE TABLE IF NOT EXISTS analytics.events ON CLUSTER analytics_cluster AS analytics.events_local
ENGINE = Distributed(analytics_cluster, analytics, events_local, cityHash64(toString(tenant_id)));

CREATE TABLE IF NOT EXISTS analytics.usage_increments_local ON CLUSTER analytics_cluster
(
    tenant_id UUID,
    ts        DateTime,
    id        UUID,
    metric    LowCardinality(String),
    n         Int64
)
ENGINE = ReplicatedMergeTree('/clickhouse/tables/analytics_cluster/{shard}/analytics/usage_increments_local', '{replica}')
PARTITION BY toYYYYMMDD(ts)
ORDER BY (tenant_id, ts, id)
TTL ts + INTERVAL 90 DAY
SETTINGS index_granularity = 8192, ttl_only_drop_parts = 1;

CREATE TABLE IF NOT EXISTS analytics.usage_increments ON CLUSTER analytics_cluster AS analytics.usage_increments_local
ENGINE = Distributed(analytics_cluster, analytics, usage_increments_local, cityHash64(toString(tenant_id)));

CREATE TABLE IF NOT EXISTS analytics.daily_usage_local ON CLUSTER analytics_cluster
(
    tenant_id UUID,
    date      Date,
    metric    LowCardinality(String),
    count     Int64
)
ENGINE = ReplicatedSummingMergeTree('/clickhouse/tables/analytics_cluster/{shard}/analytics/daily_usage_local', '{replica}', count)
PARTITION BY toYYYYMM(date)
ORDER BY (tenant_id, metric, date);

CREATE TABLE IF NOT EXISTS analytics.daily_usage ON CLUSTER analytics_cluster AS analytics.daily_usage_local
ENGINE = Distributed(analytics_cluster, analytics, daily_usage_local, cityHash64(toString(tenant_id)));

CREATE MATERIALIZED VIEW IF NOT EXISTS analytics.daily_usage_events_mv ON CLUSTER analytics_cluster TO analytics.daily_usage_local AS
SELECT tenant_id, toDate(ts) AS date, event AS metric, toInt64(count()) AS count
FROM analytics.events_local
GROUP BY tenant_id, date, metric;

CREATE MATERIALIZED VIEW IF NOT EXISTS analytics.daily_usage_increments_mv ON CLUSTER analytics_cluster TO analytics.daily_usage_local AS
SELECT tenant_id, toDate(ts) AS date, metric, sum(n) AS count
FROM analytics.usage_increments_local
GROUP BY tenant_id, date, metric;

CREATE TABLE IF NOT EXISTS analytics.usage_quarter_hour_local ON CLUSTER analytics_cluster
(
    tenant_id UUID,
    metric    LowCardinality(String),
    slot      DateTime,
    count     Int64
)
ENGINE = ReplicatedSummingMergeTree('/clickhouse/tables/analytics_cluster/{shard}/analytics/usage_quarter_hour_local', '{replica}', count)
PARTITION BY toYYYYMMDD(slot)
ORDER BY (tenant_id, metric, slot)
TTL slot + INTERVAL 90 DAY
SETTINGS index_granularity = 8192, ttl_only_drop_parts = 1;

CREATE TABLE IF NOT EXISTS analytics.usage_quarter_hour ON CLUSTER analytics_cluster AS analytics.usage_quarter_hour_local
ENGINE = Distributed(analytics_cluster, analytics, usage_quarter_hour_local, cityHash64(toString(tenant_id)));

CREATE MATERIALIZED VIEW IF NOT EXISTS analytics.usage_quarter_hour_events_mv ON CLUSTER analytics_cluster TO analytics.usage_quarter_hour_local AS
SELECT tenant_id, event AS metric, toStartOfFifteenMinutes(ts) AS slot, toInt64(count()) AS count
FROM analytics.events_local
GROUP BY tenant_id, metric, slot;

CREATE MATERIALIZED VIEW IF NOT EXISTS analytics.usage_quarter_hour_increments_mv ON CLUSTER analytics_cluster TO analytics.usage_quarter_hour_local AS
SELECT tenant_id, metric, toStartOfFifteenMinutes(ts) AS slot, sum(n) AS count
FROM analytics.usage_increments_local
GROUP BY tenant_id, metric, slot;

