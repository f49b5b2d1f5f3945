package importer

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/ClickHouse/clickhouse-go/v2"
	"github.com/google/uuid"

	"github.com/analyticsd/analyticsd/erasure"
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

func (im *Importer) queryCtx(ctx context.Context) context.Context {
	return clickhouse.Context(ctx, clickhouse.WithQueryID(erasure.ImportQueryIDPrefix(im.cfg.DB)+uuid.NewString()))
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
// source no longer has. daily_usage has no ids, so each day's daily_usage before the insert and what
// the insert adds are recorded first (a day left 'inserting' by an interrupted run is settled before,
// by settle). days are sorted.
func (im *Importer) importOld(ctx context.Context, p *plan, src, dst uuid.UUID, days []time.Time, tr *tenantRun, progress func(int64)) error {
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
	for _, d := range days {
		for m, n := range p.adds(src, d, true) {
			rows = append(rows, aggRow{day: d, metric: m, count: n})
		}
		events += p.eventsOn(src, d)
		chunkDays = append(chunkDays, d)
		if len(rows) >= im.cfg.ChunkRows || len(chunkDays) == maxInsertDays {
			if err := flush(); err != nil {
				return err
			}
		}
	}
	return flush()
}

// settle decides, for days an interrupted run left 'inserting' whose insert no id check can find
// (aggregates, and events of days that have left the window since), whether that insert landed, by
// reading the days' daily_usage again. Landed days are recorded as stored; the others are forgotten
// and returned, to be imported again as their date now says. days are sorted.
func (im *Importer) settle(ctx context.Context, p *plan, src, dst uuid.UUID, days []time.Time, states map[time.Time]dayState, tr *tenantRun, progress func(int64)) ([]time.Time, error) {
	now, err := im.usage(ctx, []uuid.UUID{dst}, days[0], days[len(days)-1])
	if err != nil {
		return nil, err
	}
	var done, redo []time.Time
	for _, d := range days {
		landed, err := states[d].landed(now[tenantDay{dst, d}])
		if err != nil {
			return nil, fmt.Errorf("resume tenant %s, day %s: %w", dst, d.Format(time.DateOnly), err)
		}
		if landed {
			done = append(done, d)
			progress(p.eventsOn(src, d))
		} else {
			redo = append(redo, d)
		}
	}
	if err := im.cp.set(ctx, dst, done, stateStored); err != nil {
		return nil, err
	}
	tr.stored += len(done)
	return redo, im.cp.forget(ctx, dst, redo)
}

// usage returns the tenants' daily_usage per day in [first, last] and metric, zeros left out.
func (im *Importer) usage(ctx context.Context, tenants []uuid.UUID, first, last time.Time) (map[tenantDay]map[string]int64, error) {
	tt, err := tenantsTable(tenants)
	if err != nil {
		return nil, err
	}
	qctx := clickhouse.Context(ctx, clickhouse.WithExternalTable(tt))
	rows, err := im.cfg.CH.Query(qctx, "SELECT tenant_id, date, metric, sum(count) FROM "+im.cfg.DB+
		".daily_usage WHERE tenant_id IN (SELECT tenant_id FROM import_tenants) AND date >= toDate(?) AND date <= toDate(?) GROUP BY tenant_id, date, metric",
		first.Format(time.DateOnly), last.Format(time.DateOnly))
	if err != nil {
		return nil, fmt.Errorf("read daily_usage: %w", err)
	}
	defer rows.Close()
	out := map[tenantDay]map[string]int64{}
	for rows.Next() {
		var td tenantDay
		var metric string
		var n int64
		if err := rows.Scan(&td.tenant, &td.day, &metric, &n); err != nil {
			return nil, fmt.Errorf("read daily_usage: %w", err)
		}
		if n == 0 {
			continue
		}
		td.day = time.Date(td.day.Year(), td.day.Month(), td.day.Day(), 0, 0, 0, 0, time.UTC)
		if out[td] == nil {
			out[td] = map[string]int64{}
		}
		out[td][metric] = n
	}
	return out, rows.Err()
}

// addAggregates records the days as 'inserting' with their daily_usage before and what rows add,
// inserts rows into daily_usage, and records the days as stored.
func (im *Importer) addAggregates(ctx context.Context, tenant uuid.UUID, days []time.Time, rows []aggRow) error {
	now, err := im.usage(ctx, []uuid.UUID{tenant}, days[0], days[len(days)-1])
	if err != nil {
		return err
	}
	delta := map[time.Time]map[string]int64{}
	for _, r := range rows {
		if delta[r.day] == nil {
			delta[r.day] = map[string]int64{}
		}
		delta[r.day][r.metric] += r.count
	}
	before, add := make([]map[string]int64, len(days)), make([]map[string]int64, len(days))
	for i, d := range days {
		before[i], add[i] = now[tenantDay{tenant, d}], delta[d]
	}
	if err := im.cp.inserting(ctx, tenant, days, before, add); err != nil {
		return err
	}
	if len(rows) > 0 {
		table := im.cfg.DB + ".daily_usage"
		batch, err := im.cfg.CH.PrepareBatch(im.queryCtx(ctx), "INSERT INTO "+table+" (tenant_id, date, metric, count)")
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
