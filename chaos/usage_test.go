//go:build chaos

package chaos

import (
	"context"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"os"
	"sort"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/analyticsd/analyticsd/auth"
	"github.com/analyticsd/analyticsd/internal/testenv"
	"github.com/analyticsd/analyticsd/tenant"
)

// usageEvents are what the usage property test sends: three events the quota map counts and one it
// does not; its increments go to a metric events also count and to one only increments count, and
// its consumes spend builds_daily.
var (
	usageEvents  = []string{"apikey.request", "builder.generate.completed", "email.sent", "auth.user.login"}
	quotaMetrics = map[string][]string{ // quota metric -> the daily_usage metrics it sums
		"api_requests_daily": {"apikey.request", "api_requests_daily"},
		"builds_daily":       {"builder.generate.completed", "builds_daily"},
		"emails_daily":       {"email.sent"},
		"exports_daily":      {"exports_daily"},
	}
)

// usageClient is one tenant's view of the property test: its key, and every request it has had
// acknowledged.
type usageClient struct {
	tenant uuid.UUID
	key    string
}

// usageOp is one request the test retries until an instance acknowledges it: the same body and
// Idempotency-Key every time, on alternating instances.
type usageOp struct {
	method, path, body, key string
}

// TestUsageAgrees is the usage property test: two instances whose clocks differ by 1.7 s run across
// midnight UTC (their clocks are shifted so that it falls a third into the test) while two tenants
// send events, increments and consumes in random order, retrying every request that fails until one
// instance acknowledges it, and the test flushes Redis, kill -9s an instance and restarts
// ClickHouse at random moments. Once all is healthy, for every tenant, metric and both days, within
// the convergence bound: the live counter (Redis, and GET /quotas of each instance for today) = the
// raw events and increments in ClickHouse = daily_usage = usage_quarter_hour (slot by slot) = Postgres
// after the rollup = /usage = the KPIs the dashboard shows (/metrics).
func TestUsageAgrees(t *testing.T) {
	if !testenv.Required() && os.Getenv("CLICKHOUSE_DSN") == "" {
		t.Skip("needs the local stack: run make chaos")
	}
	bin := build(t, "testclock")
	run := pick(36*time.Second, 120*time.Second)
	// Shift the instances' clocks so that midnight UTC comes a third of the way into the run.
	now := time.Now().UTC()
	midnight := now.Truncate(24 * time.Hour).Add(24 * time.Hour)
	offset := midnight.Add(-run / 3).Sub(now)
	// emails_daily has a limit the run passes (only events count toward it, and ingest is never
	// refused): its alerts go to a webhook receiver that refuses 30 % of deliveries.
	hooks := newHookReceiver(t, 0.3)
	a := newSystem(t, bin, map[string]string{
		"ANALYTICS_TEST_CLOCK_OFFSET": offset.String(), "QUOTA_RECONCILE_INTERVAL": "2s",
		"QUOTA_DEFAULTS":          `{"api_requests_daily":1e12,"builds_daily":1e12,"emails_daily":40,"exports_daily":1e12}`,
		"QUOTA_ALERT_WEBHOOK_URL": hooks.srv.URL,
	})
	b := a.sibling(t, map[string]string{"ANALYTICS_TEST_CLOCK_OFFSET": (offset + 1700*time.Millisecond).String()})
	ctx := context.Background()
	second, err := tenant.NewStore(a.env.PG).Create(ctx, "chaos-two", "")
	if err != nil {
		t.Fatal(err)
	}
	key2, _, err := auth.NewKeys(a.env.PG).Create(ctx, second.ID, "load", auth.AllScopes)
	if err != nil {
		t.Fatal(err)
	}
	clients := []usageClient{{a.tenant, a.key}, {second.ID, key2}}
	systems := []*system{a, b}
	dayBefore := midnight.Add(-24 * time.Hour) // the instances' "today" at the start, "yesterday" after

	var mu sync.Mutex
	acked, sent := 0, 0
	send := func(c usageClient, op usageOp, first int) {
		for try := 0; ; try++ {
			s := systems[(first+try)%2]
			req, _ := http.NewRequest(op.method, s.base+op.path, strings.NewReader(op.body))
			req.Header.Set("Authorization", "Bearer "+c.key)
			req.Header.Set("Content-Type", "application/json")
			req.Header.Set("Idempotency-Key", op.key)
			resp, err := s.client.Do(req)
			code := -1
			if err == nil {
				code = resp.StatusCode
				resp.Body.Close()
			}
			mu.Lock()
			sent++
			if code/100 == 2 {
				acked++
			}
			mu.Unlock()
			switch {
			case code/100 == 2:
				return
			case code == http.StatusBadRequest || code == http.StatusUnprocessableEntity || code == http.StatusForbidden:
				t.Errorf("%s %s: %d", op.method, op.path, code)
				return
			case try > 600:
				t.Errorf("%s %s never acknowledged", op.method, op.path)
				return
			}
			time.Sleep(time.Duration(50+rand.IntN(150)) * time.Millisecond)
		}
	}
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for w := 0; w < 4; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(uint64(w), uint64(time.Now().UnixNano())))
			for n := 0; ; n++ {
				select {
				case <-stop:
					return
				default:
				}
				c := clients[rng.IntN(len(clients))]
				var op usageOp
				switch k := rng.IntN(10); {
				case k < 6:
					evs := make([]map[string]any, 1+rng.IntN(40))
					for i := range evs {
						evs[i] = map[string]any{"id": uuid.NewString(), "event": usageEvents[rng.IntN(len(usageEvents))], "source": "api", "user_id": "u" + strconv.Itoa(rng.IntN(50))}
					}
					body, _ := json.Marshal(evs)
					op = usageOp{http.MethodPost, "/api/analytics/events", string(body), uuid.NewString()}
				case k < 8:
					metric := []string{"api_requests_daily", "exports_daily"}[rng.IntN(2)]
					op = usageOp{http.MethodPost, "/api/analytics/usage", fmt.Sprintf(`{"metric":%q,"n":%d}`, metric, 1+rng.IntN(5)), uuid.NewString()}
				default:
					op = usageOp{http.MethodPost, "/api/analytics/quotas/builds_daily/consume?n=" + strconv.Itoa(1+rng.IntN(3)), "", uuid.NewString()}
				}
				send(c, op, w+n)
				time.Sleep(time.Duration(5+rng.IntN(20)) * time.Millisecond)
			}
		}(w)
	}
	// The faults, in random order at random moments of the run's middle.
	faults := []struct {
		name string
		do   func()
	}{
		{"redis FLUSHALL", func() { a.env.Redis.FlushAll(ctx) }},
		{"kill -9 of one instance", func() { a.kill9(); time.Sleep(time.Second); a.start() }},
		{"clickhouse restart", func() {
			stack(t, "stop-service", "clickhouse")
			time.Sleep(2 * time.Second)
			stack(t, "start-service", "clickhouse")
		}},
	}
	rand.Shuffle(len(faults), func(i, j int) { faults[i], faults[j] = faults[j], faults[i] })
	start := time.Now()
	var done []string
	for i, f := range faults {
		at := start.Add(run * time.Duration(1+3*i) / 12)
		time.Sleep(time.Until(at.Add(time.Duration(rand.IntN(2000)) * time.Millisecond)))
		f.do()
		done = append(done, f.name)
	}
	time.Sleep(time.Until(start.Add(run)))
	close(stop)
	wg.Wait()
	a.drained(3 * time.Minute)
	b.drained(3 * time.Minute)
	healthy := time.Now()
	if time.Now().Add(offset).Before(midnight.Add(5 * time.Second)) {
		t.Fatalf("the instances' clocks did not pass midnight (offset %s): the test checked one day only", offset)
	}

	// Converged: every number equals the raw rows, within the bound.
	var mismatches []string
	var checked int
	for {
		mismatches, checked = usageMismatches(t, a, b, clients, []time.Time{dayBefore, midnight})
		if len(mismatches) == 0 || time.Since(healthy) > 75*time.Second {
			break
		}
		time.Sleep(time.Second)
	}
	converged := time.Since(healthy)
	t.Logf("%d requests, %d acknowledged; faults %v; %d tenant × metric × day values checked in 6 places; converged %.1f s after the spools drained",
		sent, acked, done, checked, converged.Seconds())
	for _, m := range mismatches {
		t.Error(m)
	}
	alerts, repeats := hooks.agree(t, a, clients)
	t.Logf("alerts: %d recorded, each delivered; %d repeated deliveries", alerts, repeats)
	if checked == 0 {
		t.Fatal("nothing was checked")
	}
	writeResult(t, Result{Fault: "usage agrees: 2 tenants, 2 instances 1.7 s apart across midnight, " + strings.Join(done, ", "),
		Acked: acked, Found: checked - len(mismatches), RecoverS: converged.Round(100 * time.Millisecond).Seconds(),
		Note: fmt.Sprintf("%d values checked, %d mismatches", checked, len(mismatches))})
}

