package rollup

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/analyticsd/analyticsd/internal/testenv"
	"github.com/analyticsd/analyticsd/schema"
)

func TestTruthQuery(t *testing.T) {
	day := time.Date(2026, 3, 9, 0, 0, 0, 0, time.UTC)
	tenant := uuid.MustParse("6f1c1a52-3b8e-4a43-9a55-0d2f4a0e7c11")
	check := func(name string, scope Scope, raw bool, wantSQL string, wantArgs []any) {
		t.Helper()
		q, args := truthQuery("analytics", day, scope, raw, "")
		if q != wantSQL {
			t.Errorf("%s: got SQL\n%s\nwant\n%s", name, q, wantSQL)
		}
		if fmt.Sprint(args) != fmt.Sprint(wantArgs) {
			t.Errorf("%s: got args %v, want %v", name, args, wantArgs)
		}
	}
	end := day.Add(24 * time.Hour)
	check("aggregate only", AllTenants(), false,
		"SELECT tenant_id, metric, sum(count) AS c FROM analytics.daily_usage WHERE date = toDate(?) GROUP BY tenant_id, metric",
		[]any{"2026-03-09"})
	check("one tenant with raw", OneTenant(tenant), true,
		"SELECT tenant_id, metric, sumIf(c, src = 0) AS aggregate, sumIf(c, src = 1) AS raw FROM ("+
			"SELECT tenant_id, metric, toUInt8(0) AS src, sum(count) AS c FROM analytics.daily_usage WHERE tenant_id = ? AND date = toDate(?) GROUP BY tenant_id, metric "+
			"UNION ALL SELECT tenant_id, event AS metric, toUInt8(1) AS src, toInt64(count()) AS c FROM analytics.events WHERE tenant_id = ? AND ts >= ? AND ts < ? GROUP BY tenant_id, metric "+
			"UNION ALL SELECT tenant_id, metric, toUInt8(1) AS src, sum(n) AS c FROM analytics.usage_increments WHERE tenant_id = ? AND ts >= ? AND ts < ? GROUP BY tenant_id, metric"+
			") GROUP BY tenant_id, metric",
		[]any{tenant, "2026-03-09", tenant, day, end, tenant, day, end})
}

func TestDifferences(t *testing.T) {
	a, b := uuid.New(), uuid.New()
	agg := map[key]int64{{a, "x"}: 5, {a, "y"}: 2, {b, "z"}: 3}
	raw := map[key]int64{{a, "x"}: 5, {a, "y"}: 4, {b, "w"}: 1}
	got := differences(agg, raw)
	want := map[key]int64{{a, "y"}: 2, {b, "z"}: -3, {b, "w"}: 1}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("got %v, want %v", got, want)
	}
}

func TestParseDate(t *testing.T) {
	now := time.Date(2026, 3, 9, 15, 4, 5, 0, time.UTC)
	check := func(in, want, wantErr string) {
		t.Helper()
		d, err := ParseDate(in, now)
		switch {
		case wantErr != "" && (err == nil || !strings.Contains(err.Error(), wantErr)):
			t.Errorf("ParseDate(%q): got %v, want an error saying %q", in, err, wantErr)
		case wantErr == "" && err != nil:
			t.Errorf("ParseDate(%q): got %v, want %s", in, err, want)
		case wantErr == "" && d.Format(time.RFC3339) != want:
			t.Errorf("ParseDate(%q): got %s, want %s", in, d.Format(time.RFC3339), want)
		}
	}
	check("2026-03-09", "", "is today (UTC)")
	check("2026-03-08", "2026-03-08T00:00:00Z", "")
	check("2025-02-02", "2025-02-02T00:00:00Z", "") // exactly 400 days
	check("2025-02-01", "", "more than 400 days ago")
	check("2026-03-10", "", "in the future")
	check("", "", "date is required")
	check("2026-02-30", "", "is not a date")
	check("2026-3-9", "", "is not a date")
	check("2026-03-09T00:00:00Z", "", "is not a date")
	check("'; DROP TABLE x", "", "is not a date")
}

func TestParseClock(t *testing.T) {
	check := func(in string, want time.Duration, ok bool) {
		t.Helper()
		got, err := ParseClock(in)
		if (err == nil) != ok || got != want {
			t.Errorf("ParseClock(%q): got %v, %v; want %v, ok=%v", in, got, err, want, ok)
		}
	}
	check("00:10", 10*time.Minute, true)
	check("23:59", 23*time.Hour+59*time.Minute, true)
	check("24:00", 0, false)
	check("0010", 0, false)
	check("", 0, false)
}

