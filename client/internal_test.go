package client

import (
	"context"
	"errors"
	"net"
	"net/http"
	"net/http/httptest"
	"regexp"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

func TestBackoffDoublesWithinJitterUpToTheCap(t *testing.T) {
	lo, hi := 100*time.Millisecond, 2*time.Second
	check := func(attempt int, base time.Duration) {
		t.Helper()
		for range 200 {
			if d := backoff(attempt, lo, hi); d < base/2 || d > base {
				t.Fatalf("backoff(%d): got %s, want between %s and %s", attempt, d, base/2, base)
			}
		}
	}
	check(1, 100*time.Millisecond)
	check(2, 200*time.Millisecond)
	check(4, 800*time.Millisecond)
	check(5, 1600*time.Millisecond)
	check(6, 2*time.Second)
	check(100, 2*time.Second)
	// Jitter: 200 draws are not all the same.
	seen := map[time.Duration]bool{}
	for range 200 {
		seen[backoff(3, lo, hi)] = true
	}
	if len(seen) < 10 {
		t.Errorf("backoff(3) took %d distinct values in 200 draws, want jitter", len(seen))
	}
}

func TestRetryAfter(t *testing.T) {
	now := time.Date(2026, 11, 30, 12, 0, 0, 0, time.UTC)
	check := func(in string, want time.Duration) {
		t.Helper()
		if got := retryAfter(in, now); got != want {
			t.Errorf("retryAfter(%q): got %s, want %s", in, got, want)
		}
	}
	check("", 0)
	check("3", 3*time.Second)
	check(" 120 ", 2*time.Minute)
	check("-1", 0)
	check("soon", 0)
	check("Mon, 30 Nov 2026 12:00:30 GMT", 30*time.Second)
	check("Mon, 30 Nov 2026 11:00:00 GMT", 0)
	check("99999999", 24*time.Hour)
}

func TestRetryable(t *testing.T) {
	check := func(status int, code string, want bool) {
		t.Helper()
		if got := retryable(&APIError{StatusCode: status, Code: code}); got != want {
			t.Errorf("retryable(%d %s): got %v, want %v", status, code, got, want)
		}
	}
	check(429, "rate_limited", true)
	check(429, "quota_exceeded", false)
	check(503, "ingest_unavailable", true)
	check(502, "", true)
	check(500, "", true)
	check(408, "", true)
	check(409, "idempotency_key_in_use", true)
	check(400, "invalid_events", false)
	check(401, "", false)
	check(403, "tenant_disabled", false)
	check(404, "unknown_quota", false)
	check(409, "", false)
	check(413, "", false)
	check(422, "idempotency_key_reused", false)
}

func TestIDs(t *testing.T) {
	v4 := regexp.MustCompile(`^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$`)
	seen := map[string]bool{}
	for range 1000 {
		id := NewID()
		if !v4.MatchString(id) || seen[id] {
			t.Fatalf("NewID: got %q (seen before: %v), want a fresh UUIDv4", id, seen[id])
		}
		seen[id] = true
	}
	check := func(in, want string, ok bool) {
		t.Helper()
		got, err := canonicalUUID(in)
		if (err == nil) != ok || got != want {
			t.Errorf("canonicalUUID(%q): got %q, %v; want %q, ok %v", in, got, err, want, ok)
		}
	}
	check("6F1C2D3E-4A5B-4C6D-8E7F-A0B1C2D3E4F5", "6f1c2d3e-4a5b-4c6d-8e7f-a0b1c2d3e4f5", true)
	check("6f1c2d3e4a5b4c6d8e7fa0b1c2d3e4f5", "", false)
	check("6f1c2d3e-4a5b-4c6d-8e7f-a0b1c2d3e4fg", "", false)
	check("00000000-0000-0000-0000-000000000000", "", false)
}

func TestTrackRefusesWhatItCannotSend(t *testing.T) {
	c, err := New(Config{Endpoint: "http://127.0.0.1:1", APIKey: "k"})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close(context.Background())
	for _, e := range []Event{{}, {Event: "a.b", ID: "x"}, {Event: "a.b", Props: map[string]any{"f": func() {}}}} {
		if err := c.Track(e); err == nil {
			t.Errorf("Track(%+v): got nil, want an error", e)
		}
	}
	if st := c.Stats(); st.Tracked != 0 {
		t.Errorf("stats %+v: nothing should be taken", st)
	}
}

func TestNewListsEveryProblem(t *testing.T) {
	_, err := New(Config{Endpoint: "localhost:8080", BatchSize: 20000, QueueSize: -1})
	if err == nil {
		t.Fatal("New accepted a bad config")
	}
	for _, want := range []string{"Endpoint", "APIKey", "BatchSize", "QueueSize"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("New: %v; want it to name %s", err, want)
		}
	}
}

