package importer

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"time"

	"github.com/ClickHouse/clickhouse-go/v2"
	"github.com/ClickHouse/clickhouse-go/v2/ext"
	"github.com/google/uuid"
)

// tenantDay is one analyticsd tenant's UTC day: the unit the checkpoint records.
type tenantDay struct {
	tenant uuid.UUID
	day    time.Time
}

// rowKey is a row of a tenant: ids are unique per tenant, not across tenants.
type rowKey struct {
	tenant, id uuid.UUID
}

// tenantsTable is the external table import_tenants(tenant_id) holding tenants, which a query filters
// on with IN (SELECT ...): the sort key's tenant ranges stay usable, and no list grows past
// max_query_size.
func tenantsTable(tenants []uuid.UUID) (*ext.Table, error) {
	tt, err := ext.NewTable("import_tenants", ext.Column("tenant_id", "UUID"))
	if err != nil {
		return nil, err
	}
	for _, t := range tenants {
		if err := tt.Append(t); err != nil {
			return nil, err
		}
	}
	return tt, nil
}

// present returns which (tenant, id) of the given rows ClickHouse's table holds with ts in [lo, hi].
// Ids and tenants go as external tables (an IN list of 100,000 ids would exceed max_query_size); the
// tenants and the time range narrow the scan to the sort key's (tenant_id, ts) ranges where the rows
// can be, so a busy production table is not read whole.
func (im *Importer) present(ctx context.Context, table string, tenants []uuid.UUID, lo, hi time.Time, ids []uuid.UUID) (map[rowKey]bool, error) {
	idt, err := ext.NewTable("import_ids", ext.Column("id", "UUID"))
	if err != nil {
		return nil, err
	}
	for _, id := range ids {
		if err := idt.Append(id); err != nil {
			return nil, err
		}
	}
	tt, err := tenantsTable(tenants)
	if err != nil {
		return nil, err
	}
	qctx := clickhouse.Context(ctx, clickhouse.WithExternalTable(idt, tt))
	rows, err := im.cfg.CH.Query(qctx, "SELECT tenant_id, id FROM "+im.cfg.DB+"."+table+
		" WHERE tenant_id IN (SELECT tenant_id FROM import_tenants) AND ts >= ? AND ts <= ? AND id IN (SELECT id FROM import_ids)", lo, hi)
	if err != nil {
		return nil, fmt.Errorf("check which rows %s already has: %w", table, err)
	}
	defer rows.Close()
	have := map[rowKey]bool{}
	for rows.Next() {
		var k rowKey
		if err := rows.Scan(&k.tenant, &k.id); err != nil {
			return nil, fmt.Errorf("check which rows %s already has: %w", table, err)
		}
		have[k] = true
	}
	return have, rows.Err()
}

func distinct(ids []uuid.UUID) []uuid.UUID {
	seen := map[uuid.UUID]bool{}
	var out []uuid.UUID
	for _, id := range ids {
		if !seen[id] {
			seen[id] = true
			out = append(out, id)
		}
	}
	return out
}

// insertEvents writes the chunk's rows that ClickHouse does not hold yet; it returns how many it wrote
// and how many were there already. The chunk is oldest first, any tenants.
func (im *Importer) insertEvents(ctx context.Context, c *eventCols) (inserted, present int64, err error) {
	n := len(c.id)
	if n == 0 {
		return 0, 0, nil
	}
	have, err := im.present(ctx, "events", distinct(c.tenant), c.ts[0], c.ts[n-1], c.id)
	if err != nil {
		return 0, 0, err
	}
	if len(have) > 0 {
		drop := make(map[int]bool, len(have))
		for i := range c.id {
			if have[rowKey{c.tenant[i], c.id[i]}] {
				drop[i] = true
			}
		}
		c.keep(drop)
		present = int64(len(drop))
	}
	if len(c.id) == 0 {
		return 0, present, nil
	}
	table := im.cfg.DB + ".events"
	batch, err := im.cfg.CH.PrepareBatch(im.queryCtx(ctx), "INSERT INTO "+table+" (tenant_id, ts, id, received_at, event, source, user_id, props, ip, request_id)")
	if err != nil {
		return 0, present, fmt.Errorf("insert into %s: prepare: %w", table, err)
	}
	// received_at is the event's own time: the quota reconciliation counts rows by the minute they were
	// received, and imported history must not land in today's counters.
	for i, col := range []any{c.tenant, c.ts, c.id, c.ts, c.event, c.source, c.user, c.props, c.ip, c.reqID} {
		if err := batch.Column(i).Append(col); err != nil {
			return 0, present, errors.Join(fmt.Errorf("insert into %s: column %d: %w", table, i, err), batch.Abort())
		}
	}
	if err := batch.Send(); err != nil {
		return 0, present, fmt.Errorf("insert %d rows into %s: %w", len(c.id), table, err)
	}
	return int64(len(c.id)), present, nil
}