func TestSlotsAndDates(t *testing.T) {
	d := newDaily("test", 10*time.Minute, time.Minute, time.Hour, time.Now, slog.New(slog.DiscardHandler), nil)
	check := func(now, want string) {
		t.Helper()
		n, _ := time.Parse(time.RFC3339, now)
		if got := d.prevSlot(n).Format(time.RFC3339); got != want {
			t.Errorf("prevSlot(%s): got %s, want %s", now, got, want)
		}
	}
	check("2026-03-09T00:09:59Z", "2026-03-08T00:10:00Z")
	check("2026-03-09T00:10:00Z", "2026-03-09T00:10:00Z")
	check("2026-03-09T23:00:00Z", "2026-03-09T00:10:00Z")
	check("2026-03-09T01:30:00+02:00", "2026-03-08T00:10:00Z") // 23:30 UTC the day before

	s, err := NewScheduler(nil, ScheduleConfig{LookbackDays: 3}, nil)
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, day := range s.Dates(time.Date(2026, 3, 1, 0, 10, 0, 0, time.UTC)) {
		got = append(got, day.Format(time.DateOnly))
	}
	if strings.Join(got, " ") != "2026-02-28 2026-02-27 2026-02-26" {
		t.Errorf("dates: got %v, want yesterday, D-2, D-3", got)
	}
	for _, bad := range []ScheduleConfig{{At: "25:00"}, {LookbackDays: -1}, {LookbackDays: 91}} {
		if _, err := NewScheduler(nil, bad, nil); err == nil {
			t.Errorf("NewScheduler(%+v): no error", bad)
		}
	}
}

// A failing job is retried with doubling delays and its state shows in Status; once it succeeds the
// next run is the next daily slot.
func TestDailyRetriesWithBackoff(t *testing.T) {
	var mu sync.Mutex
	var calls []time.Time
	var statuses []Status
	var d *daily
	job := func(ctx context.Context, slot time.Time) (string, error) {
		mu.Lock()
		defer mu.Unlock()
		calls = append(calls, time.Now())
		statuses = append(statuses, d.Status())
		if len(calls) <= 3 {
			return "", errors.New("clickhouse is down")
		}
		return "ok", nil
	}
	d = newDaily("test", 10*time.Minute, 20*time.Millisecond, 50*time.Millisecond, time.Now, slog.New(slog.DiscardHandler), job)
	d.start(context.Background())
	testenv.Eventually(t, 10*time.Second, func() error {
		if st := d.Status(); st.LastStatus != "ok" {
			return fmt.Errorf("job never succeeded: %+v", st)
		}
		return nil
	})
	d.stop()
	mu.Lock()
	defer mu.Unlock()
	if len(calls) != 4 {
		t.Fatalf("got %d calls, want 4 (3 failures, then success)", len(calls))
	}
	for i, least := range []time.Duration{20, 40, 50} { // doubling, capped at 50 ms
		if gap := calls[i+1].Sub(calls[i]); gap < least*time.Millisecond {
			t.Errorf("retry %d came after %v, want at least %v ms", i+1, gap, int64(least))
		}
	}
	if st := statuses[3]; st.OK || st.LastStatus != "failed" || st.Failures != 3 || st.LastError != "clickhouse is down" {
		t.Errorf("status before the 4th attempt: got %+v, want failed 3 times with the error", st)
	}
	st := d.Status()
	if !st.OK || st.Failures != 0 || st.LastError != "" || st.NextRun == nil || !st.NextRun.Equal(d.prevSlot(time.Now()).Add(24*time.Hour)) {
		t.Errorf("status after success: got %+v, want ok, next run at the next 00:10", st)
	}
}

// On a server with TTL the sweeper drops nothing (it has no ClickHouse to touch here), but still
// records that the days before the cutoff are incomplete: the table's TTL drops them.
func TestSweeperIdleWithTTL(t *testing.T) {
	now := time.Date(2026, 11, 29, 0, 5, 0, 0, time.UTC)
	s := NewSweeper(nil, schema.Layout{DB: "analytics"}, nil, nil, nil, nil, 90, func() time.Time { return now })
	s.features = func() (schema.Features, error) { return schema.Features{TTL: true}, nil }
	var floors []time.Time
	s.raiseFloor = func(_ context.Context, d time.Time) error { floors = append(floors, d); return nil }
	for range 2 {
		res, err := s.Sweep(context.Background())
		if err != nil || !res.TTL || len(res.Dropped) != 0 {
			t.Errorf("sweep with TTL: got %+v, %v; want an idle no-op", res, err)
		}
	}
	want := time.Date(2026, 9, 1, 0, 0, 0, 0, time.UTC) // the day after today - 90
	if len(floors) != 2 || !floors[0].Equal(want) {
		t.Errorf("retention floor raised to %v, want %v at each sweep", floors, want)
	}
}

