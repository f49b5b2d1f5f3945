package importer

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/analyticsd/analyticsd/internal/excerpt"
)

// plan is the source at a glance: per tenant, its days and per day the count of each event name, and
// its analytics_daily_usage rows. It is also the source side of the verification.
type plan struct {
	counts map[uuid.UUID]map[time.Time]map[string]int64
	usage  map[uuid.UUID]map[time.Time][]UsageRow
	days   map[uuid.UUID][]time.Time
	slugs  map[uuid.UUID]string // the source's tenants.slug, where it has one
	events int64
	// skipped: events without a tenant, or without a ts ClickHouse can hold; skippedUsage: rows of
	// analytics_daily_usage without a tenant, metric or date ClickHouse can hold.
	skipped, skippedUsage int64
	// undotted counts the events of each name without a dot, which the import refuses (undottedErr).
	undotted map[string]int64
}

// undottedErr refuses a source with event names without a dot. analyticsd tells a usage metric
// (api_requests_daily) from an event name by the dot — the daily usage the rollup bills holds both —
// so an event named builds_daily would be billed as that usage metric, and one named like an
// increment's metric would add to it (found by review). The source must rename them first; nothing
// is imported until it has.
func (p *plan) undottedErr() error {
	if len(p.undotted) == 0 {
		return nil
	}
	names := make([]string, 0, len(p.undotted))
	var n int64
	for name, c := range p.undotted {
		names = append(names, name)
		n += c
	}
	sort.Strings(names)
	shown := names[:min(len(names), 5)]
	for i, name := range shown {
		shown[i] = strconv.Quote(excerpt.Short(name))
	}
	more := ""
	if len(names) > len(shown) {
		more = fmt.Sprintf(" and %d more", len(names)-len(shown))
	}
	return fmt.Errorf("%w: the source has %d events named without a dot (%s%s); analyticsd reads a name without a dot as a usage metric "+
		"and would bill them as one. Rename them in the source first, e.g. UPDATE analytics_events SET event = 'legacy.' || event "+
		"WHERE strpos(event, '.') = 0 (this run imported nothing)", ErrUndottedNames, n, strings.Join(shown, ", "), more)
}

// ClickHouse's DateTime holds 1970-01-01 to 2106-02-07 06:28:15, its Date 1970-01-01 to 2149-06-06;
// a value outside wraps silently onto another day (2^32 s after an event of today is today again). The
// import keeps the UTC days whose every second both hold, [firstDay, endDay), and skips rows of other
// days as it skips rows without ts. Postgres' 'infinity' and '-infinity' fall outside too, which also
// keeps them from the scans into time.Time (which cannot hold them).
var (
	firstDay = time.Date(1970, 1, 1, 0, 0, 0, 0, time.UTC)
	endDay   = time.Date(2106, 1, 1, 0, 0, 0, 0, time.UTC)
)

func (p *plan) tenantIDs() []uuid.UUID {
	ids := make([]uuid.UUID, 0, len(p.days))
	for id := range p.days {
		ids = append(ids, id)
	}
	sort.Slice(ids, func(i, j int) bool { return ids[i].String() < ids[j].String() })
	return ids
}

func (p *plan) eventsOn(tenant uuid.UUID, day time.Time) int64 {
	var n int64
	for _, c := range p.counts[tenant][day] {
		n += c
	}
	return n
}

// adds is what importing tenant's day adds to daily_usage, per metric: its events per name and its
// usage metrics, and for a day older than the window (old: counted as aggregates) also the event-name
// rows of analytics_daily_usage when the source has no events that day (inside the window those are
// not imported: the rollup counts events).
func (p *plan) adds(tenant uuid.UUID, day time.Time, old bool) map[string]int64 {
	out := map[string]int64{}
	for ev, n := range p.counts[tenant][day] {
		out[ev] += n
	}
	for _, u := range p.usage[tenant][day] {
		if !isEventName(u.Metric) || (old && len(p.counts[tenant][day]) == 0) {
			out[u.Metric] += u.Count
		}
	}
	return out
}

