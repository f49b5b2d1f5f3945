package ingest

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/ClickHouse/clickhouse-go/v2/lib/driver"
	"github.com/google/uuid"
	"github.com/redis/go-redis/v9"

	"github.com/analyticsd/analyticsd/auth"
	"github.com/analyticsd/analyticsd/dedup"
	"github.com/analyticsd/analyticsd/ingest/spool"
	"github.com/analyticsd/analyticsd/internal/clock"
	"github.com/analyticsd/analyticsd/internal/testenv"
	"github.com/analyticsd/analyticsd/internal/testenv/fixture"
)

// Regression tests for what an adversarial review of the exactly-once change found: each failed on
// the change before its fix.

// dropClaims makes Redis forget a tenant's claims (and every Idempotency-Key), as a restart without
// persistence or an RDB restore would; keepEpoch keeps the epoch (and when it began), as a partial
// rollback does.
func (h *harness) dropClaims(t *testing.T, tenant uuid.UUID, keepEpoch bool) {
	t.Helper()
	ctx := context.Background()
	history := h.env.Prefix + "dedup:{" + tenant.String() + "}:"
	keys, _ := testenv.Keys(ctx, h.env.Redis, h.env.Prefix+"dedup:{"+tenant.String()+"}:*")
	idem, _ := testenv.Keys(ctx, h.env.Redis, h.env.Prefix+"idem:*")
	for _, k := range append(keys, idem...) {
		if keepEpoch && (k == history+"epoch" || k == history+"began") {
			continue
		}
		h.env.Redis.Del(ctx, k)
	}
}

// A retry after Redis lost the claims, of an event whose ts the server set (so the copies' ts
// differ): the ClickHouse check looks where the earlier copy can be — its own arrival time within the
// window — not only at the retry's ts. Sent once with a fixed id, once under an Idempotency-Key.
func TestRetryAfterRedisLostTheClaimsIsStoredOnce(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name string
		body string
		hdr  map[string]string
	}{
		{"fixed id", fmt.Sprintf(`[{"id":%q,"event":"apikey.request"}]`, uuid.NewString()), nil},
		{"idempotency key", `[{"event":"apikey.request"}]`, map[string]string{"Idempotency-Key": "k-1"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := newHarness(t, opts{})
			if r := h.post(t, h.keyA, "/api/analytics/events", []byte(tc.body), tc.hdr); r.Status != 202 || r.accepted() != 1 {
				t.Fatalf("first: %d %s", r.Status, r.Raw)
			}
			testenv.Eventually(t, 20*time.Second, func() error {
				n, _ := h.count(t, "events", h.a.ID)
				if n != 1 {
					return fmt.Errorf("%d rows stored, want the first copy", n)
				}
				return nil
			})
			time.Sleep(1100 * time.Millisecond) // the retry gets another ts
			h.dropClaims(t, h.a.ID, false)
			h.post(t, h.keyA, "/api/analytics/events", []byte(tc.body), tc.hdr)
			h.w.Close(context.Background())
			if rows, _ := h.count(t, "events", h.a.ID); rows != 1 {
				t.Errorf("stored %d times, want once", rows)
			}
			if n := h.dailyUsage(t, h.a.ID, "apikey.request"); n != 1 {
				t.Errorf("daily_usage %d, want 1", n)
			}
			// The retry's claim counted it again; the copy found stored from before the claim
			// history began takes that count back.
			time.Sleep(300 * time.Millisecond) // the feed sends take-backs every 10 ms
			if n, _, err := h.counters.Get(context.Background(), h.a.ID, "api_requests_daily", time.Now()); err != nil || n != 1 {
				t.Errorf("live counter %d (%v), want 1", n, err)
			}
		})
	}
}

// A Redis restart that brings back an old snapshot keeps the tenants' epochs but not the newest
// claims. The changed run id is noticed, and until the claim history covers a window again, rows are
// checked in ClickHouse: the retry is stored once.
func TestRedisRollbackIsNoticed(t *testing.T) {
	t.Parallel()
	h := newHarness(t, opts{})
	ctx := context.Background()
	var runID atomic.Value
	runID.Store("before")
	h.dedup.SetRunIDs(func(context.Context) (map[string]string, error) {
		return map[string]string{"server": runID.Load().(string)}, nil
	})
	// The tenant has been ingesting for two days: its claim history is older than the window.
	h.env.Redis.Set(ctx, h.env.Prefix+"dedup:{"+h.a.ID.String()+"}:epoch", time.Now().Add(-48*time.Hour).Unix(), 0)
	body, ids := events(5, func(int) map[string]any { return map[string]any{"event": "apikey.request"} })
	if r := h.post(t, h.keyA, "/api/analytics/events", body, nil); r.Status != 202 || r.accepted() != 5 {
		t.Fatalf("first: %d %s", r.Status, r.Raw)
	}
	h.waitStored(t, h.a.ID, ids, 5)
	h.dropClaims(t, h.a.ID, true)
	runID.Store("after") // the server restarted from its snapshot
	h.post(t, h.keyA, "/api/analytics/events", body, nil)
	h.w.Close(ctx)
	if rows, _ := h.count(t, "events", h.a.ID); rows != 5 {
		t.Errorf("stored %d rows for 5 ids, want 5", rows)
	}
	time.Sleep(300 * time.Millisecond) // the feed sends take-backs every 10 ms
	if n, _, err := h.counters.Get(ctx, h.a.ID, "api_requests_daily", time.Now()); err != nil || n != 5 {
		t.Errorf("live counter %d (%v), want 5: the retry's count of copies stored before the rollback stays", n, err)
	}
}

