package dashboards_test

import (
	"bytes"
	"context"
	"encoding/csv"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/chromedp/cdproto/browser"
	"github.com/chromedp/cdproto/page"
	"github.com/chromedp/chromedp"
	"github.com/gofiber/fiber/v2"
	"github.com/google/uuid"

	"github.com/analyticsd/analyticsd/api"
	"github.com/analyticsd/analyticsd/audit"
	"github.com/analyticsd/analyticsd/auth"
	"github.com/analyticsd/analyticsd/dashboards"
	"github.com/analyticsd/analyticsd/ingest"
	"github.com/analyticsd/analyticsd/internal/testenv"
	"github.com/analyticsd/analyticsd/internal/testenv/fixture"
	"github.com/analyticsd/analyticsd/query"
	"github.com/analyticsd/analyticsd/quota"
	"github.com/analyticsd/analyticsd/tenant"
)

// chromiumBin is Debian's chromium (deploy/local/chromium.sh installs it; make test runs that first).
const chromiumBin = "/usr/bin/chromium"

// screenshotDir is git-ignored; the screenshots are for people to look at, not compared.
var screenshotDir = filepath.Join("..", "test-output", "dashboard")

// seeded is what the test put into ClickHouse for the signed-in tenant.
type seeded struct {
	inRange  []string       // ids of events in the default 30-day range
	byEvent  map[string]int // in-range counts per event
	bySource map[string]int
	pairs    map[[2]string]int // (event, source) → in-range count
	older    map[string]int    // counts per event 31–89 days ago (in the 90-day range only)
}

// dashServer is a real analyticsd read API plus the dashboard on a loopback port.
type dashServer struct {
	base  string
	keys  map[string]string // name → plaintext key
	acme  seeded
	today time.Time
}

func chromium(t *testing.T) string {
	t.Helper()
	if _, err := os.Stat(chromiumBin); err != nil {
		if testenv.Required() {
			t.Fatalf("%s is missing: run deploy/local/chromium.sh (make test does) (ANALYTICS_REQUIRE_SERVICES=1)", chromiumBin)
		}
		t.Skipf("%s is missing; run deploy/local/chromium.sh to run the browser test", chromiumBin)
	}
	return chromiumBin
}

func startDashServer(t *testing.T) *dashServer {
	t.Helper()
	env := testenv.Migrated(t)
	ctx := context.Background()
	tenants := tenant.NewStore(env.PG)
	keys := auth.NewKeys(env.PG)
	s := &dashServer{keys: map[string]string{}}
	made := map[string]tenant.Tenant{}
	for _, slug := range []string{"acme", "globex", "initech"} {
		made[slug] = fixture.Tenant(t, env.PG, slug)
	}
	for name, spec := range map[string]struct {
		slug  string
		scope auth.Scope
	}{
		"acme-read":    {"acme", auth.ScopeAnalyticsRead},
		"acme-write":   {"acme", auth.ScopeEventsWrite},
		"initech-read": {"initech", auth.ScopeAnalyticsRead},
	} {
		s.keys[name], _ = fixture.Key(t, env.PG, made[spec.slug].ID, name, spec.scope)
	}

	now := time.Now().UTC().Truncate(time.Second)
	s.today = now.Truncate(24 * time.Hour)
	s.acme = seed(t, env, made["acme"].ID, made["globex"].ID, now)

	store := query.NewStore(env.CH, env.DB, env.PG, 10*time.Second)
	svc := query.NewService(query.Config{MaxExportRows: 50_000}, store, audit.New(env.PG), nil, nil)
	svc.SetZones(tenants)
	// initech reads in Kathmandu's time (+05:45); acme stays in UTC.
	if _, _, err := tenants.SetTimeZone(ctx, "initech", "Asia/Kathmandu"); err != nil {
		t.Fatal(err)
	}
	quotas := quota.NewService(quota.Config{Enabled: true, EventMetrics: ingest.DefaultEventMetrics()},
		quota.NewCounters(env.Redis, env.Prefix), quota.NewLimits(nil, tenants, 0), env.CH, env.DB, env.PG, audit.New(env.PG), nil, nil)
	quotas.SetRecorder(discardRecorder{})
	// Today's usage: api_requests_daily at 85% (amber), builds_daily at its limit (red), emails low.
	for metric, n := range map[string]int64{"api_requests_daily": 85_000, "builds_daily": 200, "emails_daily": 1_200} {
		if res, err := quotas.Consume(ctx, made["acme"].ID, metric, n); err != nil || !res.Allowed {
			t.Fatalf("consume %d of %s: %+v, %v", n, metric, res, err)
		}
	}
	authn := auth.NewAuthenticator(keys, tenants, auth.JWTConfig{})
	app := api.NewApp(api.Config{}, nil)
	analytics := app.Group("/api/analytics")
	// Fault injection: initech's quota reads fail, to show the panel's error state.
	initech := "Bearer " + s.keys["initech-read"]
	analytics.Use("/quotas", func(c *fiber.Ctx) error {
		if c.Get(fiber.HeaderAuthorization) == initech {
			return &api.Error{Status: http.StatusServiceUnavailable, Code: "quota_unavailable", Message: "quota counters are unavailable; retry shortly"}
		}
		return c.Next()
	})
	svc.Register(analytics, authn.Require(auth.ScopeAnalyticsRead))
	quotas.Register(analytics, authn.Require(auth.ScopeAnalyticsRead), authn.Require(auth.ScopeEventsWrite))
	dashboards.Register(app)

	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- app.Listener(ln) }()
	t.Cleanup(func() {
		if err := app.ShutdownWithTimeout(5 * time.Second); err != nil {
			t.Errorf("shut down the test server: %v", err)
		}
		<-done
	})
	s.base = "http://" + ln.Addr().String()
	return s
}

