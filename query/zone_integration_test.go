package query

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/analyticsd/analyticsd/internal/testenv"
)

// TestLocalDaysMatchRawEvents stores events and increments every few minutes around daylight-saving
// changes in both directions, a skipped midnight and zones 30 and 45 minutes off the hour, then
// checks that every daily bucket and KPI of UsageIn and KPIsIn equals what the test counts itself
// from the same rows with Go's time.In.
func TestLocalDaysMatchRawEvents(t *testing.T) {
	t.Parallel()
	env := testenv.Migrated(t)
	ctx := context.Background()
	for _, c := range []struct {
		name, zone  string
		first, last string // local dates asked for
	}{
		{"berlin spring forward (23 h day)", "Europe/Berlin", "2026-03-27", "2026-03-31"},
		{"berlin fall back (25 h day)", "Europe/Berlin", "2026-10-23", "2026-10-27"},
		{"new york fall back", "America/New_York", "2026-10-30", "2026-11-03"},
		{"new york spring forward", "America/New_York", "2026-03-06", "2026-03-10"},
		{"santiago: spring forward skips midnight", "America/Santiago", "2026-09-04", "2026-09-08"},
		{"santiago fall back", "America/Santiago", "2026-04-03", "2026-04-07"},
		{"sydney spring forward (southern)", "Australia/Sydney", "2026-10-02", "2026-10-06"},
		{"kolkata +05:30", "Asia/Kolkata", "2026-11-10", "2026-11-14"},
		{"kathmandu +05:45", "Asia/Kathmandu", "2026-11-10", "2026-11-14"},
		{"st johns -03:30 spring forward", "America/St_Johns", "2026-03-06", "2026-03-10"},
		{"st johns -02:30 fall back", "America/St_Johns", "2026-10-30", "2026-11-03"},
	} {
		t.Run(c.name, func(t *testing.T) {
			z := mustZone(t, c.zone)
			first, last := date(c.first), date(c.last)
			from, to := z.DayStart(first), z.DayStart(last.AddDate(0, 0, 1))
			tenant := uuid.New()
			// Rows every 13 minutes from half a day before the range to half a day after it, plus
			// one row on each side of every local midnight.
			var stamps []time.Time
			for ts := from.Add(-12 * time.Hour); ts.Before(to.Add(12 * time.Hour)); ts = ts.Add(13 * time.Minute) {
				stamps = append(stamps, ts)
			}
			for d := first; !d.After(last.AddDate(0, 0, 1)); d = d.AddDate(0, 0, 1) {
				stamps = append(stamps, z.DayStart(d).Add(-time.Second), z.DayStart(d))
			}
			var events, increments [][]any
			want := map[string]map[string]int64{"auth.user.login": {}, "api_requests_daily": {}}
			wantKPI := map[string]KPI{} // now is late on the last day: every row up to it is in the week
			today := c.last
			loc, err := time.LoadLocation(c.zone)
			if err != nil {
				t.Fatal(err)
			}
			for i, ts := range stamps {
				day := ts.In(loc).Format(time.DateOnly)
				events = append(events, []any{tenant, ts, uuid.New(), ts, "auth.user.login", "app", "u", "{}", "", ""})
				n := int64(1 + i%3)
				increments = append(increments, []any{tenant, ts, uuid.New(), "api_requests_daily", n})
				if day >= c.first && day <= c.last {
					want["auth.user.login"][day]++
					want["api_requests_daily"][day] += n
				}
				if day <= today {
					for metric, count := range map[string]int64{"auth.user.login": 1, "api_requests_daily": n} {
						k := wantKPI[metric]
						k.Week, k.Month = k.Week+count, k.Month+count
						if day == today {
							k.Today += count
						}
						wantKPI[metric] = k
					}
				}
			}
			env.Insert(t, "events", "tenant_id, ts, id, received_at, event, source, user_id, props, ip, request_id", events...)
			env.Insert(t, "usage_increments", "tenant_id, ts, id, metric, n", increments...)

			// Both ways of counting across midnight: usage_quarter_hour, and the raw rows it stands
			// in for (a database not migrated since the upgrade).
			for _, fromSlots := range []bool{true, false} {
				s := NewStore(env.CH, env.DB, env.PG, 10*time.Second)
				if !fromSlots {
					s.qh.checked = time.Now() // not ready, and not asked again for a minute
				} else if !s.quarterHours(ctx) {
					t.Fatal("usage_quarter_hour is not readable on a migrated database")
				}
				now := to.Add(-time.Hour) // late on the last day: everything asked for is inside retention
				s.now = func() time.Time { return now }
				// On a cluster a read may go to a replica that has not fetched the newest parts yet.
				testenv.Eventually(t, 20*time.Second, func() error {
					if err := checkLocalDays(ctx, s, tenant, z, first, last, want, wantKPI); err != nil {
						return fmt.Errorf("slots=%v: %w", fromSlots, err)
					}
					return nil
				})
			}
		})
	}
}