// A run that finds another replica holding the lock looks again after RetryMax, in case that replica
// died before finishing the slot.
func TestDailyLooksAgainAfterSkipping(t *testing.T) {
	var mu sync.Mutex
	var calls []time.Time
	job := func(ctx context.Context, slot time.Time) (string, error) {
		mu.Lock()
		defer mu.Unlock()
		calls = append(calls, time.Now())
		if len(calls) == 1 {
			return "skipped", nil
		}
		return "ok", nil
	}
	d := newDaily("test", 10*time.Minute, time.Millisecond, 30*time.Millisecond, time.Now, slog.New(slog.DiscardHandler), job)
	d.start(context.Background())
	testenv.Eventually(t, 10*time.Second, func() error {
		if st := d.Status(); st.LastStatus != "ok" {
			return fmt.Errorf("job never ran again: %+v", st)
		}
		return nil
	})
	d.stop()
	mu.Lock()
	defer mu.Unlock()
	if len(calls) != 2 || calls[1].Sub(calls[0]) < 30*time.Millisecond {
		t.Errorf("got %d calls %v, want a second one 30 ms after the skip", len(calls), calls)
	}
}

func TestDriftedDates(t *testing.T) {
	a, b, stranger := uuid.New(), uuid.New(), uuid.New()
	known := map[uuid.UUID]bool{a: true, b: true}
	billedAll := map[string]bool{"2026-11-01": true, "2026-11-02": true, "2026-11-03": true}
	billedOne := map[dayTenant]bool{{"2026-11-04", a}: true}
	billed := map[dayTenant]int64{
		{"2026-11-01", a}: 5, {"2026-11-02", a}: 5, {"2026-11-03", a}: 1, {"2026-11-04", a}: 2,
	}
	live := map[dayTenant]int64{
		{"2026-11-01", a}:        5, // unchanged
		{"2026-11-02", a}:        7, // late events
		{"2026-11-03", a}:        1, // unchanged for a ...
		{"2026-11-03", b}:        2, // ... but b's first events arrived after the date was billed
		{"2026-11-04", a}:        2, // billed for a alone, unchanged
		{"2026-11-04", b}:        9, // never billed for b: served live, not drift
		{"2026-11-01", stranger}: 4, // unknown to Postgres: runs skip it
		{"2026-11-05", a}:        1, // never billed
	}
	got := driftedDates(billedAll, billedOne, known, billed, live)
	var s []string
	for _, d := range got {
		s = append(s, d.Format(time.DateOnly))
	}
	if want := "2026-11-02 2026-11-03"; strings.Join(s, " ") != want {
		t.Errorf("drifted: got %v, want %s", s, want)
	}
}

// Two equal repairs are two corrections. On a cluster the replicated daily_usage drops an insert
// equal to a recent block unless the repair says not to (make test-cluster runs this on the cluster).
func TestEqualRepairsBothApply(t *testing.T) {
	env := testenv.Migrated(t)
	r := NewReconciler(env.CH, env.DB, env.PG, nil, nil, nil, 90, nil)
	tenant, d := uuid.New(), Day(time.Now()).AddDate(0, 0, -3)
	rp := []repair{{Tenant: tenant, Metric: "auth.user.login", Aggregate: 4, Raw: 5}}
	ctx := context.Background()
	for range 2 {
		if err := r.writeRepairs(ctx, d, rp); err != nil {
			t.Fatal(err)
		}
	}
	var n int64
	if err := env.CH.QueryRow(ctx, "SELECT sum(count) FROM "+env.DB+".daily_usage WHERE tenant_id = ?", tenant).Scan(&n); err != nil {
		t.Fatal(err)
	}
	if n != 2 {
		t.Errorf("two repairs of +1: daily_usage holds %d, want 2", n)
	}
}

// A run, whoever asks (the schedule, POST /rollup, the CLI), waits for its Gate: serve's checks of a
// ClickHouse that was unreachable at start-up. A server outside UTC counts days wrongly, and a run
// would bill them. Nothing is read, written or recorded until the gate passes.
func TestARunWaitsForItsGate(t *testing.T) {
	env := testenv.Migrated(t)
	r := NewReconciler(env.CH, env.DB, env.PG, nil, nil, nil, 90, nil)
	refused := errors.New("the clickhouse server's time zone is \"America/Chicago\", not UTC")
	r.Gate = func(context.Context) error { return refused }
	ctx := context.Background()
	if _, err := r.RunDate(ctx, Day(time.Now()).AddDate(0, 0, -1), AllTenants(), "test"); !errors.Is(err, refused) {
		t.Fatalf("run with a closed gate: %v, want the gate's error", err)
	}
	var runs int
	if err := env.PG.QueryRow(ctx, "SELECT count(*) FROM rollup_runs").Scan(&runs); err != nil || runs != 0 {
		t.Errorf("%d rollup_runs rows (%v), want none: the run must not start", runs, err)
	}
}
