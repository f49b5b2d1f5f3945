package schema_test

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/analyticsd/analyticsd/internal/testenv"
	"github.com/analyticsd/analyticsd/schema"
)

// slotCounts reads a tenant's usage_quarter_hour as "metric slot" -> count (zero sums left out).
func slotCounts(t *testing.T, env testenv.Env, tenant uuid.UUID) map[string]int64 {
	t.Helper()
	rows, err := env.CH.Query(context.Background(), "SELECT metric, slot, sum(count) AS c FROM "+env.Layout().Table("usage_quarter_hour")+
		" WHERE tenant_id = ? GROUP BY metric, slot HAVING c != 0", tenant)
	if err != nil {
		t.Fatal(err)
	}
	defer rows.Close()
	out := map[string]int64{}
	for rows.Next() {
		var m string
		var slot time.Time
		var n int64
		if err := rows.Scan(&m, &slot, &n); err != nil {
			t.Fatal(err)
		}
		out[m+" "+slot.UTC().Format(time.RFC3339)] = n
	}
	return out
}

// rawRows stores, for tenant, an event and an increment of 3 every 7 minutes over two days, and
// returns what usage_quarter_hour must then hold.
func rawRows(t *testing.T, env testenv.Env, tenant uuid.UUID, from time.Time) map[string]int64 {
	t.Helper()
	want := map[string]int64{}
	var events, increments [][]any
	for ts := from; ts.Before(from.Add(48 * time.Hour)); ts = ts.Add(7 * time.Minute) {
		slot := ts.Truncate(15 * time.Minute).Format(time.RFC3339)
		events = append(events, []any{tenant, ts, uuid.New(), ts, "auth.user.login", "app", "u", "{}", "", ""})
		increments = append(increments, []any{tenant, ts, uuid.New(), "api_requests_daily", int64(3)})
		want["auth.user.login "+slot]++
		want["api_requests_daily "+slot] += 3
	}
	env.Insert(t, "events", "tenant_id, ts, id, received_at, event, source, user_id, props, ip, request_id", events...)
	env.Insert(t, "usage_increments", "tenant_id, ts, id, metric, n", increments...)
	return want
}

// FillQuarterHours counts in what the aggregate lacks and never lowers a count (an erased user's
// counts are kept there, as in daily_usage), and a second run changes nothing.
func TestFillQuarterHoursRepairsEverySlot(t *testing.T) {
	t.Parallel()
	env := testenv.Migrated(t)
	ctx := context.Background()
	tenant, other := uuid.New(), uuid.New()
	day := time.Now().UTC().Truncate(24*time.Hour).AddDate(0, 0, -3)
	want := rawRows(t, env, tenant, day)
	wantOther := rawRows(t, env, other, day.Add(5*time.Hour))
	if got := slotCounts(t, env, tenant); fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("the materialized views: got %d slots, want %d", len(got), len(want))
	}
	// An aggregate that lacks rows: two slots 2 short (as for rows stored before the table existed).
	short1, short2 := day.Add(30*time.Hour), day.Add(45*time.Minute)
	env.Insert(t, "usage_quarter_hour", "tenant_id, metric, slot, count",
		[]any{tenant, "api_requests_daily", short1, int64(-2)},
		[]any{tenant, "auth.user.login", short2, int64(-1)})
	// And one that holds more than the raw rows: an erased user's events, deleted from events only.
	erasedAt := day.Add(10 * time.Hour)
	env.Insert(t, "events", "tenant_id, ts, id, received_at, event, source, user_id, props, ip, request_id",
		[]any{tenant, erasedAt, uuid.New(), erasedAt, "auth.user.login", "app", "erased-user", "{}", "", ""},
		[]any{tenant, erasedAt, uuid.New(), erasedAt, "auth.user.login", "app", "erased-user", "{}", "", ""})
	want["auth.user.login "+erasedAt.Format(time.RFC3339)] += 2
	if err := env.CH.Exec(ctx, "ALTER TABLE "+env.Layout().Local("events")+env.Layout().OnCluster()+" DELETE WHERE user_id = 'erased-user'"); err != nil {
		t.Fatal(err)
	}
	testenv.Eventually(t, 30*time.Second, func() error {
		var n uint64
		if err := env.CH.QueryRow(ctx, "SELECT count() FROM "+env.Layout().Table("events")+" WHERE user_id = 'erased-user'").Scan(&n); err != nil || n != 0 {
			return fmt.Errorf("%d erased rows still there (%v)", n, err)
		}
		return nil
	})
	if got := slotCounts(t, env, tenant); fmt.Sprint(got) == fmt.Sprint(want) {
		t.Fatal("the disturbed aggregate still equals the raw rows")
	}
	if err := schema.FillQuarterHours(ctx, env.CH, env.Layout(), 10*time.Millisecond); err != nil {
		t.Fatal(err)
	}
	if got := slotCounts(t, env, tenant); fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("after the fill:\n got %v\nwant %v", got, want)
	}
	if got := slotCounts(t, env, other); fmt.Sprint(got) != fmt.Sprint(wantOther) {
		t.Errorf("the other tenant after the fill: got %d slots, want %d", len(got), len(wantOther))
	}
	// Keys, not rows: a background merge of the summing table between the two counts folds rows
	// together (a clean-clone run counted 2 rows fewer after the second fill).
	var keysBefore, keysAfter uint64
	q := "SELECT count() FROM (SELECT tenant_id, metric, slot FROM " + env.Layout().Table("usage_quarter_hour") + " GROUP BY tenant_id, metric, slot)"
	if err := env.CH.QueryRow(ctx, q).Scan(&keysBefore); err != nil {
		t.Fatal(err)
	}
	before := slotCounts(t, env, tenant)
	if err := schema.FillQuarterHours(ctx, env.CH, env.Layout(), 10*time.Millisecond); err != nil {
		t.Fatal(err)
	}
	if err := env.CH.QueryRow(ctx, q).Scan(&keysAfter); err != nil {
		t.Fatal(err)
	}
	if keysAfter != keysBefore {
		t.Errorf("a second fill made %d slots into %d, want no new one", keysBefore, keysAfter)
	}
	if got := slotCounts(t, env, tenant); fmt.Sprint(got) != fmt.Sprint(before) {
		t.Errorf("a second fill changed counts:\n got %v\nwant %v", got, before)
	}
}

