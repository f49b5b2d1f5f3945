package schema

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/ClickHouse/clickhouse-go/v2"
	"github.com/ClickHouse/clickhouse-go/v2/lib/driver"
	"github.com/google/uuid"
)

// fills are the data steps a migration needs once its DDL ran and before it is recorded as applied:
// an aggregate a migration adds counts only the rows inserted after its materialized view exists, so
// the rows already stored are counted in by its fill. A fill must be safe to run again (a migrate that
// stopped half-way runs it again) and while events keep arriving.
var fills = map[int]func(ctx context.Context, ch driver.Conn, l Layout, settle time.Duration) error{
	2: FillQuarterHours,
}

// QuarterHoursVersion is the ClickHouse migration that adds usage_quarter_hour: once it is recorded as
// applied, the table holds every stored raw row (Applied tells).
const QuarterHoursVersion = 2

// FillQuarterHours counts into usage_quarter_hour the raw events and increments it lacks, day by day:
// per (tenant, metric, slot) it inserts the raw count minus the aggregate's where the raw rows hold
// more. The rows inserted since the materialized views exist are in both and cancel out; the rows
// stored before are counted in. Where the aggregate holds more than the raw rows nothing is written:
// that is what an erasure leaves (the aggregates keep an erased user's counts), so the fill never
// lowers a count. A difference is written only when a second read settle later finds it unchanged:
// rows in flight reach events and then the aggregate a moment apart, and a difference that moves is
// theirs (that day is read again, until a read finds nothing to add, up to five times). Running it
// again adds nothing.
func FillQuarterHours(ctx context.Context, ch driver.Conn, l Layout, settle time.Duration) error {
	days, err := rawDays(ctx, ch, l)
	if err != nil {
		return err
	}
	for _, day := range days {
		if err := FillQuarterHoursDay(ctx, ch, l, day, settle); err != nil {
			return err
		}
	}
	return nil
}

// FillQuarterHoursDay is FillQuarterHours for one UTC day. The rollup runs it after each day it
// reconciles inside the raw window, so slots a materialized view write missed (an insert that failed
// after its events part was written, whose replay then found the rows stored) are counted in as
// daily_usage is repaired.
func FillQuarterHoursDay(ctx context.Context, ch driver.Conn, l Layout, day time.Time, settle time.Duration) error {
	for range 5 {
		first, err := quarterHourDiffs(ctx, ch, l, day)
		if err != nil {
			return err
		}
		if len(first) == 0 {
			return nil
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(settle):
		}
		second, err := quarterHourDiffs(ctx, ch, l, day)
		if err != nil {
			return err
		}
		var stable []slotCount
		for k, d := range second {
			if first[k] == d {
				stable = append(stable, slotCount{k, d})
			}
		}
		if err := insertSlots(ctx, ch, l, stable); err != nil {
			return err
		}
	}
	return fmt.Errorf("fill usage_quarter_hour for %s: the counts kept changing while they were compared; run migrate again", day.Format(time.DateOnly))
}

type slotKey struct {
	tenant uuid.UUID
	metric string
	slot   time.Time
}

type slotCount struct {
	slotKey
	n int64
}

// rawDays lists the UTC days that have raw rows.
func rawDays(ctx context.Context, ch driver.Conn, l Layout) ([]time.Time, error) {
	rows, err := ch.Query(ctx, "SELECT DISTINCT d FROM (SELECT toDate(ts) AS d FROM "+l.Table("events")+
		" UNION ALL SELECT toDate(ts) AS d FROM "+l.Table("usage_increments")+") ORDER BY d")
	if err != nil {
		return nil, fmt.Errorf("fill usage_quarter_hour: list the days with raw rows: %w", err)
	}
	defer rows.Close()
	var out []time.Time
	for rows.Next() {
		var d time.Time
		if err := rows.Scan(&d); err != nil {
			return nil, fmt.Errorf("fill usage_quarter_hour: list the days with raw rows: %w", err)
		}
		out = append(out, d)
	}
	return out, rows.Err()
}

