package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"net"
	"net/url"
	"strconv"
	"strings"
	"time"

	"github.com/ClickHouse/clickhouse-go/v2"
	"github.com/redis/go-redis/v9"

	"github.com/analyticsd/analyticsd/api"
	"github.com/analyticsd/analyticsd/auth"
	"github.com/analyticsd/analyticsd/ingest"
	"github.com/analyticsd/analyticsd/internal/labels"
	"github.com/analyticsd/analyticsd/query"
	"github.com/analyticsd/analyticsd/quota"
	"github.com/analyticsd/analyticsd/ratelimit"
	"github.com/analyticsd/analyticsd/rollup"
	"github.com/analyticsd/analyticsd/schema"
)

// Config is every setting analyticsd reads, all from the environment (see the README's table). Each
// package's section starts from that package's defaults (ingest.DefaultConfig, quota.DefaultConfig,
// …); loadConfig only overrides them. The stores' defaults point at the local stack that
// `deploy/local/stack.sh up` starts.
type Config struct {
	Addr            string        // ANALYTICS_ADDR
	MetricsAddr     string        // ANALYTICS_METRICS_ADDR: the operator listener ("" when off)
	ReadTimeout     time.Duration // ANALYTICS_READ_TIMEOUT: whole request (headers and body) must arrive within it
	ShutdownTimeout time.Duration // ANALYTICS_SHUTDOWN_TIMEOUT
	CORSOrigins     []string      // CORS_ALLOWED_ORIGINS; empty: no cross-origin access
	TrustedProxies  api.Proxies   // ANALYTICS_TRUSTED_PROXIES: whose X-Forwarded-For names the client
	LogLevel        slog.Level    // LOG_LEVEL: debug, info, warn, error
	LogFormat       string        // LOG_FORMAT: json or text
	LabelCap        int           // METRICS_LABEL_CAP: distinct tenant/event label values per metric

	ClickHouseDSN string // CLICKHOUSE_DSN; its path names the database (default analytics)
	ClickHouseDB  string // derived from CLICKHOUSE_DSN
	// ClickHouseCluster is CLICKHOUSE_CLUSTER: the cluster (in the servers' remote_servers) whose
	// shards hold the tables; empty for one server. See schema.Layout.
	ClickHouseCluster string
	PostgresURL       string // POSTGRES_URL
	RedisURL          string // REDIS_URL
	RedisCluster      bool   // REDIS_CLUSTER: REDIS_URL names Redis Cluster nodes (redis://n1:6379?addr=n2:6379&addr=n3:6379)
	RetentionDays     int    // RETENTION_DAYS

	Ingest        ingest.Config         // ANALYTICS_ENABLED, INGEST_MAX_BODY_BYTES, INGEST_MAX_EVENTS, INGEST_MAX_PROPS_BYTES, QUOTA_EVENT_MAP
	Writer        ingest.WriterConfig   // ANALYTICS_SPOOL_DIR, INGEST_DURABILITY, INGEST_BATCH_ROWS, …
	DedupWindow   time.Duration         // INGEST_DEDUP_WINDOW: how long event ids and Idempotency-Keys are remembered; 0 turns deduplication off
	Quota         quota.Config          // QUOTAS_ENABLED, QUOTA_FAIL_OPEN, QUOTA_RECONCILE_INTERVAL, QUOTA_ALERT_*
	QuotaDefaults map[string]float64    // QUOTA_DEFAULTS (JSON object metric → limit)
	RateLimit     ratelimit.Config      // RATE_LIMIT_RPS, RATE_LIMIT_BURST
	Rollup        rollup.ScheduleConfig // ROLLUP_AT, ROLLUP_LOOKBACK_DAYS, ROLLUP_DRIFT_INTERVAL
	JWT           auth.JWTConfig        // AUTH_JWT_*, AUTH_JWKS_URL
	Refusals      auth.RefusalLimit     // AUTH_REFUSALS_PER_MINUTE, AUTH_REFUSALS_BURST
	Query         query.Config          // ANALYTICS_MAX_EXPORT_ROWS
	QueryTimeout  time.Duration         // ANALYTICS_QUERY_TIMEOUT: ClickHouse max_execution_time of reads
}