// An upgrade: rows stored before the migration that adds usage_quarter_hour are counted in by
// migrate, and reads may use the table only once that migration is recorded.
func TestMigrateFillsQuarterHoursFromStoredRows(t *testing.T) {
	t.Parallel()
	env := testenv.Migrated(t)
	ctx := context.Background()
	l := env.Layout()
	// Back to the schema of before the migration.
	for _, q := range []string{
		"DROP TABLE " + l.DB + ".usage_quarter_hour_events_mv" + l.OnCluster(),
		"DROP TABLE " + l.DB + ".usage_quarter_hour_increments_mv" + l.OnCluster(),
		"DROP TABLE " + l.Local("usage_quarter_hour") + l.OnCluster(),
	} {
		if err := env.CH.Exec(ctx, q); err != nil {
			t.Fatalf("%s: %v", q, err)
		}
	}
	if l.Clustered() {
		if err := env.CH.Exec(ctx, "DROP TABLE "+l.DB+".usage_quarter_hour"+l.OnCluster()); err != nil {
			t.Fatal(err)
		}
	}
	if err := env.CH.Exec(ctx, fmt.Sprintf("ALTER TABLE %s.schema_migrations DELETE WHERE version = %d", l.DB, schema.QuarterHoursVersion)); err != nil {
		t.Fatal(err)
	}
	testenv.Eventually(t, 30*time.Second, func() error {
		if ok, err := schema.Applied(ctx, env.CH, env.DB, schema.QuarterHoursVersion); err != nil || ok {
			return fmt.Errorf("migration %d still recorded (%v)", schema.QuarterHoursVersion, err)
		}
		return nil
	})

	tenant := uuid.New()
	want := rawRows(t, env, tenant, time.Now().UTC().Truncate(24*time.Hour).AddDate(0, 0, -2))
	res, err := (&schema.Migrator{CH: env.CH, PG: env.PG, DB: env.DB, Cluster: l.Cluster, RetentionDays: 90, FillSettle: 10 * time.Millisecond}).Run(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if fmt.Sprint(res.AppliedClickHouse) != fmt.Sprint([]int{schema.QuarterHoursVersion}) {
		t.Errorf("applied %v, want [%d]", res.AppliedClickHouse, schema.QuarterHoursVersion)
	}
	if got := slotCounts(t, env, tenant); fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("usage_quarter_hour after migrate:\n got %v\nwant %v", got, want)
	}
	if ok, err := schema.Applied(ctx, env.CH, env.DB, schema.QuarterHoursVersion); err != nil || !ok {
		t.Errorf("migration %d recorded: %v %v, want true", schema.QuarterHoursVersion, ok, err)
	}
}

// BenchmarkFillQuarterHours times migrate's fill of usage_quarter_hour on ANALYTICS_BENCH_EVENTS
// events stored before the table (emptied after the load), and a second fill that finds nothing to
// add (what a re-run costs):
//
//	ANALYTICS_BENCH_EVENTS=10000000 go test -run - -bench FillQuarterHours -benchtime 1x ./schema/
func BenchmarkFillQuarterHours(b *testing.B) {
	n := testenv.BenchEvents(b)
	env := testenv.Migrated(b)
	ctx := context.Background()
	tenants := make([]uuid.UUID, 50)
	for i := range tenants {
		tenants[i] = uuid.New()
	}
	now := time.Now().UTC()
	env.LoadEvents(b, n, func(i int) (uuid.UUID, time.Time, string, string) {
		return tenants[i%len(tenants)], now.Add(-time.Duration(i%(30*24*3600)) * time.Second), "auth.user.login", "u"
	})
	if err := env.CH.Exec(ctx, "TRUNCATE TABLE "+env.Layout().Local("usage_quarter_hour")+env.Layout().OnCluster()); err != nil {
		b.Fatal(err)
	}
	for _, run := range []string{"fill", "refill"} {
		t0 := time.Now()
		if err := schema.FillQuarterHours(ctx, env.CH, env.Layout(), time.Second); err != nil {
			b.Fatal(err)
		}
		b.ReportMetric(time.Since(t0).Seconds(), run+"-s")
		b.Logf("%s of %d events: %s", run, n, time.Since(t0).Round(time.Millisecond))
	}
}
