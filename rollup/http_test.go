package rollup_test

import (
	"encoding/json"
	"fmt"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/analyticsd/analyticsd/api"
	"github.com/analyticsd/analyticsd/audit"
	"github.com/analyticsd/analyticsd/auth"
	fx "github.com/analyticsd/analyticsd/internal/testenv/fixture"
	"github.com/analyticsd/analyticsd/query"
	"github.com/analyticsd/analyticsd/rollup"
	"github.com/analyticsd/analyticsd/tenant"
)

var jwtSecret = []byte("0123456789abcdef0123456789abcdef-rollup-test")

type server struct {
	*fixture
	srv        *fx.Server
	acme, glob uuid.UUID
	keys       map[string]string // name → plaintext key
	prefixes   map[string]string // name → key prefix
}

// newServer mounts the rollup endpoint as serve does (analytics:admin) and the read API
// (analytics:read) on one app, with tenants acme and globex and their keys.
func newServer(t *testing.T) *server {
	t.Helper()
	s := &server{fixture: newFixture(t), keys: map[string]string{}, prefixes: map[string]string{}}
	s.acme, s.glob = s.tenant(t, "acme"), s.tenant(t, "globex")
	for name, spec := range map[string]struct {
		tenant uuid.UUID
		scope  auth.Scope
	}{
		"acme-admin":  {s.acme, auth.ScopeAnalyticsAdmin},
		"acme-read":   {s.acme, auth.ScopeAnalyticsRead},
		"acme-write":  {s.acme, auth.ScopeEventsWrite},
		"globex-read": {s.glob, auth.ScopeAnalyticsRead},
	} {
		plain, rec := fx.Key(t, s.env.PG, spec.tenant, name, spec.scope)
		s.keys[name], s.prefixes[name] = plain, rec.Prefix
	}
	authn := auth.NewAuthenticator(auth.NewKeys(s.env.PG), tenant.NewStore(s.env.PG), auth.JWTConfig{Secret: jwtSecret})
	app := api.NewApp(api.Config{}, nil)
	group := app.Group("/api/analytics")
	s.reconciler(nil, nil).Register(group, authn.Require(auth.ScopeAnalyticsAdmin))
	store := query.NewStore(s.env.CH, s.env.DB, s.env.PG, 10*time.Second)
	query.NewService(query.Config{}, store, audit.New(s.env.PG), nil, nil).Register(group, authn.Require(auth.ScopeAnalyticsRead))
	s.srv = fx.Serve(t, app)
	return s
}

func (s *server) jwt(t *testing.T, role string) string {
	t.Helper()
	return fx.JWT(t, jwtSecret, "user-"+role, "acme", role, time.Hour)
}

// response is fixture's response with the envelope decoded into its fields.
type response struct {
	status int
	header http.Header
	raw    string
	body   struct {
		Success bool            `json:"success"`
		Data    json.RawMessage `json:"data"`
		Error   struct {
			Code    string `json:"code"`
			Message string `json:"message"`
		} `json:"error"`
	}
}

func (s *server) do(t *testing.T, method, token, slug, path string) response {
	t.Helper()
	res := s.srv.Do(t, fx.Request{Method: method, Path: path, Key: token, Slug: slug})
	r := response{status: res.Status, header: res.Header, raw: res.Raw}
	_ = json.Unmarshal([]byte(res.Raw), &r.body)
	return r
}

