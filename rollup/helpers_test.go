package rollup_test

import (
	"context"
	"fmt"
	"sort"
	"sync"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/analyticsd/analyticsd/audit"
	"github.com/analyticsd/analyticsd/internal/testenv"
	fx "github.com/analyticsd/analyticsd/internal/testenv/fixture"
	"github.com/analyticsd/analyticsd/rollup"
)

const day = 24 * time.Hour

// fixture is one test's isolated stack plus helpers that write raw data and read both stores.
type fixture struct {
	env   testenv.Env
	today time.Time // UTC midnight of the real today
}

func newFixture(t *testing.T) *fixture {
	t.Helper()
	return &fixture{env: testenv.Migrated(t), today: rollup.Day(time.Now())}
}

func ctxT(t *testing.T) context.Context {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	t.Cleanup(cancel)
	return ctx
}

// daysAgo returns the UTC day n days before today.
func (f *fixture) daysAgo(n int) time.Time { return f.today.AddDate(0, 0, -n) }

func (f *fixture) tenant(t *testing.T, slug string) uuid.UUID {
	t.Helper()
	return fx.Tenant(t, f.env.PG, slug).ID
}

func (f *fixture) reconciler(reg prometheus.Registerer, now func() time.Time) *rollup.Reconciler {
	r := rollup.NewReconciler(f.env.CH, f.env.DB, f.env.PG, audit.New(f.env.PG), reg, nil, 90, now)
	r.SettleDelay = 20 * time.Millisecond
	return r
}

type ev struct {
	tenant uuid.UUID
	ts     time.Time
	event  string
}

// events writes events straight into ClickHouse (the materialized view feeds daily_usage).
func (f *fixture) events(t *testing.T, rows ...ev) {
	t.Helper()
	var values [][]any
	for _, r := range rows {
		values = append(values, []any{r.tenant, r.ts, uuid.New(), r.ts, r.event, "app", "user-1", "{}", "127.0.0.1", "req-1"})
	}
	f.env.Insert(t, "events", "tenant_id, ts, id, received_at, event, source, user_id, props, ip, request_id", values...)
}

// repeat returns n events of name for tenant at ts, a second apart.
func repeat(n int, tenant uuid.UUID, ts time.Time, name string) []ev {
	out := make([]ev, n)
	for i := range out {
		out[i] = ev{tenant, ts.Add(time.Duration(i) * time.Second), name}
	}
	return out
}

type inc struct {
	tenant uuid.UUID
	ts     time.Time
	metric string
	n      int64
}

func (f *fixture) increments(t *testing.T, rows ...inc) {
	t.Helper()
	var values [][]any
	for _, r := range rows {
		values = append(values, []any{r.tenant, r.ts, uuid.New(), r.metric, r.n})
	}
	f.env.Insert(t, "usage_increments", "tenant_id, ts, id, metric, n", values...)
}

// aggregateRow writes a row straight into daily_usage, as a broken or partial materialized view would.
func (f *fixture) aggregateRow(t *testing.T, tenant uuid.UUID, date time.Time, metric string, n int64) {
	t.Helper()
	f.env.Insert(t, "daily_usage", "tenant_id, date, metric, count", []any{tenant, date, metric, n})
}

// counts maps "tenant/metric" to a count.
type counts map[string]int64

func k(tenant uuid.UUID, metric string) string { return tenant.String() + "/" + metric }

func (c counts) String() string {
	keys := make([]string, 0, len(c))
	for key := range c {
		keys = append(keys, key)
	}
	sort.Strings(keys)
	s := ""
	for _, key := range keys {
		s += fmt.Sprintf("%s=%d ", key, c[key])
	}
	return s
}

// postgres returns analytics_daily_usage for date.
func (f *fixture) postgres(t *testing.T, date time.Time) counts {
	t.Helper()
	rows, err := f.env.PG.Query(ctxT(t), "SELECT tenant_id, metric, count FROM analytics_daily_usage WHERE date = $1::date", date.Format("2006-01-02"))
	if err != nil {
		t.Fatal(err)
	}
	defer rows.Close()
	out := counts{}
	for rows.Next() {
		var id uuid.UUID
		var m string
		var n int64
		if err := rows.Scan(&id, &m, &n); err != nil {
			t.Fatal(err)
		}
		out[k(id, m)] = n
	}
	if err := rows.Err(); err != nil {
		t.Fatal(err)
	}
	return out
}

