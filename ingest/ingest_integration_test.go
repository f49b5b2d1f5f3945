package ingest

import (
	"bytes"
	"compress/gzip"
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/ClickHouse/clickhouse-go/v2"
	"github.com/ClickHouse/clickhouse-go/v2/lib/driver"
	"github.com/gofiber/fiber/v2"
	"github.com/google/uuid"
	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	"github.com/analyticsd/analyticsd/api"
	"github.com/analyticsd/analyticsd/auth"
	"github.com/analyticsd/analyticsd/dedup"
	"github.com/analyticsd/analyticsd/ingest/spool"
	"github.com/analyticsd/analyticsd/internal/labels"
	"github.com/analyticsd/analyticsd/internal/testenv"
	"github.com/analyticsd/analyticsd/internal/testenv/fixture"
	"github.com/analyticsd/analyticsd/quota"
	"github.com/analyticsd/analyticsd/schema"
	"github.com/analyticsd/analyticsd/tenant"
)

// harness is the shared stores, two tenants with keys, and the first analyticsd instance (more with
// newInstance: each has its own spool, and its own proxies the test can cut).
type harness struct {
	env      testenv.Env
	a, b     tenant.Tenant
	keyA     string
	keyB     string
	readKeyA string
	keys     *auth.Keys
	tenants  *tenant.Store
	*instance
}

type instance struct {
	srv      *fixture.Server
	w        *Writer
	svc      *Service
	counters *quota.Counters
	chProxy  *testenv.Proxy
	rdProxy  *testenv.Switch
	dedup    *dedup.Store
	metrics  *Metrics
}

type opts struct {
	writer  func(*WriterConfig)
	ingest  func(*Config)
	proxyCH bool // route the writer's ClickHouse connection through a proxy the test can cut
	proxyRD bool // same for Redis
	noDedup bool // no claims, no Idempotency-Key middleware
	// ch wraps the writer's ClickHouse connection (to script failures).
	ch func(driver.Conn) driver.Conn
}

func newHarness(t *testing.T, o opts) *harness {
	t.Helper()
	h := &harness{env: testenv.Migrated(t)}
	h.keys, h.tenants = auth.NewKeys(h.env.PG), tenant.NewStore(h.env.PG)
	h.a, h.b = fixture.Tenant(t, h.env.PG, "acme"), fixture.Tenant(t, h.env.PG, "globex")
	h.keyA, _ = fixture.Key(t, h.env.PG, h.a.ID, "w", auth.ScopeEventsWrite)
	h.keyB, _ = fixture.Key(t, h.env.PG, h.b.ID, "w", auth.ScopeEventsWrite)
	h.readKeyA, _ = fixture.Key(t, h.env.PG, h.a.ID, "r", auth.ScopeAnalyticsRead)

	h.instance = h.newInstance(t, o)
	return h
}

// newInstance starts another analyticsd ingest instance on the harness's stores.
func (h *harness) newInstance(t *testing.T, o opts) *instance {
	t.Helper()
	in := &instance{}
	ch := h.env.CH
	if o.proxyCH {
		ch, in.chProxy = proxiedClickHouse(t)
	}
	rdb := h.env.Redis
	if o.proxyRD {
		rdb, in.rdProxy = testenv.CuttableRedis(t)
	}
	in.counters = quota.NewCounters(rdb, h.env.Prefix)
	var claims Claims
	var mw []fiber.Handler
	if !o.noDedup {
		in.dedup = dedup.NewStore(rdb, h.env.Prefix, 24*time.Hour, &dedup.Counting{Keys: in.counters, Lua: quota.CountLua, TTL: quota.CounterTTL})
		claims = in.dedup
		mw = append(mw, in.dedup.Idempotency(nil))
	}
	if o.ch != nil {
		ch = o.ch(ch)
	}

	wc := WriterConfig{Dir: t.TempDir(), FlushInterval: 50 * time.Millisecond, RetryMax: 200 * time.Millisecond, Shards: h.env.Layout().Shards}
	if o.writer != nil {
		o.writer(&wc)
	}
	in.metrics = NewMetrics(nil, 0)
	var err error
	in.w, err = NewWriter(wc, ch, h.env.DB, claims, in.metrics, nil)
	if err != nil {
		t.Fatal(err)
	}
	ic := Config{Enabled: true, Limits: DefaultLimits(), CounterEvery: 10 * time.Millisecond}
	if o.ingest != nil {
		o.ingest(&ic)
	}
	in.svc = NewService(ic, in.w, counterAdapter{in.counters}, in.metrics, nil)
	// Started after the service has wired its counting into the writer, as serve does: a spool
	// replayed at start ships at once.
	in.w.Start()
	t.Cleanup(func() {
		in.svc.Close()
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		in.w.Close(ctx)
	})
	app := api.NewApp(api.Config{}, nil)
	authn := auth.NewAuthenticator(h.keys, h.tenants, auth.JWTConfig{})
	in.svc.Register(app.Group("/api/analytics"), nil, append([]fiber.Handler{authn.Require(auth.ScopeEventsWrite)}, mw...)...)
	in.srv = fixture.Serve(t, app)
	return in
}

