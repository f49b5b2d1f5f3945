package main

import (
	"bytes"
	"context"
	"encoding/base64"
	"io"
	"net/http"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/getkin/kin-openapi/openapi3"
	"github.com/getkin/kin-openapi/openapi3filter"
	"github.com/getkin/kin-openapi/routers"
	"github.com/getkin/kin-openapi/routers/legacy"

	"github.com/analyticsd/analyticsd/api"
	"github.com/google/uuid"

	"github.com/analyticsd/analyticsd/auth"
	"github.com/analyticsd/analyticsd/internal/testenv"
)

// loadOpenAPI parses api/openapi.json with kin-openapi and validates it as OpenAPI 3.0: the
// document users feed to their generators must be one (a `const` in it, valid only in 3.1, made
// @apidevtools/swagger-parser report 300+ errors).
func loadOpenAPI(t *testing.T) *openapi3.T {
	t.Helper()
	doc, err := openapi3.NewLoader().LoadFromData(api.OpenAPI())
	if err != nil {
		t.Fatalf("api/openapi.json does not load: %v", err)
	}
	if err := doc.Validate(context.Background()); err != nil {
		t.Fatalf("api/openapi.json is not valid OpenAPI %s: %v", doc.OpenAPI, err)
	}
	return doc
}

func TestOpenAPIDocumentIsValid(t *testing.T) { loadOpenAPI(t) }