// A first-release segment whose replay fails once (ClickHouse unreachable) is read again later; its
// records must claim their ids for the same batch both times, or the second read finds every id
// taken by the first and drops them all.
func TestLegacySegmentRetriedAfterAFailureShipsEveryRow(t *testing.T) {
	t.Parallel()
	env := testenv.Migrated(t)
	dir := t.TempDir()
	tenantID := uuid.New()
	now := time.Now().UTC().Truncate(time.Second)
	rows := make([]Row, 20)
	for i := range rows {
		rows[i] = Row{ID: uuid.New(), TenantID: tenantID, Ts: now, ReceivedAt: now, Event: "a.b", Source: "app", Props: "{}"}
	}
	if err := os.WriteFile(filepath.Join(dir, "0000000000000008.seg"), legacyRecord(rows), 0o640); err != nil {
		t.Fatal(err)
	}
	ch, proxy := proxiedClickHouse(t)
	proxy.SetDown(true)
	w, err := NewWriter(WriterConfig{Dir: dir, FlushInterval: 50 * time.Millisecond, RetryMax: 200 * time.Millisecond}, ch, env.DB,
		dedup.NewStore(env.Redis, env.Prefix, time.Hour, nil), nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	w.Start()
	testenv.Eventually(t, 10*time.Second, func() error { // the replay fails once
		if st := w.Stats(); st.LastError == "" {
			return fmt.Errorf("writer %+v: the replay has not failed yet", st)
		}
		return nil
	})
	proxy.SetDown(false)
	testenv.Eventually(t, 20*time.Second, func() error {
		if st := w.Stats(); st.PendingSegments != 0 {
			return fmt.Errorf("writer %+v, waiting for the spool to empty", st)
		}
		return nil
	})
	w.Close(context.Background())
	var n uint64
	env.CH.QueryRow(context.Background(), "SELECT count() FROM "+env.DB+".events WHERE tenant_id = ?", tenantID).Scan(&n)
	if n != 20 {
		t.Errorf("stored %d of the legacy segment's 20 rows", n)
	}
}

// A duplicate found by the shutdown's last flush, after the live counter feed closed (the order
// serve used): it was counted when accepted — its claim looked new after Redis lost the first copy's
// — and its live count must still be taken back, not kept as an overcount.
func TestDuplicateFoundAfterTheFeedClosedIsUncounted(t *testing.T) {
	t.Parallel()
	h := newHarness(t, opts{})
	body := []byte(fmt.Sprintf(`[{"id":%q,"event":"apikey.request"}]`, uuid.NewString()))
	h.post(t, h.keyA, "/api/analytics/events", body, nil)
	testenv.Eventually(t, 20*time.Second, func() error {
		n, _ := h.count(t, "events", h.a.ID)
		if n != 1 {
			return fmt.Errorf("%d rows stored, want the first copy", n)
		}
		return nil
	})
	time.Sleep(1100 * time.Millisecond) // not a poll: the retry gets another ts
	h.dropClaims(t, h.a.ID, false)
	h.svc.Close() // the live counter feed closes ...
	h.post(t, h.keyA, "/api/analytics/events", body, nil)
	if n, _, _ := h.counters.Get(context.Background(), h.a.ID, "api_requests_daily", time.Now()); n != 2 {
		t.Fatalf("live counter %d before shipping; the setup wants the retry counted as new (2)", n)
	}
	h.w.Close(context.Background()) // ... before the last flush finds the retry stored already
	if rows, _ := h.count(t, "events", h.a.ID); rows != 1 {
		t.Fatalf("stored %d rows", rows)
	}
	if n, ok, _ := h.counters.Get(context.Background(), h.a.ID, "api_requests_daily", time.Now()); ok && n != 1 {
		t.Errorf("live counter still %d for 1 stored row: the duplicate's count was never taken back", n)
	}
}

// A schema change that makes ClickHouse refuse every event insert, while increments keep landing:
// the increments' success is no evidence about the events table, so no event is quarantined.
func TestEventsRefusedWhileIncrementsLandQuarantinesNoEvent(t *testing.T) {
	t.Parallel()
	h := newHarness(t, opts{})
	alterEvents(t, h.env, "ADD COLUMN poison UInt8 DEFAULT throwIf(event != '')")
	body, _ := events(30, nil)
	h.post(t, h.keyA, "/api/analytics/events", body, nil)
	deadline := time.Now().Add(3 * time.Second)
	for time.Now().Before(deadline) {
		h.post(t, h.keyB, "/api/analytics/usage", []byte(`{"metric":"api_requests_daily","n":1}`), nil)
		time.Sleep(100 * time.Millisecond) // the scenario: increments keep landing for 3 s
	}
	if st := h.w.Stats(); st.QuarantinedRows > 0 {
		t.Errorf("%d events quarantined while ClickHouse refused every event insert", st.QuarantinedRows)
	}
	// The refused events cannot ship while the column refuses them: close without the harness's 10 s
	// wait for them (they stay in the test's spool).
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	h.w.Close(ctx)
}

// countingConn counts the inserts and queries that reach ClickHouse.
type countingConn struct {
	driver.Conn
	inserts, queries atomic.Int64
}

func (c *countingConn) PrepareBatch(ctx context.Context, q string, o ...driver.PrepareBatchOption) (driver.Batch, error) {
	if strings.HasPrefix(q, "INSERT") {
		c.inserts.Add(1)
	}
	return c.Conn.PrepareBatch(ctx, q, o...)
}

func (c *countingConn) Query(ctx context.Context, q string, args ...any) (driver.Rows, error) {
	c.queries.Add(1)
	return c.Conn.Query(ctx, q, args...)
}

// One attempt at a chunk ClickHouse refuses whole costs a bounded number of inserts and ends parked:
// isolating 2,000 refused rows one by one took 4,000 inserts and 18 s, and a 50,000-row chunk would
// have held a flusher for minutes.
func TestIsolatingRefusedRowsIsBounded(t *testing.T) {
	t.Parallel()
	env := testenv.Migrated(t)
	alterEvents(t, env, "ADD COLUMN poison UInt8 DEFAULT throwIf(event != '')")
	fc := &countingConn{Conn: env.CH}
	sh := newShipper(fc, env.DB, nil, WriterConfig{InsertTimeout: time.Minute, QuarantineAfter: 3}, NewMetrics(nil, 0), slog.New(slog.DiscardHandler))
	tenantID := uuid.New()
	now := time.Now().UTC().Truncate(time.Second)
	rows := make([]Row, 2000)
	for i := range rows {
		rows[i] = Row{ID: uuid.New(), TenantID: tenantID, Ts: now, ReceivedAt: now, Event: "a.b", Source: "app", Props: "{}"}
	}
	_, err := sh.shipChunk(&segment{id: "bounded"}, []*batch{{wid: 1, events: rows}}, false)
	if err != errRefused || fc.inserts.Load() > isolationBudget+1 {
		t.Errorf("got %v after %d inserts, want errRefused (parked) within %d", err, fc.inserts.Load(), isolationBudget+1)
	}
}

// A segment whose tail is zeros (the file system extended it, a crash came before its blocks were
// written): eight zero bytes are a frame of length 0 whose CRC-32C is 0. The zeros are a torn tail;
// the acknowledged rows in front of them ship.
func TestZeroFilledTailDoesNotStallASegment(t *testing.T) {
	t.Parallel()
	env := testenv.Migrated(t)
	dir := t.TempDir()
	tenantID := uuid.New()
	now := time.Now().UTC().Truncate(time.Second)
	rows := make([]Row, 5)
	for i := range rows {
		rows[i] = Row{ID: uuid.New(), TenantID: tenantID, Ts: now, ReceivedAt: now, Event: "a.b", Source: "app", Props: "{}"}
	}
	name := "0000000000000004.inflight"
	writeSegment(t, dir, name, 77, rows, nil)
	f, _ := os.OpenFile(filepath.Join(dir, name), os.O_APPEND|os.O_WRONLY, 0)
	f.Write(make([]byte, 4096))
	f.Close()
	n, st := shipSpool(t, env, dir, tenantID)
	if n != 5 || st.QuarantinedFiles != 0 {
		t.Errorf("stored %d of the 5 rows in front of a zero tail, %d quarantine files; want 5 and none (zeros are a torn tail, not a record)", n, st.QuarantinedFiles)
	}
}

// A record whose checksum holds but which this release cannot decode is set aside in the
// quarantine; the records after it ship.
func TestUnreadableRecordIsQuarantinedAndTheRestShips(t *testing.T) {
	t.Parallel()
	env := testenv.Migrated(t)
	bad, start := spool.FrameStart(nil)
	dir, tenantID := segmentAround(t, func(Row) []byte { return spool.FrameEnd(append(bad, "not a record"...), start) })
	n, st := shipSpool(t, env, dir, tenantID)
	if n != 3 || st.QuarantinedFiles != 1 {
		t.Errorf("stored %d of 3 rows, %d quarantine files; want 3 and the unreadable record in 1", n, st.QuarantinedFiles)
	}
}

// A record damaged inside a segment (its checksum fails, acknowledged records follow) is no torn
// write: the records after it ship, and the damaged bytes are kept apart (not in the quarantine,
// which requeue ships and erasure scrubs) rather than going out with the segment. Before, the reader stopped there as at a torn tail, the rows after the damage were
// never read, and the writer removed the segment: 2 of 3 acknowledged rows lost, no quarantine, no
// error. (Fails on the code before this change.)
func TestDamagedRecordInsideASegmentIsKeptAndTheRestShips(t *testing.T) {
	t.Parallel()
	env := testenv.Migrated(t)
	dir, tenantID := segmentAround(t, func(r Row) []byte {
		damaged := appendRecord(nil, 4, []Row{r}, nil)
		damaged[len(damaged)-1] ^= 0x55 // bit rot in the payload
		return damaged
	})
	n, st := shipSpool(t, env, dir, tenantID)
	if n != 3 || st.QuarantinedFiles != 0 || st.DamagedStretches != 1 || st.DamagedFiles != 1 {
		t.Fatalf("stored %d rows, %d quarantine files, %d damaged stretches in %d files; want the 3 intact rows stored and the damaged record kept apart",
			n, st.QuarantinedFiles, st.DamagedStretches, st.DamagedFiles)
	}
	if kept, err := spool.ListDamaged(dir); err != nil || len(kept) != 1 || kept[0].Bytes == 0 {
		t.Fatalf("damaged %+v %v, want the record's bytes kept", kept, err)
	}
}

// A writer whose Gate fails ships nothing — rows stay in the spool — and ships them once it passes:
// serve's checks of a ClickHouse unreachable at start-up come before any write to it.
func TestWriterShipsNothingUntilItsGatePasses(t *testing.T) {
	t.Parallel()
	var open atomic.Bool
	h := newHarness(t, opts{writer: func(c *WriterConfig) {
		c.Gate = func(context.Context) error {
			if !open.Load() {
				return errors.New("not checked yet")
			}
			return nil
		}
	}})
	body, ids := events(20, nil)
	if r := h.post(t, h.keyA, "/api/analytics/events", body, nil); r.Status != 202 {
		t.Fatalf("post: %d %s", r.Status, r.Raw)
	}
	time.Sleep(500 * time.Millisecond) // ten flush intervals
	if n, _ := h.count(t, "events", h.a.ID); n != 0 {
		t.Fatalf("%d rows shipped through a closed gate", n)
	}
	open.Store(true)
	h.waitStored(t, h.a.ID, ids, len(ids))
}

// segmentAround writes a spool segment of a new tenant's rows: one record of a row, the bytes middle
// makes (given a further row of the tenant's), then a record of two rows. It returns the spool's
// directory and the tenant.
func segmentAround(t *testing.T, middle func(Row) []byte) (string, uuid.UUID) {
	t.Helper()
	dir, tenantID := t.TempDir(), uuid.New()
	now := time.Now().UTC().Truncate(time.Second)
	row := func() Row {
		return Row{ID: uuid.New(), TenantID: tenantID, Ts: now, ReceivedAt: now, Event: "a.b", Source: "app", Props: "{}"}
	}
	name := "0000000000000005.seg"
	writeSegment(t, dir, name, 3, []Row{row()}, nil)
	f, err := os.OpenFile(filepath.Join(dir, name), os.O_APPEND|os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	f.Write(middle(row()))
	f.Write(appendRecord(nil, 5, []Row{row(), row()}, nil))
	f.Close()
	return dir, tenantID
}

// shipSpool starts a writer on dir, waits until it has shipped every segment there, and returns how
// many of tenantID's events ClickHouse holds and the writer's last stats.
func shipSpool(t *testing.T, env testenv.Env, dir string, tenantID uuid.UUID) (uint64, Stats) {
	t.Helper()
	w, err := NewWriter(WriterConfig{Dir: dir, FlushInterval: 50 * time.Millisecond, RetryMax: 200 * time.Millisecond}, env.CH, env.DB, nil, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	w.Start()
	testenv.Eventually(t, 20*time.Second, func() error {
		if st := w.Stats(); st.PendingSegments != 0 {
			return fmt.Errorf("writer %+v, waiting for the segment shipped", st)
		}
		return nil
	})
	st := w.Stats()
	w.Close(context.Background())
	var n uint64
	if err := env.CH.QueryRow(context.Background(), "SELECT count() FROM "+env.DB+".events WHERE tenant_id = ?", tenantID).Scan(&n); err != nil {
		t.Fatal(err)
	}
	return n, st
}

// firstSecondRace is the sequence two tests below share, run for new tenants until its timing is met
// (at most ten). Instance A seals a segment at two rows and otherwise holds it for a minute. Just
// after a second begins, A ships a first batch of a new tenant (judging its young history complete)
// and holds X in its open segment; loss makes Redis lose X's claim; the client's retry of X goes to
// instance B, which claims it anew and stores it; a third row makes A ship X. X must be stored once
// every time. After B shipped, loss's met says whether the loss fell as the test needs (and what
// it saw).
func firstSecondRace(t *testing.T, h *harness, b *instance, setup func(), loss func(tenant uuid.UUID) (met func() (bool, string))) {
	t.Helper()
	a := h.instance
	apikey := func(int) map[string]any { return map[string]any{"event": "apikey.request"} }
	for attempt := 1; attempt <= 10; attempt++ {
		tn := fixture.Tenant(t, h.env.PG, fmt.Sprintf("first-second-%d-%s", attempt, uuid.NewString()[:8]))
		key, _ := fixture.Key(t, h.env.PG, tn.ID, "w", auth.ScopeEventsWrite)
		post := func(in *instance, body []byte) resp {
			t.Helper()
			r := in.post(t, key, "/api/analytics/events", body, nil)
			if r.Status != 202 {
				t.Fatalf("post: %d %s", r.Status, r.Raw)
			}
			return r
		}
		setup()
		// Begin just after a second does, so that what follows fits in it.
		time.Sleep(time.Until(time.Now().Truncate(time.Second).Add(time.Second + 5*time.Millisecond)))
		w, wIDs := events(2, apikey)
		post(a, w)
		h.waitStored(t, tn.ID, wIDs, 2)
		x, xIDs := events(1, apikey)
		post(a, x) // held in A's open segment
		met := loss(tn.ID)
		if r := post(b, x); r.accepted() != 1 {
			t.Fatalf("X's retry to B: %s, want it accepted", r.Raw)
		}
		b.waitShipped(t)
		ok, saw := met()
		z, _ := events(1, apikey)
		post(a, z) // fills A's segment: it ships, X with it
		a.waitShipped(t)
		if n := h.countIDs(t, tn.ID, xIDs); n != 1 {
			t.Fatalf("attempt %d (%s): X is stored %d times, want once", attempt, saw, n)
		}
		if ok {
			return
		}
		t.Logf("attempt %d: the loss fell too late (%s); again", attempt, saw)
	}
	t.Fatal("in ten attempts the loss never fell in the history's first second")
}

func (h *harness) epoch(tenant uuid.UUID) string {
	return h.env.Redis.Get(context.Background(), h.env.Prefix+"dedup:{"+tenant.String()+"}:epoch").Val()
}

// Redis loses its data within the second the tenant's claim history began, and the next history
// begins in that second too. When A ships X, its verdict and its "complete" answer belong to the lost
// history. With epochs in whole seconds A took them for the new one's and stored X a second time;
// epochs now tell the histories apart.
func TestAHistoryLostInItsFirstSecondVouchesForNothing(t *testing.T) {
	t.Parallel()
	h := newHarness(t, opts{writer: func(c *WriterConfig) { c.BatchRows, c.FlushInterval = 2, time.Minute }})
	firstSecondRace(t, h, h.newInstance(t, opts{}), func() {}, func(tn uuid.UUID) func() (bool, string) {
		lost := h.epoch(tn)
		h.dropClaims(t, tn, false)
		return func() (bool, string) {
			next := h.epoch(tn)
			return next == lost, "epochs " + lost + ", " + next
		}
	})
}

// Redis restarts from a snapshot within the second the tenant's claim history began: the epoch
// survives, X's claim (made after the snapshot) does not, and B notices the new run id. With the
// restart floor in whole seconds the floor (that second) did not rise above the epoch, so A kept X's
// verdict and its "complete" answer and stored X a second time; the floor is now the instant the
// restart was noticed.
func TestARestartNoticedInTheHistorysFirstSecondVouchesForNothing(t *testing.T) {
	t.Parallel()
	h := newHarness(t, opts{writer: func(c *WriterConfig) { c.BatchRows, c.FlushInterval = 2, time.Minute }})
	b := h.newInstance(t, opts{})
	ctx := context.Background()
	var runID atomic.Value
	var run atomic.Int32
	runIDs := func(context.Context) (map[string]string, error) {
		return map[string]string{"server": runID.Load().(string)}, nil
	}
	h.dedup.SetRunIDs(runIDs)
	b.dedup.SetRunIDs(runIDs)
	// Another tenant's long history, read to make an instance look at the run ids.
	h.env.Redis.Set(ctx, h.env.Prefix+"dedup:{"+h.a.ID.String()+"}:epoch", time.Now().Add(-48*time.Hour).Unix(), 0)
	setup := func() {
		runID.Store(fmt.Sprintf("before-%d", run.Add(1)))
		// Both instances record the run id before the history begins (a look is at most a second
		// old on the request path, and shipping always looks).
		time.Sleep(1100 * time.Millisecond)
		for _, in := range []*instance{h.instance, b} {
			if _, err := in.dedup.Epochs(ctx, []uuid.UUID{h.a.ID}); err != nil {
				t.Fatal(err)
			}
		}
	}
	firstSecondRace(t, h, b, setup, func(tn uuid.UUID) func() (bool, string) {
		h.dropClaims(t, tn, true)
		runID.Store(fmt.Sprintf("after-%d", run.Load())) // the server restarted from its snapshot
		return func() (bool, string) {
			epoch, floor := h.epoch(tn), h.env.Redis.Get(ctx, h.env.Prefix+"dedup:{restarts}:floor").Val()
			return floor == epoch, "epoch " + epoch + ", restart noticed at " + floor
		}
	})
}

// Redis loses everything (FLUSHALL, or a restart without persistence) while instance A's insert of
// X, claimed in the lost history, is under way. The client's retry of X goes to instance B, which
// claims it anew and ships it at once: asked then, ClickHouse holds nothing of the tenant, so B
// judged the young history complete and stored X unchecked — and A's insert committed a second copy.
// An instance that notices the loss now lets the inserts begun before it settle first.
func TestAnInsertUnderWayAtARedisLossIsSettledBeforeTheRetryShips(t *testing.T) {
	t.Parallel()
	// 5 s: longer than the wait before the gate looks, so only finding the insert running holds B.
	fc := &faultConn{slow: 1, slowFor: 5 * time.Second}
	h := newHarness(t, opts{ch: func(c driver.Conn) driver.Conn { fc.Conn = c; return fc }})
	b := h.newInstance(t, opts{})
	x := h.lossRace(t, b, func() { fc.await(t, func() bool { return fc.slow == 0 }) }, nil)
	if n := h.countIDs(t, h.a.ID, x); n != 1 {
		t.Errorf("X is stored %d times, want once", n)
	}
}

// The same race on a Redis Cluster, with FLUSHALL on only the master holding tenant A's keys: that
// master keeps its run id, and the record of run ids lives on another master, so nothing noticed a
// loss — B did not wait, and X was stored twice. A marker key on every master now shows it. (The
// flush is of this test's keys on that master: a real FLUSHALL would wipe the other tests' too.)
func TestAFlushOfOneClusterMasterIsSettledBeforeTheRetryShips(t *testing.T) {
	if !testenv.RedisCluster() {
		t.Skip("needs Redis Cluster: `make test-cluster` runs it")
	}
	t.Parallel()
	fc := &faultConn{slow: 1, slowFor: 5 * time.Second}
	h := newHarness(t, opts{ch: func(c driver.Conn) driver.Conn { fc.Conn = c; return fc }})
	cc := h.env.Redis.(*redis.ClusterClient)
	ctx := context.Background()
	masterOf := func(key string) *redis.Client {
		m, err := cc.MasterForKey(ctx, key)
		if err != nil {
			t.Fatal(err)
		}
		return m
	}
	record := masterOf(h.env.Prefix + "dedup:{restarts}").Options().Addr
	for i := 0; masterOf("{"+h.a.ID.String()+"}").Options().Addr == record; i++ {
		if i == 20 {
			t.Fatal("no tenant found whose keys are on another master than the record of run ids")
		}
		h.a = fixture.Tenant(t, h.env.PG, fmt.Sprintf("acme%d", i))
		h.keyA, _ = fixture.Key(t, h.env.PG, h.a.ID, "w", auth.ScopeEventsWrite)
	}
	flush := func() {
		// The retry is received in a later second than X: the cluster's replicated tables drop an
		// insert whose block equals one stored before, which a copy received in the same second is,
		// and that would hide a second copy here.
		time.Sleep(time.Second)
		m := masterOf("{" + h.a.ID.String() + "}")
		keys, err := m.Keys(ctx, h.env.Prefix+"*").Result()
		if err != nil || len(keys) == 0 {
			t.Fatalf("keys on tenant A's master: %v %v", keys, err)
		}
		for _, k := range keys {
			m.Del(ctx, k)
		}
	}
	// A deployment running for an hour: a record of run ids created just now would make B wait for
	// the inserts under way anyway (it cannot tell a wipe from first use).
	if _, err := h.dedup.Epochs(ctx, nil); err != nil {
		t.Fatal(err)
	}
	cc.HSet(ctx, h.env.Prefix+"dedup:{restarts}", "~created", time.Now().Add(-time.Hour).UnixNano())
	b := h.newInstance(t, opts{})
	x := h.lossRaceBy(t, b, flush, func() { fc.await(t, func() bool { return fc.holding > 0 }) }, nil)
	if n := h.countIDs(t, h.a.ID, x); n != 1 {
		t.Errorf("X is stored %d times, want once", n)
	}
}

// lossRace is the sequence the tests of a loss of everything share: both instances look at Redis
// (as running instances have), instance A accepts X and ships it; once begun() returns, Redis loses
// everything of the test's prefix (the claims and the run ids recorded), after (if set) runs, and
// the client's retry of X goes to instance B. It returns X's id once both instances shipped.
func (h *harness) lossRace(t *testing.T, b *instance, begun, after func()) []string {
	t.Helper()
	return h.lossRaceBy(t, b, func() { testenv.DelKeys(context.Background(), h.env.Redis, h.env.Prefix+"*") }, begun, after)
}

// lossRaceBy is lossRace with the loss made by lose.
func (h *harness) lossRaceBy(t *testing.T, b *instance, lose, begun, after func()) []string {
	t.Helper()
	ctx := context.Background()
	h.env.Redis.Set(ctx, h.env.Prefix+"dedup:{"+h.b.ID.String()+"}:epoch", time.Now().Add(-48*time.Hour).Unix(), 0)
	for _, in := range []*instance{h.instance, b} {
		if _, err := in.dedup.Epochs(ctx, []uuid.UUID{h.b.ID}); err != nil {
			t.Fatal(err)
		}
	}
	x, xIDs := events(1, func(int) map[string]any { return map[string]any{"event": "apikey.request"} })
	if r := h.post(t, h.keyA, "/api/analytics/events", x, nil); r.Status != 202 {
		t.Fatalf("X: %d %s", r.Status, r.Raw)
	}
	begun()
	lose()
	if after != nil {
		after()
	}
	if r := b.post(t, h.keyA, "/api/analytics/events", x, nil); r.Status != 202 || r.accepted() != 1 {
		t.Fatalf("X's retry to B: %d %s, want it accepted", r.Status, r.Raw)
	}
	b.waitShipped(t)
	h.waitShipped(t)
	return xIDs
}

// closedWithin waits up to 10 s for ch to be closed, failing the test with missing otherwise.
func closedWithin(t *testing.T, ch <-chan struct{}, missing string) {
	t.Helper()
	select {
	case <-ch:
	case <-time.After(10 * time.Second):
		t.Fatal(missing)
	}
}

// await waits until done (asked under the connection's lock) holds.
func (f *faultConn) await(t *testing.T, done func() bool) {
	t.Helper()
	testenv.Eventually(t, 10*time.Second, func() error {
		f.mu.Lock()
		defer f.mu.Unlock()
		if !done() {
			return fmt.Errorf("the scripted insert has not begun")
		}
		return nil
	})
}

// The same race, with a process that never looked at Redis before (an instance just restarted, `spool
// drain`) looking first after the loss: it records the run ids anew, with nothing to compare them
// to. Before, that hid the loss from every process that had recorded them: B never waited, and X was
// stored twice. The record's generation tells them it is new.
func TestAProcessLookingFirstAfterALossDoesNotHideIt(t *testing.T) {
	t.Parallel()
	fc := &faultConn{slow: 1, slowFor: 5 * time.Second}
	h := newHarness(t, opts{ch: func(c driver.Conn) driver.Conn { fc.Conn = c; return fc }})
	b := h.newInstance(t, opts{})
	x := h.lossRace(t, b, func() { fc.await(t, func() bool { return fc.slow == 0 }) }, func() {
		if _, err := h.newInstance(t, opts{}).dedup.Epochs(context.Background(), nil); err != nil {
			t.Fatal(err)
		}
	})
	if n := h.countIDs(t, h.a.ID, x); n != 1 {
		t.Errorf("X is stored %d times, want once", n)
	}
}

// The same race, with the retry going to an instance started after the loss (a restart, a scale-out):
// its first look finds the run ids' record just created — a wipe's or first use, it cannot tell —
// and it did not wait: X was stored twice. A young record now counts as a possible loss to wait out.
func TestAnInstanceStartedAfterALossWaitsForTheInsertsUnderWay(t *testing.T) {
	t.Parallel()
	fc := &faultConn{slow: 1, slowFor: 5 * time.Second}
	h := newHarness(t, opts{ch: func(c driver.Conn) driver.Conn { fc.Conn = c; return fc }})
	ctx := context.Background()
	h.env.Redis.Set(ctx, h.env.Prefix+"dedup:{"+h.b.ID.String()+"}:epoch", time.Now().Add(-48*time.Hour).Unix(), 0)
	if _, err := h.dedup.Epochs(ctx, []uuid.UUID{h.b.ID}); err != nil {
		t.Fatal(err)
	}
	x, xIDs := events(1, func(int) map[string]any { return map[string]any{"event": "apikey.request"} })
	if r := h.post(t, h.keyA, "/api/analytics/events", x, nil); r.Status != 202 {
		t.Fatalf("X: %d %s", r.Status, r.Raw)
	}
	fc.await(t, func() bool { return fc.slow == 0 })
	testenv.DelKeys(ctx, h.env.Redis, h.env.Prefix+"*")
	b := h.newInstance(t, opts{})
	if r := b.post(t, h.keyA, "/api/analytics/events", x, nil); r.Status != 202 || r.accepted() != 1 {
		t.Fatalf("X's retry to B: %d %s, want it accepted", r.Status, r.Raw)
	}
	b.waitShipped(t)
	h.waitShipped(t)
	if n := h.countIDs(t, h.a.ID, xIDs); n != 1 {
		t.Errorf("X is stored %d times, want once", n)
	}
}

// Reading the claim histories again once the server listed an insert is what keeps it safe, not a
// time bound: with a bound (1 s after the first read), a Redis taking 1.1 s to answer the look at
// its run ids made every insert be aborted, and nothing shipped again.
func TestASlowRedisDoesNotStopShipping(t *testing.T) {
	t.Parallel()
	h := newHarness(t, opts{})
	ctx := context.Background()
	h.env.Redis.Set(ctx, h.env.Prefix+"dedup:{"+h.b.ID.String()+"}:epoch", time.Now().Add(-48*time.Hour).Unix(), 0)
	h.dedup.SetRunIDs(func(context.Context) (map[string]string, error) {
		time.Sleep(1100 * time.Millisecond)
		return map[string]string{"server": "one"}, nil
	})
	body, ids := events(3, nil)
	if r := h.post(t, h.keyB, "/api/analytics/events", body, nil); r.Status != 202 {
		t.Fatalf("post: %d %s", r.Status, r.Raw)
	}
	h.waitStored(t, h.b.ID, ids, 3)
}

// The same race, with A's insert reaching the server 8 s after A read X's claim history (A waited
// for a connection): B, having waited for the inserts begun before the loss, found none and stored X;
// then A's insert arrived and stored it again. Once the server lists an insert, its process reads the
// claim histories again: changed, the insert is aborted before its data leaves and X judged again.
func TestAnInsertTheServerSeesLateIsBegunAgain(t *testing.T) {
	t.Parallel()
	// 8 s: past B's wait however long the inserts of tests running beside it prolong it.
	fc := &faultConn{reachLate: 1, reachLateBy: 8 * time.Second, reaching: make(chan struct{})}
	h := newHarness(t, opts{ch: func(c driver.Conn) driver.Conn { fc.Conn = c; return fc }})
	b := h.newInstance(t, opts{})
	x := h.lossRace(t, b, func() { closedWithin(t, fc.reaching, "A never began inserting X") }, nil)
	if n := h.countIDs(t, h.a.ID, x); n != 1 {
		t.Errorf("X is stored %d times, want once", n)
	}
}

// With clocks shifted (the fault suite's testclock moves an instance's clock by hours to cross
// midnight), the wait for inserts begun before a loss mixed the shifted clock the loss was seen by
// with the real one: 3 h ahead, every shipment of rows whose claims prove nothing waited until its
// deadline, and the spool never drained.
func TestAShiftedClockDoesNotStallTheWaitAfterALoss(t *testing.T) {
	old := clock.Now
	clock.Now = func() time.Time { return time.Now().Add(3 * time.Hour) }
	t.Cleanup(func() { clock.Now = old })
	h := newHarness(t, opts{})
	ctx := context.Background()
	if _, err := h.dedup.Epochs(ctx, nil); err != nil {
		t.Fatal(err)
	}
	testenv.DelKeys(ctx, h.env.Redis, h.env.Prefix+"*")
	if _, err := h.dedup.Epochs(ctx, nil); err != nil {
		t.Fatal(err)
	}
	if floor, _ := h.dedup.Loss(); floor.IsZero() {
		t.Fatal("the loss was not noticed")
	}
	cctx, cancel := context.WithTimeout(ctx, 8*time.Second)
	defer cancel()
	start := time.Now()
	if err := h.w.sh.awaitLoss(cctx); err != nil {
		t.Errorf("the wait after the loss: %v after %v, want done at once (no insert runs)", err, time.Since(start))
	}
}

// The other end of the same race: instance A read X's claim history and judged it complete, then
// took 4 s (the answer slow to come back) before inserting — long after Redis lost everything and
// instance B, having waited out the inserts begun before the loss, stored X's retry. Once the server
// lists A's insert, A reads the histories again: it finds X's changed, aborts the insert, judges X
// again and drops it (B's batch holds it).
func TestAnInsertBegunLongAfterItsHistoryWasReadIsJudgedAgain(t *testing.T) {
	t.Parallel()
	fc := &faultConn{stallQuery: "received_at >= ?", stallFor: 4 * time.Second, stalled: make(chan struct{})}
	h := newHarness(t, opts{ch: func(c driver.Conn) driver.Conn { fc.Conn = c; return fc }})
	b := h.newInstance(t, opts{})
	// Once stalled, A has judged X's history complete and waits for the answer.
	x := h.lossRace(t, b, func() { closedWithin(t, fc.stalled, "A never asked whether X's history is complete") }, nil)
	if n := h.countIDs(t, h.a.ID, x); n != 1 {
		t.Errorf("X is stored %d times, want once", n)
	}
}
