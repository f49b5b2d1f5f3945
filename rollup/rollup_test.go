package rollup_test

import (
	"encoding/json"
	"fmt"
	"maps"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/analyticsd/analyticsd/retention"
	"github.com/analyticsd/analyticsd/rollup"
)

// After ingest, Postgres equals the raw counts per (tenant, date, metric), increments included; tenants
// Postgres does not know are skipped; stale rows go; a second run changes no row.
func TestRunDateMatchesRawAndIsIdempotent(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	ctx := ctxT(t)
	a, b, ghost := f.tenant(t, "acme"), f.tenant(t, "globex"), uuid.New()
	d1, d2 := f.daysAgo(1), f.daysAgo(2)

	var rows []ev
	rows = append(rows, repeat(5, a, d1.Add(9*time.Hour), "auth.user.login")...)
	rows = append(rows, repeat(3, a, d1.Add(15*time.Hour), "builder.generate.completed")...)
	rows = append(rows, ev{a, d1, "auth.user.login"}, ev{a, d1.Add(day - time.Second), "auth.user.login"}) // both ends of the day
	rows = append(rows, ev{a, d1.Add(day), "auth.user.login"})                                             // today: not d1
	rows = append(rows, repeat(2, b, d1.Add(12*time.Hour), "auth.user.login")...)
	rows = append(rows, repeat(1, ghost, d1.Add(12*time.Hour), "auth.user.login")...)
	rows = append(rows, repeat(4, a, d2.Add(8*time.Hour), "email.sent")...)
	rows = append(rows, repeat(1, b, d2.Add(8*time.Hour), "webhook.delivered")...)
	f.events(t, rows...)
	f.increments(t,
		inc{a, d1.Add(time.Hour), "api_requests_daily", 7}, inc{a, d1.Add(2 * time.Hour), "api_requests_daily", 3},
		inc{b, d1.Add(time.Hour), "emails_daily", 4}, inc{b, d2.Add(time.Hour), "webhook.delivered", 10})
	// A row a previous rollup wrote for a metric ClickHouse no longer has.
	if _, err := f.env.PG.Exec(ctx, "INSERT INTO analytics_daily_usage (tenant_id, date, metric, count) VALUES ($1, $2::date, 'stale.metric', 99)",
		a, d1.Format("2006-01-02")); err != nil {
		t.Fatal(err)
	}

	want := map[time.Time]counts{
		d1: {k(a, "auth.user.login"): 7, k(a, "builder.generate.completed"): 3, k(a, "api_requests_daily"): 10,
			k(b, "auth.user.login"): 2, k(b, "emails_daily"): 4},
		d2: {k(a, "email.sent"): 4, k(b, "webhook.delivered"): 11},
	}
	for _, d := range []time.Time{d1, d2} {
		if got := without(f.raw(t, d), ghost); got.String() != want[d].String() {
			t.Fatalf("test data for %s: raw %v, want %v", d.Format("2006-01-02"), got, want[d])
		}
	}

	reg := prometheus.NewRegistry()
	r := f.reconciler(reg, nil)
	res, err := r.RunDate(ctx, d1, rollup.AllTenants(), "test")
	if err != nil {
		t.Fatal(err)
	}
	wantRes := rollup.Result{Date: d1.Format("2006-01-02"), Tenants: 2, Metrics: 4, Rows: 5, Changed: 6, RawChecked: true, SkippedTenants: 1}
	res.DurationMS = 0
	if res != wantRes {
		t.Errorf("d1 result: got %+v, want %+v", res, wantRes)
	}
	if _, err := r.RunDate(ctx, d2, rollup.AllTenants(), "test"); err != nil {
		t.Fatal(err)
	}
	for _, d := range []time.Time{d1, d2} {
		if got := f.postgres(t, d); got.String() != want[d].String() {
			t.Errorf("postgres %s: got %v, want %v", d.Format("2006-01-02"), got, want[d])
		}
	}
	var meta map[string]any
	var raw []byte
	if err := f.env.PG.QueryRow(ctx, "SELECT meta FROM analytics_daily_usage WHERE tenant_id = $1 AND date = $2::date AND metric = 'api_requests_daily'",
		a, d1.Format("2006-01-02")).Scan(&raw); err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(raw, &meta); err != nil || meta["source"] != "clickhouse" || meta["raw_checked"] != true || meta["reconciled_at"] == nil {
		t.Errorf("meta: got %s, want source clickhouse, raw_checked true and reconciled_at", raw)
	}
	if _, repaired := meta["repaired_from"]; repaired {
		t.Errorf("meta: got %s, want no repaired_from", raw)
	}
	if n := f.count(t, "SELECT count(*) FROM rollup_runs WHERE status = 'ok' AND tenant_id IS NULL AND trigger = 'test' AND finished_at IS NOT NULL"); n != 2 {
		t.Errorf("rollup_runs: %d ok runs, want 2", n)
	}
	if n := f.count(t, "SELECT rows FROM rollup_runs WHERE date = $1::date", d1.Format("2006-01-02")); n != 5 {
		t.Errorf("rollup_runs.rows for d1: got %d, want 5", n)
	}
	if n := f.count(t, "SELECT count(*) FROM audit_log WHERE action = 'rollup.run' AND actor = 'test' AND tenant_id IS NULL AND meta->>'status' = 'ok'"); n != 2 {
		t.Errorf("audit_log: %d rollup.run entries, want 2", n)
	}

	// Again, with nothing new in ClickHouse: not one row is written.
	before := map[time.Time]map[string]string{d1: f.rowVersions(t, d1), d2: f.rowVersions(t, d2)}
	for _, d := range []time.Time{d1, d2} {
		res, err := r.RunDate(ctx, d, rollup.AllTenants(), "test")
		if err != nil {
			t.Fatal(err)
		}
		if res.Changed != 0 || res.Repaired != 0 {
			t.Errorf("repeat run of %s: changed %d, repaired %d; want 0, 0", res.Date, res.Changed, res.Repaired)
		}
		if after := f.rowVersions(t, d); !maps.Equal(after, before[d]) {
			t.Errorf("repeat run of %s rewrote rows:\nbefore %v\n after %v", res.Date, before[d], after)
		}
	}
	if got := metricValue(t, reg, "sbh_analytics_rollup_runs_total", map[string]string{"status": "ok"}); got != 4 {
		t.Errorf("rollup_runs_total{ok}: got %v, want 4", got)
	}
	if got := metricValue(t, reg, "sbh_analytics_rollup_duration_seconds", nil); got != 4 {
		t.Errorf("rollup_duration_seconds: %v observations, want 4", got)
	}
}