func proxiedClickHouse(t *testing.T) (driver.Conn, *testenv.Proxy) {
	t.Helper()
	opts, err := clickhouse.ParseDSN(testenv.ClickHouseDSN(t))
	if err != nil {
		t.Fatal(err)
	}
	proxy := testenv.NewProxy(t, opts.Addr[0])
	opts.Addr = []string{proxy.Addr}
	opts.Auth.Database = "default"
	opts.DialTimeout = time.Second
	opts.Settings = schema.Layout{Cluster: testenv.Cluster()}.ConnSettings()
	conn, err := clickhouse.Open(opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return conn, proxy
}

// counterValue reads a counter of Metrics, e.g. InsertErrors, for a test to wait on.
func counterValue(c prometheus.Counter) float64 {
	var m dto.Metric
	if err := c.Write(&m); err != nil {
		return 0
	}
	return m.GetCounter().GetValue()
}

// counterAdapter feeds the raw Redis counters (quota's limits and alerts are tested in quota).
type counterAdapter struct{ c *quota.Counters }

func (a counterAdapter) Add(ctx context.Context, t uuid.UUID, d, received time.Time, deltas map[string]int64) error {
	_, err := a.c.Add(ctx, t, d, received, deltas)
	return err
}

func (counterAdapter) Counted(context.Context, uuid.UUID, time.Time, string, int64, int64) {}

type resp struct{ fixture.Response }

// post sends body as JSON (unless headers name another Content-Type) with key as the bearer.
func (h *instance) post(t *testing.T, key, path string, body []byte, headers map[string]string) resp {
	t.Helper()
	hdr := map[string]string{"Content-Type": "application/json"}
	for k, v := range headers {
		hdr[k] = v
	}
	return resp{h.srv.Do(t, fixture.Request{Method: http.MethodPost, Path: path, Key: key, Body: body, Header: hdr})}
}

func (r resp) accepted() int {
	n, _ := r.Data()["accepted"].(float64)
	return int(n)
}

func events(n int, f func(i int) map[string]any) ([]byte, []string) {
	var out []map[string]any
	var ids []string
	for i := 0; i < n; i++ {
		id := uuid.NewString()
		e := map[string]any{"id": id, "event": "auth.user.login", "user_id": fmt.Sprintf("u%d", i), "source": "app", "props": map[string]any{"i": i}}
		if f != nil {
			for k, v := range f(i) {
				e[k] = v
			}
		}
		out = append(out, e)
		ids = append(ids, id)
	}
	b, _ := json.Marshal(out)
	return b, ids
}

// countIDs counts stored events among ids for tenant.
func (h *harness) countIDs(t *testing.T, tenantID uuid.UUID, ids []string) int {
	t.Helper()
	rows, err := h.env.CH.Query(context.Background(), "SELECT toString(id) FROM "+h.env.DB+".events WHERE tenant_id = ?", tenantID)
	if err != nil {
		t.Fatal(err)
	}
	defer rows.Close()
	want := map[string]bool{}
	for _, id := range ids {
		want[id] = true
	}
	n := 0
	for rows.Next() {
		var id string
		if err := rows.Scan(&id); err != nil {
			t.Fatal(err)
		}
		if want[id] {
			n++
		}
	}
	return n
}

// waitStored waits until exactly want of ids are stored for tenant.
func (h *harness) waitStored(t *testing.T, tenantID uuid.UUID, ids []string, want int) {
	t.Helper()
	wait := 20 * time.Second
	if testenv.Cluster() != "" {
		// Each insert into a replicated table is a ZooKeeper round trip per part: a segment split by
		// day into 150 inserts takes tens of seconds on the local cluster.
		wait = time.Minute
	}
	testenv.Eventually(t, wait, func() error {
		if got := h.countIDs(t, tenantID, ids); got != want {
			return fmt.Errorf("stored %d of the events, want %d (writer: %+v)", got, want, h.w.Stats())
		}
		return nil
	})
}

func gz(b []byte) []byte {
	var out bytes.Buffer
	zw := gzip.NewWriter(&out)
	zw.Write(b)
	zw.Close()
	return out.Bytes()
}

func TestIngestFormats(t *testing.T) {
	t.Parallel()
	h := newHarness(t, opts{})
	one := uuid.NewString()
	arr, arrIDs := events(3, nil)
	envIDs := []string{uuid.NewString(), uuid.NewString()}
	nd1, nd2 := uuid.NewString(), uuid.NewString()
	gzBody, gzIDs := events(5, nil)
	cases := []struct {
		name    string
		body    []byte
		headers map[string]string
		ids     []string
	}{
		{"object", []byte(`{"id":"` + one + `","event":"auth.user.registered"}`), nil, []string{one}},
		{"array", arr, nil, arrIDs},
		{"envelope", []byte(`{"events":[{"id":"` + envIDs[0] + `","event":"email.sent"},{"id":"` + envIDs[1] + `","event":"email.sent"}]}`), nil, envIDs},
		{"ndjson", []byte(`{"id":"` + nd1 + `","event":"files.uploaded"}` + "\n" + `{"id":"` + nd2 + `","event":"files.uploaded","ts":` + fmt.Sprint(time.Now().UnixMilli()) + "}\n"),
			map[string]string{"Content-Type": "application/x-ndjson"}, []string{nd1, nd2}},
		{"gzip", gz(gzBody), map[string]string{"Content-Encoding": "gzip"}, gzIDs},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			r := h.post(t, h.keyA, "/api/analytics/events", tc.body, tc.headers)
			if r.Status != 202 || r.accepted() != len(tc.ids) {
				t.Fatalf("got %d %s, want 202 accepting %d", r.Status, r.Raw, len(tc.ids))
			}
			h.waitStored(t, h.a.ID, tc.ids, len(tc.ids))
		})
	}
}