// discardRecorder stands in for ingest, which stores consumed usage durably; the dashboard test
// only needs the live counters.
type discardRecorder struct{}

func (discardRecorder) RecordIncrement(context.Context, uuid.UUID, string, int64, time.Time, string, bool) error {
	return nil
}
func (discardRecorder) EmitOnce(context.Context, uuid.UUID, string, string, string, map[string]any) error {
	return nil
}

// seed inserts acme's events (65 in the last 30 days, 6 older) and some of globex's, which acme
// must never see.
func seed(t *testing.T, env testenv.Env, acme, globex uuid.UUID, now time.Time) seeded {
	t.Helper()
	b, err := env.CH.PrepareBatch(context.Background(), "INSERT INTO "+env.DB+".events (tenant_id, ts, id, received_at, event, source, user_id, props, ip, request_id)")
	if err != nil {
		t.Fatal(err)
	}
	s := seeded{byEvent: map[string]int{}, bySource: map[string]int{}, pairs: map[[2]string]int{}, older: map[string]int{}}
	mix := []struct {
		event, source string
		n             int
	}{
		{"auth.user.registered", "app", 7},
		{"auth.user.login", "app", 23},
		{"builder.generate.completed", "builder", 11},
		{"apikey.request", "api", 13},
		{"webhook.delivered", "webhook", 6},
		{"email.sent", "job", 5},
	}
	i := 0
	add := func(tn uuid.UUID, ts time.Time, event, source string) uuid.UUID {
		id := uuid.New()
		props := fmt.Sprintf(`{"plan":"pro","n":%d}`, i)
		if err := b.Append(tn, ts, id, ts, event, source, fmt.Sprintf("user-%d", i%9), props, "203.0.113.7", fmt.Sprintf("req-%d", i)); err != nil {
			t.Fatal(err)
		}
		i++
		return id
	}
	shared := now.Add(-3 * time.Hour) // several events in one second: pagination must not lose any
	for _, m := range mix {
		for k := 0; k < m.n; k++ {
			ts := now.Add(-time.Duration(i)*7*time.Hour - time.Minute)
			if m.event == "webhook.delivered" && k < 5 {
				ts = shared
			}
			s.inRange = append(s.inRange, add(acme, ts, m.event, m.source).String())
			s.byEvent[m.event]++
			s.bySource[m.source]++
			s.pairs[[2]string{m.event, m.source}]++
		}
	}
	for k := 0; k < 6; k++ {
		ev := []string{"auth.user.login", "apikey.request"}[k%2]
		add(acme, now.Add(-time.Duration(40+k)*24*time.Hour), ev, map[string]string{"auth.user.login": "app", "apikey.request": "api"}[ev])
		s.older[ev]++
	}
	for k := 0; k < 10; k++ {
		add(globex, now.Add(-time.Duration(k)*time.Hour), "auth.user.login", "app")
	}
	if err := b.Send(); err != nil {
		t.Fatal(err)
	}
	return s
}

// apiGet calls the read API the way the page does and decodes data.
func (s *dashServer) apiGet(t *testing.T, key, path string, out any) {
	t.Helper()
	req, _ := http.NewRequest(http.MethodGet, s.base+path, nil)
	req.Header.Set("Authorization", "Bearer "+key)
	res, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer res.Body.Close()
	body, _ := io.ReadAll(res.Body)
	if res.StatusCode != http.StatusOK {
		t.Fatalf("GET %s: %d %s", path, res.StatusCode, body)
	}
	var env struct {
		Data json.RawMessage `json:"data"`
	}
	if err := json.Unmarshal(body, &env); err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(env.Data, out); err != nil {
		t.Fatal(err)
	}
}

// usageTotals sums GET /usage per metric over [from, to].
func (s *dashServer) usageTotals(t *testing.T, key string, from, to time.Time, metrics []string) map[string]int64 {
	t.Helper()
	q := url.Values{"from": {from.Format("2006-01-02")}, "to": {to.Format("2006-01-02")}, "metric[]": metrics}
	var series map[string][]struct {
		Count int64 `json:"count"`
	}
	s.apiGet(t, key, "/api/analytics/usage?"+q.Encode(), &series)
	out := map[string]int64{}
	for _, m := range metrics {
		for _, p := range series[m] {
			out[m] += p.Count
		}
	}
	return out
}

