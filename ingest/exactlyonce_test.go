package ingest

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/ClickHouse/clickhouse-go/v2/lib/driver"
	"github.com/google/uuid"

	"github.com/analyticsd/analyticsd/ingest/spool"
	"github.com/analyticsd/analyticsd/internal/clock"
	"github.com/analyticsd/analyticsd/internal/testenv"
)

// The regression tests of issue 15 ("exactly once"): each says which finding it covers. Every one
// fails on the writer before the spool/claims rework.

func (h *harness) count(t *testing.T, table string, tenant uuid.UUID) (rows, distinct uint64) {
	t.Helper()
	if err := h.env.CH.QueryRow(context.Background(), "SELECT count(), uniqExact(id) FROM "+h.env.DB+"."+table+" WHERE tenant_id = ?", tenant).Scan(&rows, &distinct); err != nil {
		t.Fatal(err)
	}
	return rows, distinct
}

func (h *harness) dailyUsage(t *testing.T, tenant uuid.UUID, metric string) int64 {
	t.Helper()
	var n int64
	if err := h.env.CH.QueryRow(context.Background(), "SELECT toInt64(sum(count)) FROM "+h.env.DB+".daily_usage WHERE tenant_id = ? AND metric = ?", tenant, metric).Scan(&n); err != nil {
		t.Fatal(err)
	}
	return n
}

func duplicates(r resp) []map[string]any {
	d, _ := r.Body["data"].(map[string]any)
	var out []map[string]any
	list, _ := d["duplicates"].([]any)
	for _, x := range list {
		out = append(out, x.(map[string]any))
	}
	return out
}

// Finding 4: the same 100-event batch with fixed ids posted 3 times is stored once, counted once —
// in events, daily_usage and the live counter — and the retries say which events were duplicates.
func TestRetriedBatchIsStoredAndCountedOnce(t *testing.T) {
	t.Parallel()
	h := newHarness(t, opts{})
	body, ids := events(100, func(int) map[string]any { return map[string]any{"event": "apikey.request"} })
	for try := 0; try < 3; try++ {
		r := h.post(t, h.keyA, "/api/analytics/events", body, nil)
		wantAccepted, wantDups := 100, 0
		if try > 0 {
			wantAccepted, wantDups = 0, 100
		}
		dups := duplicates(r)
		if r.Status != 202 || r.accepted() != wantAccepted || len(dups) != wantDups {
			t.Fatalf("try %d: got %d accepted=%d duplicates=%d, want 202 %d %d: %s", try, r.Status, r.accepted(), len(dups), wantAccepted, wantDups, r.Raw)
		}
		for i, d := range dups {
			if int(d["index"].(float64)) != i || d["id"] != ids[i] {
				t.Fatalf("try %d: duplicate %d is %v, want index %d id %s", try, i, d, i, ids[i])
			}
		}
	}
	h.waitStored(t, h.a.ID, ids, 100)
	h.w.Close(context.Background())
	if rows, distinct := h.count(t, "events", h.a.ID); rows != 100 || distinct != 100 {
		t.Errorf("events: %d rows, %d distinct; want 100, 100", rows, distinct)
	}
	if n := h.dailyUsage(t, h.a.ID, "apikey.request"); n != 100 {
		t.Errorf("daily_usage apikey.request = %d, want 100", n)
	}
	testenv.Eventually(t, 20*time.Second, func() error {
		n, _, _ := h.counters.Get(context.Background(), h.a.ID, "api_requests_daily", time.Now())
		if n != 100 {
			return fmt.Errorf("live counter api_requests_daily = %d, want 100", n)
		}
		return nil
	})
	time.Sleep(100 * time.Millisecond) // a late overcount would show now
	if n, _, _ := h.counters.Get(context.Background(), h.a.ID, "api_requests_daily", time.Now()); n != 100 {
		t.Errorf("live counter api_requests_daily = %d, want 100", n)
	}
}

// Within one request, an id sent twice is one event: the second is reported as a duplicate.
func TestSameIDTwiceInOneRequest(t *testing.T) {
	t.Parallel()
	h := newHarness(t, opts{})
	id := uuid.NewString()
	body := fmt.Sprintf(`[{"id":%q,"event":"a.b"},{"id":%q,"event":"a.b"},{"event":"a.b"}]`, id, id)
	r := h.post(t, h.keyA, "/api/analytics/events", []byte(body), nil)
	if dups := duplicates(r); r.Status != 202 || r.accepted() != 2 || len(dups) != 1 || dups[0]["index"].(float64) != 1 {
		t.Fatalf("got %d %s; want 2 accepted and index 1 a duplicate", r.Status, r.Raw)
	}
	h.w.Close(context.Background())
	if rows, _ := h.count(t, "events", h.a.ID); rows != 2 {
		t.Errorf("%d rows, want 2", rows)
	}
}