// A corrupted aggregate (extra rows, a lost block, a metric with no raw data at all) is detected,
// repaired in ClickHouse, and Postgres gets the raw-true counts with the repair recorded.
func TestCorruptedAggregateIsRepaired(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	ctx := ctxT(t)
	a := f.tenant(t, "acme")
	d := f.daysAgo(1)
	f.events(t, repeat(3, a, d.Add(10*time.Hour), "auth.user.login")...)
	f.increments(t, inc{a, d.Add(time.Hour), "api_requests_daily", 5})
	f.aggregateRow(t, a, d, "auth.user.login", 4)     // counted twice: aggregate 7, raw 3
	f.aggregateRow(t, a, d, "api_requests_daily", -2) // a lost block: aggregate 3, raw 5
	f.aggregateRow(t, a, d, "ghost.metric", 6)        // no raw data at all
	want := counts{k(a, "auth.user.login"): 3, k(a, "api_requests_daily"): 5}

	reg := prometheus.NewRegistry()
	r := f.reconciler(reg, nil)
	res, err := r.RunDate(ctx, d, rollup.AllTenants(), "test")
	if err != nil {
		t.Fatal(err)
	}
	if res.Repaired != 3 || res.Rows != 2 || !res.RawChecked {
		t.Errorf("result: got %+v, want 3 repaired, 2 rows, raw checked", res)
	}
	if got := f.postgres(t, d); got.String() != want.String() {
		t.Errorf("postgres: got %v, want %v", got, want)
	}
	if got := f.aggregate(t, d); got.String() != want.String() {
		t.Errorf("daily_usage after repair: got %v, want %v", got, want)
	}
	for metric, from := range map[string]float64{"auth.user.login": 7, "api_requests_daily": 3} {
		var raw []byte
		if err := f.env.PG.QueryRow(ctx, "SELECT meta FROM analytics_daily_usage WHERE tenant_id = $1 AND metric = $2", a, metric).Scan(&raw); err != nil {
			t.Fatal(err)
		}
		var meta map[string]any
		_ = json.Unmarshal(raw, &meta)
		if meta["repaired_from"] != from {
			t.Errorf("%s meta: got %s, want repaired_from %v", metric, raw, from)
		}
	}
	var auditMeta []byte
	if err := f.env.PG.QueryRow(ctx, "SELECT meta FROM audit_log WHERE action = 'rollup.run'").Scan(&auditMeta); err != nil {
		t.Fatal(err)
	}
	var am struct {
		Repaired int `json:"repaired"`
		Repairs  []struct {
			Metric         string
			Aggregate, Raw int64
		} `json:"repairs"`
	}
	_ = json.Unmarshal(auditMeta, &am)
	if am.Repaired != 3 || len(am.Repairs) != 3 || fmt.Sprint(am.Repairs) != "[{api_requests_daily 3 5} {auth.user.login 7 3} {ghost.metric 6 0}]" {
		t.Errorf("audit meta: got %s, want the 3 repairs", auditMeta)
	}
	if got := metricValue(t, reg, "sbh_analytics_rollup_repairs_total", nil); got != 3 {
		t.Errorf("rollup_repairs_total: got %v, want 3", got)
	}

	// The aggregate is right now: the next run finds nothing to repair and changes nothing.
	res, err = r.RunDate(ctx, d, rollup.AllTenants(), "test")
	if err != nil {
		t.Fatal(err)
	}
	if res.Repaired != 0 || res.Changed != 0 {
		t.Errorf("second run: got %+v, want nothing repaired or changed", res)
	}
}