func TestIngestStoresFieldsExactly(t *testing.T) {
	t.Parallel()
	h := newHarness(t, opts{})
	id := uuid.NewString()
	ts := time.Now().UTC().Add(-time.Hour).Truncate(time.Second)
	body := fmt.Sprintf(`{"id":%q,"event":"payments.checkout.created","user_id":"user-456","source":"payments","ts":%q,
		"props":{ "email" : "o'brien@example.com", "note": "tab\there \"quoted\" \\ back" },"ip":"192.168.1.1","request_id":"req-789"}`, id, ts.Format(time.RFC3339))
	if r := h.post(t, h.keyA, "/api/analytics/events", []byte(body), nil); r.Status != 202 {
		t.Fatalf("got %d %s", r.Status, r.Raw)
	}
	h.waitStored(t, h.a.ID, []string{id}, 1)
	var got struct {
		Ts                                          time.Time
		Event, Source, UserID, Props, IP, RequestID string
	}
	if err := h.env.CH.QueryRow(context.Background(), "SELECT ts, event, source, user_id, props, ip, request_id FROM "+h.env.DB+".events WHERE id = ?", id).
		Scan(&got.Ts, &got.Event, &got.Source, &got.UserID, &got.Props, &got.IP, &got.RequestID); err != nil {
		t.Fatal(err)
	}
	want := `{"email":"o'brien@example.com","note":"tab\there \"quoted\" \\ back"}`
	if !got.Ts.Equal(ts) || got.Event != "payments.checkout.created" || got.Source != "payments" || got.UserID != "user-456" ||
		got.Props != want || got.IP != "192.168.1.1" || got.RequestID != "req-789" {
		t.Errorf("stored %+v\nwant ts %v props %s", got, ts, want)
	}
}

func TestIngestReportsEachInvalidEvent(t *testing.T) {
	t.Parallel()
	h := newHarness(t, opts{})
	body := `[{"event":"auth.user.login"},{"event":"Bad Name"},{"event":"a.b","source":"cron"},{"event":"a.b","props":[1]},7]`
	r := h.post(t, h.keyA, "/api/analytics/events", []byte(body), nil)
	if r.Status != 202 || r.accepted() != 1 {
		t.Fatalf("got %d %s, want 202 with 1 accepted", r.Status, r.Raw)
	}
	rej := r.Body["data"].(map[string]any)["rejected"].([]any)
	var idx []int
	for _, x := range rej {
		m := x.(map[string]any)
		idx = append(idx, int(m["index"].(float64)))
		if m["error"].(string) == "" {
			t.Errorf("rejection without a message: %v", m)
		}
	}
	if fmt.Sprint(idx) != "[1 2 3 4]" {
		t.Errorf("rejected indexes %v, want [1 2 3 4]", idx)
	}

	r = h.post(t, h.keyA, "/api/analytics/events", []byte(`[{"event":"X"},{"source":"app"}]`), nil)
	if r.Status != 400 {
		t.Fatalf("all invalid: got %d %s, want 400", r.Status, r.Raw)
	}
	e := r.Body["error"].(map[string]any)
	d := e["details"].(map[string]any)
	if e["code"] != "invalid_events" || d["accepted"].(float64) != 0 || len(d["rejected"].([]any)) != 2 {
		t.Errorf("400 body: %s", r.Raw)
	}
}

