package importer

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/ClickHouse/clickhouse-go/v2"
	"github.com/google/uuid"
)

// incrementNS is the namespace of the name-based (v5) ids of imported usage increments.
var incrementNS = uuid.MustParse("6f1c3d52-2a7e-4c09-9d8b-5e0f4a1b7c3e")

// incrementID is the id of the increment imported for one source row (source tenant, day, metric):
// the same row gets the same id on every run, also under another --source-name, so a repeated insert
// is recognised.
func incrementID(tenant uuid.UUID, day time.Time, metric string) uuid.UUID {
	return uuid.NewSHA1(incrementNS, []byte(tenant.String()+"\x00"+day.Format(time.DateOnly)+"\x00"+metric))
}

// isEventName: event names have a dot, usage metrics never do (README, "Two namespaces").
func isEventName(metric string) bool { return strings.Contains(metric, ".") }

func queryCtx(ctx context.Context) context.Context {
	return clickhouse.Context(ctx, clickhouse.WithQueryID("analyticsd-import-"+uuid.NewString()))
}

// eventCols is a chunk of events in ClickHouse's column order.
type eventCols struct {
	id, tenant                            []uuid.UUID
	ts                                    []time.Time
	event, source, user, props, ip, reqID []string
}

func (c *eventCols) add(tenant uuid.UUID, e *event) {
	c.id, c.tenant, c.ts = append(c.id, e.id), append(c.tenant, tenant), append(c.ts, e.ts)
	c.event, c.source, c.user = append(c.event, e.event), append(c.source, e.source), append(c.user, e.user)
	c.props, c.ip, c.reqID = append(c.props, e.props), append(c.ip, e.ip), append(c.reqID, e.reqID)
}

func (c *eventCols) reset() {
	c.id, c.tenant, c.ts = c.id[:0], c.tenant[:0], c.ts[:0]
	c.event, c.source, c.user, c.props, c.ip, c.reqID = c.event[:0], c.source[:0], c.user[:0], c.props[:0], c.ip[:0], c.reqID[:0]
}

// keep drops the rows whose index is in drop (sorted), keeping order.
func (c *eventCols) keep(drop map[int]bool) {
	j := 0
	for i := range c.id {
		if drop[i] {
			continue
		}
		c.id[j], c.tenant[j], c.ts[j] = c.id[i], c.tenant[i], c.ts[i]
		c.event[j], c.source[j], c.user[j], c.props[j], c.ip[j], c.reqID[j] = c.event[i], c.source[i], c.user[i], c.props[i], c.ip[i], c.reqID[i]
		j++
	}
	c.id, c.tenant, c.ts = c.id[:j], c.tenant[:j], c.ts[:j]
	c.event, c.source, c.user, c.props, c.ip, c.reqID = c.event[:j], c.source[:j], c.user[:j], c.props[:j], c.ip[:j], c.reqID[:j]
}

// maxInsertDays bounds the UTC days (partitions of events and usage_increments) one insert spans:
// modern servers refuse an insert block touching more than max_partitions_per_insert_block (100).
const maxInsertDays = 60

// aggRow is one daily_usage row to add.
type aggRow struct {
	day    time.Time
	metric string
	count  int64
}

