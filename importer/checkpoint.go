package importer

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"sort"
	"strings"
	"time"

	"github.com/ClickHouse/clickhouse-go/v2/lib/driver"
	"github.com/google/uuid"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/analyticsd/analyticsd/erasure"
)

// The states of a (tenant, day) in import_days (schema/postgres/0007_import.sql).
const (
	stateInserting = "inserting"
	stateStored    = "stored"
	stateBilled    = "billed"
)

// dayState is one import_days row.
type dayState struct {
	state         string
	before, delta int64
	// events: the day is 'inserting' as events (inside the window when it was started), not as
	// aggregates.
	events bool
	// beforeBy and deltaBy: per metric, the day's daily_usage before the insert and what the import
	// adds (zeros left out); nil in a row recorded by a release before 0016_import_metric_totals.
	beforeBy, deltaBy map[string]int64
}

// landed tells, from the day's daily_usage now (per metric), whether the insert the row records
// landed. A resumed run asks it of days whose insert no id check can find: aggregates, and events of
// a day that has left the window since (retention may have dropped them; daily_usage keeps their
// counts). It compares per metric, not one signed sum: rows adding up to 0 (a negative usage row
// offsetting the events) would look landed whether or not they did.
func (st dayState) landed(now map[string]int64) (bool, error) {
	if st.deltaBy == nil {
		// Recorded by an earlier release: one signed total, which tells only when it moves.
		var total int64
		for _, n := range now {
			total += n
		}
		switch {
		case st.events:
			return false, errors.New("its events were being inserted by an import of an earlier release, which did not record daily_usage totals, and it has left the retention window since, so the id check cannot tell which of them landed; compare that day's daily_usage with the source, then delete its import_days row (nothing landed) or set it 'stored' (all landed)")
		case st.delta != 0 && total == st.before+st.delta:
			return true, nil
		case st.delta != 0 && total == st.before:
			return false, nil
		case st.delta == 0:
			return false, fmt.Errorf("an import of an earlier release recorded it as adding 0 to daily_usage in all (now %d), which cannot tell whether its insert landed; compare that day's daily_usage with the source, then delete its import_days row (not landed) or set it 'stored' (landed)", total)
		}
		return false, fmt.Errorf("daily_usage is %d: neither its total before the interrupted import (%d) nor that plus what the import adds (%d); something else changed it meanwhile, reconcile that day by hand",
			total, st.before, st.before+st.delta)
	}
	after := map[string]int64{}
	for m, n := range st.beforeBy {
		after[m] += n
	}
	for m, n := range st.deltaBy {
		after[m] += n
	}
	// Where both hold, the insert adds 0 to every metric: landed or not, the sums are the same.
	if sameCounts(now, after) {
		return true, nil
	}
	if sameCounts(now, st.beforeBy) {
		return false, nil
	}
	return false, fmt.Errorf("daily_usage is neither what it was before the interrupted import nor that plus what the import adds (%s); something else changed it meanwhile, reconcile that day by hand",
		countsDiff(now, st.beforeBy, st.deltaBy))
}

// sameCounts compares two per-metric counts, a missing metric counting as 0.
func sameCounts(a, b map[string]int64) bool {
	for m, n := range a {
		if b[m] != n {
			return false
		}
	}
	for m, n := range b {
		if a[m] != n {
			return false
		}
	}
	return true
}

// countsDiff names, for an error, the metrics (at most 5) whose count now is neither before nor
// before plus delta.
func countsDiff(now, before, delta map[string]int64) string {
	seen := map[string]bool{}
	var out []string
	for _, c := range []map[string]int64{now, before, delta} {
		for m := range c {
			if n := now[m]; !seen[m] && n != before[m] && n != before[m]+delta[m] {
				seen[m] = true
				out = append(out, fmt.Sprintf("%s: now %d, before %d, adds %d", m, n, before[m], delta[m]))
			}
		}
	}
	sort.Strings(out)
	if len(out) > 5 {
		out = append(out[:5], fmt.Sprintf("and %d more metrics", len(out)-5))
	}
	return strings.Join(out, "; ")
}

// checkpoint reads and writes import_days and import_tenants for one source.
type checkpoint struct {
	pg     *pgxpool.Pool
	source string
	db     string // the ClickHouse database imported into: the lock's scope
}

// lock takes the import lock of the ClickHouse database (one import at a time: aggregates are checked
// by totals, which two imports into the same tenant would confuse). It holds one connection until
// unlock.
func (c *checkpoint) lock(ctx context.Context) (unlock func(), err error) {
	conn, err := c.pg.Acquire(ctx)
	if err != nil {
		return nil, fmt.Errorf("import: connect to postgres: %w", err)
	}
	var ok bool
	key := erasure.ImportLock(c.db) // erasures wait while it is held
	if err := conn.QueryRow(ctx, "SELECT pg_try_advisory_lock(hashtext($1))", key).Scan(&ok); err != nil {
		conn.Release()
		return nil, fmt.Errorf("import: take the import lock: %w", err)
	}
	if !ok {
		conn.Release()
		return nil, fmt.Errorf("import: another import into %s is running (Postgres advisory lock %s); wait for it to end", c.db, key)
	}
	return func() {
		uctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if _, err := conn.Exec(uctx, "SELECT pg_advisory_unlock(hashtext($1))", key); err != nil {
			_ = conn.Conn().Close(uctx) // closing the session releases the lock too
		}
		conn.Release()
	}, nil
}