// Finding 1: tenants A and B send the same event ids through two instances while ClickHouse is
// unreachable; when it returns, both tenants' events are stored — ids are per tenant, and the replay
// check asks ClickHouse about one tenant at a time.
func TestSameIDsInTwoTenantsAreBothStored(t *testing.T) {
	t.Parallel()
	h := newHarness(t, opts{proxyCH: true})
	other := h.newInstance(t, opts{proxyCH: true})
	h.chProxy.SetDown(true)
	other.chProxy.SetDown(true)
	body, ids := events(20, nil)
	if r := h.post(t, h.keyA, "/api/analytics/events", body, nil); r.Status != 202 || r.accepted() != 20 {
		t.Fatalf("tenant A: %d %s", r.Status, r.Raw)
	}
	if r := other.post(t, h.keyB, "/api/analytics/events", body, nil); r.Status != 202 || r.accepted() != 20 {
		t.Fatalf("tenant B: %d %s", r.Status, r.Raw)
	}
	// Both instances try, fail, and mark their segments in flight.
	testenv.Eventually(t, 10*time.Second, func() error {
		if a, b := counterValue(h.metrics.InsertErrors), counterValue(other.metrics.InsertErrors); a < 1 || b < 1 {
			return fmt.Errorf("failed inserts: %v on the first instance, %v on the other; want one each at least", a, b)
		}
		return nil
	})
	other.chProxy.SetDown(false) // B's rows land first...
	h.waitStored(t, h.b.ID, ids, 20)
	h.chProxy.SetDown(false) // ...then A's segment is replayed with its check
	h.waitStored(t, h.a.ID, ids, 20)
}

// Finding 3: one request with events on 150 days — more partitions than a modern server takes in one
// insert block (max_partitions_per_insert_block: 100 by default, scripted here as 10; 18.16 has no
// limit) — is shipped, split by day where the server refuses it, instead of being refused forever;
// and the segment behind it ships too.
func TestOneInsertNeverSpansMorePartitionsThanTheServerTakes(t *testing.T) {
	t.Parallel()
	fc := &faultConn{maxPartitions: 10}
	h := newHarness(t, opts{
		ingest: func(c *Config) { c.Limits.RetentionDays = 200 },
		ch:     func(c driver.Conn) driver.Conn { fc.Conn = c; return fc },
	})
	now := time.Now().UTC()
	body, ids := events(150, func(i int) map[string]any {
		return map[string]any{"ts": now.AddDate(0, 0, -i).Format(time.RFC3339)}
	})
	if r := h.post(t, h.keyA, "/api/analytics/events", body, nil); r.Status != 202 || r.accepted() != 150 {
		t.Fatalf("got %d %s", r.Status, r.Raw)
	}
	later, laterIDs := events(5, nil)
	h.post(t, h.keyB, "/api/analytics/events", later, nil)
	h.waitStored(t, h.a.ID, ids, 150)
	h.waitStored(t, h.b.ID, laterIDs, 5)
	if st := h.w.Stats(); st.QuarantinedRows != 0 {
		t.Errorf("%d rows quarantined: the server refused them only for spanning too many days", st.QuarantinedRows)
	}
}

// alterEvents is an ALTER of the table that stores events: on a cluster the shards' local tables,
// where a Distributed insert's rows are finally written (and defaults computed).
func alterEvents(t *testing.T, env testenv.Env, clause string) {
	t.Helper()
	// Layout.AlterLocal, as analyticsd's own ALTERs: on a cluster of 18.16 servers it goes to each
	// shard directly, since ON CLUSTER races on replicated tables. It did here: "Node exists" stopped
	// one server's DDL worker, and every later test's CREATE DATABASE … ON CLUSTER timed out (a
	// clean-clone run, 2026-11-30).
	if _, err := env.Layout().AlterLocal(context.Background(), env.CH, "events", clause); err != nil {
		t.Fatal(err)
	}
}

// poison adds a column whose default throws for event "poison.pill": the server refuses any insert
// holding such a row (code 395), as it would refuse rows it can never take.
func poison(t *testing.T, env testenv.Env) (cure func()) {
	t.Helper()
	alterEvents(t, env, "ADD COLUMN poison UInt8 DEFAULT throwIf(event = 'poison.pill')")
	return func() {
		alterEvents(t, env, "DROP COLUMN poison")
	}
}

// Finding 3: rows ClickHouse refuses for good do not block the rows next to them or the segments
// behind them; they are moved to the quarantine (counted, kept) once other inserts succeed, and can
// be requeued once the cause is fixed.
func TestRefusedRowsGoToQuarantineAndOthersShip(t *testing.T) {
	t.Parallel()
	h := newHarness(t, opts{})
	cure := poison(t, h.env)
	body, ids := events(100, func(i int) map[string]any {
		if i == 37 {
			return map[string]any{"event": "poison.pill"}
		}
		return nil
	})
	if r := h.post(t, h.keyA, "/api/analytics/events", body, nil); r.Status != 202 || r.accepted() != 100 {
		t.Fatalf("got %d %s", r.Status, r.Raw)
	}
	good := slices.Delete(slices.Clone(ids), 37, 38)
	h.waitStored(t, h.a.ID, good, 99)
	later, laterIDs := events(10, nil)
	h.post(t, h.keyB, "/api/analytics/events", later, nil)
	h.waitStored(t, h.b.ID, laterIDs, 10)
	testenv.Eventually(t, 20*time.Second, func() error {
		if st := h.w.Stats(); st.QuarantinedRows != 1 {
			return fmt.Errorf("writer %+v, want the refused row in quarantine", st)
		}
		return nil
	})
	testenv.Eventually(t, 20*time.Second, func() error {
		st := h.w.Stats()
		if st.PendingSegments != 0 {
			return fmt.Errorf("writer %+v, want an empty spool", st)
		}
		return nil
	})
	list, err := spool.ListQuarantine(h.w.cfg.Dir)
	if err != nil || len(list) != 1 || list[0].Events != 1 || list[0].Tenants[0] != h.a.ID.String() || list[0].Error == "" {
		t.Fatalf("quarantine: %+v %v", list, err)
	}
	h.w.Close(context.Background())

	cure()
	res, err := Requeue(context.Background(), h.w.cfg.Dir, list[0].Name, h.env.CH, h.env.DB, h.dedup, RequeueOptions{})
	if err != nil || res.Inserted != 1 {
		t.Fatalf("requeue: %+v %v", res, err)
	}
	h.waitStored(t, h.a.ID, ids, 100)
	if left, _ := spool.ListQuarantine(h.w.cfg.Dir); len(left) != 0 {
		t.Errorf("quarantine after requeue: %+v", left)
	}
	if rows, distinct := h.count(t, "events", h.a.ID); rows != 100 || distinct != 100 {
		t.Errorf("events: %d rows, %d distinct; want 100, 100", rows, distinct)
	}
}

