package importer

import (
	"context"
	"fmt"
	"sort"
	"time"

	"github.com/google/uuid"
)

// Diff is one count that differs between the source and analyticsd, for a tenant, day and metric.
// Metric "events" is the number of raw events of the day (ClickHouse events, inside the window);
// any other metric is a daily count (ClickHouse daily_usage, and billed analytics_daily_usage).
type Diff struct {
	Tenant string `json:"tenant"`
	Day    string `json:"date"`
	Metric string `json:"metric"`
	// Where is "clickhouse" or "billed": the side that differs from the source.
	Where  string `json:"where"`
	Source int64  `json:"source"`
	Got    int64  `json:"got"`
}

func (d Diff) String() string {
	return fmt.Sprintf("%s %s %s: source %d, %s %d (%+d)", d.Tenant, d.Day, d.Metric, d.Source, d.Where, d.Got, d.Got-d.Source)
}

// Verification compares, per tenant and day, what the source holds with what analyticsd holds.
type Verification struct {
	TenantDays int   `json:"tenant_days"`
	Events     int64 `json:"source_events"`
	// Diffs are the mismatches: non-empty means the import is not complete or something changed
	// one side since.
	Diffs []Diff `json:"diffs"`
	// SourceDisagrees lists event-name rows of the source's analytics_daily_usage whose count is not
	// the number of the source's own events of that day; analyticsd counts the events (not a mismatch).
	SourceDisagrees []Diff `json:"source_disagrees,omitempty"`
	// NotImported: event-name rows of analytics_daily_usage inside the window without their events.
	NotImported []UsageRow `json:"not_imported,omitempty"`
}

// OK reports whether both sides agree.
func (v Verification) OK() bool { return len(v.Diffs) == 0 }

type countKey struct {
	tenant uuid.UUID // analyticsd tenant
	day    time.Time
	metric string
}

// Verify reads the source again and compares it, per tenant, day and metric, with ClickHouse
// (events inside the window, daily_usage for every day) and, when billing is wired, with the billed
// rows of past days. Only tenant-days the source has are compared. It changes nothing.
func (im *Importer) Verify(ctx context.Context) (Verification, error) {
	var v Verification
	p, err := readPlan(ctx, im.cfg.Source)
	if err != nil {
		return v, err
	}
	v.Events = p.events
	mapping, err := im.cp.tenantMap(ctx)
	if err != nil {
		return v, err
	}
	slug := map[uuid.UUID]string{}
	var dsts []uuid.UUID
	var dstNames []string
	for _, src := range p.tenantIDs() {
		dst, ok := mapping[src]
		if !ok {
			v.Diffs = append(v.Diffs, Diff{Tenant: "source:" + src.String(), Day: "-", Metric: "events (tenant not imported)", Where: "clickhouse", Source: p.tenantEvents(src)})
			continue
		}
		t, err := im.cfg.Tenants.ByID(ctx, dst)
		if err != nil {
			return v, fmt.Errorf("verify: tenant of source tenant %s: %w", src, err)
		}
		slug[dst] = t.Slug
		dsts = append(dsts, dst)
		dstNames = append(dstNames, dst.String())
	}

	// What analyticsd should hold, from the source.
	want := map[countKey]int64{}
	wantEvents := map[countKey]int64{}
	daysOf := map[uuid.UUID]map[time.Time]bool{}
	for src, dst := range mapping {
		if _, ok := p.days[src]; !ok {
			continue
		}
		daysOf[dst] = map[time.Time]bool{}
		for _, d := range p.days[src] {
			daysOf[dst][d] = true
			v.TenantDays++
			counts := p.counts[src][d]
			var n int64
			for ev, c := range counts {
				want[countKey{dst, d, ev}] += c
				n += c
			}
			if n > 0 && !d.Before(im.cfg.OldBefore) {
				wantEvents[countKey{dst, d, "events"}] = n
			}
			for _, u := range p.usage[src][d] {
				switch {
				case !isEventName(u.Metric):
					want[countKey{dst, d, u.Metric}] += u.Count
				case len(counts) == 0 && d.Before(im.cfg.OldBefore):
					want[countKey{dst, d, u.Metric}] += u.Count
				case len(counts) == 0:
					v.NotImported = append(v.NotImported, u)
				case counts[u.Metric] != u.Count:
					v.SourceDisagrees = append(v.SourceDisagrees, Diff{Tenant: slug[dst], Day: u.Day, Metric: u.Metric,
						Where: "source events", Source: u.Count, Got: counts[u.Metric]})
				}
			}
		}
	}
	if len(dsts) == 0 {
		return v, nil
	}
	inSource := func(k countKey) bool { return daysOf[k.tenant][k.day] }

	chUsage, err := im.chCounts(ctx, "SELECT tenant_id, date, metric, sum(count) FROM "+im.cfg.DB+".daily_usage WHERE has(?, toString(tenant_id)) GROUP BY tenant_id, date, metric", dstNames)
	if err != nil {
		return v, err
	}
	v.Diffs = append(v.Diffs, compare(want, chUsage, inSource, slug, "clickhouse")...)
	chEvents, err := im.chCounts(ctx, "SELECT tenant_id, toDate(ts) AS d, 'events', toInt64(count()) FROM "+im.cfg.DB+".events WHERE has(?, toString(tenant_id)) AND ts >= ? GROUP BY tenant_id, d",
		dstNames, im.cfg.OldBefore)
	if err != nil {
		return v, err
	}
	v.Diffs = append(v.Diffs, compare(wantEvents, chEvents, inSource, slug, "clickhouse")...)

	if im.cfg.Bill != nil {
		billed, err := im.billed(ctx, dsts)
		if err != nil {
			return v, err
		}
		past := func(k countKey) bool { return inSource(k) && k.day.Before(im.cfg.Today) }
		pastWant := map[countKey]int64{}
		for k, n := range want {
			if past(k) {
				pastWant[k] = n
			}
		}
		v.Diffs = append(v.Diffs, compare(pastWant, billed, past, slug, "billed")...)
	}
	sort.Slice(v.Diffs, func(i, j int) bool {
		a, b := v.Diffs[i], v.Diffs[j]
		if a.Tenant != b.Tenant {
			return a.Tenant < b.Tenant
		}
		if a.Day != b.Day {
			return a.Day < b.Day
		}
		if a.Metric != b.Metric {
			return a.Metric < b.Metric
		}
		return a.Where < b.Where
	})
	return v, nil
}

