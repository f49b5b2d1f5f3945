package main

import (
	"context"
	"fmt"
	"net/url"
	"strings"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5/pgtype"

	"github.com/analyticsd/analyticsd/query"
)

// The read scenarios run against the busiest tenant (about a quarter of the data set) with the API's
// default range (the last 30 days), each read three ways: through analyticsd's HTTP API; as (c), the
// same SQL sent straight to ClickHouse through clickhouse-go (analyticsd's own query.Store, minus
// HTTP, auth and JSON); and as SQL on (b), the guide's Postgres table.

func (b *bench) store() *query.Store { return query.NewStore(b.ch, b.name, b.pg, 30*time.Second) }

func (b *bench) slowBudget() time.Duration { return b.opt.slowBudget }

type apiPage struct {
	Events []struct {
		ID string `json:"id"`
	} `json:"events"`
	HasMore    bool    `json:"has_more"`
	NextCursor *string `json:"next_cursor"`
}

func (b *bench) apiEvents(ctx context.Context, key, cursor string) (apiPage, error) {
	path := "/api/analytics/events?limit=100"
	if cursor != "" {
		path += "&cursor=" + url.QueryEscape(cursor)
	}
	body, err := b.get(ctx, path, key)
	if err != nil {
		return apiPage{}, err
	}
	var p apiPage
	return p, decodeData(body, &p)
}

// pgPage reads one page of the guide's table with the same keyset order as the API.
func (b *bench) pgPage(ctx context.Context, tenant uuid.UUID, r query.Range, curTs time.Time, curID pgtype.UUID) (int, time.Time, pgtype.UUID, error) {
	const cols = "SELECT id, ts, event, source, user_id, props, ip, request_id FROM analytics_events WHERE tenant_id = $1 AND ts >= $2 AND ts < $3"
	q, args := cols+" ORDER BY ts DESC, id DESC LIMIT 101", []any{tenant, r.From, r.To}
	if curID.Valid {
		q = cols + " AND ts <= $4 AND (ts, id) < ($4, $5) ORDER BY ts DESC, id DESC LIMIT 101"
		args = append(args, curTs, curID)
	}
	rows, err := b.pg.Query(ctx, q, args...)
	if err != nil {
		return 0, curTs, curID, fmt.Errorf("postgres page: %w", err)
	}
	defer rows.Close()
	n := 0
	var lastTs time.Time
	var lastID pgtype.UUID
	for rows.Next() {
		var id pgtype.UUID
		var ts time.Time
		var event, source, user, ip, req pgtype.Text
		var props []byte
		if err := rows.Scan(&id, &ts, &event, &source, &user, &props, &ip, &req); err != nil {
			return 0, curTs, curID, err
		}
		n++
		if n == 100 {
			lastTs, lastID = ts, id
		}
	}
	return n, lastTs, lastID, rows.Err()
}