// quarterHourDiffs reads raw minus aggregate per (tenant, metric, slot) of day, where the raw rows hold
// more, in one query so the three tables are read at (nearly) the same moment.
func quarterHourDiffs(ctx context.Context, ch driver.Conn, l Layout, day time.Time) (map[slotKey]int64, error) {
	end := day.Add(24 * time.Hour)
	q := "SELECT tenant_id, metric, slot, sumIf(c, src = 1) - sumIf(c, src = 0) AS d FROM (" +
		"SELECT tenant_id, metric, slot, toUInt8(0) AS src, sum(count) AS c FROM " + l.Table("usage_quarter_hour") +
		" WHERE slot >= ? AND slot < ? GROUP BY tenant_id, metric, slot" +
		" UNION ALL SELECT tenant_id, event AS metric, toStartOfFifteenMinutes(ts) AS slot, toUInt8(1) AS src, toInt64(count()) AS c FROM " + l.Table("events") +
		" WHERE ts >= ? AND ts < ? GROUP BY tenant_id, metric, slot" +
		" UNION ALL SELECT tenant_id, metric, toStartOfFifteenMinutes(ts) AS slot, toUInt8(1) AS src, sum(n) AS c FROM " + l.Table("usage_increments") +
		" WHERE ts >= ? AND ts < ? GROUP BY tenant_id, metric, slot" +
		") GROUP BY tenant_id, metric, slot HAVING d > 0"
	rows, err := ch.Query(ctx, q, day, end, day, end, day, end)
	if err != nil {
		return nil, fmt.Errorf("fill usage_quarter_hour for %s: %w", day.Format(time.DateOnly), err)
	}
	defer rows.Close()
	out := map[slotKey]int64{}
	for rows.Next() {
		var k slotKey
		var d int64
		if err := rows.Scan(&k.tenant, &k.metric, &k.slot, &d); err != nil {
			return nil, fmt.Errorf("fill usage_quarter_hour for %s: %w", day.Format(time.DateOnly), err)
		}
		k.slot = k.slot.UTC()
		out[k] = d
	}
	return out, rows.Err()
}

// insertSlots adds the differences to usage_quarter_hour. insert_deduplicate=0: a cluster's replicated
// table would drop a block equal to one of its last 100 (two equal corrections are two corrections).
func insertSlots(ctx context.Context, ch driver.Conn, l Layout, rows []slotCount) error {
	if len(rows) == 0 {
		return nil
	}
	ctx = clickhouse.Context(ctx, clickhouse.WithSettings(clickhouse.Settings{"insert_deduplicate": 0}))
	batch, err := ch.PrepareBatch(ctx, "INSERT INTO "+l.Table("usage_quarter_hour")+" (tenant_id, metric, slot, count)")
	if err != nil {
		return fmt.Errorf("fill usage_quarter_hour: %w", err)
	}
	for _, r := range rows {
		if err := batch.Append(r.tenant, r.metric, r.slot, r.n); err != nil {
			return errors.Join(fmt.Errorf("fill usage_quarter_hour: %w", err), batch.Abort())
		}
	}
	if err := batch.Send(); err != nil {
		return fmt.Errorf("fill usage_quarter_hour: insert %d rows: %w", len(rows), err)
	}
	return nil
}

// Applied reports whether ClickHouse migration version is recorded as applied in db (false, without an
// error, when schema_migrations does not exist yet).
func Applied(ctx context.Context, ch driver.Conn, db string, version int) (bool, error) {
	var n uint64
	err := ch.QueryRow(ctx, "SELECT count() FROM system.tables WHERE database = ? AND name = 'schema_migrations'", db).Scan(&n)
	if err != nil || n == 0 {
		return false, err
	}
	done, err := AppliedVersions(ctx, ch, db+".schema_migrations")
	return done[version], err
}
