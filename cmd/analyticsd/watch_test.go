package main

import (
	"bytes"
	"context"
	"log/slog"
	"strings"
	"testing"

	"github.com/analyticsd/analyticsd/internal/testenv"
	"github.com/analyticsd/analyticsd/internal/testenv/fixture"
)

// A watch keeps the latest answer's warning, logs it once when it appears (not at every check,
// though its text changes) and once when it clears, and keeps the last answer when the check
// cannot tell.
func TestWatchKeepsTheLatestWarningAndLogsChanges(t *testing.T) {
	answers := []struct {
		msg string
		ok  bool
	}{{"", true}, {"off by 3s", true}, {"off by 4s", true}, {"", false}, {"", true}, {"", true}}
	var logs bytes.Buffer
	i := 0
	w := &watch{name: "the clock", log: slog.New(slog.NewTextHandler(&logs, nil)),
		check: func(context.Context) (string, bool) { a := answers[i]; i++; return a.msg, a.ok }}
	var got []string
	for range answers {
		w.once(context.Background())
		got = append(got, w.Warning())
	}
	if want := []string{"", "off by 3s", "off by 4s", "off by 4s", "", ""}; strings.Join(got, "|") != strings.Join(want, "|") {
		t.Errorf("warnings %q, want %q", got, want)
	}
	lines := strings.Split(strings.TrimSpace(logs.String()), "\n")
	if len(lines) != 2 || !strings.Contains(lines[0], "level=WARN") || !strings.Contains(lines[0], "off by 3s") ||
		!strings.Contains(lines[1], "the clock: no longer a concern") {
		t.Errorf("log:\n%s\nwant one warning when it appeared and one line when it cleared", logs.String())
	}
}

// serve started on a Redis that evicts keys says so in /readiness, as a warning: dedup claims could
// be evicted and duplicates let through. (Before, it was one log line at start-up.)
func TestServeOnAnEvictingRedisWarnsInReadiness(t *testing.T) {
	e := testenv.Migrated(t)
	_, addr := testenv.PrivateRedis(t, "--maxmemory", "64mb", "--maxmemory-policy", "volatile-lru")
	getenv := stackEnv(t, e, map[string]string{"ANALYTICS_ADDR": freeAddr(t), "ANALYTICS_METRICS_ADDR": freeAddr(t),
		"ANALYTICS_SPOOL_DIR": t.TempDir(), "REDIS_URL": "redis://" + addr, "REDIS_CLUSTER": ""})
	p := startServer(t, getenv, serveVars)
	code, warnings := fixture.Readiness(t, p.ops)
	if code != 200 || len(warnings) != 1 || !strings.Contains(warnings[0], "maxmemory-policy is volatile-lru") {
		t.Errorf("readiness %d, warnings %q; want 200 and the eviction policy's warning", code, warnings)
	}
}