// Close with a deadline while nothing answers: every event taken is handed to OnFailure and Close
// says so; none is lost silently.
func TestCloseDeadlineHandsOverWhatWasNotDelivered(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	// Accepts connections and never answers.
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { <-r.Context().Done() })}
	go srv.Serve(l)
	defer srv.Close()
	var failed []Event
	c, err := New(Config{Endpoint: "http://" + l.Addr().String(), APIKey: "k", FlushInterval: time.Millisecond,
		BatchSize: 2, MaxAttempts: -1, OnFailure: func(f Failure) { failed = append(failed, f.Events...) }})
	if err != nil {
		t.Fatal(err)
	}
	for range 5 {
		if err := c.Track(Event{Event: "a.b"}); err != nil {
			t.Fatal(err)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	err = c.Close(ctx)
	if !errors.Is(err, ErrUndelivered) || !errors.Is(err, context.DeadlineExceeded) || !strings.Contains(err.Error(), "5 events") {
		t.Fatalf("Close: got %v, want ErrUndelivered for 5 events and the deadline", err)
	}
	if st := c.Stats(); len(failed) != 5 || st.FailedEvents != 5 || st.Sent != 0 {
		t.Errorf("OnFailure got %d events, stats %+v; want all 5 failed", len(failed), st)
	}
	if err := c.Track(Event{Event: "a.b"}); !errors.Is(err, ErrClosed) {
		t.Errorf("Track after Close: got %v, want ErrClosed", err)
	}
	select {
	case <-c.done:
	default:
		t.Error("the sending goroutine still runs after Close returned")
	}
}

// A Retry-After far beyond what the client waits for (a maintenance page's 503 Retry-After: 3600)
// waits maxRetryAfter, so MaxAttempts still ends the batch. Before, each retry waited the hour: a
// Flush with MaxAttempts 2 never saw the event delivered or given up on.
func TestRetryAfterIsBoundedByMaxRetryAfter(t *testing.T) {
	var calls atomic.Int32
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		calls.Add(1)
		w.Header().Set("Retry-After", "3600")
		w.WriteHeader(http.StatusServiceUnavailable)
	}))
	defer srv.Close()
	c, err := New(Config{Endpoint: srv.URL, APIKey: "k", FlushInterval: time.Millisecond, MaxAttempts: 2, MaxBackoff: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close(context.Background())
	if c.maxRetryAfter != time.Minute {
		t.Fatalf("maxRetryAfter %s with MaxBackoff 1s, want one minute", c.maxRetryAfter)
	}
	c.maxRetryAfter = 500 * time.Millisecond // the test's minute
	if err := c.Track(Event{Event: "a.b"}); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	start := time.Now()
	err = c.Flush(ctx)
	if !errors.Is(err, ErrUndelivered) {
		t.Fatalf("Flush: %v — want the event given up on after 2 attempts", err)
	}
	if d := time.Since(start); d < 500*time.Millisecond || calls.Load() != 2 {
		t.Errorf("given up after %s and %d attempts, want 2 attempts at least maxRetryAfter apart", d, calls.Load())
	}
}
