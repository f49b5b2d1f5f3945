package main

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/analyticsd/analyticsd/auth"
	"github.com/analyticsd/analyticsd/internal/testenv"
	"github.com/analyticsd/analyticsd/internal/testenv/fixture"
)

// serveInProcess runs `analyticsd serve` inside the test and returns its base URL.
func serveInProcess(t *testing.T, getenv func(string) string) string {
	t.Helper()
	return serveLogging(t, getenv, &syncBuffer{})
}

// syncBuffer is a bytes.Buffer safe for the server's logger and the test to share.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}
func (s *syncBuffer) String() string { s.mu.Lock(); defer s.mu.Unlock(); return s.b.String() }

// serveLogging is serveInProcess with the server's log written to logs.
func serveLogging(t *testing.T, getenv func(string) string, logs io.Writer) string {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan int, 1)
	go func() { done <- run(ctx, []string{"serve"}, &bytes.Buffer{}, logs, getenv) }()
	t.Cleanup(func() { cancel(); <-done })
	base := "http://" + getenv("ANALYTICS_ADDR")
	waitHealthy(t, base, 15*time.Second)
	return base
}

// waitHealthy waits for a starting server to answer base/healthz; when it does not, the test's log
// gets detail (the server's stderr, say), read only then.
func waitHealthy(t *testing.T, base string, within time.Duration, detail ...func() string) {
	t.Helper()
	defer func() {
		if t.Failed() {
			for _, d := range detail {
				t.Log(d())
			}
		}
	}()
	testenv.Eventually(t, within, func() error {
		resp, err := http.Get(base + "/healthz")
		if err != nil {
			return fmt.Errorf("serve did not start: %v", err)
		}
		resp.Body.Close()
		return nil
	})
}

// do sends method url with key (none when empty) and hdr, and returns the response, its body closed.
func do(t *testing.T, method, url, key string, hdr map[string]string) *http.Response {
	t.Helper()
	resp := fixture.At(t, url).Open(t, fixture.Request{Method: method, Key: key, Header: hdr})
	resp.Body.Close()
	return resp
}

func TestRateLimitAndCORS(t *testing.T) {
	e := testenv.Migrated(t)
	ctx := context.Background()
	tn := fixture.Tenant(t, e.PG, "acme")
	key, _ := fixture.Key(t, e.PG, tn.ID, "r", auth.ScopeAnalyticsRead)
	base := serveInProcess(t, stackEnv(t, e, map[string]string{
		"ANALYTICS_ADDR": freeAddr(t), "ANALYTICS_SPOOL_DIR": t.TempDir(), "INGEST_FLUSH_INTERVAL": "50ms",
		"RATE_LIMIT_RPS": "1", "RATE_LIMIT_BURST": "3", "CORS_ALLOWED_ORIGINS": "https://app.example.com",
	}))
	var codes []int
	var last *http.Response
	for i := 0; i < 5; i++ {
		last = do(t, http.MethodGet, base+"/api/analytics/events", key, nil)
		codes = append(codes, last.StatusCode)
		if i == 0 && (last.Header.Get("X-RateLimit-Limit") != "3" || last.Header.Get("X-RateLimit-Remaining") != "2") {
			t.Errorf("first request headers: limit %q remaining %q, want 3 and 2", last.Header.Get("X-RateLimit-Limit"), last.Header.Get("X-RateLimit-Remaining"))
		}
	}
	if got := fmt.Sprint(codes); got != "[200 200 200 429 429]" {
		t.Errorf("statuses %s, want 200,200,200,429,429 with a burst of 3", got)
	}
	if last.Header.Get("Retry-After") == "" || last.Header.Get("X-RateLimit-Remaining") != "0" {
		t.Errorf("429 headers: %v", last.Header)
	}
	// The refusal lands in the tenant's own stream as apikey.rate_limited.
	testenv.Eventually(t, 10*time.Second, func() error {
		var n uint64
		if err := e.CH.QueryRow(ctx, "SELECT count() FROM "+e.DB+".events WHERE tenant_id = ? AND event = 'apikey.rate_limited'", tn.ID).Scan(&n); err != nil {
			t.Fatal(err)
		}
		if n != 1 {
			return fmt.Errorf("%d apikey.rate_limited events, want 1 (once per credential per minute)", n)
		}
		return nil
	})

	pre := func(origin string) string {
		r := do(t, http.MethodOptions, base+"/api/analytics/events", "", map[string]string{"Origin": origin, "Access-Control-Request-Method": "GET"})
		return r.Header.Get("Access-Control-Allow-Origin")
	}
	if got := pre("https://app.example.com"); got != "https://app.example.com" {
		t.Errorf("allowed origin: Access-Control-Allow-Origin %q", got)
	}
	if got := pre("https://evil.example"); got != "" {
		t.Errorf("other origin: Access-Control-Allow-Origin %q, want none", got)
	}
	// A browser app may read the headers that carry meaning: an export's truncation and next page
	// among them (they were not exposed, so a cross-origin app could not tell a capped export).
	r := do(t, http.MethodGet, base+"/api/analytics/events", key, map[string]string{"Origin": "https://app.example.com"})
	exposed := r.Header.Get("Access-Control-Expose-Headers")
	for _, h := range []string{"Retry-After", "X-Export-Row-Limit", "X-Export-Truncated", "X-Export-Next-Cursor", "Link", "X-Event-Names-Truncated", "Content-Disposition"} {
		if !strings.Contains(","+exposed+",", ","+h+",") {
			t.Errorf("Access-Control-Expose-Headers %q lacks %s", exposed, h)
		}
	}
}

