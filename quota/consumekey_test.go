package quota

import (
	"context"
	"fmt"
	"net/http"
	"sync"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/analyticsd/analyticsd/dedup"
	"github.com/analyticsd/analyticsd/internal/testenv"
)

// A consume's marker outlived the stored response of its Idempotency-Key (two windows against one),
// and it kept only the value it left: the key sent again after the window with another n —
// consume?n=1, then n=1000000000 — was answered 200 "allowed" while nothing was spent, and its
// increment dropped as a duplicate. The marker now keeps n: another n under a used key is refused
// with 422, and spends and stores nothing — also when the middleware's records of the key are gone
// (deleted here; the middleware keeps a mark of the key as long as the marker lives, too).
func TestConsumeKeyReusedForAnotherAmountIsRefused(t *testing.T) {
	t.Parallel()
	h := newHarness(t)
	s := h.service(t, Config{Enabled: true, IdempotencyWindow: time.Hour}, map[string]float64{"builds_daily": 200}, nil)
	srv := h.app(t, s, h.ingest, dedup.NewStore(h.env.Redis, h.env.Prefix, time.Hour, nil).Idempotency(nil))
	forget := func() {
		if n := testenv.DelKeys(context.Background(), h.env.Redis, h.env.Prefix+"idem:*"); n == 0 {
			t.Fatal("no Idempotency-Key record to delete: the middleware did not run")
		}
	}
	consume := func(n, key string) (int, map[string]any) {
		r := request(http.MethodPost, "/api/analytics/quotas/builds_daily/consume?n="+n, h.keyW, "")
		r.Header["Idempotency-Key"] = key
		got := srv.Do(t, r)
		return got.Status, got.Body
	}
	if code, body := consume("1", "bypass-1"); code != 200 {
		t.Fatalf("first consume: %d %v", code, body)
	}
	forget()
	code, body := consume("1000000000", "bypass-1")
	if e, _ := body["error"].(map[string]any); code != 422 || e["code"] != "idempotency_key_reused" {
		t.Errorf("the key again with another n: %d %v, want 422 idempotency_key_reused", code, body)
	}
	forget()
	if code, body := consume("1", "bypass-1"); code != 200 {
		t.Errorf("the key again with the same n (a retry): %d %v, want 200", code, body)
	}
	ctx := context.Background()
	if n, _, _ := s.counters.Get(ctx, h.tenant.ID, "builds_daily", time.Now()); n != 1 {
		t.Errorf("counter %d, want 1", n)
	}
	h.writer.Close(ctx)
	if got := h.storedIncrements(t); got["builds_daily"] != 1 {
		t.Errorf("stored %v, want builds_daily 1", got)
	}
}

// recorded is a Recorder that keeps what it is asked to store.
type recorded struct {
	mu   sync.Mutex
	incs []time.Time // each increment's received time
}

func (r *recorded) RecordIncrement(_ context.Context, _ uuid.UUID, _ string, _ int64, at time.Time, _ string, _ bool) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.incs = append(r.incs, at)
	return nil
}

func (r *recorded) EmitOnce(context.Context, uuid.UUID, string, string, string, map[string]any) error {
	return nil
}

func (r *recorded) all() []time.Time {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]time.Time(nil), r.incs...)
}

// A retried consume records its increment again (the first run may have died before its record was
// durable; the id derived from the key makes it a duplicate otherwise). It used to record it at the
// retry's time — after midnight, on the next day, where its spend was never counted — and at any age
// of the first run, even once the first record's claim may have expired (a second stored copy). It
// now records on the first run's time, and only within the dedup window of it.
func TestConsumeRetryRecordsOnTheFirstRunsDayWhileItsClaimLives(t *testing.T) {
	t.Parallel()
	h := newHarness(t)
	const window = time.Hour
	s := h.service(t, Config{Enabled: true, IdempotencyWindow: window}, map[string]float64{"builds_daily": 200}, nil)
	rec := &recorded{}
	s.SetRecorder(rec)
	first := time.Now().UTC().Truncate(24 * time.Hour).Add(24*time.Hour - 30*time.Second) // 23:59:30
	now := first
	s.now = func() time.Time { return now }
	ctx := context.Background()
	opts := ConsumeOptions{IdempotencyKey: "k"}
	for _, at := range []time.Time{first, first.Add(40 * time.Second), first.Add(window)} {
		now = at
		if r, err := s.ConsumeWith(ctx, h.tenant.ID, "builds_daily", 2, opts); err != nil || !r.Allowed || r.Current != 2 {
			t.Fatalf("consume at %v: %+v %v, want allowed at 2", at, r, err)
		}
	}
	got := rec.all()
	if len(got) != 2 || !got[0].Equal(first) || !got[1].Equal(first) {
		t.Errorf("increments recorded at %v; want two, both at the first run's %v (the retry a window later records none)", got, first)
	}
}

