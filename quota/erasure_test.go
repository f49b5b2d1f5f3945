package quota

import (
	"context"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/analyticsd/analyticsd/audit"
	"github.com/analyticsd/analyticsd/erasure"
	"github.com/analyticsd/analyticsd/internal/testenv"
)

// A user's erasure keeps today's live counter (issue 21: aggregates keep their counts): the periodic
// reconciliation after it, and a rebuild from ClickHouse after Redis lost the day, both count the
// erased rows through the erasure ledger. Before the ledger, both lowered the counter by the rows
// erased. The erased rows were received by an instance whose clock ran 3 minutes ahead: the ledger
// keeps each row's own received minute, so no minute moves.
func TestErasureKeepsTheLiveCounter(t *testing.T) {
	t.Parallel()
	h := newHarness(t)
	s := h.service(t, Config{Enabled: true}, nil, nil)
	ctx := context.Background()
	now := time.Now().UTC().Truncate(time.Second)
	today := now.Truncate(24 * time.Hour)
	at := now.Add(-SettleAfter - 5*time.Minute)
	if at.Before(today) {
		t.Skip("too close to midnight UTC for settled minutes today")
	}
	insert := func(user string, received time.Time, n int) {
		rows := make([][]any, n)
		for i := range rows {
			rows[i] = []any{h.tenant.ID, at, uuid.New(), received, "apikey.request", "api", user, "{}", "", ""}
		}
		h.env.Insert(t, "events", "tenant_id, ts, id, received_at, event, source, user_id, props, ip, request_id", rows...)
	}
	insert("alice", at, 4)
	insert("alice", at.Add(3*time.Minute), 2) // a skewed instance's received_at
	insert("bob", at, 3)
	current := func(when string) {
		t.Helper()
		st, err := s.State(ctx, h.tenant.ID, "api_requests_daily")
		if err != nil || st.Current != 9 || st.Degraded {
			t.Errorf("%s: api_requests_daily = %+v, %v; want 9", when, st, err)
		}
	}
	if _, err := s.ReconcileOnce(ctx); err != nil {
		t.Fatal(err)
	}
	current("before the erasure")

	e := erasure.New(erasure.Config{Layout: h.env.Layout(), Poll: 20 * time.Millisecond}, h.env.CH, h.env.PG, audit.New(h.env.PG), nil)
	j, err := e.EraseUser(ctx, h.tenant.ID, "alice", "test")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := e.RunOne(ctx); err != nil {
		t.Fatal(err)
	}
	if j, err = e.Get(ctx, h.tenant.ID, j.ID); err != nil || j.Status != erasure.StatusDone || j.RowsErased != 6 {
		t.Fatalf("erasure: %+v %v, want done with 6 rows", j, err)
	}
	for i := range 2 { // a full round, then one that sends what changed
		if _, err := s.ReconcileOnce(ctx); err != nil {
			t.Fatal(err)
		}
		current("after reconciliation " + string(rune('1'+i)))
	}
	// Redis loses the day: the read rebuilds the counter from ClickHouse and the ledger.
	iter := h.env.Redis.Scan(ctx, 0, h.env.Prefix+"*", 1000).Iterator()
	for iter.Next(ctx) {
		h.env.Redis.Del(ctx, iter.Val())
	}
	current("rebuilt after Redis lost the day")
	got, err := s.clickhouseCounts(ctx, h.tenant.ID, today)
	if err != nil {
		t.Fatal(err)
	}
	m := at.Unix() / 60
	if mins := got[h.tenant.ID]["api_requests_daily"]; mins[m] != 7 || mins[m+3] != 2 || len(mins) != 2 {
		t.Errorf("counts per received minute: got %v, want %d:7 %d:2", mins, m, m+3)
	}
}

// The periodic reconciliation writes no counter of a tenant whose erasure may be deleting its rows: a
// round that read ClickHouse before the delete would otherwise put the tenant's counters and marks
// back in Redis after the erasure removed its keys. A job still waiting for the instances'
// acknowledgements has deleted nothing: its tenant is reconciled as usual.
func TestReconcileLeavesAnErasedTenantOutOfRedis(t *testing.T) {
	t.Parallel()
	h := newHarness(t)
	s := h.service(t, Config{Enabled: true}, nil, nil)
	ctx := context.Background()
	insertEvents(t, h, time.Now().UTC().Truncate(time.Second), 3)
	quotaKeys := func() []string {
		t.Helper()
		keys, err := testenv.Keys(ctx, h.env.Redis, h.env.Prefix+"quota:{"+h.tenant.ID.String()+"}*")
		if err != nil {
			t.Fatal(err)
		}
		return keys
	}
	e := erasure.New(erasure.Config{Layout: h.env.Layout(), Poll: 20 * time.Millisecond}, h.env.CH, h.env.PG, audit.New(h.env.PG), nil)
	j, err := e.EraseTenant(ctx, h.tenant.ID, "test")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.ReconcileOnce(ctx); err != nil {
		t.Fatal(err)
	}
	if n, _, _ := s.counters.Get(ctx, h.tenant.ID, "api_requests_daily", time.Now().UTC()); n != 3 {
		t.Errorf("with the erasure queued: counter %d, want 3 (nothing deleted yet)", n)
	}
	if err := h.env.Redis.Del(ctx, quotaKeys()...).Err(); err != nil {
		t.Fatal(err)
	}
	// The job is now past its acknowledgements: its delete may be running.
	if _, err := h.env.PG.Exec(ctx, "UPDATE erasure_jobs SET status = 'running', step = 'spool' WHERE id = $1", j.ID); err != nil {
		t.Fatal(err)
	}
	if _, err := s.ReconcileOnce(ctx); err != nil {
		t.Fatal(err)
	}
	if keys := quotaKeys(); len(keys) != 0 {
		t.Errorf("a reconciliation during the tenant's delete wrote %v", keys)
	}
}

// An erasure that begins after a round's check and deletes the tenant's rows and keys before the
// round's writes: the round takes back what it wrote once it sees the erasure.
func TestReconcileTakesBackWhatAnErasureOvertook(t *testing.T) {
	t.Parallel()
	h := newHarness(t)
	s := h.service(t, Config{Enabled: true}, nil, nil)
	ctx := context.Background()
	insertEvents(t, h, time.Now().UTC().Truncate(time.Second), 3)
	e := erasure.New(erasure.Config{Layout: h.env.Layout(), Poll: 20 * time.Millisecond, DeleteKeys: erasure.RedisKeys(h.env.Redis, h.env.Prefix)},
		h.env.CH, h.env.PG, audit.New(h.env.PG), nil)
	checks := 0
	r := &reconciler{s: s, sent: map[sentKey]int64{}, afterCheck: func() {
		if checks++; checks != 2 { // today's: the rows are in its counts
			return
		}
		if _, err := e.EraseTenant(ctx, h.tenant.ID, "test"); err != nil {
			t.Fatal(err)
		}
		if ran, err := e.RunOne(ctx); err != nil || !ran {
			t.Fatalf("erasure: ran %v, %v", ran, err)
		}
	}}
	if _, err := r.run(ctx); err != nil {
		t.Fatal(err)
	}
	if checks != 2 {
		t.Fatalf("%d checks, want 2 (one per day)", checks)
	}
	keys, err := testenv.Keys(ctx, h.env.Redis, h.env.Prefix+"quota:{"+h.tenant.ID.String()+"}*")
	if err != nil {
		t.Fatal(err)
	}
	if len(keys) != 0 {
		t.Errorf("after a round an erasure overtook: %v", keys)
	}
}
