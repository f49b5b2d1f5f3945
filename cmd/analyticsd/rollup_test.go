package main

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/analyticsd/analyticsd/internal/testenv"
	"github.com/analyticsd/analyticsd/internal/testenv/fixture"
	"github.com/analyticsd/analyticsd/rollup"
)

// `analyticsd rollup --from --to` reconciles each date for every tenant, one line per date.
func TestRollupCommand(t *testing.T) {
	e := testenv.Migrated(t)
	ctx := context.Background()
	acme := fixture.Tenant(t, e.PG, "acme")
	today := rollup.Day(time.Now())
	var rows [][]any
	for n := 1; n <= 3; n++ { // n events n days ago
		ts := today.AddDate(0, 0, -n).Add(time.Hour)
		for range n {
			rows = append(rows, []any{acme.ID, ts, uuid.New(), ts, "auth.user.login", "app", "u1", "{}", "", ""})
		}
	}
	e.Insert(t, "events", "tenant_id, ts, id, received_at, event, source, user_id, props, ip, request_id", rows...)
	getenv := stackEnv(t, e, nil)
	day := func(n int) string { return today.AddDate(0, 0, -n).Format("2006-01-02") }

	r := runCmd(t, getenv, "rollup", "--from", day(3), "--to", day(1))
	if r.code != 0 {
		t.Fatalf("rollup: exit %d: %s", r.code, r.stderr)
	}
	lines := strings.Split(strings.TrimSpace(r.stdout), "\n")
	if len(lines) != 3 {
		t.Fatalf("rollup printed %d lines, want one per date:\n%s", len(lines), r.stdout)
	}
	for i, line := range lines {
		if want := day(3-i) + " tenants=1 metrics=1 rows=1 changed=1 repaired=0"; !strings.HasPrefix(line, want) {
			t.Errorf("line %d: got %q, want it to start with %q", i, line, want)
		}
	}
	for n := 1; n <= 3; n++ {
		var count int64
		if err := e.PG.QueryRow(ctx, "SELECT count FROM analytics_daily_usage WHERE tenant_id = $1 AND date = $2::date AND metric = 'auth.user.login'",
			acme.ID, day(n)).Scan(&count); err != nil || count != int64(n) {
			t.Errorf("%s: got %d (%v), want %d", day(n), count, err, n)
		}
	}
	var runs int
	if err := e.PG.QueryRow(ctx, "SELECT count(*) FROM rollup_runs WHERE trigger = 'cli' AND status = 'ok' AND tenant_id IS NULL").Scan(&runs); err != nil || runs != 3 {
		t.Errorf("rollup_runs: %d cli runs (%v), want 3", runs, err)
	}

	if r := runCmd(t, getenv, "rollup", "--date", day(2)); r.code != 0 || !strings.HasPrefix(r.lastLine(), day(2)+" tenants=1 metrics=1 rows=1 changed=0") {
		t.Errorf("repeat of one date: exit %d, %q; want no change", r.code, r.stdout)
	}
	for _, args := range [][]string{
		{},
		{"--date", day(1), "--from", day(2)},
		{"--from", day(2)},
		{"--from", day(1), "--to", day(2)},
		{"--date", "yesterday"},
		{"--date", today.AddDate(0, 0, 1).Format("2006-01-02")},
		{"--date", day(0)},
		{"--from", today.AddDate(0, 0, -401).Format("2006-01-02"), "--to", day(1)},
	} {
		if r := runCmd(t, getenv, append([]string{"rollup"}, args...)...); r.code != 2 {
			t.Errorf("rollup %v: exit %d, stderr %q; want 2", args, r.code, r.stderr)
		}
	}
}
