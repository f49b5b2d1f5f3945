package importer

import (
	"context"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/analyticsd/analyticsd/audit"
	"github.com/analyticsd/analyticsd/internal/testenv"
	"github.com/analyticsd/analyticsd/rollup"
)

// addEvents writes n source events of tenant named event on day (one an hour).
func addEvents(t *testing.T, src *pgxpool.Pool, tenant uuid.UUID, event string, day time.Time, n int) {
	t.Helper()
	for i := range n {
		if _, err := src.Exec(context.Background(), "INSERT INTO analytics_events (id, tenant_id, event, ts) VALUES ($1, $2, $3, $4)",
			uuid.New(), tenant, event, day.Add(time.Duration(i)*time.Hour)); err != nil {
			t.Fatal(err)
		}
	}
}

// addUsage writes one source analytics_daily_usage row.
func addUsage(t *testing.T, src *pgxpool.Pool, tenant uuid.UUID, day time.Time, metric string, n int64) {
	t.Helper()
	if _, err := src.Exec(context.Background(), "INSERT INTO analytics_daily_usage (tenant_id, date, metric, count) VALUES ($1, $2, $3, $4)",
		tenant, day, metric, n); err != nil {
		t.Fatal(err)
	}
}

// dayUsage is daily_usage of (analyticsd) tenant's day and metric.
func dayUsage(t *testing.T, e testenv.Env, tenant uuid.UUID, day time.Time, metric string) int64 {
	t.Helper()
	var n int64
	if err := e.CH.QueryRow(context.Background(), "SELECT sum(count) FROM "+e.DB+".daily_usage WHERE tenant_id = ? AND date = toDate(?) AND metric = ?",
		tenant, day.Format(time.DateOnly), metric).Scan(&n); err != nil {
		t.Fatal(err)
	}
	return n
}

// interrupted puts tenant's day back to 'inserting', as a run killed after its insert and before it
// recorded the day as stored leaves it.
func interrupted(t *testing.T, e testenv.Env, tenant uuid.UUID, day time.Time) {
	t.Helper()
	tag, err := e.PG.Exec(context.Background(), "UPDATE import_days SET state = 'inserting' WHERE tenant_id = $1 AND day = $2", tenant, day)
	if err != nil || tag.RowsAffected() != 1 {
		t.Fatalf("rewind %s %s: %v, %d rows", tenant, day.Format(time.DateOnly), err, tag.RowsAffected())
	}
}

func dstOf(t *testing.T, res Result, src uuid.UUID) uuid.UUID {
	t.Helper()
	for _, tr := range res.Tenants {
		if tr.Source == src {
			return tr.ID
		}
	}
	t.Fatalf("source tenant %s not imported: %+v", src, res.Tenants)
	return uuid.Nil
}

// A day whose events (and usage increment) a run inserted, killed before it recorded the day as
// stored, is resumed two days later, when the day has left the window and retention has dropped its
// partitions. Before, the resumed run sent it to the id check, which found none of its ids, and
// inserted everything again: daily_usage and billing counted the day twice (10 events, 14 requests).
// Now daily_usage settles it: acme's insert landed (stored), globex's did not (counted as aggregates).
func TestAResumedDayOutsideTheWindowIsNotCountedTwice(t *testing.T) {
	src := sourceDB(t, 0, 1)
	e, cfg := setup(t, src)
	ctx := context.Background()
	d := cfg.OldBefore // the oldest day inside the window when the first run starts
	addEvents(t, src, acme, "email.sent", d, 5)
	addUsage(t, src, acme, d, "api_requests_daily", 7)
	addEvents(t, src, globex, "email.sent", d, 4)
	cfg.Bill = nil // the first run is killed before billing
	im, _ := New(cfg)
	first, err := im.Run(ctx)
	if err != nil {
		t.Fatal(err)
	}
	a, g := dstOf(t, first, acme), dstOf(t, first, globex)
	interrupted(t, e, a, d)
	// globex's insert did not land: its day reads as before.
	interrupted(t, e, g, d)
	takeAway(t, e, g, d)
	// Two days later retention has dropped the day (the sweeper / TTL drop whole partitions).
	for _, table := range []string{"events", "usage_increments"} {
		if err := e.CH.Exec(ctx, "ALTER TABLE "+e.Layout().Local(table)+e.Layout().OnCluster()+" DROP PARTITION "+d.Format("20060102")); err != nil {
			t.Fatal(err)
		}
	}
	later := func() time.Time { return time.Now().AddDate(0, 0, 2) }
	rec := rollup.NewReconciler(e.CH, e.DB, e.PG, audit.New(e.PG), nil, nil, 90, later)
	cfg.OldBefore, cfg.Today = cfg.OldBefore.AddDate(0, 0, 2), cfg.Today.AddDate(0, 0, 2)
	cfg.Bill = func(ctx context.Context, day time.Time) error {
		_, err := rec.RunDate(ctx, day, rollup.AllTenants(), "import")
		return err
	}
	im, _ = New(cfg)
	res, err := im.Run(ctx)
	if err != nil {
		t.Fatalf("resumed run: %v", err)
	}
	if res.Inserted != 0 || res.Increments != 0 || res.Aggregated != 4 || res.DaysStored != 2 {
		t.Errorf("resumed run: inserted %d, increments %d, aggregated %d, days stored %d; want 0, 0, 4 (globex's), 2",
			res.Inserted, res.Increments, res.Aggregated, res.DaysStored)
	}
	for _, c := range []struct {
		tenant uuid.UUID
		metric string
		want   int64
	}{{a, "email.sent", 5}, {a, "api_requests_daily", 7}, {g, "email.sent", 4}} {
		if got := dayUsage(t, e, c.tenant, d, c.metric); got != c.want {
			t.Errorf("daily_usage of %s %s %s: %d, want %d (the source's, once)", c.tenant, d.Format(time.DateOnly), c.metric, got, c.want)
		}
		var billed int64
		if err := e.PG.QueryRow(ctx, "SELECT COALESCE(sum(count), 0) FROM analytics_daily_usage WHERE tenant_id = $1 AND date = $2 AND metric = $3",
			c.tenant, d, c.metric).Scan(&billed); err != nil {
			t.Fatal(err)
		}
		if billed != c.want {
			t.Errorf("billed %s %s %s: %d, want %d", c.tenant, d.Format(time.DateOnly), c.metric, billed, c.want)
		}
	}
	if v, err := im.Verify(ctx); err != nil || !v.OK() {
		t.Errorf("verification: %v, %v", err, v.Diffs)
	}
}

