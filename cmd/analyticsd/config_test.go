package main

import (
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/analyticsd/analyticsd/api"
	"github.com/analyticsd/analyticsd/auth"
	"github.com/analyticsd/analyticsd/ingest"
	"github.com/analyticsd/analyticsd/internal/labels"
	"github.com/analyticsd/analyticsd/query"
	"github.com/analyticsd/analyticsd/quota"
	"github.com/analyticsd/analyticsd/ratelimit"
	"github.com/analyticsd/analyticsd/rollup"
)

func envOf(m map[string]string) func(string) string { return func(k string) string { return m[k] } }

// With nothing set: the documented values, and each section of the configuration is its package's
// defaults plus what the sections share (retention, event map, label cap, dedup window). Each
// package declares its defaults once; one written again in config.go, and then changed in one place
// only, fails here.
func TestConfigDefaults(t *testing.T) {
	c, err := loadConfig(envOf(nil))
	if err != nil {
		t.Fatal(err)
	}
	check := func(name string, got, want any) {
		t.Helper()
		if !reflect.DeepEqual(got, want) {
			t.Errorf("%s: got %+v, want %+v", name, got, want)
		}
	}
	check("Addr", c.Addr, ":8080")
	check("ClickHouseDB", c.ClickHouseDB, "analytics")
	check("RetentionDays", c.RetentionDays, 90)
	check("Enabled", c.Ingest.Enabled, true)
	check("MaxExportRows", c.Query.MaxExportRows, 50000)
	check("QuotasEnabled", c.Quota.Enabled, true)
	check("ShutdownTimeout", c.ShutdownTimeout, 30*time.Second)

	check("RetentionDays", c.RetentionDays, ingest.DefaultLimits().RetentionDays)
	check("LabelCap", c.LabelCap, labels.DefaultCap)

	in := ingest.DefaultConfig()
	in.Limits.RetentionDays = c.RetentionDays
	check("Ingest", c.Ingest, in)
	w := ingest.DefaultWriterConfig()
	w.RetentionDays = c.RetentionDays
	check("Writer", c.Writer, w)

	q := quota.DefaultConfig()
	q.EventMetrics, q.LabelCap, q.IdempotencyWindow = ingest.DefaultEventMetrics(), c.LabelCap, c.DedupWindow
	check("Quota", c.Quota, q)
	check("QuotaDefaults", c.QuotaDefaults, map[string]float64{})

	check("RateLimit", c.RateLimit, ratelimit.DefaultConfig())
	check("Rollup", c.Rollup, rollup.DefaultScheduleConfig())
	check("JWT", c.JWT, auth.DefaultJWTConfig())
	check("Refusals", c.Refusals, auth.DefaultRefusalLimit())
	check("TrustedProxies", c.TrustedProxies, api.Proxies(nil))
	qc := query.DefaultConfig()
	qc.LabelCap = c.LabelCap
	check("Query", c.Query, qc)
	check("QueryTimeout", c.QueryTimeout, query.DefaultTimeout)
}

// The README's configuration table is what operators read: setting a variable to the default the
// table gives it must change nothing.
func TestConfigDefaultsMatchREADME(t *testing.T) {
	raw, err := os.ReadFile(filepath.Join("..", "..", "README.md"))
	if err != nil {
		t.Fatal(err)
	}
	section := regexp.MustCompile(`(?s)\n## Configuration\n(.*?)(?:\n## |$)`).FindSubmatch(raw)
	if section == nil {
		t.Fatal(`README.md has no "## Configuration" section`)
	}
	unset, err := loadConfig(envOf(nil))
	if err != nil {
		t.Fatal(err)
	}
	row, code := regexp.MustCompile(`(?m)^\| (.*?) \| (.*?) \|`), regexp.MustCompile("`([^`]+)`")
	checked := 0
	for _, cells := range row.FindAllSubmatch(section[1], -1) {
		// "`RATE_LIMIT_RPS` / `RATE_LIMIT_BURST` | `1000` / `2000`": the n-th default is the n-th variable's.
		vars, defs := code.FindAllSubmatch(cells[1], -1), code.FindAllSubmatch(cells[2], -1)
		if len(vars) == 0 || len(defs) != len(vars) {
			continue // no default ("—"), or one in words
		}
		for i, v := range vars {
			name, def := string(v[1]), string(defs[i][1])
			c, err := loadConfig(envOf(map[string]string{name: def}))
			switch {
			case err != nil:
				t.Errorf("%s=%s (the README's default): %v", name, def, err)
			default:
				got, want := reflect.ValueOf(c), reflect.ValueOf(unset)
				for f := range got.NumField() {
					if g, w := got.Field(f).Interface(), want.Field(f).Interface(); !reflect.DeepEqual(g, w) {
						t.Errorf("%s=%s (the README's default): %s is %+v, but %+v when unset", name, def, got.Type().Field(f).Name, g, w)
					}
				}
			}
			checked++
		}
	}
	if checked < 30 {
		t.Fatalf("checked %d defaults of the README's table; the parser is broken", checked)
	}
}