func TestIngestStatuses(t *testing.T) {
	t.Parallel()
	h := newHarness(t, opts{ingest: func(c *Config) { c.Limits.MaxEvents = 100; c.Limits.MaxBodyBytes = 64 << 10 }})
	ok := []byte(`{"event":"a.b"}`)
	bomb := gz(bytes.Repeat([]byte(" "), 10<<20))
	many, _ := events(101, nil)
	big := []byte(`{"event":"a.b","props":{"k":"` + strings.Repeat("x", 70<<10) + `"}}`)
	cases := []struct {
		name    string
		key     string
		body    []byte
		headers map[string]string
		status  int
		code    string
	}{
		{"no credential", "", ok, nil, 401, "unauthorized"},
		{"unknown key", "ak_000000000000_" + strings.Repeat("A", 43), ok, nil, 401, "unauthorized"},
		{"not a key", "eyJhbGciOiJub25lIn0.e30.", ok, nil, 401, "unauthorized"},
		{"read-only key", h.readKeyA, ok, nil, 403, "forbidden"},
		{"other tenant's slug", h.keyA, ok, map[string]string{"X-Tenant-Slug": "globex"}, 403, "forbidden"},
		{"own slug", h.keyA, ok, map[string]string{"X-Tenant-Slug": "acme"}, 202, ""},
		{"csv", h.keyA, ok, map[string]string{"Content-Type": "text/csv"}, 415, "unsupported_media_type"},
		{"brotli", h.keyA, ok, map[string]string{"Content-Encoding": "br"}, 415, "unsupported_media_type"},
		{"gzip bomb", h.keyA, bomb, map[string]string{"Content-Encoding": "gzip"}, 413, "payload_too_large"},
		{"too many events", h.keyA, many, nil, 413, "payload_too_large"},
		{"too large", h.keyA, big, nil, 413, "payload_too_large"},
		{"not gzip", h.keyA, ok, map[string]string{"Content-Encoding": "gzip"}, 400, "invalid_body"},
		{"malformed json", h.keyA, []byte(`[{"event":`), nil, 400, "invalid_body"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			r := h.post(t, tc.key, "/api/analytics/events", tc.body, tc.headers)
			if r.Status != tc.status {
				t.Fatalf("got %d %s, want %d", r.Status, r.Raw, tc.status)
			}
			if tc.code != "" {
				e, _ := r.Body["error"].(map[string]any)
				if e == nil || e["code"] != tc.code || e["message"] == "" {
					t.Errorf("error body %s, want code %s with a message", r.Raw, tc.code)
				}
			}
		})
	}
}

// A tenant_id in the body never writes into another tenant.
func TestIngestBodyTenantCannotCrossTenants(t *testing.T) {
	t.Parallel()
	h := newHarness(t, opts{})
	id := uuid.NewString()
	body := fmt.Sprintf(`[{"id":%q,"event":"a.b","tenant_id":%q},{"event":"a.b","tenant_id":%q}]`, id, h.b.ID, h.a.ID)
	r := h.post(t, h.keyA, "/api/analytics/events", []byte(body), nil)
	if r.Status != 202 || r.accepted() != 1 {
		t.Fatalf("got %d %s, want 202 accepting only the event naming its own tenant", r.Status, r.Raw)
	}
	if !strings.Contains(r.Raw, "tenant always comes from the API key") {
		t.Errorf("rejection does not explain: %s", r.Raw)
	}
	h.w.Close(context.Background())
	var n uint64
	if err := h.env.CH.QueryRow(context.Background(), "SELECT count() FROM "+h.env.DB+".events WHERE tenant_id = ?", h.b.ID).Scan(&n); err != nil {
		t.Fatal(err)
	}
	if n != 0 {
		t.Errorf("tenant B has %d events written with A's key", n)
	}
	if got := h.countIDs(t, h.a.ID, []string{id}); got != 0 {
		t.Errorf("the event naming tenant B was stored under A")
	}
}

func TestIngestTenThousandInOneRequest(t *testing.T) {
	t.Parallel()
	h := newHarness(t, opts{})
	body, ids := events(10_000, nil)
	r := h.post(t, h.keyA, "/api/analytics/events", body, nil)
	if r.Status != 202 || r.accepted() != 10_000 {
		t.Fatalf("got %d %.200s", r.Status, r.Raw)
	}
	h.waitStored(t, h.a.ID, ids, 10_000)
	var total uint64
	if err := h.env.CH.QueryRow(context.Background(), "SELECT count() FROM "+h.env.DB+".events").Scan(&total); err != nil {
		t.Fatal(err)
	}
	if total != 10_000 {
		t.Errorf("events table has %d rows, want exactly 10000", total)
	}
}