// A server refusing every insert (a broken schema change, say) is not a refusal of particular rows:
// with no insert succeeding nothing is quarantined, and everything lands once the cause is fixed.
func TestRefusingEverythingQuarantinesNothing(t *testing.T) {
	t.Parallel()
	h := newHarness(t, opts{writer: func(c *WriterConfig) { c.QuarantineAfter = 1 }})
	alterEvents(t, h.env, "ADD COLUMN poison UInt8 DEFAULT throwIf(event != '')")
	body, ids := events(30, nil)
	h.post(t, h.keyA, "/api/analytics/events", body, nil)
	testenv.Eventually(t, 10*time.Second, func() error {
		if st := h.w.Stats(); st.LastError == "" {
			return fmt.Errorf("writer %+v: no insert refused yet", st)
		}
		return nil
	})
	// A window of retries (RetryMax 200 ms) in which a wrong quarantine would show, not a poll:
	// refusals are not counted anywhere the test can wait on.
	time.Sleep(time.Second)
	if st := h.w.Stats(); st.QuarantinedRows != 0 || st.LastError == "" {
		t.Fatalf("with every insert refused: %+v; want nothing quarantined, the error shown", st)
	}
	alterEvents(t, h.env, "DROP COLUMN poison")
	h.waitStored(t, h.a.ID, ids, 30)
}

// An outage is not a refusal: with every insert failing, nothing is quarantined.
func TestOutageQuarantinesNothing(t *testing.T) {
	t.Parallel()
	h := newHarness(t, opts{proxyCH: true, writer: func(c *WriterConfig) { c.QuarantineAfter = 1 }})
	h.chProxy.SetDown(true)
	body, ids := events(30, nil)
	h.post(t, h.keyA, "/api/analytics/events", body, nil)
	// Several failed inserts: with QuarantineAfter 1 a wrong quarantine would have happened by now.
	testenv.Eventually(t, 10*time.Second, func() error {
		if n := counterValue(h.metrics.InsertErrors); n < 3 {
			return fmt.Errorf("%v failed inserts, want 3", n)
		}
		return nil
	})
	if st := h.w.Stats(); st.QuarantinedRows != 0 {
		t.Fatalf("quarantined %d rows during an outage", st.QuarantinedRows)
	}
	h.chProxy.SetDown(false)
	h.waitStored(t, h.a.ID, ids, 30)
}

// Finding 6: an insert the client gave up on (a timeout) may still commit on the server. The retry
// waits for it to finish before asking ClickHouse which rows it has, so it inserts nothing twice.
func TestLateCommitOfATimedOutInsertIsNotInsertedTwice(t *testing.T) {
	fc := &faultConn{late: 1, delay: 1500 * time.Millisecond} // past the second awaitAttempts waits before it KILLs
	h := newHarness(t, opts{ch: func(c driver.Conn) driver.Conn { fc.Conn = c; return fc }})
	body, ids := events(40, nil)
	if r := h.post(t, h.keyA, "/api/analytics/events", body, nil); r.Status != 202 {
		t.Fatalf("got %d %s", r.Status, r.Raw)
	}
	h.waitStored(t, h.a.ID, ids, 40)
	time.Sleep(time.Second) // not a poll: a late second copy, if any, would land in this window
	h.w.Close(context.Background())
	if rows, distinct := h.count(t, "events", h.a.ID); rows != 40 || distinct != 40 {
		t.Errorf("events: %d rows, %d distinct; want 40, 40", rows, distinct)
	}
}

// postStored posts n new apikey.request events of tenant A through in and waits until they are stored.
func (h *harness) postStored(t *testing.T, in *instance, n int) {
	t.Helper()
	body, ids := events(n, func(int) map[string]any { return map[string]any{"event": "apikey.request"} })
	if r := in.post(t, h.keyA, "/api/analytics/events", body, nil); r.Status != 202 || r.accepted() != n {
		t.Fatalf("posting %d events: %d %s", n, r.Status, r.Raw)
	}
	h.waitStored(t, h.a.ID, ids, n)
}