func TestCORSClosedByDefault(t *testing.T) {
	e := testenv.Migrated(t)
	base := serveInProcess(t, stackEnv(t, e, map[string]string{"ANALYTICS_ADDR": freeAddr(t), "ANALYTICS_SPOOL_DIR": t.TempDir()}))
	r := do(t, http.MethodOptions, base+"/api/analytics/events", "", map[string]string{"Origin": "https://app.example.com", "Access-Control-Request-Method": "GET"})
	if got := r.Header.Get("Access-Control-Allow-Origin"); got != "" {
		t.Errorf("Access-Control-Allow-Origin %q without CORS_ALLOWED_ORIGINS, want none", got)
	}
}

// A revoked key is refused within seconds by every running instance.
func TestRevokedKeyRefusedEverywhere(t *testing.T) {
	e := testenv.Migrated(t)
	ctx := context.Background()
	tn := fixture.Tenant(t, e.PG, "acme")
	keys := auth.NewKeys(e.PG)
	key, rec := fixture.Key(t, e.PG, tn.ID, "r", auth.ScopeAnalyticsRead)
	var bases []string
	for i := 0; i < 2; i++ {
		bases = append(bases, serveInProcess(t, stackEnv(t, e, map[string]string{"ANALYTICS_ADDR": freeAddr(t), "ANALYTICS_SPOOL_DIR": t.TempDir()})))
	}
	for _, b := range bases {
		if r := do(t, http.MethodGet, b+"/api/analytics/events", key, nil); r.StatusCode != 200 {
			t.Fatalf("before revoke: %d", r.StatusCode)
		}
	}
	if _, err := keys.Revoke(ctx, tn.ID, rec.Prefix); err != nil {
		t.Fatal(err)
	}
	revoked := time.Now()
	for _, b := range bases { // within 7 s of the revocation, whichever instance is asked first
		testenv.Eventually(t, 7*time.Second-time.Since(revoked), func() error {
			if r := do(t, http.MethodGet, b+"/api/analytics/events", key, nil); r.StatusCode != 401 {
				return fmt.Errorf("%s still accepts the revoked key after %s", b, time.Since(revoked))
			}
			return nil
		})
	}
	t.Logf("revoked key refused by both instances %s after revocation", time.Since(revoked).Round(100*time.Millisecond))
}

// Secrets never reach the log: keys, tokens, the JWT secret and the webhook secret, even at debug
// level and on failures.
func TestSecretsNeverLogged(t *testing.T) {
	e := testenv.Migrated(t)
	tn := fixture.Tenant(t, e.PG, "acme")
	key, _ := fixture.Key(t, e.PG, tn.ID, "r", auth.AllScopes...)
	jwtSecret, hookSecret := "jwt-secret-0123456789abcdef-0123456789", "hook-secret-abcdef"
	logs := &syncBuffer{}
	base := serveLogging(t, stackEnv(t, e, map[string]string{"ANALYTICS_ADDR": freeAddr(t), "ANALYTICS_SPOOL_DIR": t.TempDir(),
		"LOG_LEVEL": "debug", "AUTH_JWT_SECRET": jwtSecret, "QUOTA_ALERT_WEBHOOK_URL": "http://127.0.0.1:1/hook",
		"QUOTA_ALERT_WEBHOOK_SECRET": hookSecret, "QUOTA_DEFAULTS": `{"builds_daily":1}`, "ANALYTICS_SHUTDOWN_TIMEOUT": "2s"}), logs)
	bad := key[:len(key)-3] + "zzz"
	for _, tok := range []string{key, bad, "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ4In0.bad-signature"} {
		do(t, http.MethodGet, base+"/api/analytics/events", tok, nil)
		do(t, http.MethodPost, base+"/api/analytics/quotas/builds_daily/consume", tok, nil) // crosses 100%: alert + webhook failure
	}
	// A window, not a poll: the alert's webhook fails in the background and is logged (at debug
	// level, with whatever it would leak) within it; there is no "done" to wait for.
	time.Sleep(300 * time.Millisecond)
	out := logs.String()
	if !strings.Contains(out, "serving") {
		t.Fatalf("no log captured: %q", out)
	}
	for name, secret := range map[string]string{"API key": key, "API key secret part": key[16:], "tampered key": bad[16:],
		"JWT secret": jwtSecret, "webhook secret": hookSecret, "JWT": "bad-signature"} {
		if strings.Contains(out, secret) {
			t.Errorf("the log contains the %s", name)
		}
	}
}

// Replays of an idempotent consume, and consumes the Idempotency-Key middleware answers with an error,
// spend rate-limit tokens like any request: the consume route defers its token to its Redis script,
// which a replay never reaches.
func TestIdempotentConsumeReplaysAreRateLimited(t *testing.T) {
	e := testenv.Migrated(t)
	tn := fixture.Tenant(t, e.PG, "acme")
	key, _ := fixture.Key(t, e.PG, tn.ID, "w", auth.ScopeEventsWrite)
	base := serveInProcess(t, stackEnv(t, e, map[string]string{
		"ANALYTICS_ADDR": freeAddr(t), "ANALYTICS_SPOOL_DIR": t.TempDir(), "RATE_LIMIT_RPS": "1", "RATE_LIMIT_BURST": "3",
	}))
	var codes []int
	for i := 0; i < 5; i++ {
		codes = append(codes, do(t, http.MethodPost, base+"/api/analytics/quotas/builds_daily/consume", key, map[string]string{"Idempotency-Key": "k"}).StatusCode)
	}
	if got := fmt.Sprint(codes); got != "[200 200 200 429 429]" {
		t.Errorf("statuses %s, want 200,200,200,429,429 with a burst of 3 (one consume, two replays)", got)
	}
}