func (p *plan) tenantEvents(tenant uuid.UUID) int64 {
	var n int64
	for d := range p.counts[tenant] {
		n += p.eventsOn(tenant, d)
	}
	return n
}

// readPlan reads the plan: two grouped scans, one per table.
func readPlan(ctx context.Context, src *pgxpool.Pool) (*plan, error) {
	p := &plan{counts: map[uuid.UUID]map[time.Time]map[string]int64{}, usage: map[uuid.UUID]map[time.Time][]UsageRow{},
		days: map[uuid.UUID][]time.Time{}, slugs: map[uuid.UUID]string{}, undotted: map[string]int64{}}
	rows, err := src.Query(ctx, `SELECT tenant_id, CASE WHEN ts >= $1 AND ts < $2 THEN (ts AT TIME ZONE 'UTC')::date END, event, count(*)
FROM analytics_events GROUP BY 1, 2, 3`, firstDay, endDay)
	if err != nil {
		return nil, fmt.Errorf("read the source's analytics_events: %w", err)
	}
	seen := map[uuid.UUID]map[time.Time]bool{}
	addDay := func(t uuid.UUID, d time.Time) {
		if seen[t] == nil {
			seen[t] = map[time.Time]bool{}
		}
		if !seen[t][d] {
			seen[t][d] = true
			p.days[t] = append(p.days[t], d)
		}
	}
	for rows.Next() {
		var t *uuid.UUID
		var d *time.Time
		var event string
		var n int64
		if err := rows.Scan(&t, &d, &event, &n); err != nil {
			rows.Close()
			return nil, fmt.Errorf("read the source's analytics_events: %w", err)
		}
		if t == nil || d == nil {
			p.skipped += n
			continue
		}
		day := d.UTC()
		if p.counts[*t] == nil {
			p.counts[*t] = map[time.Time]map[string]int64{}
		}
		if p.counts[*t][day] == nil {
			p.counts[*t][day] = map[string]int64{}
		}
		p.counts[*t][day][event] += n
		p.events += n
		if !isEventName(event) {
			p.undotted[event] += n
		}
		addDay(*t, day)
	}
	rows.Close()
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("read the source's analytics_events: %w", err)
	}

	rows, err = src.Query(ctx, `SELECT tenant_id, CASE WHEN date >= $1 AND date < $2 THEN date END, metric, COALESCE(count, 0)
FROM analytics_daily_usage WHERE COALESCE(count, 0) <> 0`, firstDay, endDay)
	if err != nil {
		return nil, fmt.Errorf("read the source's analytics_daily_usage: %w", err)
	}
	for rows.Next() {
		var r UsageRow
		var t *uuid.UUID
		var d *time.Time
		var metric *string
		if err := rows.Scan(&t, &d, &metric, &r.Count); err != nil {
			rows.Close()
			return nil, fmt.Errorf("read the source's analytics_daily_usage: %w", err)
		}
		if t == nil || d == nil || metric == nil {
			p.skippedUsage++
			continue
		}
		r.Tenant, r.Metric = *t, *metric
		day := d.UTC()
		r.Day = day.Format(time.DateOnly)
		if p.usage[r.Tenant] == nil {
			p.usage[r.Tenant] = map[time.Time][]UsageRow{}
		}
		p.usage[r.Tenant][day] = append(p.usage[r.Tenant][day], r)
		addDay(r.Tenant, day)
	}
	rows.Close()
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("read the source's analytics_daily_usage: %w", err)
	}
	for t := range p.days {
		sort.Slice(p.days[t], func(i, j int) bool { return p.days[t][i].Before(p.days[t][j]) })
	}
	return p, readSlugs(ctx, src, p)
}