func TestIngestCountersFollowEventMap(t *testing.T) {
	t.Parallel()
	h := newHarness(t, opts{})
	body, _ := events(7, func(i int) map[string]any {
		return map[string]any{"event": []string{"apikey.request", "apikey.request", "apikey.request", "builder.generate.completed", "webhook.delivered", "webhook.failed", "auth.user.login"}[i]}
	})
	if r := h.post(t, h.keyA, "/api/analytics/events", body, nil); r.Status != 202 {
		t.Fatalf("got %d %s", r.Status, r.Raw)
	}
	if r := h.post(t, h.keyA, "/api/analytics/usage", []byte(`{"metric":"api_requests_daily","n":10}`), nil); r.Status != 202 {
		t.Fatalf("usage: got %d %s", r.Status, r.Raw)
	}
	want := map[string]int64{"api_requests_daily": 13, "builds_daily": 1, "webhooks_daily": 2, "emails_daily": 0}
	testenv.Eventually(t, 5*time.Second, func() error {
		got := map[string]int64{}
		for m := range want {
			n, _, err := h.counters.Get(context.Background(), h.a.ID, m, time.Now())
			if err != nil {
				t.Fatal(err)
			}
			got[m] = n
		}
		if fmt.Sprint(got) != fmt.Sprint(want) {
			return fmt.Errorf("live counters %v, want %v", got, want)
		}
		return nil
	})
	// Tenant B's counters are untouched.
	if n, ok, _ := h.counters.Get(context.Background(), h.b.ID, "api_requests_daily", time.Now()); ok || n != 0 {
		t.Errorf("tenant B counter = %d, want none", n)
	}
}

func TestUsageIncrementReachesDailyUsage(t *testing.T) {
	t.Parallel()
	h := newHarness(t, opts{})
	for _, n := range []string{`{"metric":"api_requests_daily","n":5}`, `{"metric":"api_requests_daily"}`} {
		if r := h.post(t, h.keyA, "/api/analytics/usage", []byte(n), nil); r.Status != 202 {
			t.Fatalf("%s: got %d %s", n, r.Status, r.Raw)
		}
	}
	// Usage only grows (a write key could erase what it is billed for), and increments never take
	// an event's name (they would be counted as events in /usage and the KPIs).
	for _, bad := range []string{`{"metric":"Bad Metric"}`, `{"metric":"x","n":1.5}`, `{"metric":"x","n":0}`, `nope`,
		`{"metric":"api_requests_daily","n":-2}`, `{"metric":"builds_daily","n":-1000000000}`,
		`{"metric":"auth.user.login","n":1000}`, `{"metric":"api.requests","n":1}`, `{"metric":"x","n":1000000001}`} {
		if r := h.post(t, h.keyA, "/api/analytics/usage", []byte(bad), nil); r.Status != 400 {
			t.Errorf("%s: got %d %s, want 400", bad, r.Status, r.Raw)
		}
	}
	// An unknown field is refused, not dropped: {"count":5} used to add 1, not 5.
	for body, want := range map[string]string{`{"metric":"api_requests_daily","count":5}`: `unknown field \"count\" (did you mean \"n\"?)`,
		`{"Metric":"api_requests_daily"}`: `unknown field \"Metric\" (did you mean \"metric\"?)`} {
		if r := h.post(t, h.keyA, "/api/analytics/usage", []byte(body), nil); r.Status != 400 || !strings.Contains(r.Raw, want) {
			t.Errorf("%s: got %d %s, want 400 saying %s", body, r.Status, r.Raw, want)
		}
	}
	h.w.Close(context.Background())
	var sum int64
	if err := h.env.CH.QueryRow(context.Background(), "SELECT sum(count) FROM "+h.env.DB+".daily_usage WHERE tenant_id = ? AND metric = 'api_requests_daily'", h.a.ID).Scan(&sum); err != nil {
		t.Fatal(err)
	}
	if sum != 6 {
		t.Errorf("daily_usage api_requests_daily = %d, want 6", sum)
	}
}

func TestIngestDisabledIsAcknowledgedNoOp(t *testing.T) {
	t.Parallel()
	h := newHarness(t, opts{ingest: func(c *Config) { c.Enabled = false }})
	body, ids := events(3, nil)
	r := h.post(t, h.keyA, "/api/analytics/events", body, nil)
	if r.Status != 202 || !strings.Contains(r.Raw, `"disabled":true`) || r.accepted() != 0 {
		t.Fatalf("got %d %s, want 202 saying analytics is disabled", r.Status, r.Raw)
	}
	h.w.Close(context.Background())
	if n := h.countIDs(t, h.a.ID, ids); n != 0 {
		t.Errorf("%d events stored while disabled", n)
	}
}

