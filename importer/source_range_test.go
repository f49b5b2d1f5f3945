package importer

import (
	"context"
	"testing"
	"time"

	"github.com/google/uuid"
)

// Timestamps and dates ClickHouse's DateTime and Date cannot hold (before 1970-01-01, from 2106 on)
// are skipped and counted, like rows without ts. Before, they wrapped silently: an event 2^32 s after
// one of a day inside the window was stored, counted and billed on that day (2 events, not 1), one of
// 1969-12-31 and a usage row of 2200 landed on other days, and the verification disagreed.
func TestTimestampsClickHouseCannotHoldAreSkipped(t *testing.T) {
	src := sourceDB(t, 0, 1)
	e, cfg := setup(t, src)
	ctx := context.Background()
	day := cfg.Today.AddDate(0, 0, -2)
	for _, ts := range []time.Time{
		day.Add(time.Hour),                          // a real event of day
		day.Add(10*time.Hour + (1<<32)*time.Second), // year 2162: DateTime wraps it onto day
		time.Date(1969, 12, 31, 12, 0, 0, 0, time.UTC),
		time.Date(2106, 1, 1, 0, 0, 0, 0, time.UTC), // DateTime holds it, but not its whole day
	} {
		addEvents(t, src, acme, "email.sent", ts, 1)
	}
	addUsage(t, src, acme, day, "api_requests_daily", 2)
	addUsage(t, src, acme, time.Date(1969, 12, 31, 0, 0, 0, 0, time.UTC), "api_requests_daily", 5)
	addUsage(t, src, acme, time.Date(2200, 1, 1, 0, 0, 0, 0, time.UTC), "api_requests_daily", 7)
	im, _ := New(cfg)
	res, err := im.Run(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if res.SourceEvents != 1 || res.Skipped != 3 || res.SkippedUsage != 2 || res.Inserted != 1 {
		t.Errorf("source events %d, skipped %d, skipped usage rows %d, inserted %d; want 1, 3, 2, 1", res.SourceEvents, res.Skipped, res.SkippedUsage, res.Inserted)
	}
	if got := count(t, e, "SELECT count() FROM "+e.DB+".events"); got != 1 {
		t.Errorf("ClickHouse events: %d, want 1 (the source has 1 event ClickHouse can hold)", got)
	}
	if got := count(t, e, "SELECT toUInt64(sum(count)) FROM "+e.DB+".daily_usage"); got != 3 {
		t.Errorf("daily_usage in all: %d, want 3 (day's event and usage row)", got)
	}
	var billed int64
	if err := e.PG.QueryRow(ctx, "SELECT COALESCE(sum(count), 0) FROM analytics_daily_usage WHERE date = $1", day).Scan(&billed); err != nil {
		t.Fatal(err)
	}
	if billed != 3 {
		t.Errorf("billed usage of %s: %d, want 3", day.Format(time.DateOnly), billed)
	}
	if v, err := im.Verify(ctx); err != nil || !v.OK() || v.Events != 1 {
		t.Errorf("verification: %v, %d events, %v", err, v.Events, v.Diffs)
	}
}

// 'infinity' and '-infinity' are valid timestamptz and date values. Before, one such row made the
// import and the verification fail ("cannot scan Infinity into *time.Time"); now it is skipped and
// counted.
func TestInfiniteTimestampsAndDatesAreSkipped(t *testing.T) {
	src := sourceDB(t, 0, 1)
	_, cfg := setup(t, src)
	ctx := context.Background()
	day := cfg.Today.AddDate(0, 0, -1)
	addEvents(t, src, acme, "email.sent", day, 1)
	for _, v := range []string{"infinity", "-infinity"} {
		if _, err := src.Exec(ctx, "INSERT INTO analytics_events (id, tenant_id, event, ts) VALUES ($1, $2, 'email.sent', $3::timestamptz)", uuid.New(), acme, v); err != nil {
			t.Fatal(err)
		}
		if _, err := src.Exec(ctx, "INSERT INTO analytics_daily_usage (tenant_id, date, metric, count) VALUES ($1, $2::date, 'api_requests_daily', 4)", acme, v); err != nil {
			t.Fatal(err)
		}
	}
	im, _ := New(cfg)
	res, err := im.Run(ctx)
	if err != nil {
		t.Fatalf("import with infinite timestamps and dates: %v", err)
	}
	if res.Inserted != 1 || res.Skipped != 2 || res.SkippedUsage != 2 {
		t.Errorf("inserted %d, skipped %d, skipped usage rows %d; want 1, 2, 2", res.Inserted, res.Skipped, res.SkippedUsage)
	}
	if v, err := im.Verify(ctx); err != nil || !v.OK() {
		t.Errorf("verification: %v, %v", err, v.Diffs)
	}
}