// usageMismatches compares every place usage is counted with the raw rows in ClickHouse, for each
// client's tenant and each day, and returns what differs and how many values it compared. The
// rollup bills the first day (after midnight it is the instances' yesterday).
func usageMismatches(t *testing.T, a, b *system, clients []usageClient, days []time.Time) ([]string, int) {
	t.Helper()
	ctx := context.Background()
	var out []string
	checked := 0
	check := func(what string, got, want int64) {
		checked++
		if got != want {
			out = append(out, fmt.Sprintf("%s: %d, raw rows say %d", what, got, want))
		}
	}
	if o, err := a.command("rollup", "--date", days[0].Format("2006-01-02")).CombinedOutput(); err != nil {
		return []string{fmt.Sprintf("rollup: %v %s", err, o)}, 0
	}
	for _, c := range clients {
		for di, d := range days {
			date := d.Format("2006-01-02")
			// The truth: raw events by name, raw increments by metric.
			raw := map[string]int64{}
			err := sums(a, raw, "SELECT event, toInt64(count()) FROM "+a.env.DB+".events WHERE tenant_id = ? AND toDate(ts) = toDate(?) GROUP BY event", c.tenant, date)
			if err == nil {
				err = sums(a, raw, "SELECT metric, toInt64(sum(n)) FROM "+a.env.DB+".usage_increments WHERE tenant_id = ? AND toDate(ts) = toDate(?) GROUP BY metric", c.tenant, date)
			}
			if err != nil {
				return []string{err.Error()}, 0
			}
			if raw["apikey.request"] == 0 || raw["builds_daily"] == 0 || raw["exports_daily"] == 0 {
				return []string{fmt.Sprintf("tenant %s on %s has no rows of some kind (%v): the test checked nothing there", c.tenant, date, raw)}, 0
			}
			// daily_usage.
			agg := map[string]int64{}
			if err := sums(a, agg, "SELECT metric, toInt64(sum(count)) FROM "+a.env.DB+".daily_usage WHERE tenant_id = ? AND date = toDate(?) GROUP BY metric", c.tenant, date); err != nil {
				return []string{err.Error()}, 0
			}
			names := make([]string, 0, len(raw))
			for m := range raw {
				names = append(names, m)
			}
			sort.Strings(names)
			for _, m := range names {
				check(fmt.Sprintf("daily_usage %s %s %s", c.tenant, m, date), agg[m], raw[m])
			}
			// usage_quarter_hour (local days are read from it): each metric's 15-minute slots of the
			// day, one by one, against the raw rows in them.
			for _, m := range names {
				var off uint64
				err := a.env.CH.QueryRow(ctx, "SELECT count() FROM (SELECT slot, sumIf(c, src = 1) - sumIf(c, src = 0) AS d FROM ("+
					"SELECT slot, toUInt8(0) AS src, sum(count) AS c FROM "+a.env.DB+".usage_quarter_hour WHERE tenant_id = ? AND metric = ? AND toDate(slot) = toDate(?) GROUP BY slot"+
					" UNION ALL SELECT toStartOfFifteenMinutes(ts) AS slot, toUInt8(1) AS src, toInt64(count()) AS c FROM "+a.env.DB+".events WHERE tenant_id = ? AND event = ? AND toDate(ts) = toDate(?) GROUP BY slot"+
					" UNION ALL SELECT toStartOfFifteenMinutes(ts) AS slot, toUInt8(1) AS src, sum(n) AS c FROM "+a.env.DB+".usage_increments WHERE tenant_id = ? AND metric = ? AND toDate(ts) = toDate(?) GROUP BY slot"+
					") GROUP BY slot HAVING d != 0)", c.tenant, m, date, c.tenant, m, date, c.tenant, m, date).Scan(&off)
				if err != nil {
					return []string{err.Error()}, 0
				}
				check(fmt.Sprintf("usage_quarter_hour slots unlike the raw rows, %s %s %s", c.tenant, m, date), int64(off), 0)
			}
			// Postgres after the rollup (the first day only: the second is still today).
			if di == 0 {
				for _, m := range names {
					var n int64
					a.env.PG.QueryRow(ctx, "SELECT count FROM analytics_daily_usage WHERE tenant_id = $1 AND date = $2 AND metric = $3", c.tenant, date, m).Scan(&n)
					check(fmt.Sprintf("billed %s %s %s", c.tenant, m, date), n, raw[m])
				}
			}
			// /usage and /metrics (the dashboard's numbers), through each tenant's key.
			series := usageSeries(a, c, names, days)
			for _, m := range names {
				check(fmt.Sprintf("/usage %s %s %s", c.tenant, m, date), series[m][date], raw[m])
			}
			// Live counters: the Redis counter of each quota metric, and for today GET /quotas on
			// both instances.
			for q, parts := range quotaMetrics {
				var want int64
				for _, p := range parts {
					want += raw[p]
				}
				key := fmt.Sprintf("quota:{%s}:%s:%s", c.tenant, q, d.Format("20060102"))
				n, _ := a.env.Redis.Get(ctx, key).Int64()
				check(fmt.Sprintf("live counter %s %s %s", c.tenant, q, date), n, want)
				if di == len(days)-1 {
					for _, s := range []*system{a, b} {
						check(fmt.Sprintf("GET /quotas %s %s %s at %s", c.tenant, q, date, s.base), quotaCurrent(s, c, q), want)
					}
				}
			}
			if di == len(days)-1 {
				kpis := usageKPIs(a, c, names)
				for _, m := range names {
					check(fmt.Sprintf("/metrics today %s %s", c.tenant, m), kpis[m], raw[m])
				}
			}
		}
	}
	return out, checked
}