// With Redis unreachable ingest still acknowledges (saying duplicates were not checked), the rows
// wait in the spool — their ids cannot be proven new — and are stored exactly once when Redis answers,
// a retry sent during the outage included.
func TestIngestRedisDownStillAccepts(t *testing.T) {
	t.Parallel()
	h := newHarness(t, opts{proxyRD: true})
	h.rdProxy.SetDown(true)
	body, ids := events(20, func(int) map[string]any { return map[string]any{"event": "apikey.request"} })
	for try := 0; try < 2; try++ {
		r := h.post(t, h.keyA, "/api/analytics/events", body, nil)
		if r.Status != 202 || r.accepted() != 20 || r.Header.Get("X-Analytics-Degraded") == "" {
			t.Fatalf("with redis down: got %d %s (degraded %q), want 202 accepting 20, marked degraded", r.Status, r.Raw, r.Header.Get("X-Analytics-Degraded"))
		}
	}
	// A window in which nothing may ship, not a poll: the writer exposes no count of the claims it
	// could not make, so there is no state to wait for.
	time.Sleep(300 * time.Millisecond)
	if n := h.countIDs(t, h.a.ID, ids); n != 0 {
		t.Fatalf("%d rows shipped while their ids could not be verified", n)
	}
	h.rdProxy.SetDown(false)
	h.waitStored(t, h.a.ID, ids, 20)
	h.w.Close(context.Background())
	var total uint64
	if err := h.env.CH.QueryRow(context.Background(), "SELECT count() FROM "+h.env.DB+".events WHERE tenant_id = ?", h.a.ID).Scan(&total); err != nil {
		t.Fatal(err)
	}
	if total != 20 {
		t.Errorf("%d rows stored for 20 ids sent twice, want 20", total)
	}
}

// The headline promise: with ClickHouse unreachable, ingest keeps acknowledging, and every
// acknowledged event lands once ClickHouse is back.
func TestIngestSurvivesClickHouseOutage(t *testing.T) {
	t.Parallel()
	h := newHarness(t, opts{proxyCH: true})
	h.chProxy.SetDown(true)
	var acked []string
	for i := 0; i < 20; i++ {
		body, ids := events(50, nil)
		r := h.post(t, h.keyA, "/api/analytics/events", body, nil)
		if r.Status != 202 {
			t.Fatalf("request %d during outage: got %d %s, want 202", i, r.Status, r.Raw)
		}
		acked = append(acked, ids...)
		time.Sleep(20 * time.Millisecond) // the scenario: requests spread over several flushes
	}
	// Several inserts fail and back off.
	testenv.Eventually(t, 10*time.Second, func() error {
		if n := counterValue(h.metrics.InsertErrors); n < 2 {
			return fmt.Errorf("%v failed inserts, want several", n)
		}
		return nil
	})
	if st := h.w.Stats(); st.PendingSegments == 0 || st.LastError == "" {
		t.Fatalf("writer stats during outage %+v: want pending segments and an error", st)
	}
	if n := h.countIDs(t, h.a.ID, acked); n != 0 {
		t.Fatalf("%d events stored while ClickHouse was cut off", n)
	}
	h.chProxy.SetDown(false)
	h.waitStored(t, h.a.ID, acked, len(acked))
}

// A full spool refuses with 503 + Retry-After instead of acknowledging what it cannot keep.
func TestIngestFullSpoolRefuses(t *testing.T) {
	t.Parallel()
	h := newHarness(t, opts{proxyCH: true, writer: func(c *WriterConfig) { c.MaxSpoolBytes = 64 << 10 }})
	h.chProxy.SetDown(true)
	var acked []string
	refused := 0
	for i := 0; i < 40 && refused == 0; i++ {
		body, ids := events(50, nil)
		r := h.post(t, h.keyA, "/api/analytics/events", body, nil)
		switch r.Status {
		case 202:
			acked = append(acked, ids...)
		case 503:
			refused++
			if r.Header.Get("Retry-After") == "" {
				t.Errorf("503 without Retry-After: %s", r.Raw)
			}
		default:
			t.Fatalf("got %d %s", r.Status, r.Raw)
		}
	}
	if refused == 0 || len(acked) == 0 {
		t.Fatalf("acked %d, refused %d: want some of each with a 64 KiB spool", len(acked), refused)
	}
	h.chProxy.SetDown(false)
	h.waitStored(t, h.a.ID, acked, len(acked))
}

// A request larger on disk than the whole spool could never be stored, however long its client
// waits: 413 naming the setting, not a 503 it retries forever (as before this change; the test fails
// on that code). Smaller requests go on being taken.
func TestRequestLargerThanTheSpoolIs413(t *testing.T) {
	t.Parallel()
	h := newHarness(t, opts{writer: func(c *WriterConfig) { c.MaxSpoolBytes = 16 << 10 }})
	big, _ := events(400, nil)
	if r := h.post(t, h.keyA, "/api/analytics/events", big, nil); r.Status != 413 || !strings.Contains(string(r.Raw), "INGEST_MAX_SPOOL_MB") {
		t.Errorf("a request over the whole spool: %d %s, want 413 naming INGEST_MAX_SPOOL_MB", r.Status, r.Raw)
	}
	small, ids := events(5, nil)
	if r := h.post(t, h.keyA, "/api/analytics/events", small, nil); r.Status != 202 {
		t.Fatalf("a small request after it: %d %s", r.Status, r.Raw)
	}
	h.waitStored(t, h.a.ID, ids, len(ids))
}