func TestConfigReadsEnv(t *testing.T) {
	c, err := loadConfig(envOf(map[string]string{
		"CLICKHOUSE_DSN":            "clickhouse://u:p@ch:9000/stats",
		"RETENTION_DAYS":            "30",
		"ANALYTICS_ENABLED":         "false",
		"ANALYTICS_MAX_EXPORT_ROWS": "1000",
		"QUOTA_DEFAULTS":            `{"api_requests_daily":50000,"builds_daily":100}`,
		"AUTH_REFUSALS_PER_MINUTE":  "6",
		"AUTH_REFUSALS_BURST":       "4",
		"ANALYTICS_TRUSTED_PROXIES": "10.0.0.0/8, 192.168.0.1",
	}))
	if err != nil {
		t.Fatal(err)
	}
	if c.ClickHouseDB != "stats" || c.RetentionDays != 30 || c.Ingest.Enabled || c.Query.MaxExportRows != 1000 ||
		c.QuotaDefaults["api_requests_daily"] != 50000 || c.QuotaDefaults["builds_daily"] != 100 ||
		c.Refusals.PerMinute != 6 || c.Refusals.Burst != 4 || len(c.TrustedProxies) != 2 {
		t.Errorf("got %+v", c)
	}
}

// The README says a negative ROLLUP_DRIFT_INTERVAL leaves billed dates to the nightly run; the
// configuration refused it (durations could not be negative), so the drift check could not be
// turned off at all (0 means the default).
func TestDriftIntervalCanBeTurnedOff(t *testing.T) {
	c, err := loadConfig(envOf(map[string]string{"ROLLUP_DRIFT_INTERVAL": "-1s"}))
	if err != nil || c.Rollup.DriftEvery >= 0 {
		t.Errorf("ROLLUP_DRIFT_INTERVAL=-1s: %v, drift every %v; want accepted and negative", err, c.Rollup.DriftEvery)
	}
	for _, v := range []string{"5s", "25h"} {
		if _, err := loadConfig(envOf(map[string]string{"ROLLUP_DRIFT_INTERVAL": v})); err == nil {
			t.Errorf("ROLLUP_DRIFT_INTERVAL=%s accepted, want refused (10s to 24h)", v)
		}
	}
}

// On a cluster the spool's shipper must reach every server (an earlier insert it waits for may run on
// any), and so must the layout's ALTERs; on one server neither has anything to reach. The first
// wiring set the shipper's field before the ingest section replaced the whole WriterConfig.
func TestConfigOnAClusterReachesEveryServer(t *testing.T) {
	c, err := loadConfig(envOf(map[string]string{"CLICKHOUSE_CLUSTER": "c1", "CLICKHOUSE_DSN": "clickhouse://u:p@ch1:9000,ch2:9000/stats"}))
	if err != nil {
		t.Fatal(err)
	}
	if c.Writer.Shards == nil || c.Layout().Shards == nil {
		t.Errorf("on a cluster: writer's Shards %v, layout's %v; want both set", c.Writer.Shards, c.Layout().Shards)
	}
	if got := fmt.Sprintf("%+v", c.Layout()); strings.Contains(got, ":p@") || strings.Contains(got, "Password") {
		t.Errorf("a printed layout shows the DSN's credentials: %s", got)
	}
	if c, err = loadConfig(envOf(nil)); err != nil {
		t.Fatal(err)
	}
	if c.Writer.Shards != nil || c.Layout().Shards != nil {
		t.Errorf("on one server: writer's Shards %v, layout's %v; want neither", c.Writer.Shards, c.Layout().Shards)
	}
}