// The endpoint's auth matrix; a run reconciles the caller's tenant only; bad dates are 400s.
func TestRollupEndpoint(t *testing.T) {
	t.Parallel()
	s := newServer(t)
	d := s.daysAgo(1)
	s.events(t, repeat(3, s.acme, d.Add(time.Hour), "auth.user.login")...)
	s.events(t, repeat(2, s.glob, d.Add(time.Hour), "auth.user.login")...)
	s.increments(t, inc{s.acme, d.Add(time.Hour), "api_requests_daily", 9})
	path := "/api/analytics/rollup?date=" + d.Format("2006-01-02")

	cases := []struct {
		name, token, slug string
		status            int
	}{
		{"API key with analytics:admin", s.keys["acme-admin"], "acme", 200},
		{"API key with analytics:admin, no slug header", s.keys["acme-admin"], "", 200},
		{"API key with analytics:read only", s.keys["acme-read"], "acme", 403},
		{"API key with events:write only", s.keys["acme-write"], "acme", 403},
		{"another tenant's slug", s.keys["acme-admin"], "globex", 403},
		{"JWT owner", s.jwt(t, "owner"), "acme", 200},
		{"JWT admin", s.jwt(t, "admin"), "acme", 200},
		{"JWT member", s.jwt(t, "member"), "acme", 403},
		{"JWT viewer", s.jwt(t, "viewer"), "acme", 403},
		{"no credential", "", "acme", 401},
		{"malformed key", "ak_nope", "acme", 401},
	}
	for _, c := range cases {
		r := s.do(t, http.MethodPost, c.token, c.slug, path)
		if r.status != c.status {
			t.Errorf("%s: got %d %s, want %d", c.name, r.status, r.raw, c.status)
		}
		if c.status != 200 && (r.body.Success || r.body.Error.Code == "") {
			t.Errorf("%s: got body %s, want the error envelope", c.name, r.raw)
		}
	}

	r := s.do(t, http.MethodPost, s.keys["acme-admin"], "acme", path)
	var data map[string]any
	if err := json.Unmarshal(r.body.Data, &data); err != nil || !r.body.Success {
		t.Fatalf("got %d %s, want the success envelope", r.status, r.raw)
	}
	for field, want := range map[string]any{"date": d.Format("2006-01-02"), "tenants": 1.0, "metrics": 2.0, "rows": 2.0, "changed": 0.0} {
		if data[field] != want {
			t.Errorf("data.%s: got %v, want %v (%s)", field, data[field], want, r.raw)
		}
	}
	if _, ok := data["duration_ms"].(float64); !ok {
		t.Errorf("data.duration_ms missing: %s", r.raw)
	}

	// Only acme's rows were written, and the runs are acme's.
	want := counts{k(s.acme, "auth.user.login"): 3, k(s.acme, "api_requests_daily"): 9}
	if got := s.postgres(t, d); got.String() != want.String() {
		t.Errorf("postgres: got %v, want %v (acme only)", got, want)
	}
	if n := s.count(t, "SELECT count(*) FROM rollup_runs WHERE tenant_id IS DISTINCT FROM $1", s.acme); n != 0 {
		t.Errorf("%d rollup_runs rows not scoped to acme", n)
	}
	if n := s.count(t, "SELECT count(*) FROM audit_log WHERE action = 'rollup.run' AND tenant_id = $1 AND actor = $2", s.acme, "apikey:"+s.prefixes["acme-admin"]); n != 3 {
		t.Errorf("audit_log: %d runs by the admin key, want 3", n)
	}
	if n := s.count(t, "SELECT count(*) FROM audit_log WHERE action = 'rollup.run' AND actor = 'jwt:user-owner'"); n != 1 {
		t.Errorf("audit_log: %d runs by the owner's token, want 1", n)
	}

	// A tenant-scoped run leaves other tenants' rows alone, even ones ClickHouse no longer backs.
	if _, err := s.env.PG.Exec(ctxT(t), "INSERT INTO analytics_daily_usage (tenant_id, date, metric, count) VALUES ($1, $2::date, 'old.metric', 5)",
		s.glob, d.Format("2006-01-02")); err != nil {
		t.Fatal(err)
	}
	s.do(t, http.MethodPost, s.keys["acme-admin"], "", path)
	if got := s.postgres(t, d)[k(s.glob, "old.metric")]; got != 5 {
		t.Errorf("globex row after acme's run: got %d, want 5 untouched", got)
	}

	today := s.today
	for _, c := range []struct{ query, msg string }{
		{"", "date is required"},
		{"?date=", "date is required"},
		{"?date=2024-13-01", "is not a date"},
		{"?date=15.01.2024", "is not a date"},
		{"?date=" + today.AddDate(0, 0, 1).Format("2006-01-02"), "in the future"},
		{"?date=" + today.Format("2006-01-02"), "is today (UTC), which is still being counted"},
		{"?date=" + today.AddDate(0, 0, -401).Format("2006-01-02"), "more than 400 days ago"},
		// Read as its first value before: another day than the caller may have meant was re-billed.
		{"?date=" + today.AddDate(0, 0, -1).Format("2006-01-02") + "&date=" + today.AddDate(0, 0, -30).Format("2006-01-02"), "date= is given more than once"},
	} {
		r := s.do(t, http.MethodPost, s.keys["acme-admin"], "", "/api/analytics/rollup"+c.query)
		if r.status != 400 || r.body.Error.Code != "invalid_parameter" || !strings.Contains(r.body.Error.Message, c.msg) {
			t.Errorf("rollup%s: got %d %s, want 400 saying %q", c.query, r.status, r.raw, c.msg)
		}
	}
	if r := s.do(t, http.MethodPost, s.keys["acme-admin"], "", "/api/analytics/rollup?date="+today.AddDate(0, 0, -400).Format("2006-01-02")); r.status != 200 {
		t.Errorf("rollup of 400 days ago: got %d %s, want 200", r.status, r.raw)
	}
}