// waitShipped waits until the instance's writer holds no rows: everything it accepted or replayed was
// shipped (or found stored).
func (in *instance) waitShipped(t *testing.T) {
	t.Helper()
	testenv.Eventually(t, 20*time.Second, func() error {
		if st := in.w.Stats(); st.PendingSegments > 0 || st.BufferedRows > 0 {
			return fmt.Errorf("the instance still holds %+v", st)
		}
		return nil
	})
}

// writeSegment leaves a spool segment as a crashed process would, with rows in the current format.
func writeSegment(t *testing.T, dir, name string, wid uint64, rows []Row, incs []Increment) {
	t.Helper()
	b := append([]byte("ADSPOOL\x02"), make([]byte, 16)...)
	b[10] = 1 // a non-zero segment id
	b = appendRecord(b, wid, rows, incs)
	if err := os.WriteFile(filepath.Join(dir, name), b, 0o640); err != nil {
		t.Fatal(err)
	}
}

// Finding 6: a segment whose insert was under way when the process died, replayed after the day of
// some of its rows left the retention window. ClickHouse may have stored those rows and dropped the
// day since, so they cannot be checked: they go to the quarantine instead of being counted twice in
// daily_usage. Rows of days still inside retention are checked and stored once.
//
// A day inside the window but before the retention floor (the window was raised since the sweeper
// dropped it) is expired as well: before the writer read the floor, those 7 rows were checked, not
// found, and stored again (fails on the code before that change).
func TestReplayNeverReinsertsIntoAnExpiredDay(t *testing.T) {
	t.Parallel()
	env := testenv.Migrated(t)
	now := time.Now().UTC().Truncate(time.Second)
	floorAt := func(d time.Time) func(context.Context) (time.Time, error) {
		return func(context.Context) (time.Time, error) { return d.Truncate(24 * time.Hour), nil }
	}
	for _, tc := range []struct {
		name  string
		days  int
		floor func(context.Context) (time.Time, error)
	}{
		{"left the window", 3, nil},
		{"before the floor", 90, floorAt(now.AddDate(0, 0, -3))},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			dir := t.TempDir()
			tenantID := uuid.New()
			old := now.AddDate(0, 0, -5)
			mk := func(ts time.Time, n int) []Row {
				rows := make([]Row, n)
				for i := range rows {
					rows[i] = Row{ID: uuid.New(), TenantID: tenantID, Ts: ts, ReceivedAt: now, Event: "a.b", Source: "app", Props: "{}"}
				}
				return rows
			}
			expired, recent := mk(old, 7), mk(now, 5)
			writeSegment(t, dir, "0000000000000003.inflight", 99, append(slices.Clone(expired), recent...), nil)
			w, err := NewWriter(WriterConfig{Dir: dir, FlushInterval: 50 * time.Millisecond, RetentionDays: tc.days, Floor: tc.floor}, env.CH, env.DB, nil, nil, nil)
			if err != nil {
				t.Fatal(err)
			}
			w.Start()
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			testenv.Eventually(t, 20*time.Second, func() error {
				if st := w.Stats(); st.PendingSegments != 0 {
					return fmt.Errorf("writer %+v, waiting for the replay", st)
				}
				return nil
			})
			st := w.Stats()
			w.Close(ctx)
			var stored uint64
			env.CH.QueryRow(ctx, "SELECT count() FROM "+env.DB+".events WHERE tenant_id = ?", tenantID).Scan(&stored)
			if stored != 5 || st.QuarantinedRows != 7 {
				t.Errorf("stored %d, quarantined %d; want the 5 recent rows stored and the 7 of the expired day quarantined", stored, st.QuarantinedRows)
			}
		})
	}
}

// Finding 7: a segment read back from disk is shipped in chunks, never held whole in memory; each
// insert holds at most a chunk.
func TestSpilledSegmentShipsInChunks(t *testing.T) {
	defer func(r, b int) { chunkRows, chunkBytes = r, b }(chunkRows, chunkBytes)
	chunkRows = 50
	fc := &faultConn{}
	h := newHarness(t, opts{
		ch: func(c driver.Conn) driver.Conn { fc.Conn = c; return fc },
		writer: func(c *WriterConfig) {
			c.MaxBufferedRows = 10
			c.FlushInterval = 300 * time.Millisecond
			c.BatchRows = 10_000
		},
	})
	var ids []string
	for i := 0; i < 3; i++ {
		body, b := events(100, nil)
		ids = append(ids, b...)
		h.post(t, h.keyA, "/api/analytics/events", body, nil)
	}
	h.waitStored(t, h.a.ID, ids, 300)
	for _, n := range fc.committed() {
		if n > 100 {
			t.Errorf("an insert of %d rows: the spilled segment was not streamed in chunks of about %d", n, chunkRows)
		}
	}
}

// Finding 10: a server-made event stored after the live counter feed closed (shutdown) used to send
// on a closed channel and panic.
func TestEmitAfterCloseDoesNotPanic(t *testing.T) {
	t.Parallel()
	h := newHarness(t, opts{})
	h.svc.Close()
	// An event the live counters count (apikey.request → api_requests_daily), so it reaches the feed.
	if err := h.svc.Emit(context.Background(), h.a.ID, "acme", "apikey.request", map[string]any{"path": "/x"}); err != nil {
		t.Fatal(err)
	}
}