func (b *bench) eventsPage(ctx context.Context, s *Scenario) error {
	t := b.tenants[0]
	n := b.opt.iterations
	want := 50
	// Walk the API to page 50, checking every event appears once.
	seen := map[string]bool{}
	cursor, page := "", 1
	for ; page < want; page++ {
		p, err := b.apiEvents(ctx, t.Key, cursor)
		if err != nil {
			return err
		}
		for _, e := range p.Events {
			if seen[e.ID] {
				return fmt.Errorf("event %s appears twice while paging", e.ID)
			}
			seen[e.ID] = true
		}
		if !p.HasMore || p.NextCursor == nil {
			break
		}
		cursor = *p.NextCursor
	}
	if page < want {
		s.note("the tenant has only %d pages of 100 in the range; 'page 50' is page %d", page, page)
	}
	s.set("page_n", float64(page))
	deep := cursor

	apiSeries := func(cur string) ([]time.Duration, error) {
		return timeSeries(ctx, n, b.warm(), 0, func(ctx context.Context) error {
			p, err := b.apiEvents(ctx, t.Key, cur)
			if err == nil && len(p.Events) == 0 {
				err = fmt.Errorf("empty page")
			}
			return err
		})
	}
	if err := b.pprof.cpu(ctx, s, "events_page", func() error { return pagePair(s, "api", "", deep, apiSeries) }); err != nil {
		return err
	}

	// (c): analyticsd's query.Store straight on ClickHouse, and one plain query per page.
	st := b.store()
	r, err := query.ParseRange("", "", time.Now())
	if err != nil {
		return err
	}
	f1 := query.EventFilter{Tenant: t.ID, Range: r, Limit: 100}
	fN := f1
	if fN.Cursor, err = query.ParseCursor(deep); err != nil {
		return err
	}
	cSeries := func(f query.EventFilter) ([]time.Duration, error) {
		return timeSeries(ctx, n, b.warm(), 0, func(ctx context.Context) error {
			p, err := st.Events(ctx, f)
			if err == nil && len(p.Events) == 0 {
				err = fmt.Errorf("empty page")
			}
			return err
		})
	}
	if err := pagePair(s, "c", f1, fN, cSeries); err != nil {
		return err
	}
	single := func(f query.EventFilter) ([]time.Duration, error) {
		q, args := f.SQL(b.name, r.From, r.To, 101)
		return timeSeries(ctx, n, 1, b.slowBudget(), func(ctx context.Context) error {
			rows, err := b.ch.Query(ctx, q, args...)
			if err != nil {
				return err
			}
			defer rows.Close()
			for rows.Next() {
				var id uuid.UUID
				var ts time.Time
				var event, source, user, props, ip, req string
				if err := rows.Scan(&id, &ts, &event, &source, &user, &props, &ip, &req); err != nil {
					return err
				}
			}
			return rows.Err()
		})
	}
	if err := pagePair(s, "c_single_query", f1, fN, single); err != nil {
		return err
	}

	// (b): the same pages on Postgres.
	var curTs time.Time
	var curID pgtype.UUID
	for p := 1; p < page; p++ {
		var got int
		if got, curTs, curID, err = b.pgPage(ctx, t.ID, r, curTs, curID); err != nil {
			return err
		}
		if got < 101 {
			break
		}
	}
	type pgCursor struct {
		ts time.Time
		id pgtype.UUID
	}
	pgSeries := func(c pgCursor) ([]time.Duration, error) {
		return timeSeries(ctx, n, 1, b.slowBudget(), func(ctx context.Context) error {
			_, _, _, err := b.pgPage(ctx, t.ID, r, c.ts, c.id)
			return err
		})
	}
	if err := pagePair(s, "b", pgCursor{}, pgCursor{curTs, curID}, pgSeries); err != nil {
		return err
	}

	p50 := func(k string) float64 { return s.Latency[k].P50 }
	s.set("page50_over_page1", ratio(p50("api_page50"), p50("api_page1")))
	s.set("api_over_c_page1", ratio(p50("api_page1"), p50("c_page1")))
	s.set("api_over_c_page50", ratio(p50("api_page50"), p50("c_page50")))
	s.set("api_over_c_single_page1", ratio(p50("api_page1"), p50("c_single_query_page1")))
	s.set("api_over_c_single_page50", ratio(p50("api_page50"), p50("c_single_query_page50")))
	s.set("b_over_api_page1", ratio(p50("b_page1"), p50("api_page1")))
	s.set("b_over_api_page50", ratio(p50("b_page50"), p50("api_page50")))
	return nil
}

// pagePair records run(page1) and run(pageN) as the series <name>_page1 and <name>_page50.
func pagePair[T any](s *Scenario, name string, page1, pageN T, run func(T) ([]time.Duration, error)) error {
	l1, err := run(page1)
	if err != nil {
		return err
	}
	lN, err := run(pageN)
	if err != nil {
		return err
	}
	s.lat(name+"_page1", Summarize(l1))
	s.lat(name+"_page50", Summarize(lN))
	return nil
}

// apiAndDirect times the same read --iterations times through the API (series "api": GET path with
// key, each answer decoded into into) and straight through query.Store (series "c").
func (b *bench) apiAndDirect(ctx context.Context, s *Scenario, path, key string, into any, direct func(context.Context, *query.Store) error) error {
	api, err := timeSeries(ctx, b.opt.iterations, b.warm(), 0, func(ctx context.Context) error {
		body, err := b.get(ctx, path, key)
		if err != nil {
			return err
		}
		return decodeData(body, into)
	})
	if err != nil {
		return err
	}
	s.lat("api", Summarize(api))
	st := b.store()
	c, err := timeSeries(ctx, b.opt.iterations, b.warm(), 0, func(ctx context.Context) error { return direct(ctx, st) })
	if err != nil {
		return err
	}
	s.lat("c", Summarize(c))
	return nil
}

