package query

import (
	"context"
	"encoding/json"
	"fmt"
	"strconv"
	"time"

	"github.com/google/uuid"

	"github.com/analyticsd/analyticsd/internal/chlimit"
)

// Point is one day of one metric.
type Point struct {
	Date  string          `json:"date"`
	Count int64           `json:"count"`
	Meta  json.RawMessage `json:"meta"`
}

// UsageResult maps metric → daily points, oldest first. Degraded is set when Postgres could not be
// read and every day came from ClickHouse.
type UsageResult struct {
	Series   map[string][]Point
	Degraded bool
}

var (
	metaLive     = json.RawMessage(`{"source":"clickhouse"}`)
	metaDegraded = json.RawMessage(`{"source":"clickhouse","degraded":true}`)
	metaBilled   = json.RawMessage(`{"source":"billed"}`)
)

// Usage returns per-day counts of metrics for tenant over days [first, last]. Days the rollup has
// reconciled (a successful rollup_runs row) come from Postgres analytics_daily_usage, the billed
// record, with meta.source "billed" — unless ClickHouse has counted more since (late events the
// rollup has not reconciled again yet, which it does within ROLLUP_DRIFT_INTERVAL): then the fresh
// count is shown, with meta.source "clickhouse" and the billed count as meta.billed. (Late events
// only add; a ClickHouse count below the billed one is an aggregate the rollup repairs.) Newer days come
// from ClickHouse daily_usage (meta.source "clickhouse"). fill adds zero points for days without any.
func (s *Store) Usage(ctx context.Context, tenant uuid.UUID, metrics []string, first, last time.Time, fill bool) (UsageResult, error) {
	res := UsageResult{Series: map[string][]Point{}}
	live, err := s.liveUsage(ctx, tenant, metrics, first, last)
	if err != nil {
		return res, err
	}
	reconciled, billed, err := s.billedUsage(ctx, tenant, metrics, first, last)
	if err != nil {
		res.Degraded = true
		reconciled = nil
	}
	for _, m := range metrics {
		points := []Point{}
		for d := first; !d.After(last); d = d.Add(24 * time.Hour) {
			key := d.Format(time.DateOnly)
			p := Point{Date: key}
			if b, ok := billed[m][key]; reconciled[key] && live[m][key] > b.count {
				p.Count = live[m][key]
				p.Meta = json.RawMessage(fmt.Sprintf(`{"source":"clickhouse","billed":%d}`, b.count))
			} else if reconciled[key] {
				p.Count, p.Meta = b.count, metaBilled
				if ok {
					p.Meta = withSource(b.meta, "billed")
				}
			} else {
				p.Count = live[m][key]
				p.Meta = metaLive
				if res.Degraded {
					p.Meta = metaDegraded
				}
			}
			if p.Count != 0 || fill {
				points = append(points, p)
			}
		}
		res.Series[m] = points
	}
	return res, nil
}

// withSource returns a billed row's meta (what the rollup recorded: run, time, repairs) with its
// "source" set to src.
func withSource(meta json.RawMessage, src string) json.RawMessage {
	var m map[string]any
	if json.Unmarshal(meta, &m) != nil || m == nil {
		m = map[string]any{}
	}
	m["source"] = src
	b, err := json.Marshal(m)
	if err != nil {
		return metaBilled
	}
	return b
}

func (s *Store) liveUsage(ctx context.Context, tenant uuid.UUID, metrics []string, first, last time.Time) (map[string]map[string]int64, error) {
	q := "SELECT metric, toString(date), sum(count) FROM " + s.db + ".daily_usage " +
		"WHERE tenant_id = ? AND date >= toDate(?) AND date <= toDate(?) AND has(?, metric) GROUP BY metric, date"
	rows, err := s.ch.Query(chlimit.Limit(s.maxExec).Context(ctx), q, tenant, first.Format(time.DateOnly), last.Format(time.DateOnly), metrics)
	if err != nil {
		return nil, fmt.Errorf("query daily_usage: %w", err)
	}
	defer rows.Close()
	out := map[string]map[string]int64{}
	for rows.Next() {
		var metric, date string
		var n int64
		if err := rows.Scan(&metric, &date, &n); err != nil {
			return nil, fmt.Errorf("scan daily_usage: %w", err)
		}
		if out[metric] == nil {
			out[metric] = map[string]int64{}
		}
		out[metric][date] = n
	}
	return out, rows.Err()
}

type billedPoint struct {
	count int64
	meta  json.RawMessage
}