// compare lists the keys (of days the source has) where got differs from want.
func compare(want, got map[countKey]int64, consider func(countKey) bool, slug map[uuid.UUID]string, where string) []Diff {
	var out []Diff
	add := func(k countKey) {
		out = append(out, Diff{Tenant: slug[k.tenant], Day: k.day.Format(time.DateOnly), Metric: k.metric, Where: where, Source: want[k], Got: got[k]})
	}
	for k, n := range want {
		if consider(k) && got[k] != n {
			add(k)
		}
	}
	for k, n := range got {
		if _, ok := want[k]; !ok && n != 0 && consider(k) {
			add(k)
		}
	}
	return out
}

// chCounts runs a query whose rows are (tenant_id, date, metric, count).
func (im *Importer) chCounts(ctx context.Context, q string, args ...any) (map[countKey]int64, error) {
	rows, err := im.cfg.CH.Query(ctx, q, args...)
	if err != nil {
		return nil, fmt.Errorf("verify: read clickhouse: %w", err)
	}
	defer rows.Close()
	out := map[countKey]int64{}
	for rows.Next() {
		var k countKey
		var d time.Time
		var n int64
		if err := rows.Scan(&k.tenant, &d, &k.metric, &n); err != nil {
			return nil, fmt.Errorf("verify: read clickhouse: %w", err)
		}
		k.day = time.Date(d.Year(), d.Month(), d.Day(), 0, 0, 0, 0, time.UTC)
		out[k] += n
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("verify: read clickhouse: %w", err)
	}
	return out, nil
}

// billed reads the tenants' billed rows (the rollup's analytics_daily_usage in analyticsd's Postgres).
func (im *Importer) billed(ctx context.Context, tenants []uuid.UUID) (map[countKey]int64, error) {
	rows, err := im.cfg.PG.Query(ctx, "SELECT tenant_id, date, metric, count FROM analytics_daily_usage WHERE tenant_id = ANY($1)", tenants)
	if err != nil {
		return nil, fmt.Errorf("verify: read billed usage: %w", err)
	}
	defer rows.Close()
	out := map[countKey]int64{}
	for rows.Next() {
		var k countKey
		var n int64
		if err := rows.Scan(&k.tenant, &k.day, &k.metric, &n); err != nil {
			return nil, fmt.Errorf("verify: read billed usage: %w", err)
		}
		k.day = k.day.UTC()
		out[k] = n
	}
	return out, rows.Err()
}