// importOld counts the days older than the retention window into daily_usage: per event name, plus
// the usage metrics, plus the event-name rows of analytics_daily_usage for days whose events the
// source no longer has. daily_usage has no ids, so each day's total before the insert and what the
// insert adds are recorded first; a day left 'inserting' by an interrupted run is settled by reading
// its total again.
func (im *Importer) importOld(ctx context.Context, p *plan, src, dst uuid.UUID, days []time.Time, states map[time.Time]dayState, tr *tenantRun, progress func(int64)) error {
	var unsettled []time.Time
	for _, d := range days {
		if states[d].state == stateInserting {
			unsettled = append(unsettled, d)
		}
	}
	todo := days
	if len(unsettled) > 0 {
		totals, err := im.totals(ctx, dst, unsettled[0], unsettled[len(unsettled)-1])
		if err != nil {
			return err
		}
		landed := map[time.Time]bool{}
		var done []time.Time
		for _, d := range unsettled {
			st, now := states[d], totals[d]
			switch now {
			case st.before + st.delta:
				landed[d] = true
				done = append(done, d)
			case st.before:
				// the insert did not land: do the day again
			default:
				return fmt.Errorf("daily_usage of tenant %s on %s is %d: neither its total before the interrupted import (%d) nor that plus what the import adds (%d); something else changed it meanwhile, reconcile that day by hand",
					dst, d.Format(time.DateOnly), now, st.before, st.before+st.delta)
			}
		}
		if err := im.cp.set(ctx, dst, done, stateStored); err != nil {
			return err
		}
		tr.stored += len(done)
		todo = nil
		for _, d := range days {
			if landed[d] {
				progress(p.eventsOn(src, d))
			} else {
				todo = append(todo, d)
			}
		}
	}
	// Chunks of at most ChunkRows rows and maxInsertDays days, a day never split (its total is checked
	// whole).
	var rows []aggRow
	var chunkDays []time.Time
	var events int64
	flush := func() error {
		if len(chunkDays) == 0 {
			return nil
		}
		if err := im.addAggregates(ctx, dst, chunkDays, rows); err != nil {
			return err
		}
		tr.aggregated += events
		tr.stored += len(chunkDays)
		progress(events)
		rows, chunkDays, events = rows[:0], chunkDays[:0], 0
		return nil
	}
	for _, d := range todo {
		byMetric := map[string]int64{}
		for ev, n := range p.counts[src][d] {
			byMetric[ev] += n
			events += n
		}
		for _, u := range p.usage[src][d] {
			if !isEventName(u.Metric) || len(p.counts[src][d]) == 0 {
				byMetric[u.Metric] += u.Count
			}
		}
		for m, n := range byMetric {
			rows = append(rows, aggRow{day: d, metric: m, count: n})
		}
		chunkDays = append(chunkDays, d)
		if len(rows) >= im.cfg.ChunkRows || len(chunkDays) == maxInsertDays {
			if err := flush(); err != nil {
				return err
			}
		}
	}
	return flush()
}

// totals returns tenant's daily_usage total per day in [first, last].
func (im *Importer) totals(ctx context.Context, tenant uuid.UUID, first, last time.Time) (map[time.Time]int64, error) {
	rows, err := im.cfg.CH.Query(ctx, "SELECT date, sum(count) FROM "+im.cfg.DB+".daily_usage WHERE tenant_id = ? AND date >= toDate(?) AND date <= toDate(?) GROUP BY date",
		tenant, first.Format(time.DateOnly), last.Format(time.DateOnly))
	if err != nil {
		return nil, fmt.Errorf("read daily_usage totals: %w", err)
	}
	defer rows.Close()
	out := map[time.Time]int64{}
	for rows.Next() {
		var d time.Time
		var n int64
		if err := rows.Scan(&d, &n); err != nil {
			return nil, fmt.Errorf("read daily_usage totals: %w", err)
		}
		out[time.Date(d.Year(), d.Month(), d.Day(), 0, 0, 0, 0, time.UTC)] = n
	}
	return out, rows.Err()
}

// addAggregates records the days as 'inserting' with their totals before and what rows add, inserts
// rows into daily_usage, and records the days as stored.
func (im *Importer) addAggregates(ctx context.Context, tenant uuid.UUID, days []time.Time, rows []aggRow) error {
	totals, err := im.totals(ctx, tenant, days[0], days[len(days)-1])
	if err != nil {
		return err
	}
	delta := map[time.Time]int64{}
	for _, r := range rows {
		delta[r.day] += r.count
	}
	before, add := make([]int64, len(days)), make([]int64, len(days))
	for i, d := range days {
		before[i], add[i] = totals[d], delta[d]
	}
	if err := im.cp.inserting(ctx, tenant, days, before, add); err != nil {
		return err
	}
	if len(rows) > 0 {
		table := im.cfg.DB + ".daily_usage"
		batch, err := im.cfg.CH.PrepareBatch(queryCtx(ctx), "INSERT INTO "+table+" (tenant_id, date, metric, count)")
		if err != nil {
			return fmt.Errorf("insert into %s: prepare: %w", table, err)
		}
		n := len(rows)
		tenants, dates, metrics, counts := make([]uuid.UUID, n), make([]time.Time, n), make([]string, n), make([]int64, n)
		for i, r := range rows {
			tenants[i], dates[i], metrics[i], counts[i] = tenant, r.day, r.metric, r.count
		}
		for i, col := range []any{tenants, dates, metrics, counts} {
			if err := batch.Column(i).Append(col); err != nil {
				return errors.Join(fmt.Errorf("insert into %s: column %d: %w", table, i, err), batch.Abort())
			}
		}
		if err := batch.Send(); err != nil {
			return fmt.Errorf("insert %d rows into %s: %w", n, table, err)
		}
	}
	return im.cp.set(ctx, tenant, days, stateStored)
}