const (
	defaultClickHouseDSN = "clickhouse://default:@127.0.0.1:19000/analytics"
	defaultPostgresURL   = "postgres://analytics:analytics@127.0.0.1:15432/analytics?sslmode=disable"
	defaultRedisURL      = "redis://127.0.0.1:16379/0"
)

// Layout says where the ClickHouse tables are: one server, or CLICKHOUSE_CLUSTER's shards.
func (c Config) Layout() schema.Layout {
	return schema.Layout{DB: c.ClickHouseDB, Cluster: c.ClickHouseCluster, Shards: schema.ShardsOf(c.ClickHouseCluster, c.ClickHouseDSN)}
}

// loadConfig reads the environment through getenv and validates it, reporting every problem at once.
// Sections read later take what they share from earlier ones: the retention, the event map, the
// label cap and the dedup window.
func loadConfig(getenv func(string) string) (Config, error) {
	e := &env{getenv: getenv}
	var c Config
	e.server(&c)
	e.stores(&c)
	c.Ingest, c.Writer = e.ingest(c.RetentionDays)
	c.Writer.Shards = c.Layout().Shards
	c.DedupWindow = e.dedup()
	c.Quota, c.QuotaDefaults = e.quota(c.Ingest.EventMetrics, c.LabelCap, c.DedupWindow)
	c.RateLimit = e.rateLimit()
	c.Rollup = e.rollup()
	c.JWT = e.jwt()
	c.Refusals = e.refusals()
	c.Query, c.QueryTimeout = e.query(c.LabelCap)
	if len(e.errs) > 0 {
		return c, fmt.Errorf("invalid configuration:\n%w", errors.Join(e.errs...))
	}
	return c, nil
}

// server reads the listeners, request and shutdown timeouts, CORS, logging and the metrics' label cap.
func (e *env) server(c *Config) {
	c.Addr = e.str("ANALYTICS_ADDR", ":8080")
	if _, _, err := net.SplitHostPort(c.Addr); err != nil {
		e.fail("ANALYTICS_ADDR=%q: want host:port or :port", c.Addr)
	}
	c.MetricsAddr = e.str("ANALYTICS_METRICS_ADDR", "127.0.0.1:9464")
	if c.MetricsAddr == "off" {
		c.MetricsAddr = ""
	} else if _, _, err := net.SplitHostPort(c.MetricsAddr); err != nil {
		e.fail("ANALYTICS_METRICS_ADDR=%q: want host:port (default 127.0.0.1:9464), or off", c.MetricsAddr)
	}
	c.ReadTimeout = e.duration("ANALYTICS_READ_TIMEOUT", 30*time.Second)
	if c.ReadTimeout < 100*time.Millisecond {
		e.fail("ANALYTICS_READ_TIMEOUT=%s: want at least 100ms", c.ReadTimeout)
	}
	c.ShutdownTimeout = e.duration("ANALYTICS_SHUTDOWN_TIMEOUT", 30*time.Second)
	if d := c.ShutdownTimeout; d < time.Second || d > time.Hour {
		// 0 would cut the final flush and the in-flight requests off at once.
		e.fail("ANALYTICS_SHUTDOWN_TIMEOUT=%s: want 1s to 1h (the time a stop gives requests in flight and the last flush)", d)
	}
	for _, o := range strings.Split(e.str("CORS_ALLOWED_ORIGINS", ""), ",") {
		if o = strings.TrimSpace(o); o == "" {
			continue
		}
		if u, ok := httpURL(o); o != "*" && (!ok || u.Path != "") {
			e.fail("CORS_ALLOWED_ORIGINS: %q is not an origin such as https://app.example.com", o)
		}
		c.CORSOrigins = append(c.CORSOrigins, o)
	}
	proxies, err := api.ParseProxies(e.str("ANALYTICS_TRUSTED_PROXIES", ""))
	if err != nil {
		e.fail("ANALYTICS_TRUSTED_PROXIES: %v; want addresses and CIDR prefixes, comma-separated (10.0.0.0/8,fd00::/8)", err)
	}
	c.TrustedProxies = proxies
	if err := c.LogLevel.UnmarshalText([]byte(e.str("LOG_LEVEL", "info"))); err != nil {
		e.fail("LOG_LEVEL=%q: want debug, info, warn or error", e.getenv("LOG_LEVEL"))
	}
	c.LogFormat = e.str("LOG_FORMAT", "json")
	if c.LogFormat != "json" && c.LogFormat != "text" {
		e.fail("LOG_FORMAT=%q: want json or text", c.LogFormat)
	}
	c.LabelCap = e.integer("METRICS_LABEL_CAP", labels.DefaultCap, 1, 100_000)
}

