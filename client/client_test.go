package client_test

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/analyticsd/analyticsd/client"
)

// recorder collects what a client reports through its hooks.
type recorder struct {
	sent, retried, dropped, failedBatches, failedEvents atomic.Int64

	mu       sync.Mutex
	failures []client.Failure
	logs     []string
}

func (r *recorder) EventsSent(n int)       { r.sent.Add(int64(n)) }
func (r *recorder) BatchRetried(int)       { r.retried.Add(1) }
func (r *recorder) EventsDropped(n int)    { r.dropped.Add(int64(n)) }
func (r *recorder) BatchFailed(events int) { r.failedBatches.Add(1); r.failedEvents.Add(int64(events)) }
func (r *recorder) onFailure(f client.Failure) {
	r.mu.Lock()
	r.failures = append(r.failures, f)
	r.mu.Unlock()
}

func (r *recorder) Failures() []client.Failure {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]client.Failure(nil), r.failures...)
}

// Logs returns the client's log records, one line each.
func (r *recorder) Logs() string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return strings.Join(r.logs, "\n")
}

func (r *recorder) Write(p []byte) (int, error) {
	r.mu.Lock()
	r.logs = append(r.logs, strings.TrimSpace(string(p)))
	r.mu.Unlock()
	return len(p), nil
}

// newClient makes a client for endpoint with the recorder's hooks, closed when t ends.
func newClient(t *testing.T, endpoint, key string, rec *recorder, cfg client.Config) *client.Client {
	t.Helper()
	cfg.Endpoint, cfg.APIKey = endpoint, key
	cfg.Metrics, cfg.OnFailure = rec, rec.onFailure
	cfg.Logger = slog.New(slog.NewTextHandler(rec, &slog.HandlerOptions{Level: slog.LevelDebug}))
	c, err := client.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		_ = c.Close(ctx)
	})
	return c
}

// track tracks one event with an id chosen here, so the test knows it.
func track(t *testing.T, c *client.Client, name string) string {
	t.Helper()
	id := client.NewID()
	if err := c.Track(client.Event{ID: id, Event: name, Source: "app"}); err != nil {
		t.Fatalf("Track: %v", err)
	}
	return id
}

func trackIDs(t *testing.T, c *client.Client, name string, n int) []string {
	t.Helper()
	ids := make([]string, n)
	for i := range ids {
		ids[i] = track(t, c, name)
	}
	return ids
}

func closeClient(t *testing.T, c *client.Client, within time.Duration) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), within)
	defer cancel()
	if err := c.Close(ctx); err != nil {
		t.Fatalf("Close: %v", err)
	}
}

func checkStats(t *testing.T, c *client.Client, sent uint64) client.Stats {
	t.Helper()
	st := c.Stats()
	if st.Sent != sent || st.FailedEvents != 0 || st.Dropped != 0 {
		t.Errorf("stats %+v: got sent %d, failed %d, dropped %d; want sent %d, none failed or dropped", st, st.Sent, st.FailedEvents, st.Dropped, sent)
	}
	return st
}

// Events are batched by size, gzipped, sent once each with a fresh Idempotency-Key per batch, and
// stored exactly once: seen through the API and counted in ClickHouse.
func TestTrackBatchesBySizeAndStoresEachEventOnce(t *testing.T) {
	t.Parallel()
	ten := newTenant(t)
	sv := startServer(t)
	px := newProxy(t, sv.url, nil)
	rec := &recorder{}
	c := newClient(t, px.srv.URL, ten.key, rec, client.Config{BatchSize: 100, FlushInterval: time.Hour})

	ids := trackIDs(t, c, "goclient.size", 1000)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := c.Flush(ctx); err != nil {
		t.Fatalf("Flush: %v", err)
	}
	reqs := px.requests()
	keys := map[string]bool{}
	for i, r := range reqs {
		if r.events != 100 || r.encoding != "gzip" || r.key == "" || r.status != http.StatusAccepted {
			t.Errorf("request %d: %d events, Content-Encoding %q, Idempotency-Key %q, status %d; want 100, gzip, a key, 202", i, r.events, r.encoding, r.key, r.status)
		}
		keys[r.key] = true
	}
	if len(reqs) != 10 || len(keys) != 10 {
		t.Errorf("got %d requests with %d distinct keys, want 10 and 10 (1000 events in batches of 100)", len(reqs), len(keys))
	}
	checkStats(t, c, 1000)
	if rec.sent.Load() != 1000 || rec.failedBatches.Load() != 0 {
		t.Errorf("metrics hook: got sent %d, failed batches %d; want 1000 and 0", rec.sent.Load(), rec.failedBatches.Load())
	}

	// Through the API: every id listed once (the server ships its spool every 200 ms).
	var listed map[string]int
	eventually(t, 20*time.Second, func() bool {
		listed = apiEvents(t, sv, ten.key, "goclient.size")
		return len(listed) >= len(ids)
	}, func() string {
		return fmt.Sprintf("GET /api/analytics/events lists %d of %d events", len(listed), len(ids))
	})
	for _, id := range ids {
		if listed[id] != 1 {
			t.Fatalf("GET /api/analytics/events lists %s %d times, want once", id, listed[id])
		}
	}
	closeClient(t, c, 10*time.Second)
	sv.stop()
	checkExactlyOnce(t, ten, "goclient.size", ids)
}

