package query_test

import (
	"strings"
	"testing"
	"time"

	"github.com/analyticsd/analyticsd/api"
	"github.com/analyticsd/analyticsd/audit"
	"github.com/analyticsd/analyticsd/auth"
	"github.com/analyticsd/analyticsd/internal/testenv/fixture"
	"github.com/analyticsd/analyticsd/query"
	"github.com/analyticsd/analyticsd/tenant"
)

// Every refusal of the read endpoints, byte for byte: clients parse the codes, show the messages
// and wait the Retry-After seconds, so none of them may change by accident.
func TestErrorResponses(t *testing.T) {
	t.Parallel()
	h := newHarness(t, 100)
	// The same endpoints on a ClickHouse database that does not exist: every read fails in storage.
	broken := api.NewApp(api.Config{}, nil)
	store := query.NewStore(h.env.CH, "no_such_db", h.env.PG, 10*time.Second)
	authn := auth.NewAuthenticator(auth.NewKeys(h.env.PG), tenant.NewStore(h.env.PG), auth.JWTConfig{Secret: jwtSecret})
	query.NewService(query.Config{MaxExportRows: 100}, store, audit.New(h.env.PG), nil, nil).
		Register(broken.Group("/api/analytics"), authn.Require(auth.ScopeAnalyticsRead))
	brokenSrv := fixture.Serve(t, broken)

	const base = "/api/analytics"
	bad := func(msg string) string {
		return `{"error":{"code":"invalid_parameter","message":"` + msg + `"},"success":false}`
	}
	const unavailable = `{"error":{"code":"storage_unavailable","message":"analytics storage did not answer; retry shortly"},"success":false}`
	cases := []struct {
		name       string
		broken     bool
		path       string
		status     int
		retryAfter string
		want       string
	}{
		{"repeated", false, "/events?source=app&source=api", 400, "", bad(`source= is given more than once; give it once (only metric takes several values)`)},
		// Any name an import may have stored is a filter (ingest's rules are narrower); a longer one
		// or invalid UTF-8 cannot match.
		{"event", false, "/events?event=" + strings.Repeat("e", 1001), 400, "", bad(`event=\"` + strings.Repeat("e", 64) + `…\" is empty or longer than 1000 bytes; no stored name is`)},
		{"source", false, "/events?source=%ff", 400, "", bad(`source is not valid UTF-8`)},
		{"unknown", false, "/events?evnt=auth.user.login", 400, "", bad(`evnt= is not a parameter of /api/analytics/events; it takes from, to, tz, event, source, user_id, limit, cursor`)},
		{"unknown on usage", false, "/usage?metric=a.b&start=2026-01-01", 400, "", bad(`start= is not a parameter of /api/analytics/usage; it takes from, to, tz, metric, metric[], fill`)},
		{"limit", false, "/events?limit=0", 400, "", bad(`limit=\"0\" must be a whole number from 1 to 1000`)},
		{"cursor", false, "/events?cursor=zzz", 400, "", bad(`cursor is not valid: pass next_cursor from the previous page unchanged, or an RFC3339 time`)},
		{"cursor years", false, "/events?cursor=1900-01-01T00:00:00Z", 400, "", bad(`cursor=\"1900-01-01T00:00:00Z\" is outside the years 1970-2105`)},
		{"from", false, "/events?from=yesterday", 400, "", bad(`from=\"yesterday\" is not a date (YYYY-MM-DD) or RFC3339 time`)},
		{"to years", false, "/events?to=2200-01-01", 400, "", bad(`to=\"2200-01-01\" is outside the years 1970-2105`)},
		{"range order", false, "/events?from=2024-02-01&to=2024-01-01", 400, "", bad(`from (2024-02-01T00:00:00Z) must be before to (2024-01-02T00:00:00Z)`)},
		{"range length", false, "/events?from=2020-01-01&to=2024-01-01", 400, "", bad(`the range from 2020-01-01 to 2024-01-01 is longer than 366 days; narrow it`)},
		{"no metric", false, "/usage", 400, "", bad(`name at least one metric: metric[]=auth.user.login\u0026metric[]=api_requests_daily (or metric=a,b)`)},
		{"fill", false, "/usage?metric=a.b&fill=ones", 400, "", bad(`fill=\"ones\": want zero or none`)},
		// Answered as the whole day before, while /events answered the second it was asked for.
		{"usage inside a day", false, "/usage?metric=a.b&from=2026-11-30T16:20:00Z&to=2026-11-30T16:20:01Z", 400, "",
			bad(`from=2026-11-30T16:20:00Z is inside a day of UTC, and usage is counted per day: give from and to as dates (YYYY-MM-DD), or as instants at midnight`)},
		{"usage at midnights", false, "/usage?metric=a.b&from=2026-11-29T00:00:00Z&to=2026-11-30T16:20:01Z", 400, "",
			bad(`to=2026-11-30T16:20:01Z is inside a day of UTC, and usage is counted per day: give from and to as dates (YYYY-MM-DD), or as instants at midnight`)},
		{"metric", false, "/metrics?metric=%c0", 400, "", bad(`metric is not valid UTF-8`)},
		{"event-names limit", false, "/event-names?limit=1001", 400, "", bad(`limit=\"1001\" must be a whole number from 1 to 1000`)},
		{"active-users event", false, "/active-users?event=" + strings.Repeat("e", 1001), 400, "", bad(`event=\"` + strings.Repeat("e", 64) + `…\" is empty or longer than 1000 bytes; no stored name is`)},
		{"export limit", false, "/export.csv?limit=101", 400, "", bad(`limit=\"101\" must be a whole number from 1 to 100`)},
		{"export bom", false, "/export.ndjson?bom=true", 400, "", bad(`bom applies to export.csv only (NDJSON is UTF-8 without a byte-order mark)`)},
		{"export bom value", false, "/export.csv?bom=yes", 400, "", bad(`bom=\"yes\": want true or false`)},
		{"events storage", true, "/events", 503, "5", unavailable},
		{"usage storage", true, "/usage?metric=a.b", 503, "5", unavailable},
		{"metrics storage", true, "/metrics", 503, "5", unavailable},
		{"event-names storage", true, "/event-names", 503, "5", unavailable},
		{"active-users storage", true, "/active-users", 503, "5", unavailable},
		{"export storage", true, "/export.csv", 503, "5", unavailable},
		{"parameter before storage", true, "/events?limit=0", 400, "", bad(`limit=\"0\" must be a whole number from 1 to 1000`)},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			var r fixture.Response
			if c.broken {
				r = brokenSrv.Get(t, h.keys["a-read"], "", base+c.path)
			} else {
				r = h.get(t, h.keys["a-read"], "", base+c.path)
			}
			if r.Status != c.status || r.Header.Get("Retry-After") != c.retryAfter || r.Raw != c.want {
				t.Errorf("got %d, Retry-After %q:\n%s\nwant %d, Retry-After %q:\n%s", r.Status, r.Header.Get("Retry-After"), r.Raw, c.status, c.retryAfter, c.want)
			}
		})
	}
}
