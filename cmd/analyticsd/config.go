package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/url"
	"strconv"
	"strings"
	"time"

	"github.com/ClickHouse/clickhouse-go/v2"

	"github.com/analyticsd/analyticsd/auth"
	"github.com/analyticsd/analyticsd/ingest"
	"github.com/analyticsd/analyticsd/quota"
	"github.com/analyticsd/analyticsd/ratelimit"
	"github.com/analyticsd/analyticsd/rollup"
	"github.com/analyticsd/analyticsd/schema"
)

// Config is every setting analyticsd reads, all from the environment (see the README's table).
// Defaults point at the local stack that `deploy/local/stack.sh up` starts.
type Config struct {
	Addr            string             // ANALYTICS_ADDR
	MetricsAddr     string             // ANALYTICS_METRICS_ADDR: the operator listener ("" when off)
	ClickHouseDSN   string             // CLICKHOUSE_DSN; its path names the database (default analytics)
	ClickHouseDB    string             // derived from CLICKHOUSE_DSN
	PostgresURL     string             // POSTGRES_URL
	RedisURL        string             // REDIS_URL
	RetentionDays   int                // RETENTION_DAYS
	Enabled         bool               // ANALYTICS_ENABLED
	MaxExportRows   int                // ANALYTICS_MAX_EXPORT_ROWS
	QuotasEnabled   bool               // QUOTAS_ENABLED
	QuotaDefaults   map[string]float64 // QUOTA_DEFAULTS (JSON object metric → limit)
	ShutdownTimeout time.Duration      // ANALYTICS_SHUTDOWN_TIMEOUT
	LogLevel        slog.Level         // LOG_LEVEL: debug, info, warn, error
	LogFormat       string             // LOG_FORMAT: json or text
	LabelCap        int                // METRICS_LABEL_CAP: distinct tenant/event label values per metric

	Ingest       ingest.Config
	Writer       ingest.WriterConfig
	DedupWindow  time.Duration // INGEST_DEDUP_WINDOW: how long event ids and Idempotency-Keys are remembered; 0 turns deduplication off
	JWT          auth.JWTConfig
	QueryTimeout time.Duration // ANALYTICS_QUERY_TIMEOUT: ClickHouse max_execution_time of reads
	Quota        quota.Config
	RateLimit    ratelimit.Config
	Rollup       rollup.ScheduleConfig
	ReadTimeout  time.Duration // ANALYTICS_READ_TIMEOUT: whole request (headers and body) must arrive within it
	CORSOrigins  []string      // CORS_ALLOWED_ORIGINS; empty: no cross-origin access
}

const (
	defaultClickHouseDSN = "clickhouse://default:@127.0.0.1:19000/analytics"
	defaultPostgresURL   = "postgres://analytics:analytics@127.0.0.1:55432/analytics?sslmode=disable"
	defaultRedisURL      = "redis://127.0.0.1:16379/0"
)