// After a rollup, GET /usage answers reconciled days from Postgres, and they equal ClickHouse's
// counts. A tenant-scoped run reconciles that tenant's day only.
func TestUsageServesReconciledDays(t *testing.T) {
	t.Parallel()
	s := newServer(t)
	ctx := ctxT(t)
	d1, d2 := s.daysAgo(1), s.daysAgo(2)
	for _, tn := range []uuid.UUID{s.acme, s.glob} {
		for i, d := range []time.Time{d2, d1, s.today} {
			s.events(t, repeat(i+2, tn, d.Add(time.Minute), "auth.user.login")...)
		}
	}
	s.increments(t, inc{s.acme, d2.Add(time.Hour), "api_requests_daily", 40}, inc{s.acme, d1.Add(time.Hour), "api_requests_daily", 2})
	r := s.reconciler(nil, nil)
	if _, err := r.RunDate(ctx, d2, rollup.AllTenants(), "test"); err != nil {
		t.Fatal(err)
	}
	if _, err := r.RunDate(ctx, d1, rollup.OneTenant(s.acme), "test"); err != nil {
		t.Fatal(err)
	}

	type point struct {
		Date  string         `json:"date"`
		Count int64          `json:"count"`
		Meta  map[string]any `json:"meta"`
	}
	usage := func(key string) map[string][]point {
		path := fmt.Sprintf("/api/analytics/usage?from=%s&to=%s&metric[]=auth.user.login&metric[]=api_requests_daily",
			d2.Format("2006-01-02"), s.today.Format("2006-01-02"))
		res := s.do(t, http.MethodGet, s.keys[key], "", path)
		var series map[string][]point
		if err := json.Unmarshal(res.body.Data, &series); res.status != 200 || err != nil {
			t.Fatalf("usage: got %d %s", res.status, res.raw)
		}
		return series
	}
	check := func(name string, tn uuid.UUID, series map[string][]point, reconciled map[string]bool) {
		t.Helper()
		n := 0
		for metric, points := range series {
			for _, p := range points {
				n++
				day, _ := time.Parse("2006-01-02", p.Date)
				if want := s.aggregate(t, day)[k(tn, metric)]; p.Count != want {
					t.Errorf("%s %s %s: got %d, want ClickHouse's %d", name, metric, p.Date, p.Count, want)
				}
				_, fromPostgres := p.Meta["reconciled_at"]
				if fromPostgres != reconciled[p.Date] {
					t.Errorf("%s %s %s: meta %v, want reconciled=%v", name, metric, p.Date, p.Meta, reconciled[p.Date])
				}
			}
		}
		if n == 0 {
			t.Errorf("%s: no points", name)
		}
	}
	day := func(d time.Time) string { return d.Format("2006-01-02") }
	check("acme", s.acme, usage("acme-read"), map[string]bool{day(d2): true, day(d1): true})
	check("globex", s.glob, usage("globex-read"), map[string]bool{day(d2): true})
}

// Every refusal of the rollup endpoint, byte for byte: clients parse the codes, show the messages
// and wait the Retry-After seconds, so none of them may change by accident.
func TestRollupErrorResponses(t *testing.T) {
	t.Parallel()
	s := newServer(t)
	// The endpoint on a ClickHouse database that does not exist, on 2024-01-20.
	now := func() time.Time { return time.Date(2024, 1, 20, 12, 0, 0, 0, time.UTC) }
	app := api.NewApp(api.Config{}, nil)
	authn := auth.NewAuthenticator(auth.NewKeys(s.env.PG), tenant.NewStore(s.env.PG), auth.JWTConfig{Secret: jwtSecret})
	rollup.NewReconciler(s.env.CH, "no_such_db", s.env.PG, audit.New(s.env.PG), nil, nil, 90, now).
		Register(app.Group("/api/analytics"), authn.Require(auth.ScopeAnalyticsAdmin))
	broken := *s
	broken.srv = fx.Serve(t, app)
	bad := func(msg string) string {
		return `{"error":{"code":"invalid_parameter","message":"` + msg + `"},"success":false}`
	}
	for _, c := range []struct {
		query      string
		status     int
		retryAfter string
		want       string
	}{
		{"", 400, "", bad(`date is required: POST /api/analytics/rollup?date=YYYY-MM-DD (a UTC day)`)},
		{"?date=2024-13-01", 400, "", bad(`date=\"2024-13-01\" is not a date: use YYYY-MM-DD (a UTC day), e.g. 2024-01-15`)},
		{"?date=2024-01-21", 400, "", bad(`date 2024-01-21 is in the future: today (UTC) is 2024-01-20`)},
		{"?date=2024-01-20", 400, "", bad(`date 2024-01-20 is today (UTC), which is still being counted: reconcile a past day; today is reconciled automatically after midnight UTC`)},
		{"?date=2022-12-01", 400, "", bad("date 2022-12-01 is more than 400 days ago: ask an operator to run `analyticsd rollup --date 2022-12-01`")},
		{"?date=2024-01-19", 503, "30", `{"error":{"code":"rollup_failed","message":"the rollup did not complete because analytics storage did not answer; retry shortly"},"success":false}`},
	} {
		r := broken.do(t, http.MethodPost, s.keys["acme-admin"], "", "/api/analytics/rollup"+c.query)
		if r.status != c.status || r.header.Get("Retry-After") != c.retryAfter || r.raw != c.want {
			t.Errorf("rollup%s: got %d, Retry-After %q:\n%s\nwant %d, Retry-After %q:\n%s", c.query, r.status, r.header.Get("Retry-After"), r.raw, c.status, c.retryAfter, c.want)
		}
	}
}