// aggregate returns ClickHouse daily_usage for date, summed, without zero rows.
func (f *fixture) aggregate(t *testing.T, date time.Time) counts {
	t.Helper()
	return f.chCounts(t, "SELECT tenant_id, metric, sum(count) FROM "+f.env.DB+".daily_usage WHERE date = toDate(?) GROUP BY tenant_id, metric",
		date.Format("2006-01-02"))
}

// raw returns events per (tenant, event) plus increments per (tenant, metric) for date.
func (f *fixture) raw(t *testing.T, date time.Time) counts {
	t.Helper()
	out := f.chCounts(t, "SELECT tenant_id, event, toInt64(count()) FROM "+f.env.DB+".events WHERE toDate(ts) = toDate(?) GROUP BY tenant_id, event",
		date.Format("2006-01-02"))
	for key, n := range f.chCounts(t, "SELECT tenant_id, metric, sum(n) FROM "+f.env.DB+".usage_increments WHERE toDate(ts) = toDate(?) GROUP BY tenant_id, metric",
		date.Format("2006-01-02")) {
		out[key] += n
	}
	return out
}

func (f *fixture) chCounts(t *testing.T, q string, args ...any) counts {
	t.Helper()
	rows, err := f.env.CH.Query(ctxT(t), q, args...)
	if err != nil {
		t.Fatal(err)
	}
	defer rows.Close()
	out := counts{}
	for rows.Next() {
		var id uuid.UUID
		var m string
		var n int64
		if err := rows.Scan(&id, &m, &n); err != nil {
			t.Fatal(err)
		}
		if n != 0 {
			out[k(id, m)] = n
		}
	}
	if err := rows.Err(); err != nil {
		t.Fatal(err)
	}
	return out
}

func without(c counts, tenant uuid.UUID) counts {
	out := counts{}
	prefix := tenant.String() + "/"
	for key, n := range c {
		if len(key) < len(prefix) || key[:len(prefix)] != prefix {
			out[key] = n
		}
	}
	return out
}

// rowVersions returns each analytics_daily_usage row of date with its xmin and meta, to prove a
// repeat run rewrote nothing.
func (f *fixture) rowVersions(t *testing.T, date time.Time) map[string]string {
	t.Helper()
	rows, err := f.env.PG.Query(ctxT(t), "SELECT tenant_id, metric, xmin::text, meta::text FROM analytics_daily_usage WHERE date = $1::date", date.Format("2006-01-02"))
	if err != nil {
		t.Fatal(err)
	}
	defer rows.Close()
	out := map[string]string{}
	for rows.Next() {
		var id uuid.UUID
		var m, xmin, meta string
		if err := rows.Scan(&id, &m, &xmin, &meta); err != nil {
			t.Fatal(err)
		}
		out[k(id, m)] = xmin + " " + meta
	}
	if err := rows.Err(); err != nil {
		t.Fatal(err)
	}
	return out
}

func (f *fixture) count(t *testing.T, q string, args ...any) int {
	t.Helper()
	var n int
	if err := f.env.PG.QueryRow(ctxT(t), q, args...).Scan(&n); err != nil {
		t.Fatalf("%s: %v", q, err)
	}
	return n
}

// metricValue reads a counter's value, or a histogram's sample count, from reg.
func metricValue(t *testing.T, reg *prometheus.Registry, name string, labels map[string]string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
	next:
		for _, m := range mf.GetMetric() {
			for _, lp := range m.GetLabel() {
				if v, ok := labels[lp.GetName()]; ok && v != lp.GetValue() {
					continue next
				}
			}
			if m.GetCounter() != nil {
				return m.GetCounter().GetValue()
			}
			if m.GetHistogram() != nil {
				return float64(m.GetHistogram().GetSampleCount())
			}
		}
	}
	t.Fatalf("metric %s%v not found", name, labels)
	return 0
}

// clock is a settable test clock.
type clock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *clock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *clock) Set(t time.Time) {
	c.mu.Lock()
	c.t = t
	c.mu.Unlock()
}