// stores reads where ClickHouse, Postgres and Redis are, and how long raw events are kept.
func (e *env) stores(c *Config) {
	c.ClickHouseDSN = e.str("CLICKHOUSE_DSN", defaultClickHouseDSN)
	if opts, err := clickhouse.ParseDSN(c.ClickHouseDSN); err != nil {
		e.fail("CLICKHOUSE_DSN: %v (want clickhouse://user:password@host:9000/database)", err)
	} else {
		c.ClickHouseDB = opts.Auth.Database
		if c.ClickHouseDB == "" || c.ClickHouseDB == "default" {
			c.ClickHouseDB = "analytics"
		}
		if !schema.ValidIdent(c.ClickHouseDB) {
			e.fail("CLICKHOUSE_DSN: database %q must be letters, digits and underscores", c.ClickHouseDB)
		}
	}
	c.ClickHouseCluster = e.str("CLICKHOUSE_CLUSTER", "")
	if c.ClickHouseCluster != "" && !schema.ValidIdent(c.ClickHouseCluster) {
		e.fail("CLICKHOUSE_CLUSTER=%q: want the name of a cluster in the servers' remote_servers (letters, digits, underscores)", c.ClickHouseCluster)
	}
	c.PostgresURL = e.str("POSTGRES_URL", defaultPostgresURL)
	if u, err := url.Parse(c.PostgresURL); err != nil || (u.Scheme != "postgres" && u.Scheme != "postgresql") {
		e.fail("POSTGRES_URL: want postgres://user:password@host:5432/db")
	}
	c.RedisURL = e.str("REDIS_URL", defaultRedisURL)
	c.RedisCluster = e.boolean("REDIS_CLUSTER", false)
	if u, err := url.Parse(c.RedisURL); err != nil || (u.Scheme != "redis" && u.Scheme != "rediss") {
		e.fail("REDIS_URL: want redis://host:6379/0 (with REDIS_CLUSTER=true: redis://node1:6379?addr=node2:6379&addr=node3:6379)")
	} else if c.RedisCluster {
		if _, err := redis.ParseClusterURL(c.RedisURL); err != nil {
			e.fail("REDIS_URL with REDIS_CLUSTER=true: %v (want redis://node1:6379?addr=node2:6379&addr=node3:6379)", err)
		}
	}
	c.RetentionDays = e.integer("RETENTION_DAYS", ingest.DefaultLimits().RetentionDays, 1, 3650)
}