func (s *Store) billedUsage(ctx context.Context, tenant uuid.UUID, metrics []string, first, last time.Time) (map[string]bool, map[string]map[string]billedPoint, error) {
	if s.pg == nil {
		return nil, nil, fmt.Errorf("no postgres")
	}
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	reconciled := map[string]bool{}
	// A day is reconciled for this tenant when a run covering every tenant (tenant_id NULL) or this
	// tenant alone finished ok.
	rows, err := s.pg.Query(ctx, "SELECT DISTINCT to_char(date, 'YYYY-MM-DD') FROM rollup_runs "+
		"WHERE status = 'ok' AND (tenant_id IS NULL OR tenant_id = $3) AND date BETWEEN $1 AND $2", first, last, tenant)
	if err != nil {
		return nil, nil, fmt.Errorf("read rollup_runs: %w", err)
	}
	for rows.Next() {
		var d string
		if err := rows.Scan(&d); err != nil {
			rows.Close()
			return nil, nil, err
		}
		reconciled[d] = true
	}
	rows.Close()
	if err := rows.Err(); err != nil {
		return nil, nil, err
	}
	billed := map[string]map[string]billedPoint{}
	if len(reconciled) == 0 {
		return reconciled, billed, nil
	}
	rows, err = s.pg.Query(ctx, "SELECT metric, to_char(date, 'YYYY-MM-DD'), count, meta FROM analytics_daily_usage "+
		"WHERE tenant_id = $1 AND date BETWEEN $2 AND $3 AND metric = ANY($4)", tenant, first, last, metrics)
	if err != nil {
		return nil, nil, fmt.Errorf("read analytics_daily_usage: %w", err)
	}
	defer rows.Close()
	for rows.Next() {
		var m, d string
		var p billedPoint
		var meta []byte
		if err := rows.Scan(&m, &d, &p.count, &meta); err != nil {
			return nil, nil, err
		}
		p.meta = json.RawMessage(meta)
		if billed[m] == nil {
			billed[m] = map[string]billedPoint{}
		}
		billed[m][d] = p
	}
	return reconciled, billed, rows.Err()
}

// KPI is a metric's count today, over the last 7 days and over the last 30 days (UTC, today included).
type KPI struct {
	Today int64 `json:"today"`
	Week  int64 `json:"week"`
	Month int64 `json:"month"`
}

// KPIs returns the KPI of each metric from ClickHouse daily_usage (live, today included).
func (s *Store) KPIs(ctx context.Context, tenant uuid.UUID, metrics []string) (map[string]KPI, error) {
	today := s.now().UTC().Truncate(24 * time.Hour)
	q := "SELECT metric, sumIf(count, date = toDate(?)), sumIf(count, date >= toDate(?)), sum(count) FROM " + s.db + ".daily_usage " +
		"WHERE tenant_id = ? AND date >= toDate(?) AND date <= toDate(?) AND has(?, metric) GROUP BY metric"
	day := func(t time.Time) string { return t.Format(time.DateOnly) }
	rows, err := s.ch.Query(chlimit.Limit(s.maxExec).Context(ctx), q, day(today), day(today.AddDate(0, 0, -6)), tenant,
		day(today.AddDate(0, 0, -29)), day(today), metrics)
	if err != nil {
		return nil, fmt.Errorf("query kpis: %w", err)
	}
	defer rows.Close()
	out := make(map[string]KPI, len(metrics))
	for _, m := range metrics {
		out[m] = KPI{}
	}
	for rows.Next() {
		var m string
		var k KPI
		if err := rows.Scan(&m, &k.Today, &k.Week, &k.Month); err != nil {
			return nil, fmt.Errorf("scan kpis: %w", err)
		}
		out[m] = k
	}
	return out, rows.Err()
}

// NameCount is an event name and how often it occurred.
type NameCount struct {
	Event string `json:"event"`
	Count uint64 `json:"count"`
}

// EventNames lists the tenant's distinct event names in r, most frequent first, at most limit of
// them; more says there were others.
func (s *Store) EventNames(ctx context.Context, tenant uuid.UUID, r Range, limit int) (names []NameCount, more bool, err error) {
	q := "SELECT event, count() AS c FROM " + s.db + ".events WHERE tenant_id = ? AND ts >= ? AND ts < ? " +
		"GROUP BY event ORDER BY c DESC, event LIMIT " + strconv.Itoa(limit+1)
	rows, err := s.ch.Query(chlimit.Limit(s.maxExec).Context(ctx), q, tenant, r.From, r.To)
	if err != nil {
		return nil, false, fmt.Errorf("query event names: %w", err)
	}
	defer rows.Close()
	out := []NameCount{}
	for rows.Next() {
		var n NameCount
		if err := rows.Scan(&n.Event, &n.Count); err != nil {
			return nil, false, fmt.Errorf("scan event names: %w", err)
		}
		out = append(out, n)
	}
	if len(out) > limit {
		return out[:limit], true, rows.Err()
	}
	return out, false, rows.Err()
}

// ActiveUsers counts distinct non-empty user_id of event in r (the dashboard's "active users").
func (s *Store) ActiveUsers(ctx context.Context, tenant uuid.UUID, r Range, event string) (ActiveUsers, error) {
	out := ActiveUsers{Event: event}
	q := "SELECT uniqExactIf(user_id, user_id != ''), count() FROM " + s.db + ".events WHERE tenant_id = ? AND ts >= ? AND ts < ? AND event = ?"
	if err := s.ch.QueryRow(chlimit.Limit(s.maxExec).Context(ctx), q, tenant, r.From, r.To, event).Scan(&out.Users, &out.Events); err != nil {
		return out, fmt.Errorf("query active users: %w", err)
	}
	return out, nil
}

// ActiveUsers is how many distinct users did Event, out of how many such events.
type ActiveUsers struct {
	Event  string `json:"event"`
	Users  uint64 `json:"users"`
	Events uint64 `json:"events"`
}