// A bad deploy must learn every problem at once, not one per restart.
func TestConfigListsEveryProblem(t *testing.T) {
	_, err := loadConfig(envOf(map[string]string{
		"ANALYTICS_ADDR":              "8080",
		"RETENTION_DAYS":              "0",
		"ANALYTICS_ENABLED":           "maybe",
		"ANALYTICS_MAX_EXPORT_ROWS":   "-5",
		"QUOTA_DEFAULTS":              `{"api_requests_daily":`,
		"POSTGRES_URL":                "mysql://x",
		"REDIS_URL":                   "http://x",
		"CLICKHOUSE_DSN":              "clickhouse://h:9000/bad-name",
		"LOG_LEVEL":                   "loud",
		"ANALYTICS_SHUTDOWN_TIMEOUT":  "soon",
		"QUOTA_ALERT_WEBHOOK_TIMEOUT": "2m",
		"ANALYTICS_TRUSTED_PROXIES":   "lb.internal",
	}))
	if err == nil {
		t.Fatal("bad config accepted")
	}
	for _, name := range []string{"ANALYTICS_ADDR", "RETENTION_DAYS", "ANALYTICS_ENABLED", "ANALYTICS_MAX_EXPORT_ROWS",
		"QUOTA_DEFAULTS", "POSTGRES_URL", "REDIS_URL", "CLICKHOUSE_DSN", "LOG_LEVEL", "ANALYTICS_SHUTDOWN_TIMEOUT", "QUOTA_ALERT_WEBHOOK_TIMEOUT",
		"ANALYTICS_TRUSTED_PROXIES"} {
		if !strings.Contains(err.Error(), name) {
			t.Errorf("error does not mention %s:\n%v", name, err)
		}
	}
}

// Quota metrics follow the usage-metric rule: a dotted name is an event's, and a quota or an event
// mapping under one would mix the two namespaces.
func TestQuotaMetricsMustNotBeEventNames(t *testing.T) {
	for name, v := range map[string]string{
		"QUOTA_DEFAULTS":  `{"auth.user.login":100}`,
		"QUOTA_EVENT_MAP": `{"apikey.request":"api.requests"}`,
	} {
		_, err := loadConfig(envOf(map[string]string{name: v}))
		if err == nil || !strings.Contains(err.Error(), name) || !strings.Contains(err.Error(), "no '.'") {
			t.Errorf("%s=%s: got %v, want it refused naming the rule", name, v, err)
		}
	}
}

// Values that parsed but did something else, or broke the server, are refused naming the variable.
// Before (each accepted): QUOTA_DEFAULTS 1e19 overflowed the consume's limit (every consume 429) and
// 0.5 was floored to 0; a spool smaller than one request of the largest body allowed answered 503 to
// it forever; a shutdown timeout of 0 cut the final flush off; a drift interval of 0 silently meant
// 5m; any JWT leeway was taken, an hour of it keeping revoked sessions alive. (Fails on the code
// before this change.)
func TestConfigRefusesValuesThatMisbehave(t *testing.T) {
	for _, tc := range []struct{ name, value, extra, extraValue string }{
		{"QUOTA_DEFAULTS", `{"api_requests_daily":1e19}`, "", ""},
		{"QUOTA_DEFAULTS", `{"api_requests_daily":0.5}`, "", ""},
		{"INGEST_MAX_SPOOL_MB", "1", "INGEST_MAX_BODY_BYTES", "4194304"},
		{"ANALYTICS_SHUTDOWN_TIMEOUT", "0s", "", ""},
		{"ROLLUP_DRIFT_INTERVAL", "0", "", ""},
		{"AUTH_JWT_LEEWAY", "1h", "", ""},
	} {
		env := map[string]string{tc.name: tc.value}
		if tc.extra != "" {
			env[tc.extra] = tc.extraValue
		}
		_, err := loadConfig(envOf(env))
		if err == nil || !strings.Contains(err.Error(), tc.name) {
			t.Errorf("%s=%s: got %v, want a refusal naming it", tc.name, tc.value, err)
		}
	}
	// The edges that are fine stay fine.
	if _, err := loadConfig(envOf(map[string]string{"QUOTA_DEFAULTS": `{"api_requests_daily":1000000000000000}`,
		"ANALYTICS_SHUTDOWN_TIMEOUT": "1s", "AUTH_JWT_LEEWAY": "5m", "ROLLUP_DRIFT_INTERVAL": "-1s",
		"INGEST_MAX_SPOOL_MB": "4", "INGEST_MAX_BODY_BYTES": "4194304"})); err != nil {
		t.Errorf("edge values refused: %v", err)
	}
}