// activeUsers asks the API how many distinct users logged in over [from, to].
func (s *dashServer) activeUsers(t *testing.T, key string, from, to time.Time) uint64 {
	t.Helper()
	q := url.Values{"from": {from.Format("2006-01-02")}, "to": {to.Format("2006-01-02")}}
	var au struct {
		Users uint64 `json:"users"`
	}
	s.apiGet(t, key, "/api/analytics/active-users?"+q.Encode(), &au)
	return au.Users
}

// browserCtx starts headless Chromium with a fresh profile; downloads go to dir.
func browserCtx(t *testing.T, bin, dir string) context.Context {
	t.Helper()
	opts := append(chromedp.DefaultExecAllocatorOptions[:],
		chromedp.ExecPath(bin),
		chromedp.Headless,
		chromedp.NoSandbox,
		chromedp.DisableGPU,
		chromedp.NoFirstRun,
		// The machine's network is closed: nothing may try to reach out, or waits for it.
		chromedp.Flag("disable-quic", true),
		chromedp.Flag("disable-background-networking", true),
		chromedp.Flag("disable-component-update", true),
		chromedp.Flag("disable-sync", true),
		chromedp.Flag("disable-domain-reliability", true),
		chromedp.Flag("no-pings", true),
		chromedp.Flag("lang", "en-US"),
		chromedp.UserDataDir(t.TempDir()),
		chromedp.WindowSize(1280, 800),
	)
	allocCtx, cancelAlloc := chromedp.NewExecAllocator(context.Background(), opts...)
	ctx, cancel := chromedp.NewContext(allocCtx)
	t.Cleanup(func() { cancel(); cancelAlloc() })
	if err := chromedp.Do(ctx); err != nil { // starts the browser, bound to ctx (no deadline)
		t.Fatalf("start chromium: %v", err)
	}
	// Record Content-Security-Policy violations in every document the tab loads.
	if _, err := chromedp.Call(ctx, page.AddScriptToEvaluateOnNewDocument, page.AddScriptToEvaluateOnNewDocumentParams{
		Source: `window.__csp = []; document.addEventListener('securitypolicyviolation', function (e) {
			window.__csp.push(e.violatedDirective + ' ' + e.blockedURI + ' ' + e.sourceFile + ':' + e.lineNumber); });`,
	}); err != nil {
		t.Fatal(err)
	}
	yes := true
	if _, err := chromedp.Call(ctx, browser.SetDownloadBehavior, browser.SetDownloadBehaviorParams{
		Behavior: browser.SetDownloadBehaviorBehaviorAllowAndName, DownloadPath: dir, EventsEnabled: &yes,
	}); err != nil {
		t.Fatal(err)
	}
	if err := chromedp.Do(ctx, chromedp.EmulateViewport(1280, 800)); err != nil {
		t.Fatal(err)
	}
	return ctx
}

// step runs actions with a deadline, so a broken page fails the test instead of hanging it.
func step(t *testing.T, ctx context.Context, what string, actions ...chromedp.Action[chromedp.Void]) {
	t.Helper()
	c, cancel := context.WithTimeout(ctx, 20*time.Second)
	defer cancel()
	if err := chromedp.Do(c, actions...); err != nil {
		t.Fatalf("%s: %v", what, err)
	}
}

func eval[T any](t *testing.T, ctx context.Context, expr string) T {
	t.Helper()
	c, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	v, err := chromedp.Run(c, chromedp.Evaluate[T](expr))
	if err != nil {
		t.Fatalf("evaluate %s: %v", expr, err)
	}
	return v
}

// waitFor polls a JavaScript condition until it is true.
func waitFor(t *testing.T, ctx context.Context, what, cond string) {
	t.Helper()
	c, cancel := context.WithTimeout(ctx, 20*time.Second)
	defer cancel()
	if _, err := chromedp.Run(c, chromedp.Poll[bool](cond, chromedp.WithPollingInterval(25*time.Millisecond))); err != nil {
		t.Fatalf("waiting for %s (%s): %v", what, cond, err)
	}
}

func screenshot(t *testing.T, ctx context.Context, name string, full bool) {
	t.Helper()
	if err := os.MkdirAll(screenshotDir, 0o755); err != nil {
		t.Fatal(err)
	}
	act := chromedp.CaptureScreenshot()
	if full {
		act = chromedp.FullScreenshot(100)
	}
	c, cancel := context.WithTimeout(ctx, 20*time.Second)
	defer cancel()
	png, err := chromedp.Run(c, act)
	if err != nil {
		t.Fatalf("screenshot %s: %v", name, err)
	}
	if err := os.WriteFile(filepath.Join(screenshotDir, name), png, 0o644); err != nil {
		t.Fatal(err)
	}
}

