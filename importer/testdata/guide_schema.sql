-- The guide's Postgres tables and indexes (spec/analytics-guide.md, "Data Model" and "Database Indexes"),
-- copied verbatim: the source database of an import.
CREATE TABLE analytics_events (
    id UUID PRIMARY KEY,
    tenant_id UUID REFERENCES tenants(id),
    user_id VARCHAR(255),
    source VARCHAR(50), -- app, api, webhook, job, payments, files, builder, agent
    event TEXT NOT NULL,
    ts TIMESTAMPTZ DEFAULT NOW(),
    props JSONB,
    ip TEXT,
    request_id TEXT
);

CREATE TABLE analytics_daily_usage (
    tenant_id UUID REFERENCES tenants(id),
    date DATE,
    metric TEXT,
    count BIGINT DEFAULT 0,
    meta JSONB,
    PRIMARY KEY (tenant_id, date, metric)
);

-- Performance indexes
CREATE INDEX idx_analytics_events_tenant_ts ON analytics_events(tenant_id, ts);
CREATE INDEX idx_analytics_events_tenant_event_ts ON analytics_events(tenant_id, event, ts);
CREATE INDEX idx_analytics_daily_usage_tenant_date ON analytics_daily_usage(tenant_id, date);