// sums adds the (name, count) rows of a ClickHouse query into into.
func sums(s *system, into map[string]int64, query string, args ...any) error {
	rows, err := s.env.CH.Query(context.Background(), query, args...)
	if err != nil {
		return err
	}
	defer rows.Close()
	for rows.Next() {
		var m string
		var n int64
		if err := rows.Scan(&m, &n); err != nil {
			return err
		}
		into[m] += n
	}
	return rows.Err()
}

// usageSeries reads /usage for metrics over days: metric -> date -> count.
// A failed GET (here and in the readers below) reads as zeros, which the comparisons then report.
func usageSeries(s *system, c usageClient, metrics []string, days []time.Time) map[string]map[string]int64 {
	path := fmt.Sprintf("/api/analytics/usage?from=%s&to=%s&metric=%s", days[0].Format("2006-01-02"), days[len(days)-1].Format("2006-01-02"), strings.Join(metrics, ","))
	var r struct {
		Data map[string][]struct {
			Date  string `json:"date"`
			Count int64  `json:"count"`
		} `json:"data"`
	}
	body, _ := s.getAs(c.key, path)
	json.Unmarshal([]byte(body), &r)
	out := map[string]map[string]int64{}
	for m, points := range r.Data {
		out[m] = map[string]int64{}
		for _, p := range points {
			out[m][p.Date] = p.Count
		}
	}
	return out
}