// increment is one usage increment to import.
type increment struct {
	tenant uuid.UUID
	id     uuid.UUID
	day    time.Time
	metric string
	n      int64
}

// insertIncrements writes the increments ClickHouse does not hold yet (usage_increments, one row per
// source row, ts = the day's midnight). incs are sorted by day.
func (im *Importer) insertIncrements(ctx context.Context, incs []increment) (int64, error) {
	if len(incs) == 0 {
		return 0, nil
	}
	ids, tenants := make([]uuid.UUID, len(incs)), make([]uuid.UUID, len(incs))
	for i, x := range incs {
		ids[i], tenants[i] = x.id, x.tenant
	}
	have, err := im.present(ctx, "usage_increments", distinct(tenants), incs[0].day, incs[len(incs)-1].day, ids)
	if err != nil {
		return 0, err
	}
	var tenantCol, idCol []uuid.UUID
	var ts []time.Time
	var metrics []string
	var ns []int64
	for _, x := range incs {
		if have[rowKey{x.tenant, x.id}] {
			continue
		}
		tenantCol, idCol, ts, metrics, ns = append(tenantCol, x.tenant), append(idCol, x.id), append(ts, x.day), append(metrics, x.metric), append(ns, x.n)
	}
	if len(idCol) == 0 {
		return 0, nil
	}
	table := im.cfg.DB + ".usage_increments"
	batch, err := im.cfg.CH.PrepareBatch(im.queryCtx(ctx), "INSERT INTO "+table+" (tenant_id, ts, id, metric, n)")
	if err != nil {
		return 0, fmt.Errorf("insert into %s: prepare: %w", table, err)
	}
	for i, col := range []any{tenantCol, ts, idCol, metrics, ns} {
		if err := batch.Column(i).Append(col); err != nil {
			return 0, errors.Join(fmt.Errorf("insert into %s: column %d: %w", table, i, err), batch.Abort())
		}
	}
	if err := batch.Send(); err != nil {
		return 0, fmt.Errorf("insert %d rows into %s: %w", len(idCol), table, err)
	}
	return int64(len(idCol)), nil
}

// startEvents records tds as 'inserting' as events, with their daily_usage before (per metric) and
// what importing them adds (see checkpoint.startEvents). srcOf maps analyticsd tenants to the source's.
func (im *Importer) startEvents(ctx context.Context, p *plan, srcOf map[uuid.UUID]uuid.UUID, tds []tenantDay) error {
	if len(tds) == 0 {
		return nil
	}
	var tenants []uuid.UUID
	first, last := tds[0].day, tds[0].day
	for _, td := range tds {
		tenants = append(tenants, td.tenant)
		if td.day.Before(first) {
			first = td.day
		}
		if td.day.After(last) {
			last = td.day
		}
	}
	now, err := im.usage(ctx, distinct(tenants), first, last)
	if err != nil {
		return err
	}
	before, delta := make([]map[string]int64, len(tds)), make([]map[string]int64, len(tds))
	for i, td := range tds {
		before[i], delta[i] = now[td], p.adds(srcOf[td.tenant], td.day, false)
	}
	return im.cp.startEvents(ctx, tds, before, delta)
}