// A batch that does not fill is sent after FlushInterval, without Flush.
func TestTrackBatchesByInterval(t *testing.T) {
	t.Parallel()
	ten := newTenant(t)
	sv := startServer(t)
	px := newProxy(t, sv.url, nil)
	c := newClient(t, px.srv.URL, ten.key, &recorder{}, client.Config{BatchSize: 1000, FlushInterval: 300 * time.Millisecond})

	start := time.Now()
	ids := trackIDs(t, c, "goclient.interval", 3)
	eventually(t, 5*time.Second, func() bool { return c.Stats().Sent == 3 },
		func() string { return fmt.Sprintf("stats %+v: want 3 sent by the interval", c.Stats()) })
	reqs := px.requests()
	if len(reqs) != 1 || reqs[0].events != 3 {
		t.Fatalf("requests %+v: want one with 3 events", reqs)
	}
	if waited := reqs[0].received.Sub(start); waited < 300*time.Millisecond {
		t.Errorf("batch sent %s after the first Track, want after the 300ms FlushInterval", waited)
	}
	closeClient(t, c, 10*time.Second)
	sv.stop()
	checkExactlyOnce(t, ten, "goclient.interval", ids)
}

// The server is killed (SIGKILL) and started again while events are being tracked: the client
// retries through the outage and every event is stored exactly once.
func TestServerRestartMidStream(t *testing.T) {
	t.Parallel()
	ten := newTenant(t)
	sv := startServer(t)
	rec := &recorder{}
	c := newClient(t, sv.url, ten.key, rec, client.Config{BatchSize: 50, FlushInterval: 20 * time.Millisecond,
		Timeout: 2 * time.Second, MinBackoff: 50 * time.Millisecond, MaxBackoff: 500 * time.Millisecond, MaxAttempts: -1})

	const chunks, per = 60, 50
	var ids []string
	restarted := make(chan error, 1)
	for i := range chunks {
		ids = append(ids, trackIDs(t, c, "goclient.restart", per)...)
		if i == chunks/3 {
			sv.kill()
			go func() {
				time.Sleep(300 * time.Millisecond)
				restarted <- sv.start()
			}()
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err := <-restarted; err != nil {
		t.Fatal(err)
	}
	// A batch the killed server was in the middle of keeps its Idempotency-Key "in use" (409) until
	// the killed process's liveness mark expires (8 s; before it, the server's PendingTTL: 1 min, which
	// this deadline would not outlast).
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := c.Close(ctx); err != nil {
		var kept []string
		for _, l := range strings.Split(rec.Logs(), "\n") {
			if !strings.Contains(l, "given up on") {
				kept = append(kept, l)
			}
		}
		logs := strings.Join(kept, "\n")
		t.Fatalf("Close: %v\nclient log (last 3000 bytes):\n%s\nserver log:\n%s", err, logs[max(0, len(logs)-3000):], sv.log.String())
	}
	st := checkStats(t, c, chunks*per)
	if strings.Contains(rec.Logs(), "idempotency_key_in_use") {
		t.Logf("a batch in flight when the server was killed waited for its holder's liveness mark to expire")
	}
	if st.Retried == 0 {
		t.Errorf("no attempt was retried: the restart did not interrupt the stream (stats %+v)", st)
	}
	sv.stop()
	checkExactlyOnce(t, ten, "goclient.restart", ids)
}

// The server stores a batch and is killed (SIGKILL) before its answer reaches the client: the client
// retries through the outage (502s from the proxy, as from a load balancer) with the same key and
// bytes, the restarted server recognises the batch, and nothing is stored twice.
func TestServerKilledBetweenStoringAndAnswering(t *testing.T) {
	t.Parallel()
	ten := newTenant(t)
	sv := startServer(t)
	restarted := make(chan error, 1)
	px := newProxy(t, sv.url, func(n int, _ *http.Request) fault {
		if n == 3 {
			return crashAfter
		}
		return pass
	})
	px.onCrash = func() {
		sv.kill()
		go func() {
			time.Sleep(500 * time.Millisecond)
			restarted <- sv.start()
		}()
	}
	rec := &recorder{}
	c := newClient(t, px.srv.URL, ten.key, rec, client.Config{BatchSize: 20, FlushInterval: 10 * time.Millisecond,
		MinBackoff: 50 * time.Millisecond, MaxBackoff: 500 * time.Millisecond, MaxAttempts: -1})

	ids := trackIDs(t, c, "goclient.crash", 200)
	closeClient(t, c, 60*time.Second)
	if err := <-restarted; err != nil {
		t.Fatal(err)
	}
	st := checkStats(t, c, 200)
	crashed := 0
	for key, tries := range px.byKey() {
		if tries[0].fault != crashAfter {
			continue
		}
		crashed++
		last := tries[len(tries)-1]
		if len(tries) < 2 || last.status != http.StatusAccepted || !last.replayed || last.bodySum != tries[0].bodySum {
			t.Errorf("key %s: %d attempts, last answered %d (replayed %v); want a retry with the same bytes that the restarted server answers from its record", key, len(tries), last.status, last.replayed)
		}
	}
	if crashed != 1 || st.Retried == 0 {
		t.Errorf("%d batches crossed the crash, %d retries; want 1 and some", crashed, st.Retried)
	}
	sv.stop()
	checkExactlyOnce(t, ten, "goclient.crash", ids)
}

// 503s with Retry-After before the server saw the request, answers lost after it stored the batch,
// and an attempt that timed out after the server took it: each batch is retried with the same key
// and bytes, never before the Retry-After, and every event is stored exactly once.
func TestRetriesAfter503AndLostAnswers(t *testing.T) {
	t.Parallel()
	ten := newTenant(t)
	sv := startServer(t)
	faults := map[int]fault{2: refuse, 4: loseAnswer, 6: hangAfter, 8: loseAnswer, 9: refuse}
	px := newProxy(t, sv.url, func(n int, r *http.Request) fault { return faults[n] })
	rec := &recorder{}
	c := newClient(t, px.srv.URL, ten.key, rec, client.Config{BatchSize: 20, FlushInterval: 10 * time.Millisecond,
		Timeout: time.Second, MinBackoff: 10 * time.Millisecond, MaxBackoff: 100 * time.Millisecond})

	var ids []string
	for range 10 {
		ids = append(ids, trackIDs(t, c, "goclient.faults", 20)...)
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		err := c.Flush(ctx)
		cancel()
		if err != nil {
			t.Fatalf("Flush: %v", err)
		}
	}
	closeClient(t, c, 30*time.Second)
	st := checkStats(t, c, 200)

	injected := 0
	for key, tries := range px.byKey() {
		for i, r := range tries {
			if r.bodySum != tries[0].bodySum || r.encoding != tries[0].encoding {
				t.Errorf("key %s: attempt %d sent other bytes than the first", key, i+1)
			}
			if r.fault == pass {
				continue
			}
			injected++
			if i == len(tries)-1 {
				t.Errorf("key %s: attempt %d got fault %d and was not retried", key, i+1, r.fault)
				continue
			}
			if r.fault != hangAfter {
				if gap := tries[i+1].received.Sub(r.sent); gap < injectedRetryAfter {
					t.Errorf("key %s: retried %s after a 503 with Retry-After: 1, want at least 1s", key, gap)
				}
			}
		}
		if last := tries[len(tries)-1]; last.status != http.StatusAccepted {
			t.Errorf("key %s: last attempt answered %d, want 202", key, last.status)
		}
	}
	if injected != len(faults) || st.Retried < uint64(len(faults)) {
		t.Errorf("%d faults seen by retried keys, %d retries; want %d of each at least", injected, st.Retried, len(faults))
	}
	if !strings.Contains(rec.Logs(), "retrying") {
		t.Errorf("no retry was logged; logs:\n%s", rec.Logs())
	}
	sv.stop()
	checkExactlyOnce(t, ten, "goclient.faults", ids)
}

// The server's own rate limit answers 429 with Retry-After: the client waits it out and delivers
// every event once.
func TestRateLimited429(t *testing.T) {
	t.Parallel()
	ten := newTenant(t)
	sv := startServer(t, "RATE_LIMIT_RPS=2", "RATE_LIMIT_BURST=2")
	px := newProxy(t, sv.url, nil)
	rec := &recorder{}
	c := newClient(t, px.srv.URL, ten.key, rec, client.Config{BatchSize: 10, FlushInterval: 10 * time.Millisecond,
		MinBackoff: 10 * time.Millisecond, MaxBackoff: 50 * time.Millisecond, MaxAttempts: -1})

	ids := trackIDs(t, c, "goclient.ratelimit", 80)
	closeClient(t, c, 60*time.Second)
	checkStats(t, c, 80)

	limited := 0
	for key, tries := range px.byKey() {
		for i, r := range tries[:len(tries)-1] {
			if r.status != http.StatusTooManyRequests {
				t.Errorf("key %s: attempt %d answered %d and was retried; only 429s were expected", key, i+1, r.status)
				continue
			}
			limited++
			wait := time.Duration(0)
			if _, err := fmt.Sscan(r.retryAfter, &wait); err == nil {
				wait *= time.Second
			}
			if r.retryAfter == "" {
				t.Errorf("key %s: the server's 429 has no Retry-After", key)
			} else if gap := tries[i+1].received.Sub(r.sent); gap < wait {
				t.Errorf("key %s: retried %s after a 429 with Retry-After: %s", key, gap, r.retryAfter)
			}
		}
	}
	if limited == 0 {
		t.Fatalf("the server never answered 429: the test did not exercise the rate limit")
	}
	if rec.retried.Load() != int64(limited) || !strings.Contains(rec.Logs(), "rate_limited") {
		t.Errorf("metrics hook saw %d retries for %d 429s; logs:\n%s", rec.retried.Load(), limited, rec.Logs())
	}
	sv.stop()
	checkExactlyOnce(t, ten, "goclient.ratelimit", ids)
}

// A full queue refuses the newest event with ErrQueueFull, counts and logs it, and keeps every event
// it took.
func TestQueueFullDropsNewestAndKeepsTheRest(t *testing.T) {
	t.Parallel()
	ten := newTenant(t)
	sv := startServer(t)
	px := newProxy(t, sv.url, func(n int, _ *http.Request) fault {
		if n == 1 {
			return holdUntilOK
		}
		return pass
	})
	rec := &recorder{}
	c := newClient(t, px.srv.URL, ten.key, rec, client.Config{QueueSize: 5, BatchSize: 1, FlushInterval: 10 * time.Millisecond})

	kept := []string{track(t, c, "goclient.overflow")}
	<-px.arrived // the sender is now blocked on the first batch
	kept = append(kept, trackIDs(t, c, "goclient.overflow", 5)...)
	for i := range 3 {
		if err := c.Track(client.Event{Event: "goclient.overflow"}); !errors.Is(err, client.ErrQueueFull) {
			t.Fatalf("Track %d into a full queue: got %v, want ErrQueueFull", i+1, err)
		}
	}
	if st := c.Stats(); st.Dropped != 3 || st.Queued != 5 || rec.dropped.Load() != 3 {
		t.Errorf("stats %+v, hook dropped %d: want 3 dropped, 5 queued", st, rec.dropped.Load())
	}
	if !strings.Contains(rec.Logs(), "queue full") {
		t.Errorf("the drop was not logged; logs:\n%s", rec.Logs())
	}
	close(px.gate)
	closeClient(t, c, 30*time.Second)
	if st := c.Stats(); st.Sent != 6 || st.FailedEvents != 0 {
		t.Errorf("stats %+v: want the 6 events taken sent, none failed", st)
	}
	sv.stop()
	checkExactlyOnce(t, ten, "goclient.overflow", kept)
}

// Answers that retrying cannot change are not retried: a bad key (401), an event the server rejects
// in a stored batch, a batch it rejects whole (400). Each is handed to OnFailure and counted.
func TestRefusalsAreSurfacedNotRetried(t *testing.T) {
	t.Parallel()
	ten := newTenant(t)
	sv := startServer(t)
	px := newProxy(t, sv.url, nil)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()

	t.Run("bad key", func(t *testing.T) {
		rec := &recorder{}
		c := newClient(t, px.srv.URL, "ak_000000000000_notakeynotakeynotakeynotakeynotakeynotakey0", rec, client.Config{})
		before := len(px.requests())
		ids := trackIDs(t, c, "goclient.refused", 2)
		if err := c.Flush(ctx); !errors.Is(err, client.ErrUndelivered) {
			t.Fatalf("Flush: got %v, want ErrUndelivered", err)
		}
		fs := rec.Failures()
		var apiErr *client.APIError
		if len(fs) != 1 || len(fs[0].Events) != 2 || fs[0].Events[0].ID != ids[0] || !errors.As(fs[0].Err, &apiErr) || apiErr.StatusCode != http.StatusUnauthorized {
			t.Fatalf("failures %+v: want one with both events and a 401 *APIError", fs)
		}
		if n := len(px.requests()) - before; n != 1 {
			t.Errorf("%d requests, want 1: a 401 is not retried", n)
		}
		if st := c.Stats(); st.Retried != 0 || st.FailedBatches != 1 || st.FailedEvents != 2 || rec.failedEvents.Load() != 2 {
			t.Errorf("stats %+v, hook failed events %d: want no retry, 1 failed batch of 2", st, rec.failedEvents.Load())
		}
	})

	t.Run("one event rejected", func(t *testing.T) {
		rec := &recorder{}
		c := newClient(t, px.srv.URL, ten.key, rec, client.Config{})
		good := track(t, c, "goclient.refused")
		if err := c.Track(client.Event{Event: "Signup Completed"}); err != nil {
			t.Fatal(err)
		}
		if err := c.Flush(ctx); !errors.Is(err, client.ErrUndelivered) || !strings.Contains(err.Error(), "1 events") {
			t.Fatalf("Flush: got %v, want ErrUndelivered for 1 event", err)
		}
		fs := rec.Failures()
		var rej *client.RejectedError
		if len(fs) != 1 || len(fs[0].Events) != 1 || fs[0].Events[0].Event != "Signup Completed" || !errors.As(fs[0].Err, &rej) || rej.Reason == "" {
			t.Fatalf("failures %+v: want the one rejected event with a *RejectedError", fs)
		}
		if st := c.Stats(); st.Sent != 1 || st.FailedEvents != 1 {
			t.Errorf("stats %+v: want 1 sent, 1 failed", st)
		}
		closeClient(t, c, 10*time.Second)
		eventually(t, 10*time.Second, func() bool { return apiEvents(t, sv, ten.key, "goclient.refused")[good] == 1 },
			func() string { return "the valid event of the batch is not listed once" })
	})

	t.Run("whole batch rejected", func(t *testing.T) {
		rec := &recorder{}
		c := newClient(t, px.srv.URL, ten.key, rec, client.Config{})
		before := len(px.requests())
		for range 2 {
			if err := c.Track(client.Event{Event: "no-dot"}); err != nil {
				t.Fatal(err)
			}
		}
		if err := c.Flush(ctx); !errors.Is(err, client.ErrUndelivered) {
			t.Fatalf("Flush: got %v, want ErrUndelivered", err)
		}
		// The 400 invalid_events's details give each event's reason: one Failure per event.
		fs := rec.Failures()
		if len(fs) != 2 {
			t.Fatalf("failures %+v: want one per rejected event", fs)
		}
		for _, f := range fs {
			var rej *client.RejectedError
			if len(f.Events) != 1 || f.Events[0].Event != "no-dot" || !errors.As(f.Err, &rej) || !strings.Contains(rej.Reason, "domain.action") {
				t.Fatalf("failure %+v: want one event with a *RejectedError naming the rule", f)
			}
		}
		if n := len(px.requests()) - before; n != 1 {
			t.Errorf("%d requests, want 1: a 400 is not retried", n)
		}
	})
}

// A server that takes fewer events per request than the client's batches answers 413; the client
// sends each refused batch again in halves until they fit, and stores everything once.
func TestBatchTooLargeIsSplit(t *testing.T) {
	t.Parallel()
	ten := newTenant(t)
	sv := startServer(t, "INGEST_MAX_EVENTS=30")
	px := newProxy(t, sv.url, nil)
	c := newClient(t, px.srv.URL, ten.key, &recorder{}, client.Config{BatchSize: 100, FlushInterval: time.Hour})
	ids := trackIDs(t, c, "goclient.split", 100)
	closeClient(t, c, 30*time.Second)
	checkStats(t, c, 100)
	tooLarge, stored := 0, 0
	for _, r := range px.requests() {
		switch r.status {
		case http.StatusRequestEntityTooLarge:
			tooLarge++
		case http.StatusAccepted:
			stored += r.events
			if r.events > 30 {
				t.Errorf("a batch of %d events was accepted by a server that takes 30", r.events)
			}
		default:
			t.Errorf("unexpected answer %d", r.status)
		}
	}
	// 100 → 50+50 → 25+25+25+25: three 413s, four batches stored.
	if tooLarge != 3 || stored != 100 {
		t.Errorf("%d answers 413, %d events in accepted batches; want 3 and 100", tooLarge, stored)
	}
	sv.stop()
	checkExactlyOnce(t, ten, "goclient.split", ids)
}

// Close sends what it took, then refuses: Track returns ErrClosed.
func TestCloseDrainsThenRefuses(t *testing.T) {
	t.Parallel()
	ten := newTenant(t)
	sv := startServer(t)
	c := newClient(t, sv.url, ten.key, &recorder{}, client.Config{FlushInterval: time.Hour})
	ids := trackIDs(t, c, "goclient.close", 1234)
	closeClient(t, c, 30*time.Second)
	checkStats(t, c, 1234)
	if err := c.Track(client.Event{Event: "goclient.close"}); !errors.Is(err, client.ErrClosed) {
		t.Errorf("Track after Close: got %v, want ErrClosed", err)
	}
	closeClient(t, c, time.Second) // again: nothing left to do
	sv.stop()
	checkExactlyOnce(t, ten, "goclient.close", ids)
}

// IncrementUsage, CheckQuota and Consume against the real server, with lost answers: a retried
// increment counts once and a retried consume spends once; a quota refusal is not retried.
func TestUsageQuotaAndConsume(t *testing.T) {
	t.Parallel()
	ten := newTenant(t)
	sv := startServer(t, `QUOTA_DEFAULTS={"builds_daily":3}`)
	// The first usage and the first consume lose their answers after the server acted on them.
	var usageSeen, consumeSeen atomic.Int32
	px := newProxy(t, sv.url, func(_ int, r *http.Request) fault {
		switch {
		case r.URL.Path == "/api/analytics/usage" && usageSeen.Add(1) == 1:
			return loseAnswer
		case strings.HasSuffix(r.URL.Path, "/consume") && consumeSeen.Add(1) == 1:
			return loseAnswer
		}
		return pass
	})
	c := newClient(t, px.srv.URL, ten.key, &recorder{}, client.Config{MinBackoff: 10 * time.Millisecond})
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()

	if err := c.IncrementUsage(ctx, "emails_daily", 5); err != nil {
		t.Fatalf("IncrementUsage: %v", err)
	}
	q, err := c.CheckQuota(ctx, "emails_daily")
	if err != nil || q.Current != 5 || q.Limit != 5000 || q.Exceeded {
		t.Fatalf("CheckQuota after one increment of 5 (its answer lost once): got %+v, %v; want current 5 of 5000", q, err)
	}
	if usageSeen.Load() != 2 {
		t.Errorf("usage requests: %d, want 2 (the lost answer retried once)", usageSeen.Load())
	}

	for i := 1; i <= 3; i++ {
		res, err := c.Consume(ctx, "builds_daily", 1)
		if err != nil || !res.Allowed || res.Current != float64(i) || res.Remaining != float64(3-i) {
			t.Fatalf("consume %d of 3: got %+v, %v; want allowed, current %d", i, res, err, i)
		}
	}
	before := consumeSeen.Load()
	res, err := c.Consume(ctx, "builds_daily", 1)
	var apiErr *client.APIError
	if !errors.Is(err, client.ErrQuotaExceeded) || !errors.As(err, &apiErr) || apiErr.RetryAfter <= 0 {
		t.Fatalf("consume beyond the limit: got %v, want ErrQuotaExceeded with a Retry-After", err)
	}
	if res.Allowed || res.Current != 3 || res.Limit != 3 {
		t.Errorf("refused consume: got %+v, want not allowed, current 3 of 3", res)
	}
	if n := consumeSeen.Load() - before; n != 1 {
		t.Errorf("refused consume sent %d times, want once: a quota refusal is not retried", n)
	}
	if q, err := c.CheckQuota(ctx, "builds_daily"); err != nil || q.Current != 3 || !q.Exceeded {
		t.Errorf("CheckQuota builds_daily: got %+v, %v; want current 3, exceeded", q, err)
	}
	if _, err := c.CheckQuota(ctx, "no_such_quota"); !errors.As(err, &apiErr) || apiErr.StatusCode != http.StatusNotFound {
		t.Errorf("CheckQuota of an unknown metric: got %v, want a 404 *APIError", err)
	}
}