// widgetsSettled is true when no widget is loading any more.
const widgetsSettled = `['#kpis', '#chart-card', '#quotas', '#events-card'].every(function (s) {
	var st = document.querySelector(s).getAttribute('data-state'); return st && st !== 'loading'; })`

func signIn(t *testing.T, ctx context.Context, token, tenantSlug string) {
	t.Helper()
	step(t, ctx, "open the sign-in form", chromedp.WaitVisible(chromedp.ID("signin-form")))
	eval[chromedp.Void](t, ctx, `document.getElementById('signin-token').value = ''; document.getElementById('signin-tenant').value = ''`)
	step(t, ctx, "fill the sign-in form",
		chromedp.SendKeys(chromedp.ID("signin-token"), token),
		chromedp.SendKeys(chromedp.ID("signin-tenant"), tenantSlug),
		chromedp.Click(chromedp.ID("signin-submit")),
	)
}

func signInFails(t *testing.T, ctx context.Context, token, tenantSlug, want string) {
	t.Helper()
	signIn(t, ctx, token, tenantSlug)
	c, cancel := context.WithTimeout(ctx, 15*time.Second)
	defer cancel()
	_, err := chromedp.Run(c, chromedp.Poll[bool](fmt.Sprintf(`(function () { var e = document.getElementById('signin-error');
		return !e.hidden && !document.getElementById('signin-submit').disabled && e.textContent.indexOf(%q) >= 0; })()`, want),
		chromedp.WithPollingInterval(25*time.Millisecond)))
	if err != nil {
		got := eval[string](t, ctx, `document.getElementById('signin-error').textContent`)
		t.Fatalf("sign-in with a bad credential: got message %q, want it to contain %q (%v)", got, want, err)
	}
	if eval[bool](t, ctx, `!document.getElementById('app').hidden`) {
		t.Error("the dashboard is visible after a failed sign-in")
	}
}

// selectOption picks a value in a <select> as a user would, firing its change event.
func selectOption(t *testing.T, ctx context.Context, id, value string) {
	t.Helper()
	eval[chromedp.Void](t, ctx, fmt.Sprintf(`(function () { var s = document.getElementById(%q); s.value = %q;
		s.dispatchEvent(new Event('change', {bubbles: true})); })()`, id, value))
}

type row struct {
	ID     string `json:"id"`
	Ts     string `json:"ts"`
	Event  string `json:"event"`
	Source string `json:"source"`
}

const readRows = `Array.prototype.map.call(document.querySelectorAll('#events-body tr'), function (tr) {
	return {id: tr.getAttribute('data-id'), ts: tr.querySelector('td.ts').title,
		event: tr.querySelector('td.ev').textContent, source: tr.querySelector('td.source').textContent}; })`

// waitEvents waits until the table shows page n for a query containing want.
func waitEvents(t *testing.T, ctx context.Context, n int, want string) []row {
	t.Helper()
	waitFor(t, ctx, fmt.Sprintf("events page %d", n), fmt.Sprintf(`(function () { var c = document.getElementById('events-card');
		var st = c.getAttribute('data-state'); return (st === 'ready' || st === 'empty') && c.getAttribute('data-page') === '%d' &&
		(c.getAttribute('data-query') || '').indexOf(%q) >= 0; })()`, n, want))
	return eval[[]row](t, ctx, readRows)
}

