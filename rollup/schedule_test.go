package rollup_test

import (
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/analyticsd/analyticsd/audit"
	"github.com/analyticsd/analyticsd/internal/testenv"
	"github.com/analyticsd/analyticsd/rollup"
	"github.com/analyticsd/analyticsd/schema"
)

// A late event for D-2, written after the run that reconciled D-2, is picked up by the next day's run
// (its look-back covers D-2 again); a second run of the same slot does nothing.
func TestSchedulerPicksUpLateEvents(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	ctx := ctxT(t)
	a := f.tenant(t, "acme")
	for n := 1; n <= 4; n++ {
		f.events(t, repeat(n, a, f.daysAgo(n).Add(6*time.Hour), "auth.user.login")...)
	}
	clk := &clock{t: f.today.Add(10*time.Minute + 5*time.Second)} // today 00:10:05
	s, err := rollup.NewScheduler(f.reconciler(nil, clk.Now), rollup.ScheduleConfig{Now: clk.Now}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.RunOnce(ctx); err != nil {
		t.Fatal(err)
	}
	runs := func() int {
		return f.count(t, "SELECT count(*) FROM rollup_runs WHERE status = 'ok' AND trigger = 'scheduler'")
	}
	if n := runs(); n != 3 {
		t.Fatalf("first slot: %d runs, want 3 (yesterday, D-2, D-3)", n)
	}
	for n, want := range map[int]int64{1: 1, 2: 2, 3: 3, 4: 0} {
		if got := f.postgres(t, f.daysAgo(n))[k(a, "auth.user.login")]; got != want {
			t.Errorf("D-%d after the first slot: got %d, want %d", n, got, want)
		}
	}
	if st := s.Status(); st.LastStatus != "ok" || !st.OK || st.LastRun == nil {
		t.Errorf("status: got %+v, want ok with a last run", st)
	}

	f.events(t, ev{a, f.daysAgo(2).Add(23 * time.Hour), "auth.user.login"}) // late
	if err := s.RunOnce(ctx); err != nil {
		t.Fatal(err)
	}
	if n := runs(); n != 3 {
		t.Errorf("the same slot again: %d runs, want still 3", n)
	}

	clk.Set(clk.Now().Add(24 * time.Hour)) // tomorrow 00:10:05: today, D-1 and D-2
	if err := s.RunOnce(ctx); err != nil {
		t.Fatal(err)
	}
	if got := f.postgres(t, f.daysAgo(2))[k(a, "auth.user.login")]; got != 3 {
		t.Errorf("D-2 after the next slot: got %d, want 3 (the late event counted)", got)
	}
	if n := runs(); n != 6 {
		t.Errorf("after the next slot: %d runs, want 6", n)
	}
}

// Two instances started together: one takes the lock and reconciles, the other skips or finds every
// date done for the slot. Each date has exactly one run.
func TestTwoSchedulersReconcileOnce(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	a := f.tenant(t, "acme")
	for n := 1; n <= 3; n++ {
		f.events(t, repeat(n, a, f.daysAgo(n).Add(6*time.Hour), "auth.user.login")...)
	}
	clk := &clock{t: f.today.Add(10*time.Minute + 5*time.Second)}
	var scheds []*rollup.Scheduler
	for range 2 {
		s, err := rollup.NewScheduler(f.reconciler(nil, clk.Now), rollup.ScheduleConfig{Now: clk.Now}, nil)
		if err != nil {
			t.Fatal(err)
		}
		scheds = append(scheds, s)
	}
	var wg sync.WaitGroup
	for _, s := range scheds {
		wg.Add(1)
		go func() { defer wg.Done(); s.Start(ctxT(t)) }()
	}
	wg.Wait()
	for _, s := range scheds {
		testenv.Eventually(t, 20*time.Second, func() error {
			if st := s.Status(); st.LastStatus == "never" {
				return fmt.Errorf("scheduler did not run: %+v", st)
			}
			return nil
		})
	}
	for _, s := range scheds {
		s.Stop()
	}
	for i, s := range scheds {
		// One that found the lock taken looks again in 30 minutes (in case the holder died); one that ran
		// waits for tomorrow's slot.
		st := s.Status()
		ok := st.LastStatus == "ok" && st.NextRun != nil && st.NextRun.Equal(f.today.Add(24*time.Hour+10*time.Minute))
		skipped := st.LastStatus == "skipped" && st.NextRun != nil && st.NextRun.Equal(clk.Now().Add(30*time.Minute))
		if !ok && !skipped {
			t.Errorf("scheduler %d: got %+v, want ok with the next run tomorrow 00:10, or skipped with a look in 30 min", i, st)
		}
	}
	if n := f.count(t, "SELECT count(*) FROM rollup_runs"); n != 3 {
		t.Errorf("%d rollup_runs rows, want 3", n)
	}
	if n := f.count(t, "SELECT count(DISTINCT date) FROM rollup_runs WHERE status = 'ok'"); n != 3 {
		t.Errorf("%d dates reconciled, want 3", n)
	}
}

// Events and increments at 100, 91, 90 and 89 days old: the sweeper (at start-up) drops the 100- and
// 91-day partitions (of usage_quarter_hour too) and keeps the rest; daily_usage keeps every day.
func TestSweeperDropsExpiredPartitions(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	ctx := ctxT(t)
	if f.env.Schema.Features.TTL {
		t.Skip("this server has TTL; the sweeper is idle")
	}
	a := f.tenant(t, "acme")
	ages := []int{100, 91, 90, 89, 0}
	for _, n := range ages {
		f.events(t, repeat(2, a, f.daysAgo(n).Add(12*time.Hour), "auth.user.login")...)
		f.increments(t, inc{a, f.daysAgo(n).Add(12 * time.Hour), "api_requests_daily", 5})
	}
	aggBefore := map[int]string{}
	for _, n := range ages {
		aggBefore[n] = f.aggregate(t, f.daysAgo(n)).String()
	}

	reg := prometheus.NewRegistry()
	s := rollup.NewSweeper(f.env.CH, f.env.Layout(), f.env.PG, audit.New(f.env.PG), reg, nil, 90, nil)
	s.Start(ctx)
	testenv.Eventually(t, 20*time.Second, func() error {
		if st := s.Status(); st.LastStatus == "never" {
			return fmt.Errorf("sweeper did not run at start-up: %+v", st)
		}
		return nil
	})
	s.Stop()
	if st := s.Status(); st.LastStatus != "ok" || st.NextRun == nil || !st.NextRun.Equal(f.today.Add(24*time.Hour+5*time.Minute)) {
		t.Errorf("status: got %+v, want ok, next run tomorrow 00:05", st)
	}

	for _, n := range ages {
		d := f.daysAgo(n)
		raw := f.raw(t, d)
		kept := n <= 90
		if got := raw[k(a, "auth.user.login")] == 2 && raw[k(a, "api_requests_daily")] == 5; got != kept {
			t.Errorf("%d days old: raw data %v, want kept=%v", n, raw, kept)
		}
		if got := f.aggregate(t, d).String(); got != aggBefore[n] {
			t.Errorf("%d days old: daily_usage %s, want unchanged %s", n, got, aggBefore[n])
		}
	}
	for _, table := range []string{"events", "usage_increments", "usage_quarter_hour"} {
		if got := metricValue(t, reg, "sbh_analytics_retention_partitions_dropped_total", map[string]string{"table": table}); got != 2 {
			t.Errorf("partitions dropped from %s: got %v, want 2", table, got)
		}
	}
	if f.env.Target.Cluster != "" {
		// On 18.16 the drops go to one replica of each shard (schema.Shards), not ON CLUSTER; the
		// other replica takes them from the shard's replication log: every server's copy goes.
		if v, err := schema.ServerVersion(f.env.CH); err != nil {
			t.Fatal(err)
		} else if n := f.env.DDLQueueTasks(t, "ALTER TABLE "+f.env.DB+"."); schema.AlterRacesOnCluster(v) && n != 0 {
			t.Errorf("%d of the sweeper's DROP PARTITIONs went through the distributed-DDL queue of a %s server, want none", n, v)
		}
		cutoff := f.daysAgo(90).Format("20060102")
		servers, err := schema.ClusterServers(ctx, f.env.CH, f.env.Target.Cluster) // cluster() would read one replica per shard
		if err != nil {
			t.Fatal(err)
		}
		if len(servers) < 2 {
			t.Fatalf("cluster %s lists %d servers", f.env.Target.Cluster, len(servers))
		}
		for _, sv := range servers {
			addr := sv.Addr
			testenv.Eventually(t, 20*time.Second, func() error {
				var n uint64
				err := f.env.CH.QueryRow(ctx, "SELECT count() FROM remote('"+addr+"', system, parts) WHERE database = ? AND table = 'events_local' AND active AND partition < ?",
					f.env.DB, cutoff).Scan(&n)
				if err == nil && n != 0 {
					err = fmt.Errorf("%s still holds %d parts of dropped days", addr, n)
				}
				return err
			})
		}
	}
	if n := f.count(t, "SELECT count(*) FROM audit_log WHERE action = 'retention.sweep' AND jsonb_array_length(meta->'dropped'->'events') = 2"); n != 1 {
		t.Errorf("audit_log: %d retention.sweep entries dropping 2 events partitions, want 1", n)
	}

	res, err := s.Sweep(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(res.Dropped) != 0 || res.Cutoff != f.daysAgo(90).Format("2006-01-02") {
		t.Errorf("second sweep: got %+v, want nothing dropped, cutoff 90 days ago", res)
	}
}

// Late events for a day the look-back has moved past: the day's billed rows are reconciled again by
// the next slot, while billed days that did not change, and a tenant Postgres does not know, cause no
// extra run.
func TestSchedulerReconcilesBilledDaysThatChanged(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	ctx := ctxT(t)
	a := f.tenant(t, "acme")
	stranger := uuid.New() // in ClickHouse only: runs skip it, so it must not look like drift either
	f.events(t, repeat(2, a, f.daysAgo(10).Add(6*time.Hour), "auth.user.login")...)
	f.events(t, repeat(1, a, f.daysAgo(12).Add(6*time.Hour), "auth.user.login")...)
	f.events(t, repeat(4, stranger, f.daysAgo(12).Add(7*time.Hour), "auth.user.login")...)
	clk := &clock{t: f.today.Add(10*time.Minute + 5*time.Second)}
	r := f.reconciler(nil, clk.Now)
	for _, n := range []int{10, 12} {
		if _, err := r.RunDate(ctx, f.daysAgo(n), rollup.AllTenants(), "cli"); err != nil {
			t.Fatal(err)
		}
	}
	runs := func(n int) int {
		return f.count(t, "SELECT count(*) FROM rollup_runs WHERE status = 'ok' AND date = $1::date", f.daysAgo(n).Format("2006-01-02"))
	}

	s, err := rollup.NewScheduler(r, rollup.ScheduleConfig{Now: clk.Now}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.RunOnce(ctx); err != nil {
		t.Fatal(err)
	}
	if runs(10) != 1 || runs(12) != 1 {
		t.Fatalf("nothing changed, yet D-10 has %d runs and D-12 %d; want 1 each", runs(10), runs(12))
	}

	f.events(t, repeat(3, a, f.daysAgo(10).Add(20*time.Hour), "auth.user.login")...) // late, for a billed day
	clk.Set(clk.Now().Add(day))
	if err := s.RunOnce(ctx); err != nil {
		t.Fatal(err)
	}
	if got := f.postgres(t, f.daysAgo(10))[k(a, "auth.user.login")]; got != 5 {
		t.Errorf("D-10 billed after the late events: got %d, want 5", got)
	}
	if runs(10) != 2 || runs(12) != 1 {
		t.Errorf("after the late events: D-10 has %d runs (want 2), D-12 %d (want 1)", runs(10), runs(12))
	}
	if err := s.RunOnce(ctx); err != nil { // the same slot again: nothing left to do
		t.Fatal(err)
	}
	if runs(10) != 2 {
		t.Errorf("the same slot again: D-10 has %d runs, want still 2", runs(10))
	}
}

// Late events for a date the rollup already billed — inside the look-back too, which the nightly
// drift pass leaves to the next night — are billed again within ROLLUP_DRIFT_INTERVAL, not at the
// next 00:10 (the code before waited for the next slot: /usage showed the stale billed count all day).
func TestLateEventsForBilledDatesAreBilledWithinTheDriftInterval(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	ctx := ctxT(t)
	a := f.tenant(t, "acme")
	f.events(t, repeat(2, a, f.daysAgo(1).Add(6*time.Hour), "auth.user.login")...)
	clk := &clock{t: f.today.Add(10*time.Minute + 5*time.Second)}
	r := f.reconciler(nil, clk.Now)
	s, err := rollup.NewScheduler(r, rollup.ScheduleConfig{Now: clk.Now, DriftEvery: 100 * time.Millisecond}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.RunOnce(ctx); err != nil {
		t.Fatal(err)
	}
	if got := f.postgres(t, f.daysAgo(1))[k(a, "auth.user.login")]; got != 2 {
		t.Fatalf("D-1 billed: %d, want 2", got)
	}
	f.events(t, repeat(3, a, f.daysAgo(1).Add(20*time.Hour), "auth.user.login")...) // late
	s.Start(ctx)
	defer s.Stop()
	testenv.Eventually(t, 10*time.Second, func() error {
		if got := f.postgres(t, f.daysAgo(1))[k(a, "auth.user.login")]; got != 5 {
			return fmt.Errorf("D-1 still billed %d after the late events, want 5", got)
		}
		return nil
	})
	if n := f.count(t, "SELECT count(*) FROM rollup_runs WHERE status = 'ok' AND trigger = 'drift' AND date = $1::date", f.daysAgo(1).Format("2006-01-02")); n != 1 {
		t.Errorf("%d drift runs for D-1, want 1 (nothing changed after it)", n)
	}
}

// A view write that missed rows (an insert that failed after its events part was written, whose replay
// then found the rows stored) leaves usage_quarter_hour short; the scheduled run of that day counts
// them in, slot by slot, as it repairs daily_usage.
func TestSchedulerFillsQuarterHourSlots(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	ctx := ctxT(t)
	a := f.tenant(t, "acme")
	at := f.daysAgo(1).Add(13*time.Hour + 20*time.Minute)
	f.events(t, repeat(5, a, at, "auth.user.login")...)
	slot := at.Truncate(15 * time.Minute)
	f.env.Insert(t, "usage_quarter_hour", "tenant_id, metric, slot, count", []any{a, "auth.user.login", slot, int64(-3)})
	slotCount := func() int64 {
		var n int64
		if err := f.env.CH.QueryRow(ctx, "SELECT sum(count) FROM "+f.env.DB+".usage_quarter_hour WHERE tenant_id = ? AND slot = ?", a, slot).Scan(&n); err != nil {
			t.Fatal(err)
		}
		return n
	}
	if n := slotCount(); n != 2 {
		t.Fatalf("the slot before the run: %d, want 2 (3 missed)", n)
	}
	clk := &clock{t: f.today.Add(10*time.Minute + 5*time.Second)}
	s, err := rollup.NewScheduler(f.reconciler(nil, clk.Now), rollup.ScheduleConfig{Now: clk.Now}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.RunOnce(ctx); err != nil {
		t.Fatal(err)
	}
	if n := slotCount(); n != 5 {
		t.Errorf("the slot after the scheduled run: %d, want 5", n)
	}
}