// ingest reads the ingest API's limits and event map, and the writer's spool and batching; both keep
// the raw tables' retention.
func (e *env) ingest(retentionDays int) (ingest.Config, ingest.WriterConfig) {
	c := ingest.DefaultConfig()
	c.Enabled = e.boolean("ANALYTICS_ENABLED", c.Enabled)
	lim := &c.Limits
	lim.RetentionDays = retentionDays
	lim.MaxBodyBytes = int64(e.integer("INGEST_MAX_BODY_BYTES", int(lim.MaxBodyBytes), 1024, 1<<30))
	lim.MaxEvents = e.integer("INGEST_MAX_EVENTS", lim.MaxEvents, 1, 1_000_000)
	lim.MaxPropsBytes = e.integer("INGEST_MAX_PROPS_BYTES", lim.MaxPropsBytes, 2, 1<<20)
	if v := e.str("QUOTA_EVENT_MAP", ""); v != "" {
		var m map[string]string
		if err := json.Unmarshal([]byte(v), &m); err != nil {
			e.fail(`QUOTA_EVENT_MAP: want a JSON object of event to metric, e.g. {"apikey.request":"api_requests_daily"}: %v`, err)
		}
		for ev, metric := range m {
			if !ingest.ValidEventName(ev) || !ingest.ValidMetric(metric) {
				e.fail("QUOTA_EVENT_MAP: %q → %q: want an event name (with a '.') and a metric name (%s)", ev, metric, ingest.MetricRule)
			}
		}
		c.EventMetrics = m
	}

	w := ingest.DefaultWriterConfig()
	w.Dir = e.str("ANALYTICS_SPOOL_DIR", w.Dir)
	durability, err := ingest.ParseDurability(e.str("INGEST_DURABILITY", string(w.Durability)))
	if err != nil {
		e.fail("INGEST_DURABILITY: %v", err)
	}
	w.Durability = durability
	w.BatchRows = e.integer("INGEST_BATCH_ROWS", w.BatchRows, 1, 10_000_000)
	w.FlushInterval = e.duration("INGEST_FLUSH_INTERVAL", w.FlushInterval)
	if w.FlushInterval < 10*time.Millisecond {
		e.fail("INGEST_FLUSH_INTERVAL=%s: want at least 10ms", w.FlushInterval)
	}
	w.Flushers = e.integer("INGEST_FLUSHERS", w.Flushers, 1, 64)
	if w.GroupWait = e.duration("INGEST_GROUP_WAIT", w.GroupWait); w.GroupWait > 100*time.Millisecond || w.GroupWait < 0 {
		e.fail("INGEST_GROUP_WAIT=%s: want 0 (off) to 100ms", w.GroupWait)
	} else if w.GroupWait == 0 {
		w.GroupWait = -1 // off (a zero WriterConfig field means the default)
	}
	w.MaxBufferedRows = e.integer("INGEST_MAX_BUFFERED_ROWS", w.MaxBufferedRows, 1, 1_000_000_000)
	w.MaxSpoolBytes = int64(e.integer("INGEST_MAX_SPOOL_MB", int(w.MaxSpoolBytes>>20), 1, 1<<30)) << 20
	if w.MaxSpoolBytes < lim.MaxBodyBytes {
		// A request of the largest body allowed would never fit: 503 to every retry, forever.
		e.fail("INGEST_MAX_SPOOL_MB=%d is below INGEST_MAX_BODY_BYTES (%d bytes): the largest request allowed could never be "+
			"stored; set it to at least %d", w.MaxSpoolBytes>>20, lim.MaxBodyBytes, (lim.MaxBodyBytes+1<<20-1)>>20)
	}
	w.RetentionDays = retentionDays
	return c, w
}

// dedup reads how long event ids and Idempotency-Keys are remembered; 0 turns deduplication off.
func (e *env) dedup() time.Duration {
	window := e.duration("INGEST_DEDUP_WINDOW", 24*time.Hour)
	if window != 0 && (window < time.Minute || window > 30*24*time.Hour) {
		e.fail("INGEST_DEDUP_WINDOW=%s: want 0 (off) or a duration from 1m to 720h", window)
	}
	return window
}

