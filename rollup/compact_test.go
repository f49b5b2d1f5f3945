package rollup_test

import (
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/analyticsd/analyticsd/rollup"
)

// A whole-day run over a closed day merges the day's events into one part and loses or adds no row; a
// per-tenant run, a run over "today" and a repeat run leave the parts alone.
func TestRunCompactsTheClosedDay(t *testing.T) {
	f := newFixture(t)
	ctx := ctxT(t)
	a, b := f.tenant(t, "acme"), f.tenant(t, "globex")
	d1 := f.daysAgo(1)
	// Three inserts, three parts in d1's partition; one insert into d2's.
	f.events(t, append(repeat(40, a, d1.Add(9*time.Hour), "auth.user.login"), repeat(5, b, d1.Add(10*time.Hour), "email.sent")...)...)
	f.events(t, repeat(30, a, d1.Add(9*time.Hour), "apikey.request")...)
	f.events(t, append(repeat(7, b, d1.Add(23*time.Hour), "auth.user.login"), ev{a, d1.Add(2 * day), "auth.user.login"})...)
	parts := func() uint64 {
		var n uint64
		if err := f.env.CH.QueryRow(ctx, "SELECT count() FROM system.parts WHERE database = ? AND table = 'events' AND partition = ? AND active",
			f.env.DB, d1.Format("20060102")).Scan(&n); err != nil {
			t.Fatal(err)
		}
		return n
	}
	ids := func() string {
		var s string
		if err := f.env.CH.QueryRow(ctx, "SELECT toString(groupArray(id)) FROM (SELECT id FROM "+f.env.DB+".events WHERE toDate(ts) = ? ORDER BY id)", d1).Scan(&s); err != nil {
			t.Fatal(err)
		}
		return s
	}
	if n := parts(); n != 3 {
		t.Fatalf("test data: %d parts for %s, want 3", n, d1.Format("2006-01-02"))
	}
	before := ids()

	// The day is "today" for this reconciler: still being written, so not compacted.
	if res, err := f.reconciler(nil, func() time.Time { return d1.Add(20 * time.Hour) }).RunDate(ctx, d1, rollup.AllTenants(), "test"); err != nil || res.Compacted || parts() != 3 {
		t.Fatalf("run over today: err %v, compacted %v, %d parts; want no compaction, 3 parts", err, res.Compacted, parts())
	}
	reg := prometheus.NewRegistry()
	r := f.reconciler(reg, nil)
	if res, err := r.RunDate(ctx, d1, rollup.OneTenant(a), "test"); err != nil || res.Compacted || parts() != 3 {
		t.Fatalf("one tenant's run: err %v, compacted %v, %d parts; want no compaction, 3 parts", err, res.Compacted, parts())
	}
	res, err := r.RunDate(ctx, d1, rollup.AllTenants(), "test")
	if err != nil || !res.Compacted {
		t.Fatalf("whole-day run: err %v, compacted %v; want compacted", err, res.Compacted)
	}
	if n := parts(); n != 1 {
		t.Errorf("after the whole-day run: %d parts, want 1", n)
	}
	if after := ids(); after != before {
		t.Errorf("compaction changed the day's events:\nbefore %s\n after %s", before, after)
	}
	if got := f.raw(t, d1).String(); got != f.postgres(t, d1).String() {
		t.Errorf("after compaction raw %s, postgres %s", got, f.postgres(t, d1))
	}
	if res, err := r.RunDate(ctx, d1, rollup.AllTenants(), "test"); err != nil || res.Compacted {
		t.Errorf("repeat run: err %v, compacted %v; want nothing to compact", err, res.Compacted)
	}
	if got := metricValue(t, reg, "sbh_analytics_rollup_compactions_total", map[string]string{"status": "ok"}); got != 1 {
		t.Errorf("rollup_compactions_total{ok}: got %v, want 1", got)
	}
	if got := metricValue(t, reg, "sbh_analytics_rollup_compactions_total", map[string]string{"status": "failed"}); got != 0 {
		t.Errorf("rollup_compactions_total{failed}: got %v, want 0", got)
	}
}