// checkLocalDays compares UsageIn and KPIsIn with what the test counted.
func checkLocalDays(ctx context.Context, s *Store, tenant uuid.UUID, z Zone, first, last time.Time, want map[string]map[string]int64, wantKPI map[string]KPI) error {
	res, err := s.UsageIn(ctx, tenant, []string{"auth.user.login", "api_requests_daily"}, z, first, last, true)
	if err != nil {
		return err
	}
	for metric, days := range want {
		got := map[string]int64{}
		for _, p := range res.Series[metric] {
			got[p.Date] = p.Count
			if string(p.Meta) != `{"source":"local"}` {
				return fmt.Errorf("%s %s: meta %s, want source local", metric, p.Date, p.Meta)
			}
		}
		if fmt.Sprint(got) != fmt.Sprint(days) {
			return fmt.Errorf("%s per local day:\n got %v\nwant %v", metric, got, days)
		}
	}
	kpis, err := s.KPIsIn(ctx, tenant, []string{"auth.user.login", "api_requests_daily"}, z)
	if err != nil {
		return err
	}
	for metric, k := range wantKPI {
		if kpis[metric] != k {
			return fmt.Errorf("%s KPIs: got %+v, want %+v", metric, kpis[metric], k)
		}
	}
	return nil
}

// TestLocalDaysBeyondRetention: a local day that starts before the raw window is answered from the
// UTC day's aggregate and says so; days inside it come from the raw rows.
func TestLocalDaysBeyondRetention(t *testing.T) {
	t.Parallel()
	env := testenv.Migrated(t)
	tenant := uuid.New()
	z := mustZone(t, "Asia/Kolkata")
	now := instant("2026-11-30T12:00:00Z")
	s := NewStore(env.CH, env.DB, env.PG, 10*time.Second)
	s.now = func() time.Time { return now }
	s.SetRetentionDays(10)                 // raw rows complete from 2026-11-21 00:00 UTC
	old := instant("2026-11-10T20:00:00Z") // 2026-11-11 01:30 in Kolkata, 2026-11-10 in UTC
	fresh := instant("2026-11-25T20:00:00Z")
	env.Insert(t, "events", "tenant_id, ts, id, received_at, event, source, user_id, props, ip, request_id",
		[]any{tenant, old, uuid.New(), old, "auth.user.login", "app", "u", "{}", "", ""},
		[]any{tenant, fresh, uuid.New(), fresh, "auth.user.login", "app", "u", "{}", "", ""})
	res, err := s.UsageIn(context.Background(), tenant, []string{"auth.user.login"}, z, date("2026-11-01"), date("2026-11-30"), false)
	if err != nil {
		t.Fatal(err)
	}
	got := fmt.Sprint(res.Series["auth.user.login"])
	want := fmt.Sprint([]Point{
		{Date: "2026-11-10", Count: 1, Meta: []byte(`{"source":"clickhouse","utc_day":true}`)},
		{Date: "2026-11-26", Count: 1, Meta: []byte(`{"source":"local"}`)},
	})
	if got != want {
		t.Errorf("got %s\nwant %s", got, want)
	}
}