func TestBrowserDashboard(t *testing.T) {
	bin := chromium(t)
	start := time.Now()
	s := startDashServer(t)
	downloads := t.TempDir()
	ctx := browserCtx(t, bin, downloads)
	var mu sync.Mutex
	var exceptions []string
	go func() {
		for m, err := range chromedp.Console(ctx) {
			if err != nil {
				return
			}
			if m.IsException() {
				mu.Lock()
				exceptions = append(exceptions, fmt.Sprintf("%s (%s:%d)", m.Text, m.URL, m.Line+1))
				mu.Unlock()
			}
		}
	}()
	t.Logf("server seeded and browser started in %s", time.Since(start).Round(time.Millisecond))

	step(t, ctx, "open the dashboard", chromedp.Navigate(s.base+"/dashboard"), chromedp.WaitVisible(chromedp.ID("signin-form")))

	// Wrong credentials: the envelope's message is shown, the dashboard stays closed.
	signInFails(t, ctx, "ak_0123456789ab_"+strings.Repeat("A", 43), "acme", "invalid API key")
	signInFails(t, ctx, s.keys["acme-write"], "acme", "API key lacks the analytics:read scope")
	signInFails(t, ctx, s.keys["acme-read"], "globex", "X-Tenant-Slug does not match")
	signInFails(t, ctx, "not-a-key", "acme", "not an analyticsd API key")
	screenshot(t, ctx, "signin-error-1280x800.png", false)

	// Sign in for real; every widget settles.
	signIn(t, ctx, s.keys["acme-read"], "acme")
	waitFor(t, ctx, "the dashboard", `!document.getElementById('app').hidden`)
	waitFor(t, ctx, "every widget", widgetsSettled)
	if stored := eval[string](t, ctx, `sessionStorage.getItem('analyticsd.dashboard.session') || ''`); !strings.Contains(stored, "acme") {
		t.Errorf("session not kept in sessionStorage: %q", stored)
	}
	if got := eval[string](t, ctx, `document.getElementById('tenant-name').textContent`); got != "acme" {
		t.Errorf("tenant badge: got %q, want acme", got)
	}

	// KPI cards equal the API's sums over the same 30 days, which equal what was seeded.
	from30 := s.today.AddDate(0, 0, -29)
	kpis := []string{"auth.user.registered", "auth.user.login", "builder.generate.completed", "apikey.request"}
	apiTotals := s.usageTotals(t, s.keys["acme-read"], from30, s.today, kpis)
	shown := eval[map[string]string](t, ctx, `(function () { var o = {}; document.querySelectorAll('.kpi').forEach(function (c) {
		o[c.getAttribute('data-metric')] = c.querySelector('.kpi-value').getAttribute('data-value'); }); return o; })()`)
	for _, m := range kpis {
		if m == "auth.user.login" {
			if users := s.activeUsers(t, s.keys["acme-read"], from30, s.today); shown[m] != fmt.Sprint(users) || users == 0 {
				t.Errorf("Active users: page shows %q, API counts %d distinct users", shown[m], users)
			}
			continue
		}
		if shown[m] != fmt.Sprint(apiTotals[m]) || apiTotals[m] != int64(s.acme.byEvent[m]) {
			t.Errorf("KPI %s: page shows %q, API sums %d, seeded %d", m, shown[m], apiTotals[m], s.acme.byEvent[m])
		}
	}

	// The chart drew the selected metrics' points: the totals match and the series colour is on the canvas.
	var kpiSum int64
	for _, m := range kpis {
		kpiSum += apiTotals[m]
	}
	chart := eval[map[string]string](t, ctx, `(function () { var c = document.getElementById('chart');
		return {points: c.getAttribute('data-points'), total: c.getAttribute('data-total'),
			canvas: String(c.querySelectorAll('canvas').length)}; })()`)
	if chart["total"] != fmt.Sprint(kpiSum) || chart["points"] != fmt.Sprint(30*len(kpis)) || chart["canvas"] == "0" {
		t.Errorf("chart: got %v, want total %d, %d points, a canvas", chart, kpiSum, 30*len(kpis))
	}
	painted := eval[int](t, ctx, `(function () { var cv = document.querySelector('#chart canvas');
		var d = cv.getContext('2d').getImageData(0, 0, cv.width, cv.height).data, n = 0;
		for (var i = 0; i < d.length; i += 4) { if (Math.abs(d[i] - 0x4f) < 24 && Math.abs(d[i+1] - 0x46) < 24 && Math.abs(d[i+2] - 0xe5) < 24 && d[i+3] > 200) n++; }
		return n; })()`)
	if painted < 100 {
		t.Errorf("chart: only %d pixels in the first series' colour; the line was not drawn", painted)
	}
	// The metric dropdown lists the range's event names; adding one re-draws with its counts.
	options := eval[[]string](t, ctx, `Array.prototype.map.call(document.querySelectorAll('#metric-options input'), function (i) { return i.value; })`)
	for ev := range s.acme.byEvent {
		if !slices.Contains(options, ev) {
			t.Errorf("metric dropdown lacks %s: %v", ev, options)
		}
	}
	step(t, ctx, "add webhook.delivered to the chart",
		chromedp.Click(chromedp.CSS("#metric-picker summary")),
		chromedp.Click(chromedp.CSS(`#metric-options input[value="webhook.delivered"]`), chromedp.NodeVisible),
	)
	waitFor(t, ctx, "the chart with five metrics", fmt.Sprintf(`document.getElementById('chart').getAttribute('data-points') === '%d' &&
		document.getElementById('chart-card').getAttribute('data-state') === 'ready'`, 30*5))
	if got, want := eval[string](t, ctx, `document.getElementById('chart').getAttribute('data-total')`), fmt.Sprint(kpiSum+int64(s.acme.byEvent["webhook.delivered"])); got != want {
		t.Errorf("chart total with webhook.delivered: got %s, want %s", got, want)
	}
	step(t, ctx, "close the metric picker", chromedp.Click(chromedp.CSS(".page-head h1")))

	// Quotas: each row shows the API's numbers; green under 80%, amber from 80%, red at the limit.
	var states map[string]struct {
		Exceeded       bool
		Current, Limit float64
	}
	s.apiGet(t, s.keys["acme-read"], "/api/analytics/quotas", &states)
	rows := eval[map[string]string](t, ctx, `(function () { var o = {}; document.querySelectorAll('.quota-row').forEach(function (r) {
		o[r.getAttribute('data-metric')] = r.getAttribute('data-level') + ' ' + getComputedStyle(r.querySelector('.quota-fill')).backgroundColor +
			' ' + r.querySelector('.quota-bar').getAttribute('aria-valuenow') + '/' + r.querySelector('.quota-bar').getAttribute('aria-valuemax'); }); return o; })()`)
	colour := map[string]string{"ok": "rgb(22, 163, 74)", "warn": "rgb(217, 119, 6)", "over": "rgb(220, 38, 38)"}
	if len(rows) != len(states) {
		t.Errorf("quota panel shows %d quotas, the API has %d", len(rows), len(states))
	}
	for metric, st := range states {
		level := "ok"
		switch {
		case st.Exceeded || st.Current >= st.Limit:
			level = "over"
		case st.Current >= 0.8*st.Limit:
			level = "warn"
		}
		if want := fmt.Sprintf("%s %s %v/%v", level, colour[level], st.Current, st.Limit); rows[metric] != want {
			t.Errorf("quota %s: got %q, want %q", metric, rows[metric], want)
		}
	}
	if !strings.HasPrefix(rows["api_requests_daily"], "warn ") || !strings.HasPrefix(rows["builds_daily"], "over ") || !strings.HasPrefix(rows["emails_daily"], "ok ") {
		t.Errorf("quota levels: got %v, want api_requests_daily amber, builds_daily red, emails_daily green", rows)
	}

	screenshot(t, ctx, "dashboard-1280x800.png", false)
	screenshot(t, ctx, "dashboard-1280x800-full.png", true)

	// Pagination walks every in-range event exactly once, newest first, then back again.
	var all []row
	pages := 0
	for {
		pages++
		rows := waitEvents(t, ctx, pages, "from=")
		all = append(all, rows...)
		if eval[bool](t, ctx, `document.getElementById('page-next').disabled`) {
			break
		}
		if pages > 10 {
			t.Fatal("more than 10 pages; next never disables")
		}
		step(t, ctx, "next page", chromedp.Click(chromedp.ID("page-next")))
	}
	ids := make([]string, len(all))
	for i, r := range all {
		ids[i] = r.ID
		if i > 0 && r.Ts > all[i-1].Ts {
			t.Errorf("row %d (%s) is newer than row %d (%s): not newest first", i, r.Ts, i-1, all[i-1].Ts)
		}
	}
	want := slices.Clone(s.acme.inRange)
	slices.Sort(ids)
	slices.Sort(want)
	if !slices.Equal(slices.Compact(ids), want) || len(all) != len(want) || pages != 3 {
		t.Errorf("pagination: %d rows (%d distinct) over %d pages, want the %d seeded events over 3 pages",
			len(all), len(slices.Compact(ids)), pages, len(want))
	}
	for p := pages - 1; p >= 1; p-- {
		step(t, ctx, "previous page", chromedp.Click(chromedp.ID("page-prev")))
		rows := waitEvents(t, ctx, p, "from=")
		if len(rows) == 0 || rows[0].ID != all[(p-1)*25].ID {
			t.Errorf("previous to page %d: first row %v, want %s", p, rows, all[(p-1)*25].ID)
		}
	}
	if !eval[bool](t, ctx, `document.getElementById('page-prev').disabled`) {
		t.Error("previous is enabled on the first page")
	}

	// Filters narrow the table.
	filterCheck := func(event, source string) []row {
		t.Helper()
		selectOption(t, ctx, "filter-event", event)
		selectOption(t, ctx, "filter-source", source)
		q := url.Values{}
		if event != "" {
			q.Set("event", event)
		}
		if source != "" {
			q.Set("source", source)
		}
		rows := waitEvents(t, ctx, 1, q.Encode())
		wantN := s.acme.pairs[[2]string{event, source}]
		switch {
		case event != "" && source == "":
			wantN = s.acme.byEvent[event]
		case event == "" && source != "":
			wantN = s.acme.bySource[source]
		}
		if len(rows) != wantN {
			t.Errorf("filter event=%q source=%q: %d rows, want %d", event, source, len(rows), wantN)
		}
		for _, r := range rows {
			if (event != "" && r.Event != event) || (source != "" && r.Source != source) {
				t.Errorf("filter event=%q source=%q: row %+v does not match", event, source, r)
			}
		}
		return rows
	}
	filterCheck("builder.generate.completed", "")
	filterCheck("", "api")
	filterCheck("auth.user.login", "webhook")
	if !eval[bool](t, ctx, `!document.querySelector('#events-card .widget-empty').hidden`) {
		t.Error("no empty-state message for a filter that matches nothing")
	}
	logins := filterCheck("auth.user.login", "app")

	// Export downloads exactly what the table's filters select.
	progress := chromedp.Events(ctx, browser.DownloadProgress)
	finished := make(chan *browser.EventDownloadProgress, 1)
	go func() {
		for ev, err := range progress {
			if err != nil {
				return
			}
			if ev.State != browser.DownloadProgressStateInProgress {
				finished <- &ev
				return
			}
		}
	}()
	step(t, ctx, "export", chromedp.Click(chromedp.ID("export")))
	var file string
	select {
	case ev := <-finished:
		if ev.State != browser.DownloadProgressStateCompleted {
			t.Fatalf("the export download ended %s", ev.State)
		}
		file = filepath.Join(downloads, ev.GUID)
	case <-time.After(20 * time.Second):
		t.Fatal("the export did not download within 20 s")
	}
	f, err := os.Open(file)
	if err != nil {
		t.Fatal(err)
	}
	raw, err := io.ReadAll(f)
	f.Close()
	if err != nil {
		t.Fatal(err)
	}
	// Opened in a spreadsheet: the download starts with the UTF-8 BOM Excel needs.
	body, hasBOM := bytes.CutPrefix(raw, []byte("\xEF\xBB\xBF"))
	if !hasBOM {
		t.Errorf("the dashboard's export has no UTF-8 BOM; Excel shows non-ASCII text as mojibake")
	}
	records, err := csv.NewReader(bytes.NewReader(body)).ReadAll()
	if err != nil {
		t.Fatalf("read the exported CSV: %v", err)
	}
	if len(records) == 0 || strings.Join(records[0], ",") != "id,ts,event,source,user_id,ip,request_id,props" {
		t.Fatalf("export header: %v", records[:min(1, len(records))])
	}
	var exported, shownIDs []string
	for _, r := range records[1:] {
		exported = append(exported, r[0])
		if r[2] != "auth.user.login" || r[3] != "app" {
			t.Errorf("exported row %v is outside the filter", r)
		}
	}
	for _, r := range logins {
		shownIDs = append(shownIDs, r.ID)
	}
	slices.Sort(exported)
	slices.Sort(shownIDs)
	if !slices.Equal(exported, shownIDs) {
		t.Errorf("export: %d rows, the table shows %d; they differ", len(exported), len(shownIDs))
	}
	waitFor(t, ctx, "the export status", `!document.getElementById('export-status').hidden`)
	if got := eval[string](t, ctx, `document.getElementById('export-status').textContent`); !strings.Contains(got, "every matching event") {
		t.Errorf("export status %q: want it to say the download holds every matching event", got)
	}

	// 90 days: the KPIs include the older events and still equal the API.
	selectOption(t, ctx, "filter-event", "")
	selectOption(t, ctx, "filter-source", "")
	step(t, ctx, "pick 90 days", chromedp.Click(chromedp.CSS(`button[data-range="90"]`)))
	waitFor(t, ctx, "90-day widgets", `document.getElementById('range-label').textContent.indexOf('90 days') >= 0 && `+widgetsSettled)
	api90 := s.usageTotals(t, s.keys["acme-read"], s.today.AddDate(0, 0, -89), s.today, kpis)
	for _, m := range kpis {
		got := eval[string](t, ctx, fmt.Sprintf(`document.querySelector('.kpi[data-metric=%q] .kpi-value').getAttribute('data-value')`, m))
		if m == "auth.user.login" {
			if users := s.activeUsers(t, s.keys["acme-read"], s.today.AddDate(0, 0, -89), s.today); got != fmt.Sprint(users) {
				t.Errorf("90-day Active users: page %s, API %d", got, users)
			}
			continue
		}
		if got != fmt.Sprint(api90[m]) || api90[m] != int64(s.acme.byEvent[m]+s.acme.older[m]) {
			t.Errorf("90-day KPI %s: page %s, API %d, seeded %d", m, got, api90[m], s.acme.byEvent[m]+s.acme.older[m])
		}
	}
	// A custom range that is backwards is refused on the page, before any request.
	step(t, ctx, "open the custom range", chromedp.Click(chromedp.CSS(`button[data-range="custom"]`)), chromedp.WaitVisible(chromedp.ID("custom-range")))
	eval[chromedp.Void](t, ctx, fmt.Sprintf(`document.getElementById('custom-from').value = %q; document.getElementById('custom-to').value = %q;
		document.querySelector('#custom-range button').click()`, s.today.Format("2006-01-02"), s.today.AddDate(0, 0, -3).Format("2006-01-02")))
	waitFor(t, ctx, "the range error", `!document.getElementById('range-error').hidden`)
	eval[chromedp.Void](t, ctx, fmt.Sprintf(`document.getElementById('custom-from').value = %q; document.getElementById('custom-to').value = %q;
		document.querySelector('#custom-range button').click()`, s.today.AddDate(0, 0, -6).Format("2006-01-02"), s.today.Format("2006-01-02")))
	waitFor(t, ctx, "7-day custom range", `document.getElementById('range-label').textContent.indexOf('7 days') >= 0 && `+widgetsSettled)
	// The 7 daily points are labelled by day ("23 Nov"), never by hour ("12am", "12pm").
	labels := strings.Split(eval[string](t, ctx, `document.getElementById('chart').getAttribute('data-x-labels') || ''`), "|")
	dayLabel := regexp.MustCompile(`^[0-9]{1,2} [A-Z][a-z]{2}$`)
	for _, l := range labels {
		if !dayLabel.MatchString(l) {
			t.Errorf("7-day chart: x label %q among %q; want day labels like \"23 Nov\"", l, labels)
			break
		}
	}
	step(t, ctx, "back to 30 days", chromedp.Click(chromedp.CSS(`button[data-range="30"]`)))
	waitFor(t, ctx, "30-day widgets", `document.getElementById('range-label').textContent.indexOf('30 days') >= 0 && `+widgetsSettled)

	// Phone width: nothing overflows sideways.
	step(t, ctx, "phone viewport", chromedp.EmulateViewport(390, 844, chromedp.EmulateMobile, chromedp.EmulateScale(2)))
	waitFor(t, ctx, "the phone layout", `document.documentElement.clientWidth === 390`)
	time.Sleep(300 * time.Millisecond) // the chart re-sizes after a 100 ms debounce
	if w := eval[int](t, ctx, `document.documentElement.scrollWidth`); w > 390 {
		t.Errorf("phone width: the page is %d px wide, wider than the 390 px screen", w)
	}
	screenshot(t, ctx, "dashboard-390x844.png", false)
	screenshot(t, ctx, "dashboard-390x844-full.png", true)
	eval[chromedp.Void](t, ctx, `document.getElementById('quotas').scrollIntoView()`)
	screenshot(t, ctx, "dashboard-390x844-events.png", false)
	eval[chromedp.Void](t, ctx, `window.scrollTo(0, 0)`)
	step(t, ctx, "desktop viewport", chromedp.EmulateViewport(1280, 800))

	// Sign out; another tenant with no events shows empty states, and a widget error state.
	step(t, ctx, "sign out", chromedp.Click(chromedp.ID("signout")), chromedp.WaitVisible(chromedp.ID("signin-form")))
	if eval[bool](t, ctx, `sessionStorage.getItem('analyticsd.dashboard.session') !== null`) {
		t.Error("sign-out left the credential in sessionStorage")
	}
	signIn(t, ctx, s.keys["initech-read"], "initech")
	waitFor(t, ctx, "initech's widgets", `!document.getElementById('app').hidden && `+widgetsSettled)
	settled := eval[map[string]string](t, ctx, `(function () { var o = {}; ['#kpis', '#chart-card', '#quotas', '#events-card'].forEach(function (s) {
		o[s] = document.querySelector(s).getAttribute('data-state'); }); o.quotaError = document.querySelector('#quotas .widget-error').textContent;
		o.signups = document.querySelector('.kpi[data-metric="auth.user.registered"] .kpi-value').textContent; return o; })()`)
	if settled["#chart-card"] != "empty" || settled["#events-card"] != "empty" || settled["#quotas"] != "error" ||
		settled["#kpis"] != "ready" || settled["signups"] != "0" || !strings.Contains(settled["quotaError"], "counters are unavailable") {
		t.Errorf("empty tenant: got %v, want empty chart and table, 0 signups, the quota error shown", settled)
	}
	screenshot(t, ctx, "dashboard-empty-1280x800.png", false)
	// The page shows and uses the tenant's zone: its name, and "today" as a date in that zone.
	zone := eval[map[string]string](t, ctx, `({footer: document.getElementById('zone-name').textContent,
		column: document.getElementById('ts-zone').textContent, label: document.getElementById('range-label').textContent})`)
	ktm, _ := time.LoadLocation("Asia/Kathmandu")
	todayKTM := time.Now().In(ktm).Format("2 Jan 2006")
	if zone["footer"] != "Asia/Kathmandu" || zone["column"] != "Asia/Kathmandu" || !strings.HasSuffix(zone["label"], "(Asia/Kathmandu)") ||
		!strings.Contains(zone["label"], todayKTM) {
		t.Errorf("initech's zone on the page: got %v, want Asia/Kathmandu everywhere and the range ending %s", zone, todayKTM)
	}

	// A reload keeps the session (sessionStorage) and needs no new sign-in.
	step(t, ctx, "reload", chromedp.Reload())
	waitFor(t, ctx, "the dashboard after a reload", `!document.getElementById('app').hidden && `+widgetsSettled)

	if !eval[bool](t, ctx, `Array.isArray(window.__csp)`) {
		t.Fatal("the CSP violation recorder did not run in the page")
	}
	if v := eval[[]string](t, ctx, `window.__csp`); len(v) > 0 {
		t.Errorf("content security policy violations: %v", v)
	}
	// The policy is in force: an inline style attribute is refused and reported.
	eval[chromedp.Void](t, ctx, `document.getElementById('tenant-name').setAttribute('style', 'color: red')`)
	waitFor(t, ctx, "the deliberate CSP violation to be reported", `window.__csp.length === 1 && window.__csp[0].indexOf('style-src') === 0`)
	mu.Lock()
	for _, e := range exceptions {
		t.Errorf("uncaught exception in the page: %s", e)
	}
	mu.Unlock()
	t.Logf("browser test took %s", time.Since(start).Round(time.Millisecond))
}