// quota reads quotas, their alerts and the default limits. Quotas count the events ingest maps to
// metrics, and remember a consume's Idempotency-Key for the dedup window.
func (e *env) quota(eventMetrics map[string]string, labelCap int, dedupWindow time.Duration) (quota.Config, map[string]float64) {
	c := quota.DefaultConfig()
	c.Enabled = e.boolean("QUOTAS_ENABLED", c.Enabled)
	c.FailOpen = e.boolean("QUOTA_FAIL_OPEN", c.FailOpen)
	c.EventMetrics, c.LabelCap, c.IdempotencyWindow = eventMetrics, labelCap, dedupWindow
	c.ReconcileEvery = e.duration("QUOTA_RECONCILE_INTERVAL", c.ReconcileEvery)
	if every := c.ReconcileEvery; every < time.Second || every > 10*time.Minute {
		e.fail("QUOTA_RECONCILE_INTERVAL=%s: want 1s to 10m", every)
	}
	if v := e.str("QUOTA_ALERT_THRESHOLDS", ""); v != "" {
		c.Thresholds = nil
		for _, part := range strings.Split(v, ",") {
			n, err := strconv.Atoi(strings.TrimSpace(part))
			if err != nil || n < 1 || n > 1000 {
				e.fail("QUOTA_ALERT_THRESHOLDS=%q: want percentages such as 80,100", v)
				break
			}
			c.Thresholds = append(c.Thresholds, n)
		}
	}
	c.Webhook.URL = e.str("QUOTA_ALERT_WEBHOOK_URL", c.Webhook.URL)
	if _, ok := httpURL(c.Webhook.URL); c.Webhook.URL != "" && !ok {
		e.fail("QUOTA_ALERT_WEBHOOK_URL=%q: want an http(s) URL", c.Webhook.URL)
	}
	c.Webhook.Secret = e.getenv("QUOTA_ALERT_WEBHOOK_SECRET")
	c.Webhook.Timeout = e.duration("QUOTA_ALERT_WEBHOOK_TIMEOUT", c.Webhook.Timeout)
	if d := c.Webhook.Timeout; d < time.Second || d > 30*time.Second {
		e.fail("QUOTA_ALERT_WEBHOOK_TIMEOUT=%s: want 1s to 30s (a delivery's lease is twice it and 30 s)", d)
	}

	limits := map[string]float64{}
	if v := e.str("QUOTA_DEFAULTS", ""); v != "" {
		if err := json.Unmarshal([]byte(v), &limits); err != nil {
			e.fail(`QUOTA_DEFAULTS: want a JSON object of metric to limit, e.g. {"api_requests_daily":50000}: %v`, err)
		}
		for m, lim := range limits {
			if lim < 0 || lim > maxLimit || lim != math.Trunc(lim) {
				// 1e19 overflowed the consume's int64 (every consume refused); 0.5 was floored to 0.
				e.fail("QUOTA_DEFAULTS: limit %v for %q: want a whole number from 0 to %d", lim, m, uint64(maxLimit))
			}
			if !ingest.ValidMetric(m) {
				e.fail("QUOTA_DEFAULTS: %q: %s", m, ingest.MetricRule)
			}
		}
	}
	return c, limits
}

// rateLimit reads the per-credential token bucket.
func (e *env) rateLimit() ratelimit.Config {
	c := ratelimit.DefaultConfig()
	c.Rate = float64(e.integer("RATE_LIMIT_RPS", int(c.Rate), 0, 1_000_000))
	c.Burst = e.integer("RATE_LIMIT_BURST", c.Burst, 1, 10_000_000)
	return c
}

// refusals reads the per-address bound on refused credentials.
func (e *env) refusals() auth.RefusalLimit {
	c := auth.DefaultRefusalLimit()
	c.PerMinute = e.integer("AUTH_REFUSALS_PER_MINUTE", c.PerMinute, 0, 1_000_000)
	c.Burst = e.integer("AUTH_REFUSALS_BURST", c.Burst, 1, 1_000_000)
	return c
}

// rollup reads the daily rollup's schedule.
func (e *env) rollup() rollup.ScheduleConfig {
	c := rollup.DefaultScheduleConfig()
	c.At = e.str("ROLLUP_AT", c.At)
	if _, err := rollup.ParseClock(c.At); err != nil {
		e.fail("ROLLUP_AT: %v", err)
	}
	c.LookbackDays = e.integer("ROLLUP_LOOKBACK_DAYS", c.LookbackDays, 1, 90)
	c.DriftEvery = e.durationOrOff("ROLLUP_DRIFT_INTERVAL", c.DriftEvery)
	if d := c.DriftEvery; d == 0 || d > 0 && (d < 10*time.Second || d > 24*time.Hour) {
		// 0 read as the default (5m) before: a setting that silently did something else.
		e.fail("ROLLUP_DRIFT_INTERVAL=%s: want 10s to 24h, or a negative value to leave late events to the nightly run", d)
	}
	return c
}