// An Idempotency-Key makes a retried request return its first response and change nothing; with the
// same key and another body it is refused; and even when the stored response is lost, ids derived
// from the key keep the retry's events from being stored twice.
func TestIdempotencyKeyOnEvents(t *testing.T) {
	t.Parallel()
	h := newHarness(t, opts{})
	body := []byte(`[{"event":"a.b"},{"event":"c.d"},{"event":"e.f"}]`)
	key := map[string]string{"Idempotency-Key": "order-42"}
	first := h.post(t, h.keyA, "/api/analytics/events", body, key)
	if first.Status != 202 || first.accepted() != 3 {
		t.Fatalf("first: %d %s", first.Status, first.Raw)
	}
	again := h.post(t, h.keyA, "/api/analytics/events", body, key)
	if again.Status != 202 || again.Raw != first.Raw || again.Header.Get("Idempotent-Replayed") != "true" {
		t.Fatalf("retry: %d %s (replayed %q), want the first response replayed", again.Status, again.Raw, again.Header.Get("Idempotent-Replayed"))
	}
	if r := h.post(t, h.keyA, "/api/analytics/events", []byte(`[{"event":"x.y"}]`), key); r.Status != 422 {
		t.Errorf("same key, other body: got %d %s, want 422", r.Status, r.Raw)
	}
	// Another tenant's identical key is its own.
	if r := h.post(t, h.keyB, "/api/analytics/events", body, key); r.Status != 202 || r.accepted() != 3 {
		t.Errorf("tenant B with the same key: %d %s", r.Status, r.Raw)
	}
	// Lose the stored response (Redis flushed its idempotency records): the retry runs again, and its
	// derived ids make every event a duplicate.
	testenv.DelKeys(context.Background(), h.env.Redis, h.env.Prefix+"idem:*")
	lost := h.post(t, h.keyA, "/api/analytics/events", body, key)
	if lost.Status != 202 || lost.accepted() != 0 || len(duplicates(lost)) != 3 {
		t.Fatalf("retry after the record was lost: %d %s, want 3 duplicates", lost.Status, lost.Raw)
	}
	h.w.Close(context.Background())
	if rows, _ := h.count(t, "events", h.a.ID); rows != 3 {
		t.Errorf("tenant A: %d rows stored, want 3", rows)
	}
}

func TestIdempotencyKeyOnUsage(t *testing.T) {
	t.Parallel()
	h := newHarness(t, opts{})
	key := map[string]string{"Idempotency-Key": "2c3e0b0e-usage"}
	body := []byte(`{"metric":"api_requests_daily","n":7}`)
	for i := 0; i < 3; i++ {
		if r := h.post(t, h.keyA, "/api/analytics/usage", body, key); r.Status != 202 {
			t.Fatalf("try %d: %d %s", i, r.Status, r.Raw)
		}
	}
	testenv.DelKeys(context.Background(), h.env.Redis, h.env.Prefix+"idem:*")
	r := h.post(t, h.keyA, "/api/analytics/usage", body, key)
	var data struct {
		Data struct {
			Accepted  int  `json:"accepted"`
			Duplicate bool `json:"duplicate"`
		} `json:"data"`
	}
	json.Unmarshal([]byte(r.Raw), &data)
	if r.Status != 202 || data.Data.Accepted != 0 || !data.Data.Duplicate {
		t.Errorf("retry after the record was lost: %d %s, want a duplicate", r.Status, r.Raw)
	}
	h.w.Close(context.Background())
	if rows, _ := h.count(t, "usage_increments", h.a.ID); rows != 1 {
		t.Errorf("%d increments stored, want 1", rows)
	}
	if n := h.dailyUsage(t, h.a.ID, "api_requests_daily"); n != 7 {
		t.Errorf("daily_usage = %d, want 7", n)
	}
	testenv.Eventually(t, 20*time.Second, func() error {
		n, _, _ := h.counters.Get(context.Background(), h.a.ID, "api_requests_daily", time.Now())
		if n != 7 {
			return fmt.Errorf("live counter api_requests_daily = %d, want 7", n)
		}
		return nil
	})
}

