package api

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"reflect"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/gofiber/fiber/v2"
)

// Strings a handler reads from the request must stay what they were after the handler returns: a
// metric name kept in a queued usage increment, an alert or a metric label outlives the request,
// and by default fiber hands out views into a buffer the next request overwrites (a consume once
// booked its spend under "amesooks_daily"). NewApp makes every such read a copy, so no handler has
// to remember to.
func TestRequestStringsOutliveTheRequest(t *testing.T) {
	app := NewApp(Config{}, nil)
	type kept struct{ param, query, header, cookie, body string }
	var got []kept
	var bodies [][]byte
	app.Post("/q/:metric", func(c *fiber.Ctx) error {
		got = append(got, kept{c.Params("metric"), c.Query("n"), c.Get("X-Key"), c.Cookies("k"), string(c.Body())})
		bodies = append(bodies, c.Body())
		return c.SendStatus(http.StatusNoContent)
	})
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go app.Listener(ln)
	t.Cleanup(func() { app.Shutdown() })
	client := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 1}}
	send := func(metric, n, key, body string) {
		req, _ := http.NewRequest(http.MethodPost, "http://"+ln.Addr().String()+"/q/"+metric+"?n="+n, bytes.NewReader([]byte(body)))
		req.Header.Set("X-Key", key)
		req.Header.Set("Cookie", "k="+key)
		resp, err := client.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
	}
	// The same keep-alive connection, so the second request lands in the first one's buffers.
	send("webhooks_daily", "1234", "first-key", `{"a":"first body"}`)
	send("zzzzzzzzzzzzzz", "9999", "other-key", `{"b":"other body"}`)
	want := kept{"webhooks_daily", "1234", "first-key", "first-key", `{"a":"first body"}`}
	if len(got) != 2 || got[0] != want || string(bodies[0]) != want.body {
		t.Fatalf("after the next request the first one's strings read %+v (body %q), want %+v", got[0], bodies[0], want)
	}
}

// ErrorHandler renders an *Error (also wrapped) with its status, code, details and headers, a
// fiber error with the code for its status, and anything else as a 500 that gives nothing away.
func TestErrorHandler(t *testing.T) {
	app := NewApp(Config{}, nil)
	app.Post("/err", func(c *fiber.Ctx) error {
		switch c.Query("kind") {
		case "api":
			return &Error{Status: http.StatusTooManyRequests, Code: "quota_exceeded", Message: "slow down",
				Details: map[string]int{"limit": 1}, Header: map[string]string{fiber.HeaderRetryAfter: "7"}, Cause: io.EOF}
		case "wrapped":
			return fmt.Errorf("consume: %w", &Error{Status: http.StatusNotFound, Code: "unknown_quota", Message: "no such quota"})
		case "fiber":
			return fiber.NewError(http.StatusUnsupportedMediaType, "not this type")
		}
		return io.ErrUnexpectedEOF
	})
	check := func(method, path string, status int, retryAfter, want string) {
		t.Helper()
		res, err := app.Test(httptest.NewRequest(method, path, nil), -1)
		if err != nil {
			t.Fatal(err)
		}
		raw, _ := io.ReadAll(res.Body)
		res.Body.Close()
		if res.StatusCode != status || res.Header.Get(fiber.HeaderRetryAfter) != retryAfter || string(raw) != want {
			t.Errorf("%s %s: got %d, Retry-After %q, %s; want %d, Retry-After %q, %s", method, path, res.StatusCode, res.Header.Get(fiber.HeaderRetryAfter), raw, status, retryAfter, want)
		}
	}
	check("POST", "/err?kind=api", 429, "7", `{"error":{"code":"quota_exceeded","message":"slow down","details":{"limit":1}},"success":false}`)
	check("POST", "/err?kind=wrapped", 404, "", `{"error":{"code":"unknown_quota","message":"no such quota"},"success":false}`)
	check("POST", "/err?kind=fiber", 415, "", `{"error":{"code":"unsupported_media_type","message":"not this type"},"success":false}`)
	check("POST", "/err", 500, "", `{"error":{"code":"internal","message":"internal error; it has been logged"},"success":false}`)
	check("GET", "/nope", 404, "", `{"error":{"code":"not_found","message":"Cannot GET /nope"},"success":false}`)
}