// readSlugs takes the source's tenants.slug when its tenants table has that column (the guide
// references a tenants table without defining it).
func readSlugs(ctx context.Context, src *pgxpool.Pool, p *plan) error {
	var has bool
	if err := src.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM information_schema.columns
WHERE table_schema = ANY (current_schemas(false)) AND table_name = 'tenants' AND column_name = 'slug')`).Scan(&has); err != nil {
		return fmt.Errorf("look for the source's tenants table: %w", err)
	}
	if !has {
		return nil
	}
	rows, err := src.Query(ctx, "SELECT id, slug::text FROM tenants WHERE slug IS NOT NULL")
	if err != nil {
		return fmt.Errorf("read the source's tenants: %w", err)
	}
	defer rows.Close()
	for rows.Next() {
		var id uuid.UUID
		var slug string
		if err := rows.Scan(&id, &slug); err != nil {
			return fmt.Errorf("read the source's tenants: %w", err)
		}
		p.slugs[id] = slug
	}
	return rows.Err()
}

// event is one source event as ClickHouse stores it.
type event struct {
	id                                    uuid.UUID
	ts                                    time.Time
	event, source, user, props, ip, reqID string
}

// streamEvents reads the source's events of the UTC days first to last (inclusive), every tenant,
// oldest first, and calls fn with each one and its source tenant. The days are the plan's, inside
// [firstDay, endDay), so no ts ClickHouse cannot hold (nor an infinite one) is read. The guide's tables have no index on
// ts alone, so Postgres scans the table once and sorts what it keeps; streamed, memory stays flat here.
func streamEvents(ctx context.Context, src *pgxpool.Pool, first, last time.Time, fn func(tenant uuid.UUID, e *event) error) error {
	rows, err := src.Query(ctx, `SELECT tenant_id, id, ts, event, COALESCE(source, ''), COALESCE(user_id, ''),
COALESCE(props::text, ''), COALESCE(ip, ''), COALESCE(request_id, '')
FROM analytics_events WHERE tenant_id IS NOT NULL AND ts >= $1 AND ts < $2 ORDER BY ts`,
		first, last.AddDate(0, 0, 1))
	if err != nil {
		return fmt.Errorf("read the source's events: %w", err)
	}
	defer rows.Close()
	var e event
	var tenant uuid.UUID
	var props []byte
	var compact bytes.Buffer
	for rows.Next() {
		if err := rows.Scan(&tenant, &e.id, &e.ts, &e.event, &e.source, &e.user, &props, &e.ip, &e.reqID); err != nil {
			return fmt.Errorf("read the source's events: %w", err)
		}
		e.ts = e.ts.UTC().Truncate(time.Second)
		e.source = importSource(e.source)
		e.props = compactProps(&compact, props)
		if err := fn(tenant, &e); err != nil {
			return err
		}
	}
	return rows.Err()
}

// importSource is the source column as analyticsd keeps it: ingest's default ("app") when the guide's
// row has none.
func importSource(s string) string {
	if s == "" {
		return "app"
	}
	return s
}

// compactProps is props as ingest stores them: compact JSON text ("{}" for none). Postgres prints
// jsonb with spaces after ':' and ',', which ClickHouse's visitParamExtract functions do not read.
func compactProps(buf *bytes.Buffer, props []byte) string {
	if len(props) == 0 {
		return "{}"
	}
	buf.Reset()
	if err := json.Compact(buf, props); err != nil {
		return string(props)
	}
	return buf.String()
}

// slugFor is the analyticsd slug an unmapped source tenant goes to: its own slug made valid, or "t-"
// and the first 12 hex digits of its id.
func slugFor(id uuid.UUID, sourceSlug string) string {
	s := strings.ToLower(strings.TrimSpace(sourceSlug))
	var b strings.Builder
	for _, r := range s {
		switch {
		case r >= 'a' && r <= 'z', r >= '0' && r <= '9':
			b.WriteRune(r)
		case b.Len() > 0:
			b.WriteByte('-')
		}
	}
	s = strings.Trim(b.String(), "-")
	if len(s) > 63 {
		s = strings.TrimRight(s[:63], "-")
	}
	if s == "" {
		return "t-" + strings.ReplaceAll(id.String(), "-", "")[:12]
	}
	return s
}