// usageKPIs reads today's figure of each metric from /metrics.
func usageKPIs(s *system, c usageClient, metrics []string) map[string]int64 {
	var r struct {
		Data map[string]struct {
			Today int64 `json:"today"`
		} `json:"data"`
	}
	body, _ := s.getAs(c.key, "/api/analytics/metrics?metric="+strings.Join(metrics, ","))
	json.Unmarshal([]byte(body), &r)
	out := map[string]int64{}
	for m, k := range r.Data {
		out[m] = k.Today
	}
	return out
}

func quotaCurrent(s *system, c usageClient, metric string) int64 {
	var r struct {
		Data struct {
			Current float64 `json:"current"`
		} `json:"data"`
	}
	body, _ := s.getAs(c.key, "/api/analytics/quotas/"+metric)
	json.Unmarshal([]byte(body), &r)
	return int64(r.Data.Current)
}

// hookReceiver is an alert webhook receiver that refuses a share of deliveries (503) and records
// the alerts it accepted.
type hookReceiver struct {
	srv *httptest.Server
	mu  sync.Mutex
	ids map[string]string // alert (tenant, day, metric, threshold) -> the id it came with
	n   map[string]int    // alert -> deliveries accepted
}

func newHookReceiver(t *testing.T, refuse float64) *hookReceiver {
	h := &hookReceiver{ids: map[string]string{}, n: map[string]int{}}
	h.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if rand.Float64() < refuse {
			w.WriteHeader(http.StatusServiceUnavailable)
			return
		}
		var p struct {
			ID       string `json:"id"`
			TenantID string `json:"tenant_id"`
			Day      string `json:"day"`
			Metric   string `json:"metric"`
			Pct      int    `json:"threshold_percent"`
		}
		if err := json.NewDecoder(r.Body).Decode(&p); err != nil || p.ID == "" {
			t.Errorf("webhook payload: %+v, %v", p, err)
		}
		k := fmt.Sprintf("%s %s %s %d", p.TenantID, p.Day, p.Metric, p.Pct)
		h.mu.Lock()
		if id, ok := h.ids[k]; ok && id != p.ID {
			t.Errorf("alert %s came with ids %s and %s", k, id, p.ID)
		}
		h.ids[k] = p.ID
		h.n[k]++
		h.mu.Unlock()
	}))
	t.Cleanup(h.srv.Close)
	return h
}

