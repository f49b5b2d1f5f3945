package dedup

import (
	"context"
	"fmt"
	"io"
	"maps"
	"math/rand/v2"
	"net"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/gofiber/fiber/v2"
	"github.com/google/uuid"
	"github.com/redis/go-redis/v9"

	"github.com/analyticsd/analyticsd/api"
	"github.com/analyticsd/analyticsd/internal/clock"
	"github.com/analyticsd/analyticsd/internal/testenv"
	"github.com/analyticsd/analyticsd/quota"
)

type redisEnv struct {
	Redis  redis.UniversalClient
	Prefix string
}

func newStore(t *testing.T) (*Store, redisEnv) {
	t.Helper()
	rdb, prefix := testenv.Redis(t)
	return NewStore(rdb, prefix, time.Hour, nil), redisEnv{rdb, prefix}
}

func TestClaimOwnsAnIDOncePerTenantAndKind(t *testing.T) {
	s, _ := newStore(t)
	ctx := context.Background()
	a, b := uuid.New(), uuid.New()
	ids := []uuid.UUID{uuid.New(), uuid.New()}
	dup, epoch, err := s.Claim(ctx, a, 'e', 1, ids, nil, nil)
	if err != nil || dup[0] || dup[1] || epoch.IsZero() {
		t.Fatalf("first claim: %v %v %v", dup, epoch, err)
	}
	// The same batch claiming again (a retried script) still holds its ids.
	if dup, _, _ := s.Claim(ctx, a, 'e', 1, ids, nil, nil); dup[0] || dup[1] {
		t.Errorf("same batch again: %v, want its own ids held", dup)
	}
	if dup, _, _ := s.Claim(ctx, a, 'e', 2, []uuid.UUID{ids[1], uuid.New()}, nil, nil); !dup[0] || dup[1] {
		t.Errorf("another batch: %v, want [true false]", dup)
	}
	// Ids are per tenant and per kind.
	if dup, _, _ := s.Claim(ctx, b, 'e', 3, ids, nil, nil); dup[0] || dup[1] {
		t.Errorf("tenant B, same ids: %v, want new", dup)
	}
	if dup, _, _ := s.Claim(ctx, a, 'i', 4, ids, nil, nil); dup[0] || dup[1] {
		t.Errorf("increments, same ids: %v, want new", dup)
	}
}