// importRecent imports the days inside the retention window of every tenant in one pass over the
// source, oldest first: the events with their ids, the usage metrics as increments. One insert
// carries every tenant's rows of its days, so ClickHouse makes one part per day and insert rather
// than one per tenant and day, and the source is read by one scan instead of one index scan per
// tenant (a tenant's rows are spread over the whole table). A (tenant, day) is recorded as stored
// once all of its rows are in ClickHouse.
func (im *Importer) importRecent(ctx context.Context, p *plan, tenants map[uuid.UUID]TenantResult, pending map[uuid.UUID][]time.Time, tr *tenantRun, progress func(int64)) error {
	want := map[uuid.UUID]map[time.Time]bool{}
	byDay := map[time.Time][]uuid.UUID{}
	srcOf := map[uuid.UUID]uuid.UUID{}
	for src, t := range tenants {
		srcOf[t.ID] = src
	}
	for src, days := range pending {
		want[src] = map[time.Time]bool{}
		for _, d := range days {
			want[src][d] = true
			byDay[d] = append(byDay[d], src)
		}
	}
	days := make([]time.Time, 0, len(byDay))
	for d := range byDay {
		days = append(days, d)
	}
	if len(days) == 0 {
		return nil
	}
	sort.Slice(days, func(i, j int) bool { return days[i].Before(days[j]) })
	var (
		cols     eventCols
		incs     []increment
		complete []tenantDay // (tenant, day)s whose rows are all in cols/incs or already inserted
		next     int         // days[next] is the first day not complete yet
		started  = map[tenantDay]bool{}
	)
	flush := func() error {
		n := int64(len(cols.id))
		var starting []tenantDay
		for i, t := range cols.ts {
			if k := (tenantDay{cols.tenant[i], t.Truncate(24 * time.Hour)}); !started[k] {
				started[k] = true
				starting = append(starting, k)
			}
		}
		for _, x := range incs {
			if k := (tenantDay{x.tenant, x.day}); !started[k] {
				started[k] = true
				starting = append(starting, k)
			}
		}
		if err := im.startEvents(ctx, p, srcOf, starting); err != nil {
			return err
		}
		ins, pres, err := im.insertEvents(ctx, &cols)
		if err != nil {
			return err
		}
		tr.inserted += ins
		tr.present += pres
		cols.reset()
		sort.Slice(incs, func(i, j int) bool { return incs[i].day.Before(incs[j].day) })
		for rest := incs; len(rest) > 0; { // at most maxInsertDays days per insert
			n, days := 0, 0
			for ; n < len(rest) && (n == 0 || rest[n].day == rest[n-1].day || days < maxInsertDays); n++ {
				if n == 0 || rest[n].day != rest[n-1].day {
					days++
				}
			}
			k, err := im.insertIncrements(ctx, rest[:n])
			if err != nil {
				return err
			}
			tr.increments += k
			rest = rest[n:]
		}
		incs = incs[:0]
		if err := im.cp.setDays(ctx, complete, stateStored); err != nil {
			return err
		}
		tr.stored += len(complete)
		complete = complete[:0]
		progress(n)
		return nil
	}
	completeBefore := func(d time.Time) {
		for ; next < len(days) && days[next].Before(d); next++ {
			day := days[next]
			for _, src := range byDay[day] {
				dst := tenants[src].ID
				for _, u := range p.usage[src][day] {
					switch {
					case !isEventName(u.Metric):
						incs = append(incs, increment{tenant: dst, id: incrementID(src, day, u.Metric), day: day, metric: u.Metric, n: u.Count})
					case len(p.counts[src][day]) == 0:
						// Counted by events in analyticsd; without them the rollup would take it back.
						tr.notImported = append(tr.notImported, u)
					}
				}
				complete = append(complete, tenantDay{dst, day})
			}
		}
	}
	var lastDay time.Time
	chunkDays := 0
	err := streamEvents(ctx, im.cfg.Source, days[0], days[len(days)-1], func(src uuid.UUID, e *event) error {
		d := e.ts.Truncate(24 * time.Hour)
		if !want[src][d] {
			return nil // another day of this tenant: done, or not inside the window
		}
		completeBefore(d)
		if d != lastDay || len(cols.id) == 0 {
			// A new day in the chunk: no insert spans more than maxInsertDays partitions.
			if chunkDays == maxInsertDays {
				if err := flush(); err != nil {
					return err
				}
			}
			if len(cols.id) == 0 {
				chunkDays = 0
			}
			chunkDays++
			lastDay = d
		}
		cols.add(tenants[src].ID, e)
		if len(cols.id) >= im.cfg.ChunkRows {
			return flush()
		}
		return nil
	})
	if err != nil {
		return err
	}
	completeBefore(days[len(days)-1].AddDate(0, 0, 1))
	return flush()
}