// agree waits until no webhook is due (a lease a killed instance held ends after 40 s), then
// checks that the alerts accepted are exactly those quota_alerts recorded for the clients'
// tenants, and that the run recorded some (each tenant passes 80 % and 100 % of emails_daily on
// at least one day). It returns the alerts recorded and the repeated deliveries.
func (h *hookReceiver) agree(t *testing.T, s *system, clients []usageClient) (int, int) {
	t.Helper()
	var tenants []uuid.UUID
	for _, c := range clients {
		tenants = append(tenants, c.tenant)
	}
	ctx := context.Background()
	deadline := time.Now().Add(90 * time.Second)
	for {
		var due int
		if err := s.env.PG.QueryRow(ctx, "SELECT count(*) FROM quota_alerts WHERE webhook_due_at IS NOT NULL").Scan(&due); err != nil {
			t.Fatal(err)
		}
		if due == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Errorf("%d alert webhooks still due 90 s after the run", due)
			break
		}
		time.Sleep(500 * time.Millisecond)
	}
	rows, err := s.env.PG.Query(ctx, `SELECT tenant_id, day, metric, threshold FROM quota_alerts
		WHERE recorded_at IS NOT NULL AND tenant_id = ANY($1)`, tenants)
	if err != nil {
		t.Fatal(err)
	}
	recorded := map[string]bool{}
	for rows.Next() {
		var tn uuid.UUID
		var day time.Time
		var metric string
		var pct int
		if err := rows.Scan(&tn, &day, &metric, &pct); err != nil {
			t.Fatal(err)
		}
		recorded[fmt.Sprintf("%s %s %s %d", tn, day.Format(time.DateOnly), metric, pct)] = true
	}
	if err := rows.Err(); err != nil {
		t.Fatal(err)
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	repeats := 0
	for k, n := range h.n {
		if !recorded[k] {
			t.Errorf("webhook for an alert quota_alerts has not recorded: %s", k)
		}
		repeats += n - 1
	}
	for k := range recorded {
		if h.n[k] == 0 {
			t.Errorf("alert %s recorded, its webhook never accepted", k)
		}
	}
	if len(recorded) < 2*len(clients) {
		t.Errorf("%d alerts recorded, want at least 80 %% and 100 %% of emails_daily for each of %d tenants", len(recorded), len(clients))
	}
	return len(recorded), repeats
}
