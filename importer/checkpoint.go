package importer

import (
	"context"
	"fmt"
	"log/slog"
	"time"

	"github.com/ClickHouse/clickhouse-go/v2/lib/driver"
	"github.com/google/uuid"
	"github.com/jackc/pgx/v5/pgxpool"
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
	// aggregates; it is finished as events even if it has left the window since.
	events bool
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
	key := "analyticsd.import." + c.db
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
	rows, err := c.pg.Query(ctx, "SELECT day, state, COALESCE(before_total, 0), COALESCE(delta_total, 0), delta_total IS NULL FROM import_days WHERE source = $1 AND tenant_id = $2",
		c.source, tenant)
	if err != nil {
		return nil, fmt.Errorf("read import_days: %w", err)
	}
	defer rows.Close()
	out := map[time.Time]dayState{}
	for rows.Next() {
		var d time.Time
		var s dayState
		if err := rows.Scan(&d, &s.state, &s.before, &s.delta, &s.events); err != nil {
			return nil, fmt.Errorf("read import_days: %w", err)
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

// startEvents records (tenant, day)s whose events are about to be inserted, unless recorded already.
func (c *checkpoint) startEvents(ctx context.Context, tds []tenantDay) error {
	if len(tds) == 0 {
		return nil
	}
	tenants, days := split(tds)
	_, err := c.pg.Exec(ctx, `INSERT INTO import_days (source, tenant_id, day, state)
SELECT $1, t.tenant_id, t.day, 'inserting' FROM unnest($2::uuid[], $3::date[]) AS t (tenant_id, day)
ON CONFLICT (source, tenant_id, day) DO NOTHING`, c.source, tenants, days)
	if err != nil {
		return fmt.Errorf("record %d tenant-days in import_days: %w", len(tds), err)
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

// inserting records, before an aggregate insert, each day's daily_usage total and what it adds.
func (c *checkpoint) inserting(ctx context.Context, tenant uuid.UUID, days []time.Time, before, delta []int64) error {
	_, err := c.pg.Exec(ctx, `INSERT INTO import_days (source, tenant_id, day, state, before_total, delta_total)
SELECT $1, $2, t.d, 'inserting', t.b, t.x FROM unnest($3::date[], $4::bigint[], $5::bigint[]) AS t (d, b, x)
ON CONFLICT (source, tenant_id, day) DO UPDATE SET state = 'inserting', before_total = EXCLUDED.before_total,
    delta_total = EXCLUDED.delta_total, updated_at = now()`, c.source, tenant, days, before, delta)
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

// awaitEarlierInserts waits until no insert of an earlier import is still running on ClickHouse (a
// killed import's last insert may still commit), stopping it after 10 s: the id checks that follow
// must see everything that will ever land.
func awaitEarlierInserts(ctx context.Context, ch driver.Conn, log *slog.Logger) error {
	start := time.Now()
	for {
		var n uint64
		if err := ch.QueryRow(ctx, "SELECT count() FROM system.processes WHERE query_id LIKE 'analyticsd-import-%'").Scan(&n); err != nil {
			return fmt.Errorf("look for an earlier import's insert still running: %w", err)
		}
		if n == 0 {
			return nil
		}
		if time.Since(start) > 10*time.Second {
			log.Warn("an earlier import's insert is still running on clickhouse; stopping it", "inserts", n)
			if err := ch.Exec(ctx, "KILL QUERY WHERE query_id LIKE 'analyticsd-import-%' SYNC"); err != nil {
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