// kpis: GET /metrics (the guide's KPI set: today, 7 days, 30 days) against query.Store.KPIs and
// against counting the guide's table, which is how that design answers it.
func (b *bench) kpis(ctx context.Context, s *Scenario) error {
	t := b.tenants[0]
	n := b.opt.iterations
	var apiKPIs map[string]query.KPI
	if err := b.apiAndDirect(ctx, s, "/api/analytics/metrics", t.Key, &apiKPIs, func(ctx context.Context, st *query.Store) error {
		_, err := st.KPIs(ctx, t.ID, query.DefaultKPIMetrics)
		return err
	}); err != nil {
		return err
	}

	today := time.Now().UTC().Truncate(24 * time.Hour)
	q := `SELECT event, count(*) FILTER (WHERE ts >= $2), count(*) FILTER (WHERE ts >= $3), count(*)
FROM analytics_events WHERE tenant_id = $1 AND event = ANY($4) AND ts >= $5 GROUP BY event`
	pgKPIs := map[string]query.KPI{}
	pg, err := timeSeries(ctx, n, 1, b.slowBudget(), func(ctx context.Context) error {
		rows, err := b.pg.Query(ctx, q, t.ID, today, today.AddDate(0, 0, -6), query.DefaultKPIMetrics, today.AddDate(0, 0, -29))
		if err != nil {
			return fmt.Errorf("postgres kpis: %w", err)
		}
		defer rows.Close()
		for rows.Next() {
			var m string
			var k query.KPI
			if err := rows.Scan(&m, &k.Today, &k.Week, &k.Month); err != nil {
				return err
			}
			pgKPIs[m] = k
		}
		return rows.Err()
	})
	if err != nil {
		return err
	}
	s.lat("b", Summarize(pg))
	s.set("b_over_api", ratio(s.Latency["b"].P50, s.Latency["api"].P50))
	s.set("api_over_c", ratio(s.Latency["api"].P50, s.Latency["c"].P50))
	for _, m := range query.DefaultKPIMetrics {
		if apiKPIs[m] != pgKPIs[m] {
			s.note("KPI %s differs: API %+v, Postgres %+v", m, apiKPIs[m], pgKPIs[m])
		}
	}
	return nil
}

var usageMetrics = []string{"auth.user.login", "apikey.request", "builder.generate.completed", "email.sent"}

// usage90d: GET /usage over the last 90 days for four metrics, against query.Store.Usage and a
// GROUP BY day on the guide's table.
func (b *bench) usage90d(ctx context.Context, s *Scenario) error {
	t := b.tenants[0]
	n := b.opt.iterations
	today := time.Now().UTC().Truncate(24 * time.Hour)
	first := today.AddDate(0, 0, -89)
	path := "/api/analytics/usage?from=" + first.Format(time.DateOnly) + "&to=" + today.Format(time.DateOnly)
	for _, m := range usageMetrics {
		path += "&metric[]=" + m
	}
	var apiRes map[string][]query.Point
	if err := b.apiAndDirect(ctx, s, path, t.Key, &apiRes, func(ctx context.Context, st *query.Store) error {
		_, err := st.Usage(ctx, t.ID, usageMetrics, first, today, false)
		return err
	}); err != nil {
		return err
	}
	q := `SELECT event, (ts AT TIME ZONE 'UTC')::date AS day, count(*) FROM analytics_events
WHERE tenant_id = $1 AND event = ANY($2) AND ts >= $3 AND ts < $4 GROUP BY 1, 2`
	var pgTotal int64
	pg, err := timeSeries(ctx, n, 1, b.slowBudget(), func(ctx context.Context) error {
		rows, err := b.pg.Query(ctx, q, t.ID, usageMetrics, first, today.AddDate(0, 0, 1))
		if err != nil {
			return fmt.Errorf("postgres usage: %w", err)
		}
		defer rows.Close()
		pgTotal = 0
		for rows.Next() {
			var m string
			var d time.Time
			var c int64
			if err := rows.Scan(&m, &d, &c); err != nil {
				return err
			}
			pgTotal += c
		}
		return rows.Err()
	})
	if err != nil {
		return err
	}
	s.lat("b", Summarize(pg))
	s.set("b_over_api", ratio(s.Latency["b"].P50, s.Latency["api"].P50))
	s.set("api_over_c", ratio(s.Latency["api"].P50, s.Latency["c"].P50))
	var apiTotal int64
	days := 0
	for _, pts := range apiRes {
		for _, p := range pts {
			apiTotal += p.Count
			days++
		}
	}
	s.set("points", float64(days))
	if apiTotal != pgTotal {
		s.note("usage totals differ: API %d, Postgres %d", apiTotal, pgTotal)
	}
	return nil
}

// sqlLiteralRange renders r for a clickhouse-client query (unix seconds: no zone or format traps).
func sqlLiteralRange(r query.Range) (string, string) {
	return fmt.Sprintf("toDateTime(%d)", r.From.Unix()), fmt.Sprintf("toDateTime(%d)", r.To.Unix())
}

func quoteCH(s string) string {
	return "'" + strings.ReplaceAll(strings.ReplaceAll(s, `\`, `\\`), `'`, `\'`) + "'"
}