func TestVerifyKeepsOwnersAndReclaimsLostClaims(t *testing.T) {
	s, env := newStore(t)
	ctx := context.Background()
	tn := uuid.New()
	mine, theirs, lost := uuid.New(), uuid.New(), uuid.New()
	_, epoch, _ := s.Claim(ctx, tn, 'e', 10, []uuid.UUID{mine}, nil, nil)
	s.Claim(ctx, tn, 'e', 20, []uuid.UUID{theirs}, nil, nil)
	held, reclaimed, e2, err := s.Verify(ctx, tn, 'e', []uuid.UUID{mine, theirs, lost}, []uint64{10, 10, 10}, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	if !held[0] || reclaimed[0] || held[1] || !held[2] || !reclaimed[2] || !e2.Equal(epoch) {
		t.Errorf("verify: held %v reclaimed %v epoch %v (claim epoch %v)", held, reclaimed, e2, epoch)
	}
	// A reclaimed id now belongs to its batch: another batch is a duplicate of it.
	if dup, _, _ := s.Claim(ctx, tn, 'e', 30, []uuid.UUID{lost}, nil, nil); !dup[0] {
		t.Error("an id reclaimed at ship time was claimed again by another batch")
	}
	// Redis losing everything shows as a new epoch.
	testenv.DelKeys(ctx, env.Redis, env.Prefix+"*")
	s.now = func() time.Time { return time.Now().Add(time.Minute) }
	epochs, err := s.Epochs(ctx, []uuid.UUID{tn, uuid.New()})
	if err != nil || len(epochs) != 0 {
		t.Fatalf("epochs after the loss: %v %v, want none", epochs, err)
	}
	_, e3, _ := s.Claim(ctx, tn, 'e', 40, []uuid.UUID{uuid.New()}, nil, nil)
	if !e3.After(epoch) {
		t.Errorf("epoch after the loss %v, want after %v", e3, epoch)
	}
	if epochs, _ := s.Epochs(ctx, []uuid.UUID{tn}); !epochs[tn].Equal(e3) {
		t.Errorf("Epochs %v, want %v", epochs[tn], e3)
	}
}

// Claims against a model of what they promise: an id is held by the first batch that claimed it
// within the current or the previous window-long bucket, and a row counts when its id is claimed
// now, unless it was received before its day's live counting began (started by the first row that
// counts). Random calls of up to 2,500 ids (more than one of the script's 1,000-id slices), drawn
// from a small pool so ids repeat within a call, across calls and across buckets, each id with its
// own batch or all with one; rows of two metrics on two days, received in the current or the last
// two seconds (which may fall into two minutes).
func TestClaimsMatchTheModel(t *testing.T) {
	rdb, prefix := testenv.Redis(t)
	counters := quota.NewCounters(rdb, prefix)
	s := NewStore(rdb, prefix, time.Hour, &Counting{Keys: counters, Lua: quota.CountLua, TTL: quota.CounterTTL})
	ctx := context.Background()
	tn := uuid.New()
	start := time.Now().Truncate(time.Hour)
	clock := start
	s.now = func() time.Time { return clock }
	type claim struct {
		wid    uint64
		bucket int64
	}
	model := map[uuid.UUID]claim{}
	pool := make([]uuid.UUID, 3000)
	for i := range pool {
		pool[i] = uuid.New()
	}
	rng := rand.New(rand.NewPCG(1, 2))
	metrics := []string{"builds_daily", "emails_daily"}
	today := start.UTC().Truncate(24 * time.Hour)
	days := []time.Time{today, today.AddDate(0, 0, -1)}
	counts := map[string]int64{}
	for call := 0; call < 60; call++ {
		if rng.IntN(8) == 0 {
			clock = clock.Add(time.Duration(rng.IntN(90)) * time.Minute)
		}
		bucket := clock.Unix() / 3600
		n := 1 + rng.IntN(2500)
		ids, wids := make([]uuid.UUID, n), make([]uint64, n)
		shared := rng.IntN(2) == 0
		for i := range ids {
			ids[i] = pool[rng.IntN(len(pool))]
			wids[i] = uint64(call*10 + 1)
			if !shared {
				wids[i] += uint64(rng.IntN(3))
			}
		}
		units := make([]row, n)
		for i := range units {
			if rng.IntN(3) > 0 {
				units[i] = row{metrics[rng.IntN(2)], int64(1 + rng.IntN(3)), days[rng.IntN(2)], clock.Add(-time.Duration(rng.IntN(3)) * time.Second)}
			}
		}
		want := make([]int64, n)
		for i, id := range ids {
			c, ok := model[id]
			switch {
			case ok && (c.bucket == bucket || c.bucket == bucket-1) && c.wid == wids[i]:
				want[i] = 1
			case ok && (c.bucket == bucket || c.bucket == bucket-1):
				want[i] = 0
			default:
				model[id] = claim{wids[i], bucket}
				want[i] = 2
				if u := units[i]; u.metric != "" {
					counts[u.metric+u.day.String()] += u.n
				}
			}
		}
		unit := func(i int) (string, int64, time.Time, time.Time) {
			u := units[i]
			return u.metric, u.n, u.day, u.received
		}
		got, _, err := s.run(ctx, tn, 'e', ids, wids, time.Time{}, unit, nil)
		if err != nil {
			t.Fatal(err)
		}
		for i := range want {
			if got[i] != want[i] {
				t.Fatalf("call %d (%d ids, %s into the test): id %d (%s, batch %d) state %d, want %d",
					call, n, clock.Sub(start), i, ids[i], wids[i], got[i], want[i])
			}
		}
		for _, m := range metrics {
			for _, d := range days {
				if v, _, _ := counters.Get(ctx, tn, m, d); v != counts[m+d.String()] {
					t.Fatalf("call %d: counter %s on %s is %d, want %d", call, m, d.Format(time.DateOnly), v, counts[m+d.String()])
				}
			}
		}
	}
}

// row is what a claimed row adds to the live counters in TestClaimsMatchTheModel.
type row struct {
	metric   string
	n        int64
	day      time.Time
	received time.Time
}

// app mounts the middleware behind a stand-in for authentication, in front of a handler the test
// controls.
func app(t *testing.T, s *Store, tenant uuid.UUID, handler fiber.Handler) *fiber.App {
	t.Helper()
	a := api.NewApp(api.Config{}, nil)
	auth := func(c *fiber.Ctx) error { api.SetPrincipal(c, api.Principal{TenantID: tenant}); return c.Next() }
	a.Post("/write", auth, s.Idempotency(nil), handler)
	return a
}

func do(t *testing.T, a *fiber.App, body, key string) (int, string, http.Header) {
	t.Helper()
	req := httptest.NewRequest(http.MethodPost, "/write", strings.NewReader(body))
	if key != "" {
		req.Header.Set(IdempotencyHeader, key)
	}
	res, err := a.Test(req, -1)
	if err != nil {
		t.Fatal(err)
	}
	defer res.Body.Close()
	b, _ := io.ReadAll(res.Body)
	return res.StatusCode, string(b), res.Header
}

func TestIdempotencyReplaysTheFirstResponse(t *testing.T) {
	s, _ := newStore(t)
	var runs atomic.Int32
	a := app(t, s, uuid.New(), func(c *fiber.Ctx) error {
		n := runs.Add(1)
		return c.Status(202).JSON(fiber.Map{"run": n})
	})
	st, body, _ := do(t, a, `{"x":1}`, "k1")
	st2, body2, h2 := do(t, a, `{"x":1}`, "k1")
	if st != 202 || st2 != 202 || body2 != body || h2.Get("Idempotent-Replayed") != "true" || runs.Load() != 1 {
		t.Fatalf("first %d %s, retry %d %s (replayed %q), handler ran %d times; want one run, replayed", st, body, st2, body2, h2.Get("Idempotent-Replayed"), runs.Load())
	}
	reused := `{"error":{"code":"idempotency_key_reused","message":"this Idempotency-Key was used with a different request (method, path, query or body) in the last 2h0m0s; send a new key for a new request"},"success":false}`
	if st, body, _ := do(t, a, `{"x":2}`, "k1"); st != 422 || !strings.Contains(body, "idempotency_key_reused") || body != reused {
		t.Errorf("same key, other body: %d %s, want 422 %s", st, body, reused)
	}
	if st, _, _ := do(t, a, `{"x":1}`, ""); st != 202 || runs.Load() != 2 {
		t.Errorf("no key: %d, runs %d; want it to run", st, runs.Load())
	}
	invalid := `{"error":{"code":"invalid_idempotency_key","message":"Idempotency-Key must be 1 to 255 printable ASCII characters; a UUID per logical request is a good choice"},"success":false}`
	if st, body, _ := do(t, a, `{"x":1}`, strings.Repeat("k", 256)); st != 400 || !strings.Contains(body, "invalid_idempotency_key") || body != invalid {
		t.Errorf("a 256-byte key: %d %s, want 400 %s", st, body, invalid)
	}
}

func TestIdempotencyWhileRunningAndAfterFailures(t *testing.T) {
	s, _ := newStore(t)
	release := make(chan struct{})
	started := make(chan struct{}, 1)
	var fail atomic.Bool
	var runs atomic.Int32
	a := app(t, s, uuid.New(), func(c *fiber.Ctx) error {
		runs.Add(1)
		if fail.Load() {
			return api.Unavailable("unavailable", "down", 0, nil)
		}
		started <- struct{}{}
		<-release
		return c.Status(202).SendString("done")
	})
	result := make(chan int)
	go func() { st, _, _ := do(t, a, "b", "k"); result <- st }()
	<-started
	inUse := `{"error":{"code":"idempotency_key_in_use","message":"a request with this Idempotency-Key is still being processed; retry shortly"},"success":false}`
	if st, body, h := do(t, a, "b", "k"); st != 409 || h.Get("Retry-After") == "" || h.Get("Retry-After") != "1" || body != inUse {
		t.Errorf("while the first runs: %d %s Retry-After %q, want 409 %s with Retry-After 1", st, body, h.Get("Retry-After"), inUse)
	}
	close(release)
	if st := <-result; st != 202 {
		t.Fatalf("first: %d", st)
	}

	// A 5xx is not kept: the retry runs again.
	fail.Store(true)
	if st, _, _ := do(t, a, "c", "k2"); st != 503 {
		t.Fatalf("failing run: %d", st)
	}
	fail.Store(false)
	go func() { <-started }()
	release = make(chan struct{})
	close(release)
	if st, body, h := do(t, a, "c", "k2"); st != 202 || h.Get("Idempotent-Replayed") != "" {
		t.Errorf("retry after a 503: %d %s replayed=%q, want a fresh run", st, body, h.Get("Idempotent-Replayed"))
	}
}

// With Redis unreachable the request runs, unchecked, and says so.
func TestIdempotencyWithRedisDownRunsTheRequest(t *testing.T) {
	_, prefix := testenv.Redis(t)
	rdb, proxy := testenv.CuttableRedis(t)
	s := NewStore(rdb, prefix, time.Hour, nil)
	proxy.SetDown(true)
	a := app(t, s, uuid.New(), func(c *fiber.Ctx) error { return c.Status(202).SendString("ok") })
	if st, _, h := do(t, a, "b", "k"); st != 202 || h.Get("X-Analytics-Degraded") == "" {
		t.Errorf("redis down: %d degraded=%q", st, h.Get("X-Analytics-Degraded"))
	}
}

// A row is counted in the step that claims its id: once, whoever claims it (the request, or shipping
// after the request could not), and never when another batch holds the id. A row received more than
// a window ago is left to the counters' reconciliation with ClickHouse.
func TestClaimCountsWhatItClaims(t *testing.T) {
	rdb, prefix := testenv.Redis(t)
	counters := quota.NewCounters(rdb, prefix)
	s := NewStore(rdb, prefix, time.Hour, &Counting{Keys: counters, Lua: quota.CountLua, TTL: quota.CounterTTL})
	ctx := context.Background()
	tn := uuid.New()
	now := time.Now().UTC().Truncate(time.Second)
	today := now.Truncate(24 * time.Hour)
	ids := []uuid.UUID{uuid.New(), uuid.New(), uuid.New()}
	unit := func(received time.Time) Unit {
		return func(i int) (string, int64, time.Time, time.Time) {
			if i == 2 {
				return "", 0, time.Time{}, time.Time{} // not a counted event
			}
			return "builds_daily", 5, today, received
		}
	}
	var heard []string
	counted := func(d time.Time, metric string, by, value int64) {
		heard = append(heard, fmt.Sprintf("%s %s +%d=%d", d.Format("2006-01-02"), metric, by, value))
	}
	get := func() int64 {
		n, _, _ := counters.Get(ctx, tn, "builds_daily", today)
		return n
	}
	if _, _, err := s.Claim(ctx, tn, 'e', 1, ids, unit(now), counted); err != nil {
		t.Fatal(err)
	}
	if get() != 10 || len(heard) != 1 || heard[0] != today.Format("2006-01-02")+" builds_daily +10=10" {
		t.Fatalf("after the first claim: counter %d, heard %v; want 10", get(), heard)
	}
	// The same ids again — another request, the same request's script retried, a ship-time verify.
	s.Claim(ctx, tn, 'e', 2, ids, unit(now), counted)
	s.Claim(ctx, tn, 'e', 1, ids, unit(now), counted)
	s.Verify(ctx, tn, 'e', ids, []uint64{1, 1, 1}, unit(now), counted)
	if get() != 10 {
		t.Errorf("after repeats: counter %d, want 10", get())
	}
	// Shipping claims an id whose request-time claim never happened: it counts it.
	late := []uuid.UUID{uuid.New()}
	s.Verify(ctx, tn, 'e', late, []uint64{7}, unit(now), counted)
	if get() != 15 {
		t.Errorf("after a ship-time claim: counter %d, want 15", get())
	}
	// ...but not a row received more than a window ago (its claim may have expired after counting).
	s.Verify(ctx, tn, 'e', []uuid.UUID{uuid.New()}, []uint64{8}, unit(now.Add(-2*time.Hour)), counted)
	if get() != 15 {
		t.Errorf("a row received two windows ago was counted: counter %d, want 15", get())
	}
	// The count sits in the live hash under the rows' received minute, where reconciliation meets
	// ClickHouse's count of the same rows.
	live := rdb.HGetAll(ctx, counters.LiveKey(tn, "builds_daily", today)).Val()
	if want := strconv.FormatInt(now.Unix()/60, 10); len(live) != 1 || live[want] != "15" {
		t.Errorf("live counts per minute %v, want {%s: 15}", live, want)
	}
}

// A request whose instance died mid-way (its pending record outlives it) is run again at once by a
// retry on another instance, not refused with 409 until PendingTTL ends; while that instance lives,
// the retry is refused.
func TestIdempotencyRetryAfterTheHolderDied(t *testing.T) {
	rdb, prefix := testenv.Redis(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	first, second := NewStore(rdb, prefix, time.Hour, nil), NewStore(rdb, prefix, time.Hour, nil)
	deadCtx, die := context.WithCancel(ctx)
	go first.KeepAlive(deadCtx)
	go second.KeepAlive(ctx)
	testenv.Eventually(t, 5*time.Second, func() error {
		if first.holder.Load() == nil || second.holder.Load() == nil {
			return fmt.Errorf("KeepAlive has not started")
		}
		return nil
	})
	tenant := uuid.New()
	started, release := make(chan struct{}, 1), make(chan struct{})
	var runs atomic.Int32
	stuck := app(t, first, tenant, func(c *fiber.Ctx) error { // the instance that will die
		runs.Add(1)
		started <- struct{}{}
		<-release
		return c.SendStatus(500) // never seen: the process is "dead" by then
	})
	other := app(t, second, tenant, func(c *fiber.Ctx) error {
		runs.Add(1)
		return c.Status(202).SendString("stored")
	})
	go func() {
		req := httptest.NewRequest(http.MethodPost, "/write", strings.NewReader("b"))
		req.Header.Set(IdempotencyHeader, "k")
		if res, err := stuck.Test(req, -1); err == nil {
			res.Body.Close()
		}
	}()
	<-started
	defer close(release)
	if st, _, _ := do(t, other, "b", "k"); st != 409 {
		t.Errorf("while the first instance lives: %d, want 409", st)
	}
	die() // stopped: its mark is deleted (after kill -9 it expires within holderTTL)
	testenv.Eventually(t, 5*time.Second, func() error {
		if !second.holderGone(ctx, first.holder.Load().(string)) {
			return fmt.Errorf("the first instance's liveness mark is still there")
		}
		return nil
	})
	st, body, _ := do(t, other, "b", "k")
	if st != 202 || body != "stored" || runs.Load() != 2 {
		t.Errorf("after the first instance died: %d %q (runs %d), want the request run again: 202 stored", st, body, runs.Load())
	}
	if st, body, h := do(t, other, "b", "k"); st != 202 || body != "stored" || h.Get("Idempotent-Replayed") != "true" || runs.Load() != 2 {
		t.Errorf("the next retry: %d %q replayed=%q (runs %d), want the kept response", st, body, h.Get("Idempotent-Replayed"), runs.Load())
	}
}

// A handler that panics is answered 500 by api.NewApp's recover, outside this middleware: the key's
// pending record stayed, its holder (this live instance) was not gone, and the retry got 409 for a
// minute instead of running. The record is now freed before the panic goes on.
func TestIdempotencyKeyFreedWhenTheHandlerPanics(t *testing.T) {
	s, _ := newStore(t)
	var runs atomic.Int32
	a := app(t, s, uuid.New(), func(c *fiber.Ctx) error {
		if runs.Add(1) == 1 {
			panic("index out of range")
		}
		return c.Status(202).JSON(fiber.Map{"ok": true})
	})
	if st, body, _ := do(t, a, `{"x":1}`, "k-panic"); st != 500 {
		t.Fatalf("first run: %d %s, want 500", st, body)
	}
	if st, body, _ := do(t, a, `{"x":1}`, "k-panic"); st != 202 || runs.Load() != 2 {
		t.Errorf("retry: %d %s after %d runs, want 202 from a second run", st, body, runs.Load())
	}
}

// A history Redis loses within the second it began is told apart from the next one, begun in the
// same second. Before, epochs were whole seconds and the two were equal: a shipping instance took
// verdicts made in the lost history, and its cached "history complete" answer, for the new one's (a
// retry stored twice, RELIABILITY.md). A history begun by a binary that writes only the seconds
// reads as that second.
func TestAHistoryLostInTheSecondItBeganIsToldApart(t *testing.T) {
	s, env := newStore(t)
	ctx := context.Background()
	tn := uuid.New()
	base := time.Now().Truncate(time.Second)
	at := base.Add(100 * time.Millisecond)
	s.now = func() time.Time { return at }
	_, e1, err := s.Claim(ctx, tn, 'e', 10, []uuid.UUID{uuid.New()}, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	// The tenant's history is lost (the record of run ids is kept: no floor rises, so the epochs
	// alone must tell the histories apart).
	testenv.DelKeys(ctx, env.Redis, env.Prefix+"dedup:{"+tn.String()+"}*")
	at = base.Add(400 * time.Millisecond)
	_, e2, err := s.Claim(ctx, tn, 'e', 20, []uuid.UUID{uuid.New()}, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	if e1.Equal(e2) || !e2.After(e1) {
		t.Fatalf("epoch of the lost history %v, of the next %v: want the next one later", e1, e2)
	}
	if epochs, err := s.Epochs(ctx, []uuid.UUID{tn}); err != nil || !epochs[tn].Equal(e2) {
		t.Fatalf("Epochs %v (%v), want %v", epochs[tn], err, e2)
	}
	// The same history as an older binary leaves it: the seconds only.
	env.Redis.Del(ctx, s.beganKey(tn))
	if epochs, err := s.Epochs(ctx, []uuid.UUID{tn}); err != nil || !epochs[tn].Equal(base) {
		t.Fatalf("Epochs without began: %v (%v), want %v", epochs[tn], err, base)
	}
	if _, e, err := s.Claim(ctx, tn, 'e', 30, []uuid.UUID{uuid.New()}, nil, nil); err != nil || !e.Equal(base) {
		t.Fatalf("a claim without began: epoch %v (%v), want %v", e, err, base)
	}
}

// A Redis restart noticed within the second a tenant's history began raises the history's epoch above
// the instant it was noticed, by clock.MaxSkew (it stayed at the epoch when the floor was whole seconds);
// a floor an older release raised to a later second, without the instant, counts as that second.
func TestARestartNoticedInTheSecondAHistoryBeganRaisesItsEpoch(t *testing.T) {
	s, env := newStore(t)
	ctx := context.Background()
	tn := uuid.New()
	runID := "before"
	s.SetRunIDs(func(context.Context) (map[string]string, error) { return map[string]string{"server": runID}, nil })
	base := time.Now().Truncate(time.Second)
	at := base.Add(100 * time.Millisecond)
	s.now = func() time.Time { return at }
	_, epoch, err := s.Claim(ctx, tn, 'e', 10, []uuid.UUID{uuid.New()}, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	runID, at = "after", base.Add(600*time.Millisecond)
	epochs, err := s.Epochs(ctx, []uuid.UUID{tn})
	if err != nil {
		t.Fatal(err)
	}
	if want := at.Add(clock.MaxSkew); !epochs[tn].Equal(want) {
		t.Fatalf("epoch %v after a restart noticed at %v, want %v (history began %v)", epochs[tn], at, want, epoch)
	}
	// Another instance reads the same floor from Redis.
	other := NewStore(env.Redis, env.Prefix, time.Hour, nil)
	other.SetRunIDs(func(context.Context) (map[string]string, error) { return map[string]string{"server": runID}, nil })
	if e, err := other.Epochs(ctx, []uuid.UUID{tn}); err != nil || !e[tn].Equal(at.Add(clock.MaxSkew)) {
		t.Fatalf("another instance: epoch %v (%v), want %v", e[tn], err, at.Add(clock.MaxSkew))
	}
	// An older release noticed a later restart and wrote only its second.
	later := base.Add(3 * time.Second)
	env.Redis.Set(ctx, env.Prefix+"dedup:{restarts}:floor", later.Unix(), 0)
	if e, err := other.Epochs(ctx, []uuid.UUID{tn}); err != nil || !e[tn].Equal(later.Add(clock.MaxSkew)) {
		t.Fatalf("after an older release's floor: epoch %v (%v), want %v", e[tn], err, later.Add(clock.MaxSkew))
	}
}

// Redis losing everything (FLUSHALL, a restart without persistence) takes the recorded run ids with
// it. A process that recorded them before notices the loss — even when another process, which never
// looked before (just started), looks first and records them anew — and raises the floor; a process
// whose first look finds a record created recently cannot tell a wipe from first use, and reports a
// possible loss (for shipping to wait out the inserts under way) without raising epochs. (Before,
// nothing noticed a wipe; then a process looking first hid it from the others; then a process
// started after the wipe did not know of it.)
func TestALossOfEverythingIsNoticedByAProcessThatLookedBefore(t *testing.T) {
	s, env := newStore(t)
	ctx := context.Background()
	tn := uuid.New()
	at := time.Now().Truncate(time.Second).Add(200 * time.Millisecond)
	s.now = func() time.Time { return at }
	_, e1, err := s.Claim(ctx, tn, 'e', 1, []uuid.UUID{uuid.New()}, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	if loss, seen := s.Loss(); !loss.Equal(at) || !seen.Equal(at) {
		t.Fatalf("first use: loss %v seen %v, want the record's creation, %v", loss, seen, at)
	}
	if epochs, _ := s.Epochs(ctx, []uuid.UUID{tn}); !epochs[tn].Equal(e1) {
		t.Fatalf("first use: epoch %v, want it as it began (%v): a young record raises no epoch", epochs[tn], e1)
	}
	testenv.DelKeys(ctx, env.Redis, env.Prefix+"*")
	// A process started after the wipe looks first: it records the run ids anew.
	fresh := NewStore(env.Redis, env.Prefix, time.Hour, nil)
	wiped := at.Add(100 * time.Millisecond)
	fresh.now = func() time.Time { return wiped }
	if _, err := fresh.Epochs(ctx, nil); err != nil {
		t.Fatal(err)
	}
	if loss, seen := fresh.Loss(); !loss.Equal(wiped) || !seen.Equal(wiped) {
		t.Fatalf("a process that never looked before: loss %v seen %v, want the new record's creation, %v", loss, seen, wiped)
	}
	at = at.Add(300 * time.Millisecond)
	epochs, err := s.Epochs(ctx, []uuid.UUID{tn})
	if err != nil {
		t.Fatal(err)
	}
	if loss, seen := s.Loss(); !loss.Equal(at) || !seen.Equal(at) {
		t.Fatalf("after the wipe: loss %v seen %v, want both %v", loss, seen, at)
	}
	if len(epochs) != 0 {
		t.Errorf("epochs %v after the wipe, want none (no history yet)", epochs)
	}
	// Another process, started later, takes the floor s raised, first learnt of at its own time.
	other := NewStore(env.Redis, env.Prefix, time.Hour, nil)
	later := at.Add(time.Second)
	other.now = func() time.Time { return later }
	_, e2, err := other.Claim(ctx, tn, 'e', 2, []uuid.UUID{uuid.New()}, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	if loss, seen := other.Loss(); !loss.Equal(at) || !seen.Equal(later) {
		t.Errorf("another process: loss %v seen %v, want %v seen %v", loss, seen, at, later)
	}
	if !e2.Equal(at.Add(clock.MaxSkew)) {
		t.Errorf("the next history's epoch %v, want it raised to the floor and clock.MaxSkew, %v", e2, at.Add(clock.MaxSkew))
	}
}

// twoClocks returns two stores on one Redis, the second's clock ahead of the first's by ahead, both
// having looked at the run ids (as running processes have), and a way to set both clocks: set(d)
// moves them to d after the start (by the first's clock), which it returns.
func twoClocks(t *testing.T, ahead time.Duration) (s, fast *Store, env redisEnv, set func(time.Duration) time.Time) {
	t.Helper()
	s, env = newStore(t)
	fast = NewStore(env.Redis, env.Prefix, time.Hour, nil)
	start := time.Now()
	at := start
	s.now = func() time.Time { return at }
	fast.now = func() time.Time { return at.Add(ahead) }
	for _, st := range []*Store{s, fast} {
		if _, err := st.Epochs(context.Background(), nil); err != nil {
			t.Fatal(err)
		}
	}
	return s, fast, env, func(d time.Duration) time.Time { at = start.Add(d); return at }
}

// Two wipes within the clocks' difference: the first noticed by a process whose clock runs 4 s fast,
// the second, 2 s later, by one with the true clock — whose now is below the floor, and which the
// wipe left without a floor in Redis. The second loss must still be a new floor, later than the
// first, or Loss reports nothing new (shipping does not wait for the inserts it cut short) and
// histories begun on both sides of it share the floor as their epoch.
func TestASecondLossWithinTheClocksDifferenceIsANewFloor(t *testing.T) {
	s, fast, env, set := twoClocks(t, 4*time.Second)
	ctx := context.Background()
	tn := uuid.New()
	testenv.DelKeys(ctx, env.Redis, env.Prefix+"*")
	set(100 * time.Millisecond)
	for _, st := range []*Store{fast, s} { // the fast one notices first
		if _, err := st.Epochs(ctx, nil); err != nil {
			t.Fatal(err)
		}
	}
	f1, _ := s.Loss()
	set(500 * time.Millisecond)
	_, e2, err := s.Claim(ctx, tn, 'e', 1, []uuid.UUID{uuid.New()}, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	testenv.DelKeys(ctx, env.Redis, env.Prefix+"*")
	second := set(2 * time.Second)
	for _, st := range []*Store{s, fast} { // the true clock notices first
		if _, err := st.Epochs(ctx, nil); err != nil {
			t.Fatal(err)
		}
	}
	set(2500 * time.Millisecond)
	_, e3, err := s.Claim(ctx, tn, 'e', 2, []uuid.UUID{uuid.New()}, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	f2, seen2 := s.Loss()
	if !f2.After(f1) || !seen2.Equal(second) {
		t.Errorf("after the second wipe: floor %v (first %v) seen %v: want a later floor, seen at %v", f2, f1, seen2, second)
	}
	// The fast process saw the new record itself, at its own (fast) time.
	if ff, fseen := fast.Loss(); !ff.After(f1) || !fseen.Equal(second.Add(4*time.Second)) {
		t.Errorf("the fast process: loss %v seen %v, want one after %v, seen at %v", ff, fseen, f1, second.Add(4*time.Second))
	}
	if e2.Equal(e3) {
		t.Errorf("histories on both sides of the second wipe have one epoch %v", e2)
	}
}

// A second loss raised by a process that never learnt the first one's floor (a faster clock's, which
// the second wipe took from Redis) comes out below it: the process holding that floor took nothing
// from it, noticed nothing, and saw one epoch for the histories on both sides. A process now counts a
// record created anew, or a run id changed, against what it saw itself.
func TestASecondLossRaisedBelowAFasterProcesssFloorIsStillNoticed(t *testing.T) {
	s, fast, env, set := twoClocks(t, 4*time.Second)
	ctx := context.Background()
	tn := uuid.New()
	testenv.DelKeys(ctx, env.Redis, env.Prefix+"*") // the first loss: only the fast process looks
	set(100 * time.Millisecond)
	if _, err := fast.Epochs(ctx, nil); err != nil {
		t.Fatal(err)
	}
	f1, _ := fast.Loss()
	set(300 * time.Millisecond)
	if _, _, err := s.Claim(ctx, tn, 'e', 1, []uuid.UUID{uuid.New()}, nil, nil); err != nil { // history 2
		t.Fatal(err)
	}
	e2, err := fast.Epochs(ctx, []uuid.UUID{tn})
	if err != nil {
		t.Fatal(err)
	}
	testenv.DelKeys(ctx, env.Redis, env.Prefix+"*") // the second, noticed by s first
	set(1500 * time.Millisecond)
	if _, err := s.Epochs(ctx, nil); err != nil {
		t.Fatal(err)
	}
	if _, _, err := s.Claim(ctx, tn, 'e', 2, []uuid.UUID{uuid.New()}, nil, nil); err != nil { // history 3
		t.Fatal(err)
	}
	set(1700 * time.Millisecond)
	e3, err := fast.Epochs(ctx, []uuid.UUID{tn})
	if err != nil {
		t.Fatal(err)
	}
	if f2, _ := fast.Loss(); !f2.After(f1) {
		t.Errorf("the fast process's loss %v after the second wipe, want one after %v", f2, f1)
	}
	if e2[tn].Equal(e3[tn]) {
		t.Errorf("the fast process sees one epoch %v for the histories on both sides of the second wipe", e2[tn])
	}
}

// A restart from a snapshot noticed by a process whose clock is 3 s behind the one that began the
// tenant's history: the floor (its clock) stayed below the surviving epoch, so the verdict of a claim
// the snapshot lost still stood. An epoch within clock.MaxSkew of a floor is raised above it.
func TestAnEpochStampedByAFastClockIsRaisedByALaterLoss(t *testing.T) {
	s, env := newStore(t)
	ctx := context.Background()
	fast := NewStore(env.Redis, env.Prefix, time.Hour, nil)
	base := time.Now()
	at := base
	s.now = func() time.Time { return at }
	fast.now = func() time.Time { return at.Add(3 * time.Second) }
	run := "one"
	ids := func(context.Context) (map[string]string, error) { return map[string]string{"server": run}, nil }
	s.SetRunIDs(ids)
	fast.SetRunIDs(ids)
	tn := uuid.New()
	for _, st := range []*Store{s, fast} {
		if _, err := st.Epochs(ctx, nil); err != nil {
			t.Fatal(err)
		}
	}
	_, e1, err := fast.Claim(ctx, tn, 'e', 1, []uuid.UUID{uuid.New()}, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	run = "two" // restarted from a snapshot that holds the epoch
	at = base.Add(500 * time.Millisecond)
	ep, err := s.Epochs(ctx, []uuid.UUID{tn})
	if err != nil {
		t.Fatal(err)
	}
	if loss, _ := s.Loss(); !ep[tn].After(e1) {
		t.Errorf("the epoch %v after a restart noticed at %v, want it raised above the history's start %v", ep[tn], loss, e1)
	}
}

// claimedReading returns a store that reads the run ids *read holds at each look, a tenant with one
// claim, the claim's epoch, and the loss the store knew of then (the record's creation: first use).
func claimedReading(t *testing.T, read *map[string]string) (s *Store, tn uuid.UUID, epoch, loss time.Time) {
	t.Helper()
	s, _ = newStore(t)
	s.SetRunIDs(func(context.Context) (map[string]string, error) { return maps.Clone(*read), nil })
	tn = uuid.New()
	_, epoch, err := s.Claim(context.Background(), tn, 'e', 1, []uuid.UUID{uuid.New()}, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	loss, _ = s.Loss()
	return s, tn, epoch, loss
}

// A cluster master that misses one read of the run ids (slow to answer INFO, for a BGSAVE's fork)
// and answers the next with the same id is no loss: a process that forgot it took it back for a
// master never seen, raised its own floor, and checked every tenant's rows for a window.
func TestAMasterMissingFromOneReadIsNoLoss(t *testing.T) {
	read := map[string]string{"a": "run-a", "b": "run-b"}
	s, tn, e1, before := claimedReading(t, &read)
	ctx := context.Background()
	for _, ids := range []map[string]string{{"a": "run-a"}, {"a": "run-a", "b": "run-b"}} {
		read = ids
		epochs, err := s.Epochs(ctx, []uuid.UUID{tn})
		if err != nil {
			t.Fatal(err)
		}
		if !epochs[tn].Equal(e1) {
			t.Fatalf("reading %v: epoch %v, want it unchanged (%v)", ids, epochs[tn], e1)
		}
	}
	if loss, _ := s.Loss(); !loss.Equal(before) {
		t.Errorf("loss %v after a master missed one read, want it unchanged (%v)", loss, before)
	}
}

// A cluster master's marker that changed is a loss — that master alone lost its keys (FLUSHALL on
// it keeps its run id and the record on another master) — but one recorded for the first time is
// none: a release before markers recorded the run ids alone, and its first look after an upgrade
// must not raise every epoch.
func TestAChangedMarkerIsALossAndANewOneIsNot(t *testing.T) {
	read := map[string]string{"master a": "run-a"}
	s, tn, e1, before := claimedReading(t, &read)
	ctx := context.Background()
	read[markField+"dedup:{restarts:0}"] = "mark-1"
	for range 2 {
		epochs, err := s.Epochs(ctx, []uuid.UUID{tn})
		if err != nil {
			t.Fatal(err)
		}
		if !epochs[tn].Equal(e1) {
			t.Fatalf("a marker recorded for the first time: epoch %v, want it unchanged (%v)", epochs[tn], e1)
		}
	}
	if loss, _ := s.Loss(); !loss.Equal(before) {
		t.Fatalf("loss %v after a marker recorded for the first time, want it unchanged (%v)", loss, before)
	}
	read[markField+"dedup:{restarts:0}"] = "mark-2" // the master was flushed; a look made it anew
	looked := time.Now()
	epochs, err := s.Epochs(ctx, []uuid.UUID{tn})
	if err != nil {
		t.Fatal(err)
	}
	if loss, _ := s.Loss(); loss.Before(looked) || !epochs[tn].After(e1) {
		t.Errorf("after the marker changed: loss %v, epoch %v; want a loss after %v and the epoch raised above %v", loss, epochs[tn], looked, e1)
	}
	// A process that looks for the first time after the change finds it in the record.
	late := NewStore(s.rdb, s.prefix, time.Hour, nil)
	late.SetRunIDs(func(context.Context) (map[string]string, error) { return maps.Clone(read), nil })
	if e, err := late.Epochs(ctx, []uuid.UUID{tn}); err != nil || !e[tn].Equal(epochs[tn]) {
		t.Errorf("a process looking first after the change: epoch %v (%v), want %v", e[tn], err, epochs[tn])
	}
}

// On a Redis Cluster every master holding slots carries a marker, in a key of its own slots, and
// every process picks the same key. A master flushed alone (here: its marker deleted, as FLUSHALL
// on it would) raises the floor at the next look. (Before, the run ids alone did not show it.)
func TestAFlushOfOneClusterMasterIsALoss(t *testing.T) {
	if !testenv.RedisCluster() {
		t.Skip("needs Redis Cluster: `make test-cluster` runs it")
	}
	s, env := newStore(t)
	cc := env.Redis.(*redis.ClusterClient)
	ctx := context.Background()
	ids, err := s.runIDs(ctx)
	if err != nil {
		t.Fatal(err)
	}
	again, err := NewStore(env.Redis, env.Prefix, time.Hour, nil).runIDs(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if !maps.Equal(ids, again) {
		t.Fatalf("two processes read %v and %v, want the same run ids and markers", ids, again)
	}
	masters, marked := map[string]bool{}, map[string]string{} // master address -> its marker key
	for field := range ids {
		if addr, ok := strings.CutPrefix(field, "master "); ok {
			masters[addr] = true
		}
		if key, ok := strings.CutPrefix(field, markField); ok {
			m, err := cc.MasterForKey(ctx, env.Prefix+key)
			if err != nil {
				t.Fatal(err)
			}
			marked[m.Options().Addr] = env.Prefix + key
		}
	}
	if len(masters) < 2 || len(marked) != len(masters) {
		t.Fatalf("run ids %v: want a marker on each of the masters %v", ids, masters)
	}
	if _, err := s.Epochs(ctx, nil); err != nil {
		t.Fatal(err)
	}
	record, err := cc.MasterForKey(ctx, env.Prefix+"dedup:{restarts}")
	if err != nil {
		t.Fatal(err)
	}
	for addr, key := range marked {
		if addr == record.Options().Addr {
			continue
		}
		looked := time.Now()
		cc.Del(ctx, key)
		if _, err := s.Epochs(ctx, nil); err != nil {
			t.Fatal(err)
		}
		if loss, _ := s.Loss(); loss.Before(looked) {
			t.Errorf("master %s flushed alone: latest loss %v, want one noticed after %v", addr, loss, looked)
		}
		return
	}
	t.Fatal("every marker is on the master holding the record of run ids")
}

// replicate makes replica follow the server at addr and waits until its link is up.
func replicate(t *testing.T, replica *redis.Client, addr string) {
	t.Helper()
	ctx := context.Background()
	host, port, _ := net.SplitHostPort(addr)
	if err := replica.SlaveOf(ctx, host, port).Err(); err != nil {
		t.Fatal(err)
	}
	testenv.Eventually(t, 20*time.Second, func() error {
		if info := replica.Info(ctx, "replication").Val(); !strings.Contains(info, "master_link_status:up") {
			return fmt.Errorf("replica of %s: link not up:\n%s", addr, info)
		}
		return nil
	})
}

// A failover back to a former master (demoted, not restarted: a partition, a maintenance failover)
// keeps its address and run id, and it may have missed what its replica took meanwhile: nothing
// noticed it (a review's private cluster: a claim made on the replica was lost, and the same id
// claimed again was judged new in the same history). A server made a master keeps its previous
// replication id (master_replid2), and a new one is now a loss. Replication alone is none: a first
// replica attaching and a replication backlog freed change master_replid (a first version watched
// that, and took both for losses), not master_replid2. (Servers of the test's own: roles change.)
func TestAFailbackIsALossAndReplicationAloneIsNot(t *testing.T) {
	// A backlog without replicas is freed after a second (3,600 by default).
	a, aAddr := testenv.PrivateRedis(t, "--repl-backlog-ttl", "1")
	b, bAddr := testenv.PrivateRedis(t)
	ctx := context.Background()
	s := NewStore(a, "", time.Hour, nil)
	tn := uuid.New()
	if _, _, err := s.Claim(ctx, tn, 'e', 1, []uuid.UUID{uuid.New()}, nil, nil); err != nil {
		t.Fatal(err)
	}
	replid := func() string {
		for _, l := range strings.Split(a.Info(ctx, "replication").Val(), "\n") {
			if v, ok := strings.CutPrefix(strings.TrimSpace(l), "master_replid:"); ok {
				return v
			}
		}
		return ""
	}
	look := func(step string, wantLoss bool) {
		t.Helper()
		before, _ := s.Loss()
		looked := time.Now()
		if _, err := s.Epochs(ctx, []uuid.UUID{tn}); err != nil {
			t.Fatal(err)
		}
		if loss, _ := s.Loss(); wantLoss && loss.Before(looked) {
			t.Errorf("%s: latest loss %v, want one noticed after %v", step, loss, looked)
		} else if !wantLoss && !loss.Equal(before) {
			t.Errorf("%s: a loss at %v, want none (the latest stays %v)", step, loss, before)
		}
	}
	look("first look", false) // a process's first look at a record just created: "first use"
	first := replid()
	replicate(t, b, aAddr) // b follows a: a makes its backlog
	if replid() == first {
		t.Fatal("a's master_replid did not change when its first replica attached: the test shows nothing")
	}
	look("a first replica attached", false)
	if err := b.SlaveOf(ctx, "NO", "ONE").Err(); err != nil { // b takes over, a follows it
		t.Fatal(err)
	}
	replicate(t, a, bAddr)
	if err := a.SlaveOf(ctx, "NO", "ONE").Err(); err != nil { // and a takes over again
		t.Fatal(err)
	}
	look("a failover back to a", true)
	freed := replid()
	testenv.Eventually(t, 10*time.Second, func() error { // a's backlog, without replicas, is freed
		if replid() == freed {
			return fmt.Errorf("a's backlog not freed yet")
		}
		return nil
	})
	look("a's backlog freed", false)
}

// A look that read a master's marker before a flush but records it after a newer look did (looks
// overlap: every shipment looks) wrote the old marker back, which the record took for a second loss,
// and the next look's new marker for a third: one flush raised the floor three times, and each raise
// had every process judge every tenant's rows again. A marker the record replaced is now a stale
// look's, and changes nothing. (From a review; run ids went the same way, but they can come back.)
func TestALookThatReadBeforeALossDoesNotRaiseItAgain(t *testing.T) {
	read := map[string]string{"master a": "run-a", markField + "k": "mark-1"}
	s, tn, _, _ := claimedReading(t, &read)
	ctx := context.Background()
	stale := NewStore(s.rdb, s.prefix, time.Hour, nil)
	old := maps.Clone(read)
	stale.SetRunIDs(func(context.Context) (map[string]string, error) { return maps.Clone(old), nil })
	floor := func() string { return s.rdb.Get(ctx, s.prefix+"dedup:{restarts}:at").Val() }
	for _, st := range []*Store{s, stale} {
		if _, err := st.Epochs(ctx, []uuid.UUID{tn}); err != nil {
			t.Fatal(err)
		}
	}
	read[markField+"k"] = "mark-2" // the master was flushed
	if _, err := s.Epochs(ctx, []uuid.UUID{tn}); err != nil {
		t.Fatal(err)
	}
	raised := floor()
	if raised == "" {
		t.Fatal("the flush raised no floor")
	}
	for _, st := range []*Store{stale, s} { // the stale look lands, then a current one
		if _, err := st.Epochs(ctx, []uuid.UUID{tn}); err != nil {
			t.Fatal(err)
		}
		if f := floor(); f != raised {
			t.Fatalf("one flush: the floor in Redis went from %s to %s, want it raised once", raised, f)
		}
	}
}

// A failover A→B and a failback to A, which was not restarted (a standalone Redis behind an address
// that follows the master, where INFO shows no master_replid2): A's run id comes back. A first
// version of the rule above took it for a stale look, and a process that did not look while B was
// master never learnt that claims B took were lost. (From a review.)
func TestAFailbackToTheSameRunIDIsALoss(t *testing.T) {
	read := map[string]string{"server": "run-A"}
	s, tn, _, _ := claimedReading(t, &read)
	ctx := context.Background()
	other := NewStore(s.rdb, s.prefix, time.Hour, nil)
	other.SetRunIDs(func(context.Context) (map[string]string, error) { return maps.Clone(read), nil })
	for _, st := range []*Store{s, other} {
		if _, err := st.Epochs(ctx, []uuid.UUID{tn}); err != nil {
			t.Fatal(err)
		}
	}
	read["server"] = "run-B" // failover; only s looks while B is the master
	if _, err := s.Epochs(ctx, []uuid.UUID{tn}); err != nil {
		t.Fatal(err)
	}
	read["server"] = "run-A" // failback
	back := time.Now()
	for _, st := range []*Store{s, other} {
		if _, err := st.Epochs(ctx, []uuid.UUID{tn}); err != nil {
			t.Fatal(err)
		}
	}
	if loss, _ := other.Loss(); loss.Before(back) {
		t.Errorf("a process that did not look while B was the master: latest loss %v, want one after the failback at %v", loss, back)
	}
}

// EvictionRisk names a policy that evicts and, once it has, how many keys it evicted; a Redis
// reconfigured to noeviction at run time has none. (Before, the count was not reported, and serve
// asked once, at start-up.)
func TestEvictionRiskNamesThePolicyAndTheEvictions(t *testing.T) {
	rdb, _ := testenv.PrivateRedis(t, "--maxmemory", "2mb", "--maxmemory-policy", "allkeys-lru")
	s := NewStore(rdb, "", time.Hour, nil)
	ctx := context.Background()
	if r, ok := s.EvictionRisk(ctx); !ok || !strings.Contains(r, "maxmemory-policy is allkeys-lru") || strings.Contains(r, "evicted") {
		t.Errorf("before any eviction: %q, %v", r, ok)
	}
	big := strings.Repeat("x", 64<<10)
	for i := range 200 { // 12.5 MiB into 2 MiB
		rdb.Set(ctx, fmt.Sprintf("filler:%d", i), big, 0)
	}
	if r, _ := s.EvictionRisk(ctx); !strings.Contains(r, "it has evicted") {
		t.Errorf("after evictions: %q, want their count", r)
	}
	if err := rdb.ConfigSet(ctx, "maxmemory-policy", "noeviction").Err(); err != nil {
		t.Fatal(err)
	}
	if r, ok := s.EvictionRisk(ctx); r != "" || !ok {
		t.Errorf("with noeviction: %q, %v; want none", r, ok)
	}
	// A Redis that does not answer says nothing (the last answer stands); before, it was "no risk",
	// and serve logged the warning cleared at every outage (found by review).
	if err := rdb.ConfigSet(ctx, "maxmemory-policy", "allkeys-lru").Err(); err != nil {
		t.Fatal(err)
	}
	if err := rdb.Do(ctx, "CLIENT", "PAUSE", "8000", "ALL").Err(); err != nil {
		t.Fatal(err)
	}
	short, cancel := context.WithTimeout(ctx, 300*time.Millisecond)
	defer cancel()
	if r, ok := s.EvictionRisk(short); ok {
		t.Errorf("with Redis paused: %q, ok; want no answer", r)
	}
}

// Only CONFIG refused for good is an answer ("" and ok): renamed away, or denied by ACL. A Redis busy
// with a script (BUSY) or refusing the client's password (WRONGPASS) says nothing about the policy.
// Found by review: any error reply read as "no risk", and the warning cleared.
func TestEvictionRiskTellsRefusalsFromNoAnswer(t *testing.T) {
	ctx := context.Background()
	renamed, _ := testenv.PrivateRedis(t, "--rename-command", "CONFIG", "")
	if r, ok := NewStore(renamed, "", time.Hour, nil).EvictionRisk(ctx); r != "" || !ok {
		t.Errorf("CONFIG renamed away: %q %v, want no risk, an answer", r, ok)
	}
	admin, addr := testenv.PrivateRedis(t, "--maxmemory-policy", "allkeys-lru", "--busy-reply-threshold", "100")
	if err := admin.Do(ctx, "ACL", "SETUSER", "app", "on", ">pw", "~*", "+@all", "-config").Err(); err != nil {
		t.Fatal(err)
	}
	denied := redis.NewClient(&redis.Options{Addr: addr, Username: "app", Password: "pw"})
	defer denied.Close()
	if r, ok := NewStore(denied, "", time.Hour, nil).EvictionRisk(ctx); r != "" || !ok {
		t.Errorf("CONFIG denied by ACL: %q %v, want no risk, an answer", r, ok)
	}
	wrong := redis.NewClient(&redis.Options{Addr: addr, Username: "app", Password: "rotated"})
	defer wrong.Close()
	if r, ok := NewStore(wrong, "", time.Hour, nil).EvictionRisk(ctx); ok {
		t.Errorf("a refused password: %q, ok; want no answer", r)
	}
	busy := redis.NewClient(&redis.Options{Addr: addr, ReadTimeout: -1})
	defer busy.Close()
	go busy.Eval(ctx, "local t = redis.call('TIME') while true do local n = redis.call('TIME') if tonumber(n[1]) - tonumber(t[1]) > 2 then break end end return 1", nil)
	time.Sleep(400 * time.Millisecond)
	if r, ok := NewStore(admin, "", time.Hour, nil).EvictionRisk(ctx); ok {
		t.Errorf("a Redis busy with a script: %q, ok; want no answer", r)
	}
}