// TestLocalDaysReadQuarterHours: with usage_quarter_hour readable, the rows between a local and a UTC
// midnight are taken from it, not from the raw rows: an aggregate with no raw rows behind it moves.
func TestLocalDaysReadQuarterHours(t *testing.T) {
	t.Parallel()
	env := testenv.Migrated(t)
	tenant := uuid.New()
	z := mustZone(t, "Asia/Kolkata")
	slot := instant("2026-11-25T20:00:00Z") // 2026-11-26 01:30 in Kolkata, 2026-11-25 in UTC
	env.Insert(t, "daily_usage", "tenant_id, date, metric, count", []any{tenant, date("2026-11-25"), "auth.user.login", int64(5)})
	env.Insert(t, "usage_quarter_hour", "tenant_id, metric, slot, count", []any{tenant, "auth.user.login", slot, int64(5)})
	s := NewStore(env.CH, env.DB, env.PG, 10*time.Second)
	s.now = func() time.Time { return instant("2026-11-30T12:00:00Z") }
	res, err := s.UsageIn(context.Background(), tenant, []string{"auth.user.login"}, z, date("2026-11-24"), date("2026-11-27"), false)
	if err != nil {
		t.Fatal(err)
	}
	if got, want := fmt.Sprint(res.Series["auth.user.login"]), fmt.Sprint([]Point{{Date: "2026-11-26", Count: 5, Meta: metaLocal}}); got != want {
		t.Errorf("got %s, want %s", got, want)
	}
}

// TestLocalDaysAcrossTheRawWindowsStart: a range that starts before the raw window has UTC days up to
// it and local days after; a row between the local and the UTC midnight at that boundary is counted
// once — not on both sides (east of Greenwich), not on neither (west). Both failed before: Kolkata
// counted such an event twice, New York not at all.
func TestLocalDaysAcrossTheRawWindowsStart(t *testing.T) {
	t.Parallel()
	env := testenv.Migrated(t)
	now := instant("2026-11-30T12:00:00Z")
	for _, c := range []struct {
		zone, at string
	}{
		{"Asia/Kolkata", "2026-11-27T20:00:00Z"},     // UTC 11-27, local 11-28 01:30
		{"America/New_York", "2026-11-27T02:00:00Z"}, // UTC 11-27, local 11-26 21:00
	} {
		tenant := uuid.New()
		z := mustZone(t, c.zone)
		at := instant(c.at)
		env.Insert(t, "events", "tenant_id, ts, id, received_at, event, source, user_id, props, ip, request_id",
			[]any{tenant, at, uuid.New(), at, "auth.user.login", "app", "u", "{}", "", ""})
		s := NewStore(env.CH, env.DB, env.PG, 10*time.Second)
		s.now = func() time.Time { return now }
		s.SetRetentionDays(4) // raw rows complete from 11-27 00:00 UTC: the split falls on the event's days
		testenv.Eventually(t, 20*time.Second, func() error {
			res, err := s.UsageIn(context.Background(), tenant, []string{"auth.user.login"}, z, date("2026-11-20"), date("2026-11-30"), false)
			if err != nil {
				return err
			}
			var total int64
			for _, p := range res.Series["auth.user.login"] {
				total += p.Count
			}
			kpis, err := s.KPIsIn(context.Background(), tenant, []string{"auth.user.login"}, z)
			if err != nil {
				return err
			}
			if k := kpis["auth.user.login"]; total != 1 || k.Month != 1 || k.Week != 1 {
				return fmt.Errorf("%s: one event counted %d times in the series %v, KPIs %+v; want once", c.zone, total, res.Series["auth.user.login"], k)
			}
			return nil
		})
	}
}