// states returns the recorded state of each day of tenant.
func (c *checkpoint) states(ctx context.Context, tenant uuid.UUID) (map[time.Time]dayState, error) {
	rows, err := c.pg.Query(ctx, `SELECT day, state, COALESCE(before_total, 0), COALESCE(delta_total, 0), delta_total IS NULL,
    before_metrics::text, delta_metrics::text FROM import_days WHERE source = $1 AND tenant_id = $2`,
		c.source, tenant)
	if err != nil {
		return nil, fmt.Errorf("read import_days: %w", err)
	}
	defer rows.Close()
	out := map[time.Time]dayState{}
	for rows.Next() {
		var d time.Time
		var s dayState
		var before, delta *string
		if err := rows.Scan(&d, &s.state, &s.before, &s.delta, &s.events, &before, &delta); err != nil {
			return nil, fmt.Errorf("read import_days: %w", err)
		}
		if before != nil && delta != nil {
			if err := errors.Join(json.Unmarshal([]byte(*before), &s.beforeBy), json.Unmarshal([]byte(*delta), &s.deltaBy)); err != nil {
				return nil, fmt.Errorf("read import_days: %s: %w", d.Format(time.DateOnly), err)
			}
		}
		out[d.UTC()] = s
	}
	return out, rows.Err()
}

// set records state for tenant's days.
func (c *checkpoint) set(ctx context.Context, tenant uuid.UUID, days []time.Time, state string) error {
	if len(days) == 0 {
		return nil
	}
	_, err := c.pg.Exec(ctx, `INSERT INTO import_days (source, tenant_id, day, state)
SELECT $1, $2, d, $4 FROM unnest($3::date[]) AS d
ON CONFLICT (source, tenant_id, day) DO UPDATE SET state = EXCLUDED.state, updated_at = now()`,
		c.source, tenant, days, state)
	if err != nil {
		return fmt.Errorf("record %d days as %s in import_days: %w", len(days), state, err)
	}
	return nil
}

// startEvents records (tenant, day)s whose events are about to be inserted, unless recorded already,
// with each one's daily_usage before and what its events and increments add, per metric: should the
// run stop before the day is stored and the day leave the window before a run resumes it, retention
// may drop its events, and only daily_usage can tell whether they landed. The row recorded first
// stays: its before is from before any of the day's rows were inserted.
func (c *checkpoint) startEvents(ctx context.Context, tds []tenantDay, before, delta []map[string]int64) error {
	if len(tds) == 0 {
		return nil
	}
	tenants, days := split(tds)
	js, err := jsonCounts(before, delta)
	if err != nil {
		return err
	}
	// delta_total stays NULL: it is what tells an events day from an aggregate one, also to a release
	// before 0016_import_metric_totals.
	_, err = c.pg.Exec(ctx, `INSERT INTO import_days (source, tenant_id, day, state, before_metrics, delta_metrics)
SELECT $1, t.tenant_id, t.day, 'inserting', t.b::jsonb, t.x::jsonb
FROM unnest($2::uuid[], $3::date[], $4::text[], $5::text[]) AS t (tenant_id, day, b, x)
ON CONFLICT (source, tenant_id, day) DO NOTHING`, c.source, tenants, days, js[0], js[1])
	if err != nil {
		return fmt.Errorf("record %d tenant-days in import_days: %w", len(tds), err)
	}
	return nil
}

// jsonCounts encodes per-metric counts for import_days' jsonb columns.
func jsonCounts(lists ...[]map[string]int64) ([][]string, error) {
	out := make([][]string, len(lists))
	for i, l := range lists {
		out[i] = make([]string, len(l))
		for j, c := range l {
			b, err := json.Marshal(nonZero(c))
			if err != nil {
				return nil, err
			}
			out[i][j] = string(b)
		}
	}
	return out, nil
}

// nonZero is c without its zero counts (a metric summing to 0 in daily_usage reads as no row).
func nonZero(c map[string]int64) map[string]int64 {
	out := make(map[string]int64, len(c))
	for m, n := range c {
		if n != 0 {
			out[m] = n
		}
	}
	return out
}

// forget deletes tenant's days from import_days: days whose interrupted insert did not land, to be
// imported afresh (as aggregates or as events, whichever their date now says).
func (c *checkpoint) forget(ctx context.Context, tenant uuid.UUID, days []time.Time) error {
	if len(days) == 0 {
		return nil
	}
	if _, err := c.pg.Exec(ctx, "DELETE FROM import_days WHERE source = $1 AND tenant_id = $2 AND day = ANY($3::date[])", c.source, tenant, days); err != nil {
		return fmt.Errorf("forget %d tenant-days in import_days: %w", len(days), err)
	}
	return nil
}