// Rows whose ids the server made (sent without an id and without an Idempotency-Key) cannot have a
// copy anywhere, so they cost no claim: no dedup key is written for them, and they are still
// stored and counted once — live through the counter feed. (The code before claimed them like any
// other: a Redis round trip per request, and per consume.)
func TestServerMadeIDsAreNotClaimed(t *testing.T) {
	t.Parallel()
	h := newHarness(t, opts{})
	body := []byte(`[` + strings.TrimSuffix(strings.Repeat(`{"event":"apikey.request","source":"api"},`, 30), ",") + `]`)
	if r := h.post(t, h.keyA, "/api/analytics/events", body, nil); r.Status != 202 || r.accepted() != 30 || r.Header.Get("X-Analytics-Degraded") != "" {
		t.Fatalf("events: %d %s", r.Status, r.Raw)
	}
	if r := h.post(t, h.keyA, "/api/analytics/usage", []byte(`{"metric":"api_requests_daily","n":2}`), nil); r.Status != 202 {
		t.Fatalf("usage: %d %s", r.Status, r.Raw)
	}
	testenv.Eventually(t, 20*time.Second, func() error {
		ev, _ := h.count(t, "events", h.a.ID)
		inc, _ := h.count(t, "usage_increments", h.a.ID)
		if ev != 30 || inc != 1 {
			return fmt.Errorf("stored %d events and %d increments, want 30 and 1", ev, inc)
		}
		return nil
	})
	keys, err := testenv.Keys(context.Background(), h.env.Redis, h.env.Prefix+"dedup:{"+h.a.ID.String()+"}:*")
	if err != nil || len(keys) != 0 {
		t.Errorf("dedup keys %v (%v), want none: server-made ids need no claim", keys, err)
	}
	testenv.Eventually(t, 20*time.Second, func() error {
		n, _, _ := h.counters.Get(context.Background(), h.a.ID, "api_requests_daily", time.Now())
		if n != 32 {
			return fmt.Errorf("live counter api_requests_daily = %d, want 32", n)
		}
		return nil
	})
	h.w.Close(context.Background())
	if rows, distinct := h.count(t, "events", h.a.ID); rows != 30 || distinct != 30 {
		t.Errorf("events: %d rows, %d distinct; want 30", rows, distinct)
	}
	if n, _, _ := h.counters.Get(context.Background(), h.a.ID, "api_requests_daily", time.Now()); n != 32 {
		t.Errorf("live counter %d after shipping, want 32", n)
	}
}

// expireResponses deletes the tenant's kept Idempotency-Key responses, as their window ending does,
// and leaves the keys' fingerprint marks.
func expireResponses(t *testing.T, h *harness, tenant uuid.UUID) {
	t.Helper()
	ctx := context.Background()
	keys, err := testenv.Keys(ctx, h.env.Redis, h.env.Prefix+"idem:{"+tenant.String()+"}:*") // every master of a cluster
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, k := range keys {
		if !strings.HasSuffix(k, ":fp") {
			n++
			if err := h.env.Redis.Del(ctx, k).Err(); err != nil {
				t.Fatal(err)
			}
		}
	}
	if n == 0 {
		t.Fatal("no kept response to expire: the test would prove nothing")
	}
}

// A key's response is kept one window, the claims of the ids derived from it one to two. So a key
// sent again after the window with another request ran, and every one of its rows was found to be a
// duplicate of the first request's: 202 "accepted 0", nothing stored, for events never seen (and on
// /usage, for another metric). While those claims may live, the key now answers another request
// with 422; the same request runs again and changes nothing.
func TestIdempotencyKeyReusedAfterItsResponseExpired(t *testing.T) {
	t.Parallel()
	h := newHarness(t, opts{})
	key := map[string]string{"Idempotency-Key": "reuse-after-window"}
	first := []byte(`[{"event":"reuse.first"}]`)
	if r := h.post(t, h.keyA, "/api/analytics/events", first, key); r.Status != 202 || r.accepted() != 1 {
		t.Fatalf("first: %d %s", r.Status, r.Raw)
	}
	ukey := map[string]string{"Idempotency-Key": "usage-reuse"}
	if r := h.post(t, h.keyA, "/api/analytics/usage", []byte(`{"metric":"api_requests_daily","n":3}`), ukey); r.Status != 202 {
		t.Fatalf("first usage: %d %s", r.Status, r.Raw)
	}
	expireResponses(t, h, h.a.ID)
	if r := h.post(t, h.keyA, "/api/analytics/events", []byte(`[{"event":"reuse.second"}]`), key); r.Status != 422 {
		t.Errorf("another request under the key after its response expired: %d %s, want 422", r.Status, r.Raw)
	}
	if r := h.post(t, h.keyA, "/api/analytics/usage", []byte(`{"metric":"builds_daily","n":7}`), ukey); r.Status != 422 {
		t.Errorf("another usage under the key after its response expired: %d %s, want 422", r.Status, r.Raw)
	}
	if r := h.post(t, h.keyA, "/api/analytics/events", first, key); r.Status != 202 || r.accepted() != 0 || len(duplicates(r)) != 1 {
		t.Errorf("the same request again: %d %s, want 202 with its event a duplicate", r.Status, r.Raw)
	}
	h.w.Close(context.Background())
	if rows, _ := h.count(t, "events", h.a.ID); rows != 1 {
		t.Errorf("%d events stored, want 1", rows)
	}
}

// A row whose claim could not be made at request time (Redis unreachable for its instance) is taken
// as counted when shipped, so that a row not stored after all has its count taken back. But when the
// shipper then finds its id held by another batch — a retry the client sent to another instance,
// which claimed and counted it — this batch's claim never counted it, and the take-back made the live
// counter short until the next reconciliation (the retry storm read 15,925 of 16,650 under load).
func TestAnUnclaimedCopyFoundAtShippingTakesNothingBack(t *testing.T) {
	t.Parallel()
	h := newHarness(t, opts{proxyRD: true})
	other := h.newInstance(t, opts{})
	body, ids := events(20, func(int) map[string]any { return map[string]any{"event": "apikey.request"} })
	h.rdProxy.SetDown(true)
	if r := h.post(t, h.keyA, "/api/analytics/events", body, nil); r.Status != 202 || r.Header.Get("X-Analytics-Degraded") == "" {
		t.Fatalf("with redis down: %d %s, want 202 marked degraded", r.Status, r.Raw)
	}
	if r := other.post(t, h.keyA, "/api/analytics/events", body, nil); r.Status != 202 || r.accepted() != 20 {
		t.Fatalf("the retry on the other instance: %d %s, want 20 accepted", r.Status, r.Raw)
	}
	h.waitStored(t, h.a.ID, ids, 20)
	h.rdProxy.SetDown(false)
	h.waitShipped(t)
	time.Sleep(300 * time.Millisecond) // the feed's take-backs, if any, are sent every 10 ms
	if n, _, err := h.counters.Get(context.Background(), h.a.ID, "api_requests_daily", time.Now()); err != nil || n != 20 {
		t.Errorf("live counter %d (%v), want 20: a count nobody made was taken back", n, err)
	}
	if rows, _ := h.count(t, "events", h.a.ID); rows != 20 {
		t.Errorf("%d rows stored, want 20", rows)
	}
}