// jwt reads which host-app tokens are accepted.
func (e *env) jwt() auth.JWTConfig {
	c := auth.DefaultJWTConfig()
	if s := e.getenv("AUTH_JWT_SECRET"); s != "" {
		c.Secret = []byte(s)
	}
	if n := len(c.Secret); n > 0 && n < 32 {
		e.fail("AUTH_JWT_SECRET is %d bytes; HS256 needs at least 32 random bytes", n)
	}
	c.JWKSURL = e.str("AUTH_JWKS_URL", c.JWKSURL)
	if _, ok := httpURL(c.JWKSURL); c.JWKSURL != "" && !ok {
		e.fail("AUTH_JWKS_URL=%q: want an http(s) URL of the host app's JWKS", c.JWKSURL)
	}
	c.Issuer = e.str("AUTH_JWT_ISSUER", c.Issuer)
	c.Audience = e.str("AUTH_JWT_AUDIENCE", c.Audience)
	c.Leeway = e.duration("AUTH_JWT_LEEWAY", c.Leeway)
	if c.Leeway > 5*time.Minute {
		// Leeway extends every token's life: an hour of it keeps a revoked session working an hour.
		e.fail("AUTH_JWT_LEEWAY=%s: want 0 to 5m (clock skew between the host app and analyticsd, not a token lifetime)", c.Leeway)
	}
	return c
}

// query reads the read API's export page size and ClickHouse time limit.
func (e *env) query(labelCap int) (query.Config, time.Duration) {
	c := query.DefaultConfig()
	c.MaxExportRows = e.integer("ANALYTICS_MAX_EXPORT_ROWS", c.MaxExportRows, 1, 100_000_000)
	c.LabelCap = labelCap
	timeout := e.duration("ANALYTICS_QUERY_TIMEOUT", query.DefaultTimeout)
	if timeout < time.Second {
		e.fail("ANALYTICS_QUERY_TIMEOUT=%s: want at least 1s", timeout)
	}
	return c, timeout
}

// env reads settings through getenv and collects every problem, so a bad deploy learns them all at
// once. A variable unset or blank keeps the default it is read with; a bad value keeps it too and
// adds a problem naming the variable and what it wants.
type env struct {
	getenv func(string) string
	errs   []error
}

func (e *env) fail(format string, args ...any) {
	e.errs = append(e.errs, fmt.Errorf(format, args...))
}

func (e *env) str(name, def string) string {
	if v := strings.TrimSpace(e.getenv(name)); v != "" {
		return v
	}
	return def
}

func (e *env) integer(name string, def, min, max int) int {
	v := e.str(name, "")
	if v == "" {
		return def
	}
	n, err := strconv.Atoi(v)
	if err != nil || n < min || n > max {
		e.fail("%s=%q: want a whole number from %d to %d", name, v, min, max)
		return def
	}
	return n
}

func (e *env) boolean(name string, def bool) bool {
	v := e.str(name, "")
	if v == "" {
		return def
	}
	b, err := strconv.ParseBool(v)
	if err != nil {
		e.fail("%s=%q: want true or false", name, v)
		return def
	}
	return b
}

func (e *env) duration(name string, def time.Duration) time.Duration {
	return e.parseDuration(name, def, false)
}

// durationOrOff is duration for a setting where a negative value turns something off.
func (e *env) durationOrOff(name string, def time.Duration) time.Duration {
	return e.parseDuration(name, def, true)
}

func (e *env) parseDuration(name string, def time.Duration, negative bool) time.Duration {
	v := e.str(name, "")
	if v == "" {
		return def
	}
	d, err := time.ParseDuration(v)
	if err != nil || d < 0 && !negative {
		e.fail("%s=%q: want a duration such as 500ms, 10s or 1m", name, v)
		return def
	}
	return d
}

// httpURL parses s and reports whether it is an absolute http or https URL with a host.
func httpURL(s string) (*url.URL, bool) {
	u, err := url.Parse(s)
	return u, err == nil && (u.Scheme == "https" || u.Scheme == "http") && u.Host != ""
}
