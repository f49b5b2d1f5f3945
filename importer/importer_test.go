package importer

import (
	"context"
	_ "embed"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/analyticsd/analyticsd/audit"
	"github.com/analyticsd/analyticsd/internal/testenv"
	"github.com/analyticsd/analyticsd/retention"
	"github.com/analyticsd/analyticsd/rollup"
	"github.com/analyticsd/analyticsd/tenant"
)

//go:embed testdata/guide_schema.sql
var guideSchema string

// The source's tenants. The guide's tables reference a tenants table the guide does not define; the
// tests' one has a slug, as analyticsd's tenants do (NULL for one tenant).
var (
	acme   = uuid.MustParse("0a0a0a0a-0000-4000-8000-0000000000a0")
	globex = uuid.MustParse("0b0b0b0b-0000-4000-8000-0000000000b0")
	noSlug = uuid.MustParse("0c0c0c0c-0000-4000-8000-0000000000c0")
)

// seedEvents: $1 events of the three tenants ($3, $4, $5) over the last $2 days, today included, tenant,
// day and event drawn independently. Every eighth event has no props and every ninth no source (NULLs
// the guide allows); props are printed by Postgres with spaces, which the import compacts.
const seedEvents = `INSERT INTO analytics_events (id, tenant_id, user_id, source, event, ts, props, ip, request_id)
SELECT gen_random_uuid(),
       (ARRAY[$3::uuid, $4::uuid, $5::uuid])[1 + r.t],
       'user-' || (i % 997),
       CASE WHEN i % 9 = 0 THEN NULL ELSE (ARRAY['app','api','webhook','job','payments','files','builder','agent'])[1 + i % 8] END,
       (ARRAY['auth.user.login','auth.user.registered','apikey.request','builder.generate.completed','email.sent',
              'webhook.delivered','files.uploaded','payments.checkout.created'])[1 + r.e],
       (date_trunc('day', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC')
         - make_interval(days => r.d) + make_interval(secs => r.s),
       CASE WHEN i % 8 = 0 THEN NULL ELSE jsonb_build_object('plan', 'pro', 'n', i, 'note', 'a, b: c') END,
       '10.0.' || (i % 256) || '.' || (i % 200),
       'req-' || i
FROM generate_series(1, $1::int) AS i,
     LATERAL (SELECT i AS k, floor(random() * 3)::int AS t, floor(random() * $2::int)::int AS d,
                     floor(random() * 8)::int AS e, floor(random() * 86400)::int AS s) AS r`

// seedUsage: the daily usage the guide's rollup job would have kept: api_requests_daily on every
// tenant-day with events, and acme's auth.user.login counts.
var seedUsage = []string{
	`INSERT INTO analytics_daily_usage (tenant_id, date, metric, count, meta)
SELECT tenant_id, (ts AT TIME ZONE 'UTC')::date, 'api_requests_daily', count(*) * 3, '{"from": "redis"}'
FROM analytics_events GROUP BY 1, 2`,
	`INSERT INTO analytics_daily_usage (tenant_id, date, metric, count)
SELECT tenant_id, (ts AT TIME ZONE 'UTC')::date, event, count(*)
FROM analytics_events WHERE event = 'auth.user.login' AND tenant_id = '0a0a0a0a-0000-4000-8000-0000000000a0' GROUP BY 1, 2, 3`,
}

// sourceDB is a fresh Postgres schema holding the guide's tables verbatim, seeded with n events over
// the last days days.
func sourceDB(t *testing.T, n, days int) *pgxpool.Pool {
	t.Helper()
	ctx := context.Background()
	src, _ := testenv.Postgres(t)
	for _, stmt := range []string{"CREATE TABLE tenants (id uuid PRIMARY KEY, slug text)", guideSchema} {
		if _, err := src.Exec(ctx, stmt); err != nil {
			t.Fatalf("create the source's tables: %v", err)
		}
	}
	if _, err := src.Exec(ctx, "INSERT INTO tenants (id, slug) VALUES ($1, 'acme'), ($2, 'Globex Corp'), ($3, NULL)", acme, globex, noSlug); err != nil {
		t.Fatal(err)
	}
	if _, err := src.Exec(ctx, seedEvents, n, days, acme, globex, noSlug); err != nil {
		t.Fatalf("seed events: %v", err)
	}
	for _, stmt := range seedUsage {
		if _, err := src.Exec(ctx, stmt); err != nil {
			t.Fatalf("seed daily usage: %v", err)
		}
	}
	return src
}