// Memory mode has no spool: its full buffer is also a 503, never a silent drop.
func TestIngestMemoryModeFullBufferRefuses(t *testing.T) {
	t.Parallel()
	h := newHarness(t, opts{proxyCH: true, writer: func(c *WriterConfig) { c.Durability = DurabilityMemory; c.MaxBufferedRows = 100 }})
	h.chProxy.SetDown(true)
	body, _ := events(80, nil)
	if r := h.post(t, h.keyA, "/api/analytics/events", body, nil); r.Status != 202 {
		t.Fatalf("first request: got %d %s", r.Status, r.Raw)
	}
	r := h.post(t, h.keyA, "/api/analytics/events", body, nil)
	if r.Status != 503 || r.Header.Get("Retry-After") == "" {
		t.Fatalf("second request over the buffer: got %d %s, want 503 with Retry-After", r.Status, r.Raw)
	}
	h.chProxy.SetDown(false) // let the cleanup's graceful close flush
}

// Segments left by a crash are replayed at start-up, and rows ClickHouse already has (the insert
// succeeded but the segment was not yet deleted) are not inserted twice. The segments here are in the
// first release's format, as an upgrade finds them.
func TestSpoolReplayAfterCrashIsExactlyOnce(t *testing.T) {
	t.Parallel()
	env := testenv.Migrated(t)
	dir := t.TempDir()
	tenantID := uuid.New()
	now := time.Now().UTC().Truncate(time.Second)
	mk := func(n int) []Row {
		rows := make([]Row, n)
		for i := range rows {
			rows[i] = Row{ID: uuid.New(), TenantID: tenantID, Ts: now, ReceivedAt: now, Event: "a.b", Source: "app", Props: "{}"}
		}
		return rows
	}
	inserted, notYet, fresh := mk(30), mk(20), mk(10)
	// The crashed process had inserted the first 30 rows of an in-flight segment.
	insertRows(t, env.CH, env.DB, inserted)
	write := func(name string, rows []Row) {
		if err := os.WriteFile(filepath.Join(dir, name), legacyRecord(rows), 0o640); err != nil {
			t.Fatal(err)
		}
	}
	write("0000000000000007.inflight", append(append([]Row{}, inserted...), notYet...))
	write("0000000000000008.seg", fresh)
	// And a torn tail: half a record that was never acknowledged.
	f, _ := os.OpenFile(filepath.Join(dir, "0000000000000008.seg"), os.O_APPEND|os.O_WRONLY, 0)
	f.Write(legacyRecord(mk(5))[:40])
	f.Close()

	w, err := NewWriter(WriterConfig{Dir: dir, FlushInterval: 50 * time.Millisecond}, env.CH, env.DB, dedup.NewStore(env.Redis, env.Prefix, time.Hour, nil), nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	w.Start()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if err := w.Close(ctx); err != nil {
		t.Fatal(err)
	}
	var total, distinct uint64
	if err := env.CH.QueryRow(ctx, "SELECT count(), uniqExact(id) FROM "+env.DB+".events WHERE tenant_id = ?", tenantID).Scan(&total, &distinct); err != nil {
		t.Fatal(err)
	}
	if total != 60 || distinct != 60 {
		t.Errorf("after replay: %d rows, %d distinct; want 60 and 60", total, distinct)
	}
	left, _ := filepath.Glob(filepath.Join(dir, "*.*"))
	if len(left) != 0 {
		t.Errorf("spool not emptied after replay: %v", left)
	}
}

// legacyRecord frames rows as the first release wrote them (no batch id).
func legacyRecord(rows []Row) []byte {
	rec := appendRecord(nil, 0, rows, nil)[spool.FrameOverhead+8:]
	b, start := spool.FrameStart(nil)
	return spool.FrameEnd(append(b, rec...), start)
}

// insertRows writes rows straight into ClickHouse, as an earlier process's insert did.
func insertRows(t *testing.T, ch driver.Conn, db string, rows []Row) {
	t.Helper()
	b, err := ch.PrepareBatch(context.Background(), "INSERT INTO "+db+".events (tenant_id, ts, id, received_at, event, source, user_id, props, ip, request_id)")
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range rows {
		if err := b.Append(r.TenantID, r.Ts, r.ID, r.ReceivedAt, r.Event, r.Source, r.UserID, r.Props, r.IP, r.RequestID); err != nil {
			t.Fatal(err)
		}
	}
	if err := b.Send(); err != nil {
		t.Fatal(err)
	}
}

// Graceful shutdown flushes everything still buffered.
func TestWriterCloseFlushes(t *testing.T) {
	t.Parallel()
	h := newHarness(t, opts{writer: func(c *WriterConfig) { c.FlushInterval = time.Hour; c.BatchRows = 1_000_000 }})
	var wg sync.WaitGroup
	var ids []string
	for i := 0; i < 4; i++ {
		body, batch := events(500, nil)
		ids = append(ids, batch...)
		wg.Add(1)
		go func() {
			defer wg.Done()
			if r := h.post(t, h.keyA, "/api/analytics/events", body, nil); r.Status != 202 {
				t.Errorf("got %d", r.Status)
			}
		}()
	}
	wg.Wait()
	if n := h.countIDs(t, h.a.ID, ids); n != 0 {
		t.Fatalf("%d stored before close with a 1h flush interval", n)
	}
	if err := h.w.Close(context.Background()); err != nil {
		t.Fatal(err)
	}
	if n := h.countIDs(t, h.a.ID, ids); n != 2000 {
		t.Errorf("after close: %d stored, want 2000 (4 requests × 500 ids)", n)
	}
	body, _ := events(1, nil)
	r := h.post(t, h.keyA, "/api/analytics/events", body, nil)
	if r.Status != 503 {
		t.Errorf("after close: got %d, want 503", r.Status)
	}
}

// Rows no claim counts — sent without ids, or with deduplication off — reached the live counters up to
// CounterEvery after their 202, so a consume sent right after the answer read an old counter: 190
// builds accepted, then consume?n=10 passed a limit of 200 at 16. They are now counted before the
// answer. (CounterEvery is an hour here: only the request path can have counted them.)
func TestRowsWithoutClaimsAreCountedBeforeTheAnswer(t *testing.T) {
	t.Parallel()
	for _, noDedup := range []bool{false, true} {
		h := newHarness(t, opts{noDedup: noDedup, ingest: func(c *Config) { c.CounterEvery = time.Hour }})
		body := []byte(strings.Repeat(`{"event":"builder.generate.completed","source":"app","user_id":"u"}`+"\n", 3)) // no ids
		if r := h.post(t, h.keyA, "/api/analytics/events", body, map[string]string{"Content-Type": "application/x-ndjson"}); r.Status != 202 {
			t.Fatalf("events: %d %s", r.Status, r.Raw)
		}
		if r := h.post(t, h.keyA, "/api/analytics/usage", []byte(`{"metric":"builds_daily","n":190}`), nil); r.Status != 202 {
			t.Fatalf("usage: %d %s", r.Status, r.Raw)
		}
		if n, _, err := h.counters.Get(context.Background(), h.a.ID, "builds_daily", time.Now()); err != nil || n != 193 {
			t.Errorf("deduplication off %v: builds_daily %d (%v) right after the answers, want 193", noDedup, n, err)
		}
	}
}

// /metrics caps the distinct event names it labels (METRICS_LABEL_CAP, 500), and the cap was shared
// by every tenant: one tenant sending 500 made-up names turned every other tenant's events into
// event="other" on the operator's /metrics. The cap is now per tenant.
func TestOneTenantsEventNamesDoNotHideAnothers(t *testing.T) {
	t.Parallel()
	h := newHarness(t, opts{})
	var flood strings.Builder
	for i := range labels.DefaultCap {
		fmt.Fprintf(&flood, `{"event":"flood.e%d","source":"app","user_id":"u"}`+"\n", i)
	}
	nd := map[string]string{"Content-Type": "application/x-ndjson"}
	if r := h.post(t, h.keyA, "/api/analytics/events", []byte(flood.String()), nd); r.Status != 202 {
		t.Fatalf("flood: %d %s", r.Status, r.Raw)
	}
	paid := strings.Repeat(`{"event":"billing.invoice.paid","source":"app","user_id":"u"}`+"\n", 2)
	if r := h.post(t, h.keyB, "/api/analytics/events", []byte(paid), nd); r.Status != 202 {
		t.Fatalf("tenant B: %d %s", r.Status, r.Raw)
	}
	if got := counterValue(h.metrics.Events.WithLabelValues(h.b.Slug, "billing.invoice.paid", "app")); got != 2 {
		t.Errorf("tenant B's billing.invoice.paid on /metrics: %v, want 2 (not hidden under other by tenant A's names)", got)
	}
	if got := counterValue(h.metrics.Events.WithLabelValues(h.a.Slug, "other", "app")); got != 0 {
		t.Errorf("tenant A's own names under other: %v, want 0 (its 500 fit its cap)", got)
	}
}
