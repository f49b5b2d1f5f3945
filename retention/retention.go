// Package retention owns how long raw events and increments are kept, and what follows from it for
// every other package: the window in force (the tables' own TTL where they have one, RETENTION_DAYS
// where the sweeper enforces it), the oldest timestamp ingest may accept, the oldest day kept, and the
// first day whose raw data is known complete — a floor kept in Postgres, so that raising the window
// never makes the rollup "repair" days whose raw rows were already dropped. It changes no table
// (schema applies a new window; rollup's sweeper drops partitions).
package retention

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"regexp"
	"strconv"
	"time"

	"github.com/ClickHouse/clickhouse-go/v2/lib/driver"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
)

// Window is the retention of the raw tables.
type Window struct {
	Days int
	// TTL: the tables expire rows themselves (a TTL clause); otherwise the sweeper drops partitions.
	TTL bool
}

// Day is the UTC day of t.
func Day(t time.Time) time.Time { return t.UTC().Truncate(24 * time.Hour) }

// OldestAccepted is the oldest event timestamp ingest accepts at now: anything older would expire at
// once.
func (w Window) OldestAccepted(now time.Time) time.Time {
	return now.Add(-time.Duration(w.Days) * 24 * time.Hour)
}

// Cutoff is the oldest UTC day kept at now: today - Days. Partitions of earlier days are dropped.
func (w Window) Cutoff(now time.Time) time.Time { return Day(now).AddDate(0, 0, -w.Days) }

// Expired reports whether day d is before the cutoff: its partition may be gone.
func (w Window) Expired(d, now time.Time) bool { return d.Before(w.Cutoff(now)) }

// CompleteFrom is the first day whose raw data is all still stored at now, given the floor (the first
// day known complete; zero when none was recorded): the later of the floor and the day after the
// cutoff (a table TTL drops the cutoff day's parts over the course of today).
func (w Window) CompleteFrom(floor, now time.Time) time.Time {
	first := w.Cutoff(now).AddDate(0, 0, 1)
	if floor.After(first) {
		return floor
	}
	return first
}

// ttlRe finds the days of a "TTL ts + INTERVAL n DAY" (or slot) clause as the server shows it in
// system.tables.create_table_query: modern servers print it as "TTL ts + toIntervalDay(n)".
var ttlRe = regexp.MustCompile(`(?i)\bTTL\s+(?:ts|slot)\s*\+\s*(?:toIntervalDay\(\s*(\d+)\s*\)|INTERVAL\s+(\d+)\s+DAY)`)

// ParseTTLDays returns the days of the TTL clause of a CREATE TABLE statement, and whether it has one.
func ParseTTLDays(create string) (int, bool) {
	m := ttlRe.FindStringSubmatch(create)
	if m == nil {
		return 0, false
	}
	s := m[1]
	if s == "" {
		s = m[2]
	}
	n, err := strconv.Atoi(s)
	return n, err == nil
}

// ErrNoTable: the events table does not exist (analyticsd migrate has not run).
var ErrNoTable = errors.New("the events table does not exist; run `analyticsd migrate` first")

// TableTTL reads the TTL days of db.table from its definition (ok false when it has no TTL).
func TableTTL(ctx context.Context, ch driver.Conn, db, table string) (days int, ok bool, err error) {
	var create string
	err = ch.QueryRow(ctx, "SELECT create_table_query FROM system.tables WHERE database = ? AND name = ?", db, table).Scan(&create)
	if err != nil {
		if errors.Is(err, sql.ErrNoRows) {
			return 0, false, ErrNoTable
		}
		return 0, false, fmt.Errorf("read the definition of %s.%s: %w", db, table, err)
	}
	days, ok = ParseTTLDays(create)
	return days, ok, nil
}

// Effective returns the window in force for configured (RETENTION_DAYS): the events table's own TTL
// (events is the table that stores the events: "events", or "events_local" on a cluster)
// when it has one — which must be configured, or migrate has not applied a changed RETENTION_DAYS
// yet and serving would accept events the table then expires — and configured otherwise (the
// sweeper enforces it).
func Effective(ctx context.Context, ch driver.Conn, db, events string, configured int) (Window, error) {
	days, ttl, err := TableTTL(ctx, ch, db, events)
	if err != nil {
		return Window{}, err
	}
	if !ttl {
		return Window{Days: configured}, nil
	}
	if days != configured {
		return Window{}, fmt.Errorf("RETENTION_DAYS is %d but the events table expires rows after %d days: run `analyticsd migrate` to apply the new window", configured, days)
	}
	return Window{Days: days, TTL: true}, nil
}

// Floor is the first day whose raw data is known complete, kept in Postgres (table retention_floor)
// per ClickHouse database. It only moves forward: whoever knows retention has dropped everything
// before some day raises it to that day.
type Floor struct {
	pg *pgxpool.Pool
	db string
}

// NewFloor returns the floor of ClickHouse database db.
func NewFloor(pg *pgxpool.Pool, db string) *Floor { return &Floor{pg: pg, db: db} }

// Raise moves the floor to d if it is behind.
func (f *Floor) Raise(ctx context.Context, d time.Time) error {
	_, err := f.pg.Exec(ctx, `INSERT INTO retention_floor (db, complete_from) VALUES ($1, $2)
		ON CONFLICT (db) DO UPDATE SET complete_from = GREATEST(retention_floor.complete_from, EXCLUDED.complete_from), updated_at = now()`,
		f.db, Day(d).Format(time.DateOnly))
	if err != nil {
		return fmt.Errorf("raise the retention floor: %w", err)
	}
	return nil
}

// Get returns the floor (zero when none was recorded).
func (f *Floor) Get(ctx context.Context) (time.Time, error) {
	var d time.Time
	err := f.pg.QueryRow(ctx, "SELECT complete_from FROM retention_floor WHERE db = $1", f.db).Scan(&d)
	if errors.Is(err, pgx.ErrNoRows) {
		return time.Time{}, nil
	}
	if err != nil {
		return time.Time{}, fmt.Errorf("read the retention floor: %w", err)
	}
	return Day(d), nil
}