// setup is a migrated analyticsd and an importer config on src, billing through the rollup.
func setup(t *testing.T, src *pgxpool.Pool) (testenv.Env, Config) {
	t.Helper()
	e := testenv.Migrated(t)
	now := time.Now()
	rec := rollup.NewReconciler(e.CH, e.DB, e.PG, audit.New(e.PG), nil, nil, 90, nil)
	cfg := Config{
		Source: src, SourceName: "test-source", CH: e.CH, DB: e.DB, PG: e.PG,
		Tenants: tenant.NewStore(e.PG),
		Bill: func(ctx context.Context, day time.Time) error {
			_, err := rec.RunDate(ctx, day, rollup.AllTenants(), "import")
			return err
		},
		OldBefore: retention.Window{Days: 90}.CompleteFrom(time.Time{}, now),
		Today:     retention.Day(now),
		ChunkRows: 1000,
	}
	return e, cfg
}

func count(t *testing.T, e testenv.Env, q string, args ...any) int64 {
	t.Helper()
	var n uint64
	if err := e.CH.QueryRow(context.Background(), q, args...).Scan(&n); err != nil {
		t.Fatalf("%s: %v", q, err)
	}
	return int64(n)
}

// The whole promise on 20,000 events over 120 days: interrupted half-way and resumed, every event of
// the window is in ClickHouse once with its id, older ones only in daily_usage, usage metrics and
// events billed; a re-run adds nothing; and the verification agrees with the source.
func TestImportInterruptedResumedAndRepeated(t *testing.T) {
	const n, days = 20_000, 120
	src := sourceDB(t, n, days)
	e, cfg := setup(t, src)
	ctx := context.Background()
	if _, err := tenant.NewStore(e.PG).Create(ctx, "globex-inc", "Globex Inc"); err != nil {
		t.Fatal(err)
	}
	cfg.Map = map[string]string{"Globex Corp": "globex-inc"}

	// Interrupted once, half-way.
	ictx, cancel := context.WithCancel(ctx)
	cfg.Progress = func(done, total int64) {
		if done >= total/2 {
			cancel()
		}
	}
	im, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	first, err := im.Run(ictx)
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("interrupted run: got %v, want context.Canceled", err)
	}
	if first.Inserted+first.Aggregated == 0 || first.Inserted+first.Aggregated >= n {
		t.Fatalf("interrupted run imported %d+%d events, want part of %d", first.Inserted, first.Aggregated, n)
	}
	t.Logf("interrupted after %d inserted, %d aggregated", first.Inserted, first.Aggregated)

	// Resumed to the end.
	cfg.Progress = nil
	im, _ = New(cfg)
	second, err := im.Run(ctx)
	if err != nil {
		t.Fatalf("resumed run: %v", err)
	}
	if second.SourceEvents != n {
		t.Errorf("source events: got %d, want %d", second.SourceEvents, n)
	}
	var recent, old int64
	if err := src.QueryRow(ctx, "SELECT count(*) FILTER (WHERE ts >= $1), count(*) FILTER (WHERE ts < $1) FROM analytics_events", cfg.OldBefore).Scan(&recent, &old); err != nil {
		t.Fatal(err)
	}
	if old == 0 || recent == 0 {
		t.Fatalf("seed: %d recent and %d old events, want both", recent, old)
	}
	// An insert the interruption cut off may have landed unacknowledged: the resumed run finds its ids.
	t.Logf("resumed: %d inserted, %d found already present", second.Inserted, second.Present)
	if got := first.Inserted + second.Inserted; got > recent || got+second.Present < recent {
		t.Errorf("events inserted over both runs: %d (+%d found present), want %d (the window's events, once)", got, second.Present, recent)
	}
	if got := count(t, e, "SELECT count() FROM "+e.DB+".events"); got != recent {
		t.Errorf("ClickHouse events: got %d, want %d", got, recent)
	}
	if got := count(t, e, "SELECT count() FROM "+e.DB+".events WHERE ts < ?", cfg.OldBefore); got != 0 {
		t.Errorf("ClickHouse events older than the window: got %d, want 0 (they go to daily_usage only)", got)
	}
	if got := count(t, e, "SELECT toUInt64(sum(count)) FROM "+e.DB+".daily_usage WHERE date < toDate(?) AND metric LIKE '%.%'",
		cfg.OldBefore.Format(time.DateOnly)); got != old {
		t.Errorf("daily_usage of old days: got %d, want %d", got, old)
	}
	// Ids, NULL source and props as analyticsd keeps them.
	var id uuid.UUID
	var wantSource, wantProps string
	if err := src.QueryRow(ctx, "SELECT id, COALESCE(source, 'app'), COALESCE(props::text, '{}') FROM analytics_events WHERE ts >= $1 AND source IS NULL AND props IS NOT NULL LIMIT 1",
		cfg.OldBefore).Scan(&id, &wantSource, &wantProps); err != nil {
		t.Fatal(err)
	}
	var gotSource, gotProps string
	if err := e.CH.QueryRow(ctx, "SELECT source, props FROM "+e.DB+".events WHERE id = ?", id).Scan(&gotSource, &gotProps); err != nil {
		t.Fatalf("event %s in ClickHouse: %v", id, err)
	}
	if gotSource != "app" || gotProps[:2] != `{"` || strings.Contains(gotProps, `": `) {
		t.Errorf("event %s: source %q props %q, want app and compact JSON of %s", id, gotSource, gotProps, wantProps)
	}
	// Tenants: acme by its slug (created), Globex mapped, the slug-less one from its id.
	slugs := map[uuid.UUID]string{}
	for _, tr := range second.Tenants {
		slugs[tr.Source] = tr.Slug
	}
	if slugs[acme] != "acme" || slugs[globex] != "globex-inc" || slugs[noSlug] != "t-0c0c0c0c0000" {
		t.Errorf("tenants: got %v", slugs)
	}
	// Usage metrics: billed and served like the rollup's rows.
	var billed, want int64
	if err := src.QueryRow(ctx, "SELECT sum(count) FROM analytics_daily_usage WHERE metric = 'api_requests_daily' AND date < $1", cfg.Today).Scan(&want); err != nil {
		t.Fatal(err)
	}
	if err := e.PG.QueryRow(ctx, "SELECT COALESCE(sum(count), 0) FROM analytics_daily_usage WHERE metric = 'api_requests_daily'").Scan(&billed); err != nil {
		t.Fatal(err)
	}
	if billed != want {
		t.Errorf("billed api_requests_daily: got %d, want %d", billed, want)
	}

	// Verified on both sides.
	v, err := im.Verify(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if !v.OK() {
		t.Fatalf("verification after the import: %d differences, first %v", len(v.Diffs), v.Diffs[0])
	}
	if v.Events != n || v.TenantDays == 0 {
		t.Errorf("verification compared %d events over %d tenant-days, want %d events", v.Events, v.TenantDays, n)
	}

	// A re-run adds nothing, also when the checkpoint is gone (ids are checked in ClickHouse).
	before := count(t, e, "SELECT toUInt64(sum(count)) FROM "+e.DB+".daily_usage")
	third, err := im.Run(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if third.Inserted+third.Aggregated+third.Increments != 0 || third.DaysStored != 0 {
		t.Errorf("re-run: %+v, want nothing added", third)
	}
	if _, err := e.PG.Exec(ctx, "DELETE FROM import_days WHERE day >= $1", cfg.OldBefore); err != nil {
		t.Fatal(err)
	}
	fourth, err := im.Run(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if fourth.Inserted != 0 || fourth.Increments != 0 || fourth.Present != recent {
		t.Errorf("re-run without checkpoint: inserted %d, increments %d, already present %d; want 0, 0, %d", fourth.Inserted, fourth.Increments, fourth.Present, recent)
	}
	if after := count(t, e, "SELECT toUInt64(sum(count)) FROM "+e.DB+".daily_usage"); after != before {
		t.Errorf("daily_usage total after re-runs: got %d, want %d", after, before)
	}
	if v, err := im.Verify(ctx); err != nil || !v.OK() {
		t.Errorf("verification after re-runs: %v, %v", err, v.Diffs)
	}
}

// An aggregate insert interrupted after it landed but before the checkpoint said so is not repeated:
// the day's total tells.
func TestImportAggregateLandedBeforeCheckpoint(t *testing.T) {
	src := sourceDB(t, 3000, 120)
	e, cfg := setup(t, src)
	ctx := context.Background()
	im, _ := New(cfg)
	if _, err := im.Run(ctx); err != nil {
		t.Fatal(err)
	}
	before := count(t, e, "SELECT toUInt64(sum(count)) FROM "+e.DB+".daily_usage")
	// Rewind one old day of each tenant to 'inserting' with the totals the insert recorded.
	tag, err := e.PG.Exec(ctx, `UPDATE import_days SET state = 'inserting' WHERE day < $1 AND before_total IS NOT NULL AND day = (SELECT min(day) FROM import_days)`, cfg.OldBefore)
	if err != nil || tag.RowsAffected() == 0 {
		t.Fatalf("rewind: %v, %d rows", err, tag.RowsAffected())
	}
	res, err := im.Run(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if res.Aggregated != 0 || res.DaysStored != int(tag.RowsAffected()) {
		t.Errorf("resume of a landed aggregate: aggregated %d, days stored %d; want 0 and %d", res.Aggregated, res.DaysStored, tag.RowsAffected())
	}
	if after := count(t, e, "SELECT toUInt64(sum(count)) FROM "+e.DB+".daily_usage"); after != before {
		t.Errorf("daily_usage total: got %d, want %d", after, before)
	}
	// And one that did not land is done again: put the day back as it was (nothing) by taking its
	// rows away, metric by metric.
	var tid uuid.UUID
	var day time.Time
	if err := e.PG.QueryRow(ctx, "SELECT tenant_id, day FROM import_days WHERE day < $1 ORDER BY day LIMIT 1", cfg.OldBefore).Scan(&tid, &day); err != nil {
		t.Fatal(err)
	}
	takeAway(t, e, tid, day)
	if _, err := e.PG.Exec(ctx, "UPDATE import_days SET state = 'inserting' WHERE tenant_id = $1 AND day = $2", tid, day); err != nil {
		t.Fatal(err)
	}
	res, err = im.Run(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if res.DaysStored != 1 || res.Aggregated == 0 {
		t.Errorf("resume of an aggregate that did not land: %+v, want the day stored again", res)
	}
	if after := count(t, e, "SELECT toUInt64(sum(count)) FROM "+e.DB+".daily_usage"); after != before {
		t.Errorf("daily_usage total after redoing the day: got %d, want %d", after, before)
	}
}

// takeAway adds to daily_usage the opposite of tenant's day, metric by metric: the day reads as if
// its rows had never been inserted.
func takeAway(t *testing.T, e testenv.Env, tenant uuid.UUID, day time.Time) {
	t.Helper()
	rows, err := e.CH.Query(context.Background(), "SELECT metric, sum(count) FROM "+e.DB+".daily_usage WHERE tenant_id = ? AND date = toDate(?) GROUP BY metric",
		tenant, day.Format(time.DateOnly))
	if err != nil {
		t.Fatal(err)
	}
	defer rows.Close()
	var opposite [][]any
	for rows.Next() {
		var metric string
		var n int64
		if err := rows.Scan(&metric, &n); err != nil {
			t.Fatal(err)
		}
		opposite = append(opposite, []any{tenant, day, metric, -n})
	}
	if err := rows.Err(); err != nil || len(opposite) == 0 {
		t.Fatalf("daily_usage of %s on %s: %v, %d metrics", tenant, day.Format(time.DateOnly), err, len(opposite))
	}
	e.Insert(t, "daily_usage", "tenant_id, date, metric, count", opposite...)
}

// The verification names what differs: an event the source got after the import, and a billed row
// someone changed.
func TestImportVerificationCatchesMismatch(t *testing.T) {
	src := sourceDB(t, 2000, 30)
	e, cfg := setup(t, src)
	ctx := context.Background()
	im, _ := New(cfg)
	if _, err := im.Run(ctx); err != nil {
		t.Fatal(err)
	}
	if v, err := im.Verify(ctx); err != nil || !v.OK() {
		t.Fatalf("verification after the import: %v %v", err, v.Diffs)
	}
	day := cfg.Today.AddDate(0, 0, -3)
	if _, err := src.Exec(ctx, "INSERT INTO analytics_events (id, tenant_id, event, ts) VALUES (gen_random_uuid(), $1, 'email.sent', $2)",
		acme, day.Add(time.Hour)); err != nil {
		t.Fatal(err)
	}
	if _, err := e.PG.Exec(ctx, "UPDATE analytics_daily_usage SET count = count + 5 WHERE metric = 'api_requests_daily' AND date = $1", day.AddDate(0, 0, -1)); err != nil {
		t.Fatal(err)
	}
	v, err := im.Verify(ctx)
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]bool{
		"acme " + day.Format(time.DateOnly) + " email.sent clickhouse":             false,
		"acme " + day.Format(time.DateOnly) + " events clickhouse":                 false,
		"acme " + day.Format(time.DateOnly) + " email.sent billed":                 false,
		day.AddDate(0, 0, -1).Format(time.DateOnly) + " api_requests_daily billed": false,
	}
	for _, d := range v.Diffs {
		t.Logf("diff: %s", d)
		for k := range want {
			if strings.Contains(d.Tenant+" "+d.Day+" "+d.Metric+" "+d.Where, k) {
				want[k] = true
			}
		}
	}
	for k, found := range want {
		if !found {
			t.Errorf("verification did not report %q", k)
		}
	}
}