// A process killed after its insert of a segment committed replays the segment on restart, finds its
// rows in ClickHouse and drops them. They were counted once, by the batch's own claim, and stored
// once, by that insert: nothing is to be taken back. While a tenant's claim history does not cover
// the window (Redis lost the claims) every row of it is checked in ClickHouse, and a replay used to
// take each row it found back from the live counter — the retry storm's quota read 100 short after a
// kill -9 (here: counter 21, want 51).
func TestReplayOfItsOwnCommittedInsertTakesNothingBack(t *testing.T) {
	t.Parallel()
	h := newHarness(t, opts{})
	h.postStored(t, h.instance, 20)
	// Redis loses the claims: the next request begins a new history, which ClickHouse's 20 rows from
	// before it keep from proving anything for a window.
	h.dropClaims(t, h.a.ID, false)
	h.postStored(t, h.instance, 1)
	// The next rows are received after the history's first seconds, which allow for clock skew.
	time.Sleep(time.Second + clock.MaxSkew + 100*time.Millisecond)

	// A batch of another process: claimed (and so counted) and inserted, and the process died
	// before it removed the segment.
	now := time.Now().UTC().Truncate(time.Second)
	rows := make([]Row, 30)
	rowIDs := make([]uuid.UUID, len(rows))
	for i := range rows {
		rowIDs[i] = uuid.New()
		rows[i] = Row{ID: rowIDs[i], TenantID: h.a.ID, Ts: now, ReceivedAt: now, Event: "apikey.request", Source: "api", Props: "{}"}
	}
	wid := newBatchID()
	unit := func(int) (string, int64, time.Time, time.Time) {
		return "api_requests_daily", 1, now.Truncate(24 * time.Hour), now
	}
	dup, _, err := h.dedup.Claim(context.Background(), h.a.ID, KindEvent, wid, rowIDs, unit, func(time.Time, string, int64, int64) {})
	if err != nil || slices.Contains(dup, true) {
		t.Fatalf("claim: %v %v", dup, err)
	}
	insertRows(t, h.env.CH, h.env.DB, rows)
	dir := t.TempDir()
	writeSegment(t, dir, "0000000000000001.inflight", wid, rows, nil)
	if n, _, _ := h.counters.Get(context.Background(), h.a.ID, "api_requests_daily", now); n != 51 {
		t.Fatalf("live counter %d before the replay, want 51", n)
	}

	restarted := h.newInstance(t, opts{writer: func(wc *WriterConfig) { wc.Dir = dir }})
	restarted.waitShipped(t)
	time.Sleep(300 * time.Millisecond) // the feed's take-backs, if any, are sent every 10 ms
	if got := counterValue(restarted.metrics.Duplicates.WithLabelValues("clickhouse")); got != 30 {
		t.Errorf("%v rows found stored at replay, want 30 (the test did not replay what it meant to)", got)
	}
	if n, _, err := h.counters.Get(context.Background(), h.a.ID, "api_requests_daily", now); err != nil || n != 51 {
		t.Errorf("live counter %d (%v), want 51: the replay took back rows its own insert stored", n, err)
	}
	if total, distinct := h.count(t, "events", h.a.ID); total != 51 || distinct != 51 {
		t.Errorf("events: %d rows, %d distinct; want 51, 51", total, distinct)
	}
}

// storedRow stores an apikey.request row of tenant a received at `at` straight into ClickHouse, as
// another instance's insert would have, and returns it.
func (h *harness) storedRow(t *testing.T, at time.Time) Row {
	t.Helper()
	r := Row{ID: uuid.New(), TenantID: h.a.ID, Ts: at, ReceivedAt: at, Event: "apikey.request", Source: "api", Props: "{}"}
	insertRows(t, h.env.CH, h.env.DB, []Row{r})
	return r
}

// retry posts the client's retry of r (its id and ts) to instance in.
func (h *harness) retry(t *testing.T, in *instance, r Row) {
	t.Helper()
	body := fmt.Sprintf(`[{"id":%q,"event":%q,"ts":%q}]`, r.ID, r.Event, r.Ts.Format(time.RFC3339))
	if resp := in.post(t, h.keyA, "/api/analytics/events", []byte(body), nil); resp.Status != 202 {
		t.Fatalf("retry: %d %s", resp.Status, resp.Raw)
	}
}