// setDays records state for (tenant, day)s.
func (c *checkpoint) setDays(ctx context.Context, tds []tenantDay, state string) error {
	if len(tds) == 0 {
		return nil
	}
	tenants, days := split(tds)
	_, err := c.pg.Exec(ctx, `INSERT INTO import_days (source, tenant_id, day, state)
SELECT $1, t.tenant_id, t.day, $4 FROM unnest($2::uuid[], $3::date[]) AS t (tenant_id, day)
ON CONFLICT (source, tenant_id, day) DO UPDATE SET state = EXCLUDED.state, updated_at = now()`,
		c.source, tenants, days, state)
	if err != nil {
		return fmt.Errorf("record %d tenant-days as %s in import_days: %w", len(tds), state, err)
	}
	return nil
}

func split(tds []tenantDay) ([]uuid.UUID, []time.Time) {
	tenants, days := make([]uuid.UUID, len(tds)), make([]time.Time, len(tds))
	for i, td := range tds {
		tenants[i], days[i] = td.tenant, td.day
	}
	return tenants, days
}

// inserting records, before an aggregate insert, each day's daily_usage total and what it adds: in
// all, and per metric.
func (c *checkpoint) inserting(ctx context.Context, tenant uuid.UUID, days []time.Time, before, delta []map[string]int64) error {
	beforeTotal, deltaTotal := make([]int64, len(days)), make([]int64, len(days))
	for i := range days {
		for _, n := range before[i] {
			beforeTotal[i] += n
		}
		for _, n := range delta[i] {
			deltaTotal[i] += n
		}
	}
	js, err := jsonCounts(before, delta)
	if err != nil {
		return err
	}
	_, err = c.pg.Exec(ctx, `INSERT INTO import_days (source, tenant_id, day, state, before_total, delta_total, before_metrics, delta_metrics)
SELECT $1, $2, t.d, 'inserting', t.b, t.x, t.bm::jsonb, t.xm::jsonb
FROM unnest($3::date[], $4::bigint[], $5::bigint[], $6::text[], $7::text[]) AS t (d, b, x, bm, xm)
ON CONFLICT (source, tenant_id, day) DO UPDATE SET state = 'inserting', before_total = EXCLUDED.before_total,
    delta_total = EXCLUDED.delta_total, before_metrics = EXCLUDED.before_metrics, delta_metrics = EXCLUDED.delta_metrics,
    updated_at = now()`, c.source, tenant, days, beforeTotal, deltaTotal, js[0], js[1])
	if err != nil {
		return fmt.Errorf("record %d aggregate days in import_days: %w", len(days), err)
	}
	return nil
}

// tenantMap returns the mapping recorded by earlier runs: source tenant → analyticsd tenant.
func (c *checkpoint) tenantMap(ctx context.Context) (map[uuid.UUID]uuid.UUID, error) {
	rows, err := c.pg.Query(ctx, "SELECT source_tenant_id, tenant_id FROM import_tenants WHERE source = $1", c.source)
	if err != nil {
		return nil, fmt.Errorf("read import_tenants: %w", err)
	}
	defer rows.Close()
	out := map[uuid.UUID]uuid.UUID{}
	for rows.Next() {
		var s, t uuid.UUID
		if err := rows.Scan(&s, &t); err != nil {
			return nil, fmt.Errorf("read import_tenants: %w", err)
		}
		out[s] = t
	}
	return out, rows.Err()
}

func (c *checkpoint) recordTenant(ctx context.Context, src, dst uuid.UUID, created bool) error {
	_, err := c.pg.Exec(ctx, `INSERT INTO import_tenants (source, source_tenant_id, tenant_id, created) VALUES ($1, $2, $3, $4)
ON CONFLICT (source, source_tenant_id) DO NOTHING`, c.source, src, dst, created)
	if err != nil {
		return fmt.Errorf("record tenant mapping in import_tenants: %w", err)
	}
	return nil
}

// awaitEarlierInserts waits until no insert of an earlier import into db is still running on
// ClickHouse (a killed import's last insert may still commit), stopping it after 10 s: the id checks
// that follow must see everything that will ever land. Only db's: the server may hold other
// deployments' databases, whose imports are theirs to wait for.
func awaitEarlierInserts(ctx context.Context, ch driver.Conn, db string, log *slog.Logger) error {
	start := time.Now()
	prefix := erasure.ImportQueryIDPrefix(db)
	for {
		var n uint64
		if err := ch.QueryRow(ctx, "SELECT count() FROM system.processes WHERE startsWith(query_id, ?)", prefix).Scan(&n); err != nil {
			return fmt.Errorf("look for an earlier import's insert still running: %w", err)
		}
		if n == 0 {
			return nil
		}
		if time.Since(start) > 10*time.Second {
			log.Warn("an earlier import's insert is still running on clickhouse; stopping it", "inserts", n)
			if err := ch.Exec(ctx, "KILL QUERY WHERE startsWith(query_id, ?) SYNC", prefix); err != nil {
				return fmt.Errorf("stop an earlier import's insert: %w", err)
			}
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(200 * time.Millisecond):
		}
	}
}