// loadConfig reads the environment through getenv and validates it, reporting every problem at once.
func loadConfig(getenv func(string) string) (Config, error) {
	var errs []error
	str := func(name, def string) string {
		if v := strings.TrimSpace(getenv(name)); v != "" {
			return v
		}
		return def
	}
	integer := func(name string, def, min, max int) int {
		v := str(name, "")
		if v == "" {
			return def
		}
		n, err := strconv.Atoi(v)
		if err != nil || n < min || n > max {
			errs = append(errs, fmt.Errorf("%s=%q: want a whole number from %d to %d", name, v, min, max))
			return def
		}
		return n
	}
	boolean := func(name string, def bool) bool {
		v := str(name, "")
		if v == "" {
			return def
		}
		b, err := strconv.ParseBool(v)
		if err != nil {
			errs = append(errs, fmt.Errorf("%s=%q: want true or false", name, v))
			return def
		}
		return b
	}
	duration := func(name string, def time.Duration) time.Duration {
		v := str(name, "")
		if v == "" {
			return def
		}
		d, err := time.ParseDuration(v)
		if err != nil || d < 0 {
			errs = append(errs, fmt.Errorf("%s=%q: want a duration such as 500ms, 10s or 1m", name, v))
			return def
		}
		return d
	}

	c := Config{
		Addr:            str("ANALYTICS_ADDR", ":8080"),
		MetricsAddr:     str("ANALYTICS_METRICS_ADDR", "127.0.0.1:9464"),
		ClickHouseDSN:   str("CLICKHOUSE_DSN", defaultClickHouseDSN),
		PostgresURL:     str("POSTGRES_URL", defaultPostgresURL),
		RedisURL:        str("REDIS_URL", defaultRedisURL),
		RetentionDays:   integer("RETENTION_DAYS", 90, 1, 3650),
		Enabled:         boolean("ANALYTICS_ENABLED", true),
		MaxExportRows:   integer("ANALYTICS_MAX_EXPORT_ROWS", 50000, 1, 100_000_000),
		QuotasEnabled:   boolean("QUOTAS_ENABLED", true),
		ShutdownTimeout: duration("ANALYTICS_SHUTDOWN_TIMEOUT", 30*time.Second),
		LogFormat:       str("LOG_FORMAT", "json"),
	}

	c.LabelCap = integer("METRICS_LABEL_CAP", 500, 1, 100_000)
	lim := ingest.DefaultLimits()
	lim.RetentionDays = c.RetentionDays
	lim.MaxBodyBytes = int64(integer("INGEST_MAX_BODY_BYTES", int(lim.MaxBodyBytes), 1024, 1<<30))
	lim.MaxEvents = integer("INGEST_MAX_EVENTS", lim.MaxEvents, 1, 1_000_000)
	lim.MaxPropsBytes = integer("INGEST_MAX_PROPS_BYTES", lim.MaxPropsBytes, 2, 1<<20)
	c.Ingest = ingest.Config{Enabled: c.Enabled, Limits: lim, EventMetrics: ingest.DefaultEventMetrics()}
	if v := str("QUOTA_EVENT_MAP", ""); v != "" {
		var m map[string]string
		if err := json.Unmarshal([]byte(v), &m); err != nil {
			errs = append(errs, fmt.Errorf(`QUOTA_EVENT_MAP: want a JSON object of event to metric, e.g. {"apikey.request":"api_requests_daily"}: %v`, err))
		}
		for ev, metric := range m {
			if !ingest.ValidEventName(ev) || !ingest.ValidMetric(metric) {
				errs = append(errs, fmt.Errorf("QUOTA_EVENT_MAP: %q → %q: want an event name (with a '.') and a metric name (%s)", ev, metric, ingest.MetricRule))
			}
		}
		c.Ingest.EventMetrics = m
	}
	durability, err := ingest.ParseDurability(str("INGEST_DURABILITY", string(ingest.DurabilityFsync)))
	if err != nil {
		errs = append(errs, fmt.Errorf("INGEST_DURABILITY: %v", err))
	}
	c.Writer = ingest.WriterConfig{
		Dir:             str("ANALYTICS_SPOOL_DIR", ".data/spool"),
		Durability:      durability,
		BatchRows:       integer("INGEST_BATCH_ROWS", 50_000, 1, 10_000_000),
		FlushInterval:   duration("INGEST_FLUSH_INTERVAL", time.Second),
		Flushers:        integer("INGEST_FLUSHERS", 2, 1, 64),
		MaxBufferedRows: integer("INGEST_MAX_BUFFERED_ROWS", 1_000_000, 1, 1_000_000_000),
		MaxSpoolBytes:   int64(integer("INGEST_MAX_SPOOL_MB", 8192, 1, 1<<30)) << 20,
		RetentionDays:   c.RetentionDays,
	}
	if c.Writer.FlushInterval < 10*time.Millisecond {
		errs = append(errs, fmt.Errorf("INGEST_FLUSH_INTERVAL=%s: want at least 10ms", c.Writer.FlushInterval))
	}
	c.DedupWindow = duration("INGEST_DEDUP_WINDOW", 24*time.Hour)
	if c.DedupWindow != 0 && (c.DedupWindow < time.Minute || c.DedupWindow > 30*24*time.Hour) {
		errs = append(errs, fmt.Errorf("INGEST_DEDUP_WINDOW=%s: want 0 (off) or a duration from 1m to 720h", c.DedupWindow))
	}

	c.JWT = auth.JWTConfig{
		Secret:   []byte(getenv("AUTH_JWT_SECRET")),
		JWKSURL:  str("AUTH_JWKS_URL", ""),
		Issuer:   str("AUTH_JWT_ISSUER", ""),
		Audience: str("AUTH_JWT_AUDIENCE", ""),
		Leeway:   duration("AUTH_JWT_LEEWAY", 30*time.Second),
	}
	if n := len(c.JWT.Secret); n > 0 && n < 32 {
		errs = append(errs, fmt.Errorf("AUTH_JWT_SECRET is %d bytes; HS256 needs at least 32 random bytes", n))
	}
	if c.JWT.JWKSURL != "" {
		if u, err := url.Parse(c.JWT.JWKSURL); err != nil || (u.Scheme != "https" && u.Scheme != "http") || u.Host == "" {
			errs = append(errs, fmt.Errorf("AUTH_JWKS_URL=%q: want an http(s) URL of the host app's JWKS", c.JWT.JWKSURL))
		}
	}
	c.Quota = quota.Config{
		Enabled:           c.QuotasEnabled,
		FailOpen:          boolean("QUOTA_FAIL_OPEN", true),
		EventMetrics:      c.Ingest.EventMetrics,
		LabelCap:          c.LabelCap,
		IdempotencyWindow: c.DedupWindow,
		ReconcileEvery:    duration("QUOTA_RECONCILE_INTERVAL", 30*time.Second),
		Webhook: quota.WebhookConfig{
			URL:    str("QUOTA_ALERT_WEBHOOK_URL", ""),
			Secret: getenv("QUOTA_ALERT_WEBHOOK_SECRET"),
		},
	}
	if e := c.Quota.ReconcileEvery; e < time.Second || e > 10*time.Minute {
		errs = append(errs, fmt.Errorf("QUOTA_RECONCILE_INTERVAL=%s: want 1s to 10m", e))
	}
	if v := str("QUOTA_ALERT_THRESHOLDS", ""); v != "" {
		for _, part := range strings.Split(v, ",") {
			n, err := strconv.Atoi(strings.TrimSpace(part))
			if err != nil || n < 1 || n > 1000 {
				errs = append(errs, fmt.Errorf("QUOTA_ALERT_THRESHOLDS=%q: want percentages such as 80,100", v))
				break
			}
			c.Quota.Thresholds = append(c.Quota.Thresholds, n)
		}
	}
	if u := c.Quota.Webhook.URL; u != "" {
		if pu, err := url.Parse(u); err != nil || (pu.Scheme != "https" && pu.Scheme != "http") || pu.Host == "" {
			errs = append(errs, fmt.Errorf("QUOTA_ALERT_WEBHOOK_URL=%q: want an http(s) URL", u))
		}
	}
	c.RateLimit = ratelimit.Config{Rate: float64(integer("RATE_LIMIT_RPS", 1000, 0, 1_000_000)), Burst: integer("RATE_LIMIT_BURST", 2000, 1, 10_000_000)}
	for _, o := range strings.Split(str("CORS_ALLOWED_ORIGINS", ""), ",") {
		if o = strings.TrimSpace(o); o == "" {
			continue
		}
		if u, err := url.Parse(o); o != "*" && (err != nil || (u.Scheme != "https" && u.Scheme != "http") || u.Host == "" || u.Path != "") {
			errs = append(errs, fmt.Errorf("CORS_ALLOWED_ORIGINS: %q is not an origin such as https://app.example.com", o))
		}
		c.CORSOrigins = append(c.CORSOrigins, o)
	}
	c.Rollup = rollup.ScheduleConfig{At: str("ROLLUP_AT", "00:10"), LookbackDays: integer("ROLLUP_LOOKBACK_DAYS", 3, 1, 90),
		DriftEvery: duration("ROLLUP_DRIFT_INTERVAL", 5*time.Minute)}
	if d := c.Rollup.DriftEvery; d != 0 && (d < 10*time.Second || d > 24*time.Hour) {
		errs = append(errs, fmt.Errorf("ROLLUP_DRIFT_INTERVAL=%s: want 10s to 24h", d))
	}
	if _, err := rollup.ParseClock(c.Rollup.At); err != nil {
		errs = append(errs, fmt.Errorf("ROLLUP_AT: %v", err))
	}
	c.ReadTimeout = duration("ANALYTICS_READ_TIMEOUT", 30*time.Second)
	if c.ReadTimeout < 100*time.Millisecond {
		errs = append(errs, fmt.Errorf("ANALYTICS_READ_TIMEOUT=%s: want at least 100ms", c.ReadTimeout))
	}
	c.QueryTimeout = duration("ANALYTICS_QUERY_TIMEOUT", 30*time.Second)
	if c.QueryTimeout < time.Second {
		errs = append(errs, fmt.Errorf("ANALYTICS_QUERY_TIMEOUT=%s: want at least 1s", c.QueryTimeout))
	}

	if _, _, err := net.SplitHostPort(c.Addr); err != nil {
		errs = append(errs, fmt.Errorf("ANALYTICS_ADDR=%q: want host:port or :port", c.Addr))
	}
	if c.MetricsAddr == "off" {
		c.MetricsAddr = ""
	} else if _, _, err := net.SplitHostPort(c.MetricsAddr); err != nil {
		errs = append(errs, fmt.Errorf("ANALYTICS_METRICS_ADDR=%q: want host:port (default 127.0.0.1:9464), or off", c.MetricsAddr))
	}
	if opts, err := clickhouse.ParseDSN(c.ClickHouseDSN); err != nil {
		errs = append(errs, fmt.Errorf("CLICKHOUSE_DSN: %v (want clickhouse://user:password@host:9000/database)", err))
	} else {
		c.ClickHouseDB = opts.Auth.Database
		if c.ClickHouseDB == "" || c.ClickHouseDB == "default" {
			c.ClickHouseDB = "analytics"
		}
		if !schema.ValidIdent(c.ClickHouseDB) {
			errs = append(errs, fmt.Errorf("CLICKHOUSE_DSN: database %q must be letters, digits and underscores", c.ClickHouseDB))
		}
	}
	if u, err := url.Parse(c.PostgresURL); err != nil || (u.Scheme != "postgres" && u.Scheme != "postgresql") {
		errs = append(errs, fmt.Errorf("POSTGRES_URL: want postgres://user:password@host:5432/db"))
	}
	if u, err := url.Parse(c.RedisURL); err != nil || (u.Scheme != "redis" && u.Scheme != "rediss") {
		errs = append(errs, fmt.Errorf("REDIS_URL: want redis://host:6379/0"))
	}
	c.QuotaDefaults = map[string]float64{}
	if v := str("QUOTA_DEFAULTS", ""); v != "" {
		if err := json.Unmarshal([]byte(v), &c.QuotaDefaults); err != nil {
			errs = append(errs, fmt.Errorf(`QUOTA_DEFAULTS: want a JSON object of metric to limit, e.g. {"api_requests_daily":50000}: %v`, err))
		}
		for m, lim := range c.QuotaDefaults {
			if lim < 0 {
				errs = append(errs, fmt.Errorf("QUOTA_DEFAULTS: limit for %q is negative", m))
			}
			if !ingest.ValidMetric(m) {
				errs = append(errs, fmt.Errorf("QUOTA_DEFAULTS: %q: %s", m, ingest.MetricRule))
			}
		}
	}
	if err := c.LogLevel.UnmarshalText([]byte(str("LOG_LEVEL", "info"))); err != nil {
		errs = append(errs, fmt.Errorf("LOG_LEVEL=%q: want debug, info, warn or error", getenv("LOG_LEVEL")))
	}
	if c.LogFormat != "json" && c.LogFormat != "text" {
		errs = append(errs, fmt.Errorf("LOG_FORMAT=%q: want json or text", c.LogFormat))
	}
	if len(errs) > 0 {
		return c, fmt.Errorf("invalid configuration:\n%w", errors.Join(errs...))
	}
	return c, nil
}