// An old day left 'inserting' as aggregates is resumed after RETENTION_DAYS grew, so the day is now
// inside the window. Before, it was sent to the events' id check, which cannot see aggregates: acme's
// landed aggregate was counted again by its events (10, not 5). Now the aggregate is settled first,
// whatever the day's date: acme's landed (stored), globex's did not and its events are imported.
func TestAnInterruptedAggregateInsideAGrownWindowIsSettledFirst(t *testing.T) {
	src := sourceDB(t, 0, 1)
	e, cfg := setup(t, src)
	ctx := context.Background()
	d := cfg.OldBefore.AddDate(0, 0, -1) // older than the window: counted into daily_usage only
	addEvents(t, src, acme, "email.sent", d, 5)
	addEvents(t, src, globex, "email.sent", d, 4)
	cfg.Bill = nil
	im, _ := New(cfg)
	first, err := im.Run(ctx)
	if err != nil {
		t.Fatal(err)
	}
	a, g := dstOf(t, first, acme), dstOf(t, first, globex)
	interrupted(t, e, a, d)
	interrupted(t, e, g, d)
	takeAway(t, e, g, d)
	// The window grew by 30 days before the resume.
	cfg.OldBefore = cfg.OldBefore.AddDate(0, 0, -30)
	im, _ = New(cfg)
	res, err := im.Run(ctx)
	if err != nil {
		t.Fatalf("resumed run: %v", err)
	}
	if res.Inserted != 4 || res.Aggregated != 0 || res.DaysStored != 2 {
		t.Errorf("resumed run: inserted %d, aggregated %d, days stored %d; want 4 (globex's events), 0, 2", res.Inserted, res.Aggregated, res.DaysStored)
	}
	if got := dayUsage(t, e, a, d, "email.sent"); got != 5 {
		t.Errorf("daily_usage of acme %s: %d, want 5", d.Format(time.DateOnly), got)
	}
	if got := dayUsage(t, e, g, d, "email.sent"); got != 4 {
		t.Errorf("daily_usage of globex %s: %d, want 4", d.Format(time.DateOnly), got)
	}
}

// An old day whose rows add up to 0 (three events and a usage row of -3, a refund) is left
// 'inserting' by a run killed before its insert landed. Before, the resumed run compared one signed
// total, which reads the same (0) whether or not the insert landed, took it for landed and lost the
// rows (email.sent 0, not 3). Now each metric is compared.
func TestAnInterruptedDayWhoseRowsSumToZeroIsInserted(t *testing.T) {
	src := sourceDB(t, 0, 1)
	e, cfg := setup(t, src)
	ctx := context.Background()
	d := cfg.OldBefore.AddDate(0, 0, -10)
	addEvents(t, src, acme, "email.sent", d, 3)
	addUsage(t, src, acme, d, "credits", -3)
	im, _ := New(cfg)
	first, err := im.Run(ctx)
	if err != nil {
		t.Fatal(err)
	}
	a := dstOf(t, first, acme)
	interrupted(t, e, a, d)
	takeAway(t, e, a, d)
	res, err := im.Run(ctx)
	if err != nil {
		t.Fatalf("resumed run: %v", err)
	}
	if res.Aggregated != 3 || res.DaysStored != 1 {
		t.Errorf("resumed run: aggregated %d, days stored %d; want 3 and 1", res.Aggregated, res.DaysStored)
	}
	if got := dayUsage(t, e, a, d, "email.sent"); got != 3 {
		t.Errorf("daily_usage email.sent on %s: %d, want 3", d.Format(time.DateOnly), got)
	}
	if got := dayUsage(t, e, a, d, "credits"); got != -3 {
		t.Errorf("daily_usage credits on %s: %d, want -3", d.Format(time.DateOnly), got)
	}
	if v, err := im.Verify(ctx); err != nil || !v.OK() {
		t.Errorf("verification: %v, %v", err, v.Diffs)
	}
}
