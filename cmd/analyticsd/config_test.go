package main

import (
	"strings"
	"testing"
	"time"
)

func envOf(m map[string]string) func(string) string { return func(k string) string { return m[k] } }

func TestConfigDefaults(t *testing.T) {
	c, err := loadConfig(envOf(nil))
	if err != nil {
		t.Fatal(err)
	}
	check := func(name string, got, want any) {
		t.Helper()
		if got != want {
			t.Errorf("%s: got %v, want %v", name, got, want)
		}
	}
	check("Addr", c.Addr, ":8080")
	check("ClickHouseDB", c.ClickHouseDB, "analytics")
	check("RetentionDays", c.RetentionDays, 90)
	check("Enabled", c.Enabled, true)
	check("MaxExportRows", c.MaxExportRows, 50000)
	check("QuotasEnabled", c.QuotasEnabled, true)
	check("ShutdownTimeout", c.ShutdownTimeout, 30*time.Second)
}

func TestConfigReadsEnv(t *testing.T) {
	c, err := loadConfig(envOf(map[string]string{
		"CLICKHOUSE_DSN":            "clickhouse://u:p@ch:9000/stats",
		"RETENTION_DAYS":            "30",
		"ANALYTICS_ENABLED":         "false",
		"ANALYTICS_MAX_EXPORT_ROWS": "1000",
		"QUOTA_DEFAULTS":            `{"api_requests_daily":50000,"builds_daily":100}`,
	}))
	if err != nil {
		t.Fatal(err)
	}
	if c.ClickHouseDB != "stats" || c.RetentionDays != 30 || c.Enabled || c.MaxExportRows != 1000 ||
		c.QuotaDefaults["api_requests_daily"] != 50000 || c.QuotaDefaults["builds_daily"] != 100 {
		t.Errorf("got %+v", c)
	}
}

// A bad deploy must learn every problem at once, not one per restart.
func TestConfigListsEveryProblem(t *testing.T) {
	_, err := loadConfig(envOf(map[string]string{
		"ANALYTICS_ADDR":             "8080",
		"RETENTION_DAYS":             "0",
		"ANALYTICS_ENABLED":          "maybe",
		"ANALYTICS_MAX_EXPORT_ROWS":  "-5",
		"QUOTA_DEFAULTS":             `{"api_requests_daily":`,
		"POSTGRES_URL":               "mysql://x",
		"REDIS_URL":                  "http://x",
		"CLICKHOUSE_DSN":             "clickhouse://h:9000/bad-name",
		"LOG_LEVEL":                  "loud",
		"ANALYTICS_SHUTDOWN_TIMEOUT": "soon",
	}))
	if err == nil {
		t.Fatal("bad config accepted")
	}
	for _, name := range []string{"ANALYTICS_ADDR", "RETENTION_DAYS", "ANALYTICS_ENABLED", "ANALYTICS_MAX_EXPORT_ROWS",
		"QUOTA_DEFAULTS", "POSTGRES_URL", "REDIS_URL", "CLICKHOUSE_DSN", "LOG_LEVEL", "ANALYTICS_SHUTDOWN_TIMEOUT"} {
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