// Each kind of refusal has its status, its code and, when asked for, its Retry-After; the cause is
// kept for the log and never shown.
func TestErrorKinds(t *testing.T) {
	cause := errors.New("dial tcp: connection refused")
	check := func(e *Error, status int, code, retryAfter string) {
		t.Helper()
		if e.Status != status || e.Code != code || e.Header[fiber.HeaderRetryAfter] != retryAfter || e.Message != "msg" {
			t.Errorf("got %d %s %q Retry-After %q, want %d %s \"msg\" Retry-After %q", e.Status, e.Code, e.Message, e.Header[fiber.HeaderRetryAfter], status, code, retryAfter)
		}
	}
	check(BadRequest("invalid_parameter", "msg"), 400, "invalid_parameter", "")
	check(Unauthorized("msg"), 401, "unauthorized", "")
	check(Forbidden("tenant_disabled", "msg"), 403, "tenant_disabled", "")
	check(NotFound("unknown_quota", "msg"), 404, "unknown_quota", "")
	check(Conflict("idempotency_key_in_use", "msg", 1), 409, "idempotency_key_in_use", "1")
	check(TooLarge("msg"), 413, "payload_too_large", "")
	check(Unsupported("msg"), 415, "unsupported_media_type", "")
	check(Unprocessable("idempotency_key_reused", "msg"), 422, "idempotency_key_reused", "")
	check(TooMany("rate_limited", "msg", 30), 429, "rate_limited", "30")
	check(Unavailable("quota_unavailable", "msg", 0, nil), 503, "quota_unavailable", "")
	u := Unavailable("storage_unavailable", "msg", 5, cause)
	check(u, 503, "storage_unavailable", "5")
	if !errors.Is(u, cause) || u.Error() != "msg" {
		t.Errorf("Unavailable's cause: errors.Is %v, Error() %q; want the cause kept and only the message shown", errors.Is(u, cause), u.Error())
	}
	if d := BadRequest("invalid_events", "msg").WithDetails([]int{1}); !reflect.DeepEqual(d.Details, []int{1}) {
		t.Errorf("WithDetails: got %v", d.Details)
	}
}

// The API's answers carry a tenant's data and strings its clients wrote: none is sniffed into another
// type, cached, rendered as a page or framed — an error or a 404 no more than a success. Before, only
// the dashboard's pages set these headers (found by review).
func TestAPIAnswersAreNotSniffedCachedOrFramed(t *testing.T) {
	app := NewApp(Config{}, nil)
	app.Get("/api/analytics/events", func(c *fiber.Ctx) error { return OK(c, map[string]string{"user_id": "<b>x</b>"}) })
	app.Post("/v1/t", func(c *fiber.Ctx) error { return BadRequest("invalid", "no") })
	app.Get("/dashboard", func(c *fiber.Ctx) error {
		c.Set(fiber.HeaderCacheControl, "no-cache")
		return c.SendString("page")
	})
	for _, tc := range []struct {
		method, path string
		api          bool
	}{{"GET", "/api/analytics/events", true}, {"POST", "/v1/t", true}, {"GET", "/api/nope", true}, {"GET", "/dashboard", false},
		// Routing ignores case: these reach the same handlers and must carry the same headers.
		{"GET", "/API/analytics/events", true}, {"GET", "/Api/Analytics/Events", true}, {"POST", "/V1/t", true}} {
		res, err := app.Test(httptest.NewRequest(tc.method, tc.path, nil), -1)
		if err != nil {
			t.Fatal(err)
		}
		res.Body.Close()
		h := res.Header
		if h.Get(fiber.HeaderXContentTypeOptions) != "nosniff" {
			t.Errorf("%s %s: X-Content-Type-Options %q, want nosniff", tc.method, tc.path, h.Get(fiber.HeaderXContentTypeOptions))
		}
		if tc.api && (h.Get(fiber.HeaderCacheControl) != "no-store" || h.Get(fiber.HeaderContentSecurityPolicy) != "default-src 'none'; frame-ancestors 'none'") {
			t.Errorf("%s %s (%d): Cache-Control %q, CSP %q; want no-store and default-src 'none'", tc.method, tc.path, res.StatusCode,
				h.Get(fiber.HeaderCacheControl), h.Get(fiber.HeaderContentSecurityPolicy))
		}
		if !tc.api && (h.Get(fiber.HeaderCacheControl) != "no-cache" || h.Get(fiber.HeaderContentSecurityPolicy) != "") {
			t.Errorf("%s %s: Cache-Control %q, CSP %q; want the page's own", tc.method, tc.path, h.Get(fiber.HeaderCacheControl), h.Get(fiber.HeaderContentSecurityPolicy))
		}
	}
}

// The public /readiness is open to anyone: a client looping on it must not turn each request into a
// ping of every dependency. Callers at once share one check, and an answer serves for a second.
// Before, 50 requests were 50 rounds of pings (found by review).
func TestPublicReadinessDoesNotPingPerRequest(t *testing.T) {
	var pings atomic.Int32
	ops := Ops{Checks: []Check{{Name: "db", Ping: func(context.Context) error {
		pings.Add(1)
		time.Sleep(20 * time.Millisecond)
		return nil
	}}}}
	app := NewApp(Config{}, nil)
	ops.Register(app)
	var wg sync.WaitGroup
	for range 50 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			res, err := app.Test(httptest.NewRequest("GET", "/readiness", nil), -1)
			if err != nil {
				t.Error(err)
				return
			}
			res.Body.Close()
			if res.StatusCode != 200 {
				t.Errorf("readiness: %d, want 200", res.StatusCode)
			}
		}()
	}
	wg.Wait()
	if n := pings.Load(); n > 2 {
		t.Errorf("50 public readiness requests within a second pinged %d times, want at most 2", n)
	}
	// The detailed readiness on the operator listener is always fresh.
	before := pings.Load()
	for range 3 {
		rec := httptest.NewRecorder()
		ops.Private().ServeHTTP(rec, httptest.NewRequest("GET", "/readiness", nil))
	}
	if n := pings.Load() - before; n != 3 {
		t.Errorf("3 operator readiness requests pinged %d times, want 3", n)
	}
}