// The marker's value is what a version before the amount key reads with tonumber(): it must stay a
// plain integer (a marker "7 1 1796056729" made that version's script answer {2} and its Go code
// index past the end, a panic that takes the process down). And Lua writes numbers of 1e14 and above
// as "1e+14" unless told otherwise: a replay of a consume on such a counter found a marker its own
// pattern did not match, answered {2}, and the Go side panicked the same way. Both replay here.
func TestConsumeMarkerStaysAPlainIntegerAtAnySize(t *testing.T) {
	t.Parallel()
	h := newHarness(t)
	s := h.service(t, Config{Enabled: false, IdempotencyWindow: time.Hour}, map[string]float64{"builds_daily": 200}, nil)
	ctx := context.Background()
	opts := ConsumeOptions{IdempotencyKey: "big"}
	if _, err := s.ConsumeWith(ctx, h.tenant.ID, "builds_daily", 1, opts); err != nil { // reconciles the day
		t.Fatal(err)
	}
	if err := h.env.Redis.IncrBy(ctx, s.counters.Key(h.tenant.ID, "builds_daily", time.Now()), 100_000_000_000_000).Err(); err != nil {
		t.Fatal(err)
	}
	opts.IdempotencyKey = "bigger"
	first, err := s.ConsumeWith(ctx, h.tenant.ID, "builds_daily", 1, opts)
	if err != nil || !first.Allowed || first.Current != 100_000_000_000_002 {
		t.Fatalf("consume on a counter past 1e14: %+v %v", first, err)
	}
	raw, err := h.env.Redis.Get(ctx, s.counters.MarkerKey(h.tenant.ID, "builds_daily", "bigger")).Result()
	if err != nil || raw != "100000000000002" {
		t.Errorf("marker %q (%v), want the plain integer 100000000000002", raw, err)
	}
	again, err := s.ConsumeWith(ctx, h.tenant.ID, "builds_daily", 1, opts)
	if err != nil || !again.Allowed || again.Current != first.Current {
		t.Errorf("replay: %+v %v, want allowed at %v", again, err, first.Current)
	}
	if _, err := s.ConsumeWith(ctx, h.tenant.ID, "builds_daily", 2, opts); err != ErrKeyReused {
		t.Errorf("another n under the key: %v, want ErrKeyReused", err)
	}
}

// One build (never released) wrote the marker as "value n time" in one key. Read as a plain value it
// was 0 and its n unknown, so another n under its key was allowed for free again. It is still read.
func TestConsumeReadsTheOneKeyMarkerFormat(t *testing.T) {
	t.Parallel()
	h := newHarness(t)
	s := h.service(t, Config{Enabled: true, IdempotencyWindow: time.Hour}, map[string]float64{"builds_daily": 200}, nil)
	ctx := context.Background()
	first := time.Now().UTC().Truncate(time.Second).Add(-time.Minute)
	if err := h.env.Redis.Set(ctx, s.counters.MarkerKey(h.tenant.ID, "builds_daily", "old"), fmt.Sprintf("7 5 %d", first.Unix()), time.Hour).Err(); err != nil {
		t.Fatal(err)
	}
	if _, err := s.ConsumeWith(ctx, h.tenant.ID, "builds_daily", 100, ConsumeOptions{IdempotencyKey: "old"}); err != ErrKeyReused {
		t.Errorf("another n under the key: %v, want ErrKeyReused", err)
	}
	rec := &recorded{}
	s.SetRecorder(rec)
	r, err := s.ConsumeWith(ctx, h.tenant.ID, "builds_daily", 5, ConsumeOptions{IdempotencyKey: "old"})
	if got := rec.all(); err != nil || !r.Allowed || r.Current != 7 || len(got) != 1 || !got[0].Equal(first) {
		t.Errorf("the same n: %+v %v, recorded at %v; want a replay at 7, recorded at the first run's %v", r, err, got, first)
	}
}