// An insert of a history Redis lost can commit after the new history was judged complete (it was
// under way at the loss). A retry of such a row, claimed anew on an instance that judges the history
// after that commit, is checked and found. (A first answer shared by every instance through Redis,
// tried and withdrawn, stored the retry twice.)
func TestARowFromBeforeTheHistoryStoredLateIsStillFound(t *testing.T) {
	t.Parallel()
	h := newHarness(t, opts{})
	before := time.Now().UTC().Add(-10 * time.Second).Truncate(time.Second)
	h.postStored(t, h.instance, 20)
	// The late commit: a row received before the history began, whose claim Redis lost.
	late := h.storedRow(t, before)
	// The client's retry of it, to another instance.
	other := h.newInstance(t, opts{})
	h.retry(t, other, late)
	other.waitShipped(t)
	if n := h.countIDs(t, h.a.ID, []string{late.ID.String()}); n != 1 {
		t.Errorf("the late row's id is stored %d times, want once", n)
	}
}

// A copy received up to clock.MaxSkew after the history's first second may have been stamped by a
// fast clock before Redis lost its claim; a new claim of the id counted it again, and finding the copy
// takes that count back (here: counter 3 for 2 stored rows when any copy received after the epoch's
// second was taken for the batch's own insert).
func TestACopyStampedByAFastClockIsNotTakenForTheBatchsOwn(t *testing.T) {
	t.Parallel()
	h := newHarness(t, opts{})
	ctx := context.Background()
	h.postStored(t, h.instance, 1)
	time.Sleep(1100 * time.Millisecond) // the new history below begins in a later second
	// Another instance, its clock 2 s fast, received X, claimed (counted) and stored it.
	fast := time.Now().UTC().Add(2 * time.Second).Truncate(time.Second)
	x := Row{ID: uuid.New(), TenantID: h.a.ID, Ts: fast, ReceivedAt: fast, Event: "apikey.request", Source: "api", Props: "{}"}
	unit := func(int) (string, int64, time.Time, time.Time) {
		return "api_requests_daily", 1, fast.Truncate(24 * time.Hour), fast
	}
	if _, _, err := h.dedup.Claim(ctx, h.a.ID, KindEvent, newBatchID(), []uuid.UUID{x.ID}, unit, func(time.Time, string, int64, int64) {}); err != nil {
		t.Fatal(err)
	}
	insertRows(t, h.env.CH, h.env.DB, []Row{x})
	// Redis loses the claims; the client's retry of X begins a new history and is counted again.
	h.dropClaims(t, h.a.ID, false)
	h.retry(t, h.instance, x)
	h.waitShipped(t)
	time.Sleep(300 * time.Millisecond) // the feed sends take-backs every 10 ms
	if n := h.countIDs(t, h.a.ID, []string{x.ID.String()}); n != 1 {
		t.Errorf("X stored %d times, want once", n)
	}
	if n, _, err := h.counters.Get(ctx, h.a.ID, "api_requests_daily", time.Now()); err != nil || n != 2 {
		t.Errorf("live counter %d (%v), want 2 for the 2 rows stored", n, err)
	}
}

// The tenant's first row X was stored by an instance whose clock runs 2 s ahead; Redis then lost
// the claims, and the client's retry of X went to an instance with a correct clock, which began the
// new history 2 s before X's stamp. Asked whether ClickHouse holds rows from before that history,
// the shipper looked up to the epoch's second only, missed X, and stored the retry too (2 copies).
// It looks clock.MaxSkew further now.
func TestAFirstRowStampedByAFastClockIsFoundAfterARedisLoss(t *testing.T) {
	t.Parallel()
	h := newHarness(t, opts{})
	fast := time.Now().UTC().Add(2 * time.Second).Truncate(time.Second)
	x := h.storedRow(t, fast)
	h.dropClaims(t, h.a.ID, false)
	h.retry(t, h.instance, x)
	h.waitShipped(t)
	if n := h.countIDs(t, h.a.ID, []string{x.ID.String()}); n != 1 {
		t.Errorf("X stored %d times, want once", n)
	}
}

// A client that sends an event's age rather than its time (Segment: ts = arrival − (sentAt −
// timestamp)) gets a later ts on every retry, by the time between the tries. For an event older
// than the dedup window, the check after a Redis loss looked from the retry's ts on, above the first
// copy's, and stored the retry too: 2 copies of an event sent 48 h late. It looks a window below the
// retry's ts now. (Fails on the code before this change.)
func TestRetryWithAShiftedTsOfAnOldEventIsFoundAfterARedisLoss(t *testing.T) {
	t.Parallel()
	h := newHarness(t, opts{})
	now := time.Now().UTC().Truncate(time.Second)
	first := Row{ID: uuid.New(), TenantID: h.a.ID, Ts: now.Add(-48 * time.Hour), ReceivedAt: now.Add(-3 * time.Second),
		Event: "apikey.request", Source: "api", Props: "{}"}
	insertRows(t, h.env.CH, h.env.DB, []Row{first})
	h.dropClaims(t, h.a.ID, false)
	retried := first
	retried.Ts = first.Ts.Add(3 * time.Second) // the retry arrived 3 s later
	h.retry(t, h.instance, retried)
	h.waitShipped(t)
	if n := h.countIDs(t, h.a.ID, []string{first.ID.String()}); n != 1 {
		t.Errorf("the event is stored %d times, want once", n)
	}
}