// Outside retention the raw data is gone; the aggregate is the truth and is not "repaired" to zero.
func TestDayOutsideRetentionUsesAggregate(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	a := f.tenant(t, "acme")
	old := f.daysAgo(120)
	f.aggregateRow(t, a, old, "auth.user.login", 8)
	res, err := f.reconciler(nil, nil).RunDate(ctxT(t), old, rollup.AllTenants(), "test")
	if err != nil {
		t.Fatal(err)
	}
	if res.RawChecked || res.Repaired != 0 || res.Rows != 1 {
		t.Errorf("result: got %+v, want 1 row, raw not checked, nothing repaired", res)
	}
	if got, want := f.postgres(t, old), (counts{k(a, "auth.user.login"): 8}); got.String() != want.String() {
		t.Errorf("postgres: got %v, want %v", got, want)
	}
	if n := f.count(t, "SELECT count(*) FROM analytics_daily_usage WHERE meta->>'raw_checked' = 'false'"); n != 1 {
		t.Errorf("meta.raw_checked: %d rows false, want 1", n)
	}
}

// A failed run is recorded as failed (rollup_runs, audit, metric) and publishes nothing.
func TestFailedRunIsRecorded(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	ctx := ctxT(t)
	a := f.tenant(t, "acme")
	d := f.daysAgo(1)
	f.events(t, repeat(2, a, d.Add(time.Hour), "auth.user.login")...)
	if err := f.env.CH.Exec(ctx, "RENAME TABLE "+f.env.DB+".usage_increments TO "+f.env.DB+".usage_increments_gone"); err != nil {
		t.Fatal(err)
	}
	reg := prometheus.NewRegistry()
	if _, err := f.reconciler(reg, nil).RunDate(ctx, d, rollup.AllTenants(), "test"); err == nil {
		t.Fatal("run without usage_increments succeeded")
	}
	if n := f.count(t, "SELECT count(*) FROM rollup_runs WHERE status = 'failed' AND error <> '' AND finished_at IS NOT NULL"); n != 1 {
		t.Errorf("rollup_runs: %d failed runs, want 1", n)
	}
	if n := f.count(t, "SELECT count(*) FROM analytics_daily_usage"); n != 0 {
		t.Errorf("a failed run published %d rows", n)
	}
	if n := f.count(t, "SELECT count(*) FROM audit_log WHERE action = 'rollup.run' AND meta->>'status' = 'failed'"); n != 1 {
		t.Errorf("audit_log: %d failed rollup.run entries, want 1", n)
	}
	if got := metricValue(t, reg, "sbh_analytics_rollup_runs_total", map[string]string{"status": "failed"}); got != 1 {
		t.Errorf("rollup_runs_total{failed}: got %v, want 1", got)
	}
}

// Finding 8: after RETENTION_DAYS was raised, the days the old window had already dropped are inside
// the new one but their raw data is gone: the retention floor keeps the rollup from "repairing"
// their aggregate to what is left.
func TestDayBeforeTheRetentionFloorIsNotRepaired(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	a := f.tenant(t, "acme")
	dropped := f.daysAgo(40) // inside the 90-day window, before the floor
	f.aggregateRow(t, a, dropped, "auth.user.login", 8)
	if err := retention.NewFloor(f.env.PG, f.env.DB).Raise(ctxT(t), f.daysAgo(30)); err != nil {
		t.Fatal(err)
	}
	res, err := f.reconciler(nil, nil).RunDate(ctxT(t), dropped, rollup.AllTenants(), "test")
	if err != nil {
		t.Fatal(err)
	}
	if res.RawChecked || res.Repaired != 0 {
		t.Errorf("result: got %+v, want raw not checked, nothing repaired", res)
	}
	if got, want := f.postgres(t, dropped), (counts{k(a, "auth.user.login"): 8}); got.String() != want.String() {
		t.Errorf("postgres: got %v, want %v", got, want)
	}
	if got := f.aggregate(t, dropped); got[k(a, "auth.user.login")] != 8 {
		t.Errorf("daily_usage: got %v, want the aggregate left at 8", got)
	}
}