// Every route, driven against a real server, answers what the document says: each request is
// checked against its operation (parameters, body) and each response against the documented
// response of its status (content type, body schema, headers). Every route and every status the
// drive produces must be documented; the test lists the statuses it saw, so a new route or status
// without a schema fails here.
func TestLiveResponsesMatchOpenAPI(t *testing.T) {
	doc := loadOpenAPI(t)
	router, err := legacy.NewRouter(doc)
	if err != nil {
		t.Fatal(err)
	}
	openapi3filter.RegisterBodyDecoder("text/csv", openapi3filter.FileBodyDecoder)
	openapi3filter.RegisterBodyDecoder("application/x-ndjson", openapi3filter.FileBodyDecoder)
	openapi3filter.RegisterBodyDecoder("text/html", openapi3filter.FileBodyDecoder)
	openapi3filter.RegisterBodyDecoder("text/css", openapi3filter.FileBodyDecoder)
	openapi3filter.RegisterBodyDecoder("text/javascript", openapi3filter.FileBodyDecoder)
	openapi3filter.RegisterBodyDecoder("image/svg+xml", openapi3filter.FileBodyDecoder)

	e := testenv.Migrated(t)
	getenv := stackEnv(t, e, map[string]string{"ANALYTICS_ADDR": freeAddr(t), "ANALYTICS_SPOOL_DIR": t.TempDir(),
		"INGEST_FLUSH_INTERVAL": "50ms", "RATE_LIMIT_RPS": "0", "ANALYTICS_MAX_EXPORT_ROWS": "3"})
	tenantID, writeKey := writeKey(t, e, "openapi")
	keys := auth.NewKeys(e.PG)
	readKey, _, err := keys.Create(context.Background(), tenantID, "r", []auth.Scope{auth.ScopeAnalyticsRead})
	if err != nil {
		t.Fatal(err)
	}
	adminKey, _, err := keys.Create(context.Background(), tenantID, "a", []auth.Scope{auth.ScopeAnalyticsAdmin})
	if err != nil {
		t.Fatal(err)
	}
	base := serveInProcess(t, getenv)
	yesterday := time.Now().UTC().AddDate(0, 0, -1).Format("2006-01-02")
	segment := map[string]string{"Authorization": "Basic " + base64.StdEncoding.EncodeToString([]byte(writeKey+":"))}

	type call struct {
		method, path, key, body string
		hdr                     map[string]string
		want                    int
	}
	events := `[{"event":"auth.user.login","user_id":"u1"},{"event":"build.started","user_id":"u2","source":"builder","props":{"n":1}},` +
		`{"event":"auth.user.login","user_id":"u3"},{"event":"auth.user.login","user_id":"u4"}]`
	calls := []call{
		{"GET", "/healthz", "", "", nil, 200},
		{"GET", "/readiness", "", "", nil, 200},
		{"GET", "/api/openapi.json", "", "", nil, 200},
		{"GET", "/dashboard", "", "", nil, 200},
		{"GET", "/dashboard/app.js", "", "", nil, 200},
		{"GET", "/dashboard/nope.js", "", "", nil, 404},
		{"GET", "/dashboard/vendor/uPlot.min.css", "", "", nil, 200},
		{"POST", "/api/analytics/events", writeKey, events, nil, 202},
		{"POST", "/api/analytics/events", writeKey, `[{"event":"Bad Name"},{"event":"auth.user.login"}]`, nil, 202},
		{"POST", "/api/analytics/events", writeKey, `[{"event":"Bad Name"}]`, nil, 400},
		{"POST", "/api/analytics/events", writeKey, `{"events":[`, nil, 400},
		{"POST", "/api/analytics/events", "", events, nil, 401},
		{"POST", "/api/analytics/events", readKey, events, nil, 403},
		{"POST", "/api/analytics/events", writeKey, events, map[string]string{"Content-Type": "application/xml"}, 415},
		{"POST", "/api/analytics/events", writeKey, events, map[string]string{"Idempotency-Key": "k1"}, 202},
		{"POST", "/api/analytics/events", writeKey, `[{"event":"auth.user.logout"}]`, map[string]string{"Idempotency-Key": "k1"}, 422},
		{"POST", "/api/analytics/usage", writeKey, `{"metric":"builds_daily","n":2}`, nil, 202},
		{"POST", "/api/analytics/usage", writeKey, `{"metric":"builds_daily","n":0}`, nil, 400},
		{"POST", "/api/analytics/usage", writeKey, `{"metric":"builds_daily","count":2}`, nil, 400},
		{"POST", "/api/analytics/events", writeKey, "{\"event\":\"a.b\"}\n{\"event\":\"a.b\",\"userId\":\"u\"}", map[string]string{"Content-Type": "application/x-ndjson"}, 202},
		{"GET", "/api/analytics/events?limit=2", readKey, "", nil, 200},
		{"GET", "/api/analytics/events?limit=0", readKey, "", nil, 400},
		{"GET", "/api/analytics/usage?metric=builds_daily&fill=zero", readKey, "", nil, 200},
		{"GET", "/api/analytics/metrics", readKey, "", nil, 200},
		{"GET", "/api/analytics/event-names", readKey, "", nil, 200},
		{"GET", "/api/analytics/active-users", readKey, "", nil, 200},
		{"GET", "/api/analytics/export.csv", readKey, "", nil, 200},
		{"GET", "/api/analytics/export.csv?from=2026-13-01", readKey, "", nil, 400},
		{"GET", "/api/analytics/export.csv?bom=true&limit=2", readKey, "", nil, 200},
		{"GET", "/api/analytics/export.ndjson", readKey, "", nil, 200},
		{"GET", "/api/analytics/export.ndjson?limit=4", readKey, "", nil, 400},
		{"GET", "/api/analytics/event-names?limit=1", readKey, "", nil, 200},
		{"GET", "/api/analytics/quotas", readKey, "", nil, 200},
		{"GET", "/api/analytics/quotas/builds_daily", readKey, "", nil, 200},
		{"GET", "/api/analytics/quotas/no_such_metric", readKey, "", nil, 404},
		{"POST", "/api/analytics/quotas/builds_daily/consume?n=1", writeKey, "", nil, 200},
		{"POST", "/api/analytics/quotas/builds_daily/consume?n=1000000", writeKey, "", nil, 429},
		{"POST", "/api/analytics/quotas/builds_daily/consume?n=x", writeKey, "", nil, 400},
		{"POST", "/api/analytics/rollup?date=" + yesterday, adminKey, "", nil, 200},
		{"POST", "/api/analytics/rollup?date=2999-01-01", adminKey, "", nil, 400},
		// The Segment-compatible endpoints, with the write key as Segment's libraries send it.
		{"POST", "/v1/batch", "", `{"batch":[{"type":"track","event":"Order Completed","anonymousId":"a1","messageId":"m1","properties":{"revenue":9.5}},` +
			`{"type":"identify","anonymousId":"a1","traits":{"plan":"pro"}}],"sentAt":"` + time.Now().UTC().Format(time.RFC3339) + `"}`, segment, 200},
		{"POST", "/v1/batch", "", `{"batch":[{"type":"track","anonymousId":"a1"},{"type":"page","anonymousId":"a1"}]}`, segment, 400},
		{"POST", "/v1/track", "", `{"event":"Signed Up","anonymousId":"a2","context":{"ip":"203.0.113.9"}}`, segment, 200},
		{"POST", "/v1/track", "", `{"event":"Signed Up","anonymousId":"a2","writeKey":"` + writeKey + `"}`, nil, 200},
		{"POST", "/v1/track", "", `{"event":"Signed Up","anonymousId":"a2"}`, nil, 401},
		{"POST", "/v1/track", readKey, `{"event":"Signed Up","anonymousId":"a2"}`, nil, 403},
		{"POST", "/v1/track", "", `{"event":"Signed Up","anonymousId":"a2","properties":{"s":"` + strings.Repeat("x", 33<<10) + `"}}`, segment, 413},
		{"POST", "/v1/track", "", `{"event":"Signed Up","anonymousId":"a2"}`, map[string]string{"Authorization": segment["Authorization"], "Content-Type": "application/xml"}, 415},
		{"POST", "/v1/identify", "", `{"anonymousId":"a3","traits":{"plan":"pro"}}`, segment, 200},
		{"POST", "/v1/page", "", `{"anonymousId":"a3","name":"Home","properties":{"path":"/"}}`, segment, 200},
		{"POST", "/v1/screen", "", `{"anonymousId":"a3","name":"Settings"}`, segment, 200},
		{"POST", "/v1/group", "", `{"anonymousId":"a3","groupId":"g1","traits":{"seats":3}}`, segment, 200},
		{"POST", "/v1/alias", "", `{"userId":"u9","previousId":"a3"}`, segment, 200},
		{"POST", "/v1/alias", "", `{"anonymousId":"a3","previousId":"a3"}`, segment, 400},
		// The short paths of analytics.js (text/plain, the writeKey in the body) and the mobile libraries.
		{"POST", "/v1/b", "", `{"batch":[{"type":"track","event":"Opened","anonymousId":"a1"}],"writeKey":"` + writeKey + `"}`, nil, 200},
		{"POST", "/v1/t", "", `{"event":"Clicked","anonymousId":"a4","writeKey":"` + writeKey + `"}`, map[string]string{"Content-Type": "text/plain"}, 200},
		{"POST", "/v1/i", "", `{"anonymousId":"a4","traits":{"plan":"pro"}}`, segment, 200},
		{"POST", "/v1/p", "", `{"anonymousId":"a4","name":"Home"}`, segment, 200},
		{"POST", "/v1/s", "", `{"anonymousId":"a4","name":"Settings"}`, segment, 200},
		{"POST", "/v1/g", "", `{"anonymousId":"a4","groupId":"g1"}`, segment, 200},
		{"POST", "/v1/a", "", `{"userId":"u9","previousId":"a4"}`, segment, 200},
		// Erasure last: the tenant's data goes.
		{"DELETE", "/api/analytics/users/u1", adminKey, "", nil, 202},
		{"DELETE", "/api/analytics/users/u1", readKey, "", nil, 403},
		{"GET", "/api/analytics/erasures/" + uuid.NewString(), adminKey, "", nil, 404},
		{"DELETE", "/api/analytics/data?confirm=someone-else", adminKey, "", nil, 400},
		{"DELETE", "/api/analytics/data?confirm=openapi", adminKey, "", nil, 202},
	}

	seen := map[string]bool{} // "METHOD path status"
	for _, c := range calls {
		var body io.Reader
		if c.body != "" {
			body = strings.NewReader(c.body)
		}
		req, err := http.NewRequest(c.method, base+c.path, body)
		if err != nil {
			t.Fatal(err)
		}
		if c.body != "" {
			req.Header.Set("Content-Type", "application/json")
		}
		if c.key != "" {
			req.Header.Set("Authorization", "Bearer "+c.key)
		}
		for k, v := range c.hdr {
			req.Header.Set(k, v)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		respBody, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		name := c.method + " " + c.path
		if resp.StatusCode != c.want {
			t.Errorf("%s: status %d, want %d: %.300s", name, resp.StatusCode, c.want, respBody)
			continue
		}
		route, params, err := router.FindRoute(req)
		if err != nil {
			t.Errorf("%s: not in the document: %v", name, err)
			continue
		}
		seen[c.method+" "+route.Path+" "+strconv.Itoa(resp.StatusCode)] = true
		in := &openapi3filter.RequestValidationInput{Request: req, PathParams: params, Route: route,
			Options: &openapi3filter.Options{AuthenticationFunc: openapi3filter.NoopAuthenticationFunc, MultiError: true}}
		if c.want < 400 && !strings.Contains(c.body, "Bad Name") && !strings.Contains(c.body, "userId") {
			// Requests the server accepted must be valid by the document too (a refused one, or
			// one with refused items, is often refused because it is not).
			req.Body = io.NopCloser(strings.NewReader(c.body))
			if err := openapi3filter.ValidateRequest(context.Background(), in); err != nil {
				t.Errorf("%s: request the server accepted is invalid by the document: %v", name, err)
			}
		}
		if err := validateResponse(in, route, resp, respBody); err != nil {
			t.Errorf("%s: %d response does not match the document: %v\nbody: %.400s", name, resp.StatusCode, err, respBody)
		}
	}
	// Every documented operation was driven at least once.
	var missing []string
	for path, item := range doc.Paths.Map() {
		for method := range item.Operations() {
			found := false
			for k := range seen {
				if strings.HasPrefix(k, method+" "+path+" ") {
					found = true
				}
			}
			if !found {
				missing = append(missing, method+" "+path)
			}
		}
	}
	sort.Strings(missing)
	if len(missing) > 0 {
		t.Errorf("operations never checked against a live response: %v", missing)
	}
}

func validateResponse(in *openapi3filter.RequestValidationInput, route *routers.Route, resp *http.Response, body []byte) error {
	return openapi3filter.ValidateResponse(context.Background(), &openapi3filter.ResponseValidationInput{
		RequestValidationInput: in,
		Status:                 resp.StatusCode,
		Header:                 resp.Header,
		Body:                   io.NopCloser(bytes.NewReader(body)),
		Options:                &openapi3filter.Options{MultiError: true, IncludeResponseStatus: true},
	})
}
