package rollup

import (
	"context"
	"fmt"
	"sort"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"

	"github.com/analyticsd/analyticsd/internal/chlimit"
)

// dayTenant is one tenant's usage on one date.
type dayTenant struct {
	date   string
	tenant uuid.UUID
}

// Drifted returns the dates in [first, last], oldest first, whose billed usage in Postgres no longer
// matches ClickHouse for some tenant: a successful run reconciled the date (for every tenant, or for
// that one), and ClickHouse's daily_usage total for the tenant and date now differs from the total of
// its analytics_daily_usage rows. That happens when events arrive late for a day the look-back has
// already moved past (ingest accepts timestamps up to RETENTION_DAYS old), or when a run published
// while a repair was still settling. Tenants Postgres does not know are ignored, as runs skip them.
//
// It reads one small aggregate per store (one row per date and tenant), so it is cheap enough to run
// over the whole retention window every day.
func (r *Reconciler) Drifted(ctx context.Context, first, last time.Time) ([]time.Time, error) {
	from, to := Day(first).Format(time.DateOnly), Day(last).Format(time.DateOnly)
	if from > to {
		return nil, nil
	}
	// Which (date, tenant) pairs are billed: a run for every tenant covers the whole date.
	type run struct {
		Date   string
		Tenant *uuid.UUID
	}
	// Query's error, if any, is also what CollectRows returns: one check per read.
	rows, _ := r.pg.Query(ctx, "SELECT DISTINCT to_char(date, 'YYYY-MM-DD'), tenant_id FROM rollup_runs "+
		"WHERE status = 'ok' AND date BETWEEN $1::date AND $2::date", from, to)
	runs, err := pgx.CollectRows(rows, pgx.RowToStructByPos[run])
	if err != nil {
		return nil, fmt.Errorf("drift check: read rollup_runs: %w", err)
	}
	if len(runs) == 0 {
		return nil, nil
	}
	billedAll := map[string]bool{}
	billedOne := map[dayTenant]bool{}
	for _, x := range runs {
		if x.Tenant == nil {
			billedAll[x.Date] = true
		} else {
			billedOne[dayTenant{x.Date, *x.Tenant}] = true
		}
	}

	type total struct {
		Date   string
		Tenant uuid.UUID
		Count  int64
	}
	rows, _ = r.pg.Query(ctx, "SELECT to_char(u.date, 'YYYY-MM-DD'), u.tenant_id, sum(u.count)::bigint "+
		"FROM analytics_daily_usage u WHERE u.date BETWEEN $1::date AND $2::date GROUP BY u.date, u.tenant_id", from, to)
	totals, err := pgx.CollectRows(rows, pgx.RowToStructByPos[total])
	if err != nil {
		return nil, fmt.Errorf("drift check: read analytics_daily_usage: %w", err)
	}
	billed := make(map[dayTenant]int64, len(totals))
	for _, t := range totals {
		billed[dayTenant{t.Date, t.Tenant}] = t.Count
	}

	rows, _ = r.pg.Query(ctx, "SELECT id FROM tenants")
	ids, err := pgx.CollectRows(rows, pgx.RowTo[uuid.UUID])
	if err != nil {
		return nil, fmt.Errorf("drift check: read tenants: %w", err)
	}
	known := make(map[uuid.UUID]bool, len(ids))
	for _, id := range ids {
		known[id] = true
	}

	live := map[dayTenant]int64{}
	chRows, err := r.ch.Query(chlimit.Limit(r.QueryTimeout).Context(ctx), "SELECT toString(date), tenant_id, sum(count) FROM "+r.db+".daily_usage "+
		"WHERE date >= toDate(?) AND date <= toDate(?) GROUP BY date, tenant_id", from, to)
	if err != nil {
		return nil, fmt.Errorf("drift check: read clickhouse: %w", err)
	}
	for chRows.Next() {
		var k dayTenant
		var n int64
		if err := chRows.Scan(&k.date, &k.tenant, &n); err != nil {
			chRows.Close()
			return nil, fmt.Errorf("drift check: read clickhouse: %w", err)
		}
		live[k] = n
	}
	chRows.Close()
	if err := chRows.Err(); err != nil {
		return nil, fmt.Errorf("drift check: read clickhouse: %w", err)
	}
	return driftedDates(billedAll, billedOne, known, billed, live), nil
}

// driftedDates compares the two totals of every billed pair of a known tenant; a pair present in only
// one store counts as 0 in the other.
func driftedDates(billedAll map[string]bool, billedOne map[dayTenant]bool, known map[uuid.UUID]bool,
	billed, live map[dayTenant]int64) []time.Time {
	drifted := map[string]bool{}
	check := func(k dayTenant) {
		if drifted[k.date] || !known[k.tenant] || (!billedAll[k.date] && !billedOne[k]) {
			return
		}
		if billed[k] != live[k] {
			drifted[k.date] = true
		}
	}
	for k := range billed {
		check(k)
	}
	for k := range live {
		check(k)
	}
	out := make([]time.Time, 0, len(drifted))
	for d := range drifted {
		if t, err := time.Parse(time.DateOnly, d); err == nil {
			out = append(out, t)
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Before(out[j]) })
	return out
}
