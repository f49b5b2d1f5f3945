package erasure

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"

	"github.com/analyticsd/analyticsd/audit"
	"github.com/analyticsd/analyticsd/ingest/spool"
	"github.com/analyticsd/analyticsd/internal/testenv"
	"github.com/analyticsd/analyticsd/internal/testenv/fixture"
	"github.com/analyticsd/analyticsd/schema"
)

const eventCols = "tenant_id, ts, id, received_at, event, source, user_id, props, ip, request_id"

type stores struct {
	env  testenv.Env
	a, b uuid.UUID
}

func newFixture(t *testing.T) *stores {
	t.Helper()
	return &stores{env: testenv.Migrated(t), a: uuid.New(), b: uuid.New()}
}

func (f *stores) service(cfg Config) *Service {
	cfg.Layout = f.env.Layout() // the cluster's under make test-cluster
	if cfg.Poll == 0 {
		cfg.Poll = 20 * time.Millisecond
	}
	return New(cfg, f.env.CH, f.env.PG, audit.New(f.env.PG), nil)
}

// rows makes n events of user in tenant, an hour apart, ending now.
func rows(tenant uuid.UUID, user string, n int) [][]any {
	var out [][]any
	now := time.Now().UTC().Truncate(time.Second)
	for i := range n {
		ts := now.Add(-time.Duration(i) * time.Hour)
		out = append(out, []any{tenant, ts, uuid.New(), ts, "auth.user.login", "app", user, `{"email":"` + user + `@example.com"}`, "10.0.0.1", "req"})
	}
	return out
}

func (f *stores) count(t *testing.T, tenant uuid.UUID, user string) uint64 {
	t.Helper()
	var n uint64
	q := "SELECT count() FROM " + f.env.DB + ".events WHERE tenant_id = ?"
	args := []any{tenant}
	if user != "" {
		q += " AND user_id = ?"
		args = append(args, user)
	}
	if err := f.env.CH.QueryRow(context.Background(), q, args...).Scan(&n); err != nil {
		t.Fatal(err)
	}
	return n
}

// registered is how many rows the instance id has in the register (0 or 1).
func (f *stores) registered(t *testing.T, id string) int {
	t.Helper()
	var n int
	if err := f.env.PG.QueryRow(context.Background(), "SELECT count(*) FROM erasure_instances WHERE id = $1", id).Scan(&n); err != nil {
		t.Fatal(err)
	}
	return n
}

func (f *stores) job(t *testing.T, s *Service, tenant, id uuid.UUID) Job {
	t.Helper()
	j, err := s.Get(context.Background(), tenant, id)
	if err != nil {
		t.Fatal(err)
	}
	return j
}

func TestEraseUserLeavesOthersAndCanRunAgain(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	ctx := context.Background()
	erased := rows(f.a, "alice", 30)
	f.env.Insert(t, "events", eventCols, erased...)
	f.env.Insert(t, "events", eventCols, rows(f.a, "bob", 7)...)
	f.env.Insert(t, "events", eventCols, rows(f.b, "alice", 5)...) // the same user id in another tenant
	s := f.service(Config{})
	j, err := s.EraseUser(ctx, f.a, "alice", "test")
	if err != nil {
		t.Fatal(err)
	}
	if j.Status != StatusQueued {
		t.Errorf("a new job: got status %s, want queued", j.Status)
	}
	if ran, err := s.RunOne(ctx); !ran || err != nil {
		t.Fatalf("RunOne: got %v %v, want a job run", ran, err)
	}
	got := f.job(t, s, f.a, j.ID)
	if got.Status != StatusDone || got.RowsErased != 30 || got.UserID != "" || got.FinishedAt == nil {
		t.Errorf("finished job: got %+v, want done, 30 rows, the user id blanked", got)
	}
	if n := f.count(t, f.a, "alice"); n != 0 {
		t.Errorf("alice in tenant A: got %d rows, want 0", n)
	}
	if n := f.count(t, f.a, "bob"); n != 7 {
		t.Errorf("bob in tenant A: got %d rows, want 7", n)
	}
	if n := f.count(t, f.b, "alice"); n != 5 {
		t.Errorf("alice in tenant B: got %d rows, want 5", n)
	}
	// Nothing of the props or ip survives anywhere in the table.
	var left uint64
	if err := f.env.CH.QueryRow(ctx, "SELECT count() FROM "+f.env.DB+".events WHERE tenant_id = ? AND props LIKE '%alice%'", f.a).Scan(&left); err != nil || left != 0 {
		t.Errorf("rows whose props name alice: got %d (%v), want 0", left, err)
	}
	// The audit log names the job and the user's hash, never the user id.
	var actions []string
	rs, err := f.env.PG.Query(ctx, "SELECT action FROM audit_log WHERE target = $1 AND meta->>'user_hash' = $2 AND meta::text NOT LIKE '%alice%' ORDER BY id",
		j.ID.String(), audit.UserHash(f.a, "alice"))
	if err != nil {
		t.Fatal(err)
	}
	for rs.Next() {
		var a string
		_ = rs.Scan(&a)
		actions = append(actions, a)
	}
	rs.Close()
	if len(actions) != 2 || actions[0] != "erasure.requested" || actions[1] != "erasure.done" {
		t.Errorf("audit: got %v, want erasure.requested, erasure.done", actions)
	}
	// A second request is harmless: done, nothing erased, nothing else touched.
	j2, err := s.EraseUser(ctx, f.a, "alice", "test")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.RunOne(ctx); err != nil {
		t.Fatal(err)
	}
	if got := f.job(t, s, f.a, j2.ID); got.Status != StatusDone || got.RowsErased != 0 {
		t.Errorf("second erasure: got %s %d rows, want done 0", got.Status, got.RowsErased)
	}
	if n := f.count(t, f.a, "bob") + f.count(t, f.b, "alice"); n != 12 {
		t.Errorf("others after the second erasure: got %d rows, want 12", n)
	}
	if ran, err := s.RunOne(ctx); ran || err != nil {
		t.Errorf("an empty queue: got ran=%v err=%v", ran, err)
	}
	// Events the same user sends afterwards are stored — also the very rows erased, sent again
	// byte for byte (a non-replicated table does not deduplicate inserts; see the README for clusters).
	// On a cluster the replicated table does: a byte-identical block is a replay of one it already
	// took (block hashes in ZooKeeper), so only the new rows are stored. analyticsd never sends such a
	// block for new requests — every row carries the time it was received — only for a replayed segment.
	f.env.Insert(t, "events", eventCols, erased...)
	f.env.Insert(t, "events", eventCols, rows(f.a, "alice", 3)...)
	want := uint64(33)
	if f.env.Layout().Clustered() {
		want = 3
	}
	if n := f.count(t, f.a, "alice"); n != want {
		t.Errorf("alice's events after the erasure: got %d, want %d stored", n, want)
	}
	// Another tenant cannot see the job.
	if _, err := s.Get(ctx, f.b, j.ID); !errors.Is(err, ErrNotFound) {
		t.Errorf("tenant B reading A's job: got %v, want ErrNotFound", err)
	}
}

// TestEraseUserCoversRowsShippedFromTheSpool: the delete runs after the barrier, so rows that reach
// ClickHouse while the job waits for the spool (acknowledged before it) are erased too.
func TestEraseUserCoversRowsShippedFromTheSpool(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	ctx := context.Background()
	f.env.Insert(t, "events", eventCols, rows(f.a, "carol", 4)...)
	s := f.service(Config{Barrier: func(context.Context) error {
		f.env.Insert(t, "events", eventCols, rows(f.a, "carol", 6)...) // the spool ships meanwhile
		return nil
	}})
	j, err := s.EraseUser(ctx, f.a, "carol", "test")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.RunOne(ctx); err != nil {
		t.Fatal(err)
	}
	if got := f.job(t, s, f.a, j.ID); got.Status != StatusDone || got.RowsErased != 10 {
		t.Errorf("job: got %s %d rows, want done 10", got.Status, got.RowsErased)
	}
	if n := f.count(t, f.a, "carol"); n != 0 {
		t.Errorf("carol: got %d rows, want 0", n)
	}
}

// TestJobSurvivesARestart: a runner that fails (or dies) mid-way leaves the job running; once its
// heartbeat is stale another runner takes it from the step after the last one saved.
func TestJobSurvivesARestart(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	ctx := context.Background()
	f.env.Insert(t, "events", eventCols, rows(f.a, "dave", 12)...)
	var barriers atomic.Int32
	crash := errors.New("process killed")
	first := f.service(Config{Stale: 300 * time.Millisecond, Backoff: time.Millisecond, Barrier: func(context.Context) error {
		barriers.Add(1)
		return crash
	}})
	j, err := first.EraseUser(ctx, f.a, "dave", "test")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := first.RunOne(ctx); !errors.Is(err, crash) {
		t.Fatalf("first runner: got %v, want the crash", err)
	}
	mid := f.job(t, first, f.a, j.ID)
	if mid.Status != StatusRunning || mid.Step != "" || mid.Attempts != 1 || mid.UserID != "dave" || mid.Error == "" {
		t.Fatalf("after the crash: got %+v, want running, no step done, one attempt with its error", mid)
	}
	// A job another runner is still working on (fresh heartbeat) is not taken.
	if _, err := f.env.PG.Exec(ctx, "UPDATE erasure_jobs SET heartbeat_at = now() WHERE id = $1", j.ID); err != nil {
		t.Fatal(err)
	}
	second := f.service(Config{Stale: 300 * time.Millisecond})
	if ran, _ := second.RunOne(ctx); ran {
		t.Fatal("a job with a fresh heartbeat was taken over")
	}
	time.Sleep(400 * time.Millisecond) // the heartbeats go stale: this is what the test is about
	if ran, err := second.RunOne(ctx); !ran || err != nil {
		t.Fatalf("second runner: got %v %v, want the job resumed", ran, err)
	}
	if got := f.job(t, second, f.a, j.ID); got.Status != StatusDone || got.RowsErased != 12 || got.Error != "" {
		t.Errorf("resumed job: got %+v, want done with 12 rows", got)
	}
	if n := f.count(t, f.a, "dave"); n != 0 {
		t.Errorf("dave: got %d rows, want 0", n)
	}
	if barriers.Load() != 1 {
		t.Errorf("the crashed runner's barrier ran %d times, want 1", barriers.Load())
	}
}

// TestErasureSendsNoReplicatedAlterOnCluster: on servers whose distributed-DDL worker races on a
// replicated ALTER (18.16: the worker of one replica stopped for good on "Node exists" during a run of
// the storage suites, and every later DDL ON CLUSTER timed out), the erasure's deletes go to one
// replica of each shard directly (schema.Shards) and still remove the rows from every shard. Before
// schema.Shards they went ON CLUSTER, through the queue this test reads.
func TestErasureSendsNoReplicatedAlterOnCluster(t *testing.T) {
	if testenv.Cluster() == "" {
		t.Skip("a cluster's distributed-DDL queue: runs under make test-cluster")
	}
	t.Parallel()
	f := newFixture(t)
	ctx := context.Background()
	v, err := schema.ServerVersion(f.env.CH)
	if err != nil {
		t.Fatal(err)
	}
	for _, tn := range []uuid.UUID{f.a, f.b} {
		f.env.Insert(t, "events", eventCols, rows(tn, "erin", 20)...)
	}
	s := f.service(Config{})
	j, err := s.EraseTenant(ctx, f.a, "test")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.RunOne(ctx); err != nil {
		t.Fatal(err)
	}
	if got := f.job(t, s, f.a, j.ID); got.Status != StatusDone || got.RowsErased != 20 {
		t.Errorf("job: got %s %d rows, want done 20", got.Status, got.RowsErased)
	}
	for tn, want := range map[uuid.UUID]uint64{f.a: 0, f.b: 20} {
		var n uint64
		if err := f.env.CH.QueryRow(ctx, "SELECT count() FROM "+f.env.DB+".events WHERE tenant_id = ?", tn).Scan(&n); err != nil {
			t.Fatal(err)
		}
		if n != want {
			t.Errorf("tenant %s: %d events after the erasure, want %d", tn, n, want)
		}
	}
	n := f.env.DDLQueueTasks(t, "ALTER TABLE "+f.env.DB+".")
	if schema.AlterRacesOnCluster(v) && n != 0 {
		t.Errorf("%d ALTERs of the erasure went through the distributed-DDL queue of a %s server, want none", n, v)
	}
	if !schema.AlterRacesOnCluster(v) && n == 0 {
		t.Errorf("no ALTER of the erasure in the distributed-DDL queue of a %s server, want them ON CLUSTER", v)
	}
}

// TestEraseTenantLeavesOtherTenants: an offboarding erases the tenant's events, increments, daily
// aggregates and billed usage, and nothing of another tenant.
func TestEraseTenantLeavesOtherTenants(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	ctx := context.Background()
	for _, tn := range []uuid.UUID{f.a, f.b} {
		f.env.Insert(t, "events", eventCols, rows(tn, "erin", 9)...)
		now := time.Now().UTC().Truncate(time.Second)
		f.env.Insert(t, "usage_increments", "tenant_id, ts, id, metric, n", []any{tn, now, uuid.New(), "api_requests_daily", int64(5)})
		if _, err := f.env.PG.Exec(ctx, "INSERT INTO tenants (id, slug) VALUES ($1, $2)", tn, "t-"+tn.String()[:8]); err != nil {
			t.Fatal(err)
		}
		if _, err := f.env.PG.Exec(ctx, "INSERT INTO analytics_daily_usage (tenant_id, date, metric, count) VALUES ($1, current_date, 'auth.user.login', 9)", tn); err != nil {
			t.Fatal(err)
		}
	}
	var deleted atomic.Value
	s := f.service(Config{DeleteKeys: func(_ context.Context, tn uuid.UUID) (int, error) { deleted.Store(tn); return 3, nil }})
	j, err := s.EraseTenant(ctx, f.a, "test")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.RunOne(ctx); err != nil {
		t.Fatal(err)
	}
	if got := f.job(t, s, f.a, j.ID); got.Status != StatusDone || got.RowsErased != 10 {
		t.Errorf("job: got %s %d rows, want done 10 (9 events, 1 increment)", got.Status, got.RowsErased)
	}
	counts := func(tn uuid.UUID) (ev, inc, agg uint64, billed int) {
		var daily, slots uint64
		for table, into := range map[string]*uint64{"events": &ev, "usage_increments": &inc, "daily_usage": &daily, "usage_quarter_hour": &slots} {
			if err := f.env.CH.QueryRow(ctx, "SELECT count() FROM "+f.env.DB+"."+table+" WHERE tenant_id = ?", tn).Scan(into); err != nil {
				t.Fatal(err)
			}
		}
		if (daily == 0) != (slots == 0) {
			t.Errorf("tenant %s: %d daily_usage rows but %d usage_quarter_hour rows: both or neither", tn, daily, slots)
		}
		agg = daily + slots
		if err := f.env.PG.QueryRow(ctx, "SELECT count(*) FROM analytics_daily_usage WHERE tenant_id = $1", tn).Scan(&billed); err != nil {
			t.Fatal(err)
		}
		return
	}
	if ev, inc, agg, billed := counts(f.a); ev+inc+agg != 0 || billed != 0 {
		t.Errorf("tenant A after its erasure: %d events, %d increments, %d aggregate rows, %d billed; want none", ev, inc, agg, billed)
	}
	if ev, inc, agg, billed := counts(f.b); ev != 9 || inc != 1 || agg == 0 || billed != 1 {
		t.Errorf("tenant B: %d events, %d increments, %d aggregate rows, %d billed; want 9, 1, some, 1", ev, inc, agg, billed)
	}
	if deleted.Load() != f.a {
		t.Errorf("redis keys deleted for %v, want tenant A", deleted.Load())
	}
}

func TestSQL(t *testing.T) {
	st := statement{"events", "tenant_id = ? AND user_id = ?", nil}
	check := func(cfg Config, want string) {
		t.Helper()
		if got := New(cfg, nil, nil, nil, nil).SQL(st); got != want {
			t.Errorf("got %s, want %s", got, want)
		}
	}
	check(Config{Layout: schema.Layout{DB: "analytics"}}, "ALTER TABLE analytics.events DELETE WHERE tenant_id = ? AND user_id = ?")
	check(Config{Layout: schema.Layout{DB: "analytics", Cluster: "c1"}},
		"ALTER TABLE analytics.events_local ON CLUSTER c1 DELETE WHERE tenant_id = ? AND user_id = ?")
	check(Config{Layout: schema.Layout{DB: "analytics", Cluster: "c1"}, Lightweight: true},
		"DELETE FROM analytics.events_local ON CLUSTER c1 WHERE tenant_id = ? AND user_id = ?")
	if !schema.LightweightDelete(schema.Version{Major: 25, Minor: 8}) || schema.LightweightDelete(schema.Version{Major: 18, Minor: 16}) {
		t.Error("the version gate: want lightweight deletes on 25.8 and not on 18.16")
	}
}

func TestSpoolBarrierWaitsForTheSegmentsOfBefore(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	sp, err := spool.Open(spool.Options{Dir: dir, Format: 3})
	if err != nil {
		t.Fatal(err)
	}
	defer sp.Close()
	var segs []*spool.Segment
	for range 2 {
		g, err := sp.Create()
		if err != nil {
			t.Fatal(err)
		}
		segs = append(segs, g)
	}
	done := make(chan error, 1)
	go func() { done <- SpoolBarrier(dir, 5*time.Millisecond, 5*time.Second)(context.Background()) }()
	time.Sleep(50 * time.Millisecond) // the barrier has listed the spool
	later, err := sp.Create()         // a segment of after the barrier: not waited for
	if err != nil {
		t.Fatal(err)
	}
	for _, g := range segs {
		select {
		case err := <-done:
			t.Fatalf("the barrier returned (%v) with segment %d still in the spool", err, g.Seq)
		case <-time.After(30 * time.Millisecond):
		}
		if err := g.Seal(); err != nil {
			t.Fatal(err)
		}
		if err := sp.Remove(g); err != nil {
			t.Fatal(err)
		}
	}
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the barrier did not return once the segments of before shipped")
	}
	if _, err := os.Stat(filepath.Join(later.Path())); err != nil {
		t.Errorf("the later segment: %v", err)
	}
	// A barrier that cannot pass says why.
	err = SpoolBarrier(dir, 5*time.Millisecond, 50*time.Millisecond)(context.Background())
	if err == nil {
		t.Error("a barrier over a segment that never ships: got nil, want an error")
	}
}

func TestRedisKeysDeletesOnlyTheTenants(t *testing.T) {
	t.Parallel()
	rdb, prefix := testenv.Redis(t)
	ctx := context.Background()
	a, b := uuid.New(), uuid.New()
	for _, tn := range []uuid.UUID{a, b} {
		for _, k := range []string{"quota:{%s}:api_requests_daily:20261130", "dedup:{%s}:e:42", "idem:{%s}:abc"} {
			if err := rdb.Set(ctx, prefix+fmt.Sprintf(k, tn), "1", time.Hour).Err(); err != nil {
				t.Fatal(err)
			}
		}
	}
	n, err := RedisKeys(rdb, prefix)(ctx, a)
	if err != nil || n != 3 {
		t.Fatalf("got %d %v, want 3 keys deleted", n, err)
	}
	for tn, want := range map[uuid.UUID]int64{a: 0, b: 1} {
		if got := rdb.Exists(ctx, prefix+fmt.Sprintf("quota:{%s}:api_requests_daily:20261130", tn)).Val(); got != want {
			t.Errorf("tenant %s's counter: exists=%d, want %d", tn, got, want)
		}
	}
}

// A key belongs to the tenant of its hash tag (the first {...}), not to any tenant id written later in
// it: tenant b's rate-limit bucket of a JWT whose subject (chosen by b's token issuer) spells a's id
// in braces must survive a's erasure.
func TestRedisKeysFollowTheHashTag(t *testing.T) {
	t.Parallel()
	rdb, prefix := testenv.Redis(t)
	ctx := context.Background()
	a, b := uuid.New(), uuid.New()
	theirs := prefix + "ratelimit:{" + b.String() + "}:jwt:{" + a.String() + "}"
	ours := prefix + "ratelimit:{" + a.String() + "}:jwt:{" + b.String() + "}"
	for _, k := range []string{theirs, ours} {
		if err := rdb.Set(ctx, k, "1", time.Hour).Err(); err != nil {
			t.Fatal(err)
		}
	}
	n, err := RedisKeys(rdb, prefix)(ctx, a)
	if err != nil || n != 1 {
		t.Errorf("got %d %v, want 1 key deleted", n, err)
	}
	if rdb.Exists(ctx, theirs).Val() != 1 {
		t.Errorf("%s (tenant b's) was deleted by tenant a's erasure", theirs)
	}
	if rdb.Exists(ctx, ours).Val() != 0 {
		t.Errorf("%s (tenant a's) was kept", ours)
	}
}

// The quarantine is scrubbed after the spool's barrier and before the delete, for the job's tenant
// and user ("" for a tenant), and what it removed counts as erased.
func TestQuarantineIsScrubbed(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	ctx := context.Background()
	f.env.Insert(t, "events", eventCols, rows(f.a, "fred", 3)...)
	var calls []string
	var barrierPassed atomic.Bool
	s := f.service(Config{Barrier: func(context.Context) error { barrierPassed.Store(true); return nil }, Quarantine: func(_ context.Context, tn uuid.UUID, user string) (int, error) {
		if !barrierPassed.Load() {
			t.Error("the quarantine was scrubbed before the spool's barrier passed")
		}
		calls = append(calls, tn.String()+"/"+user)
		return 2, nil
	}})
	j, err := s.EraseUser(ctx, f.a, "fred", "test")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.RunOne(ctx); err != nil {
		t.Fatal(err)
	}
	if got := f.job(t, s, f.a, j.ID); got.Status != StatusDone || got.RowsErased != 5 {
		t.Errorf("job: got %s %d rows, want done 5 (3 stored, 2 quarantined)", got.Status, got.RowsErased)
	}
	jt, err := s.EraseTenant(ctx, f.b, "test")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.RunOne(ctx); err != nil {
		t.Fatal(err)
	}
	if want := []string{f.a.String() + "/fred", f.b.String() + "/"}; fmt.Sprint(calls) != fmt.Sprint(want) {
		t.Errorf("scrubs: got %v, want %v", calls, want)
	}
	if got := f.job(t, s, f.b, jt.ID); got.Status != StatusDone {
		t.Errorf("tenant job: %+v", got)
	}
}

// A level set while a tenant erasure deletes the Postgres rows is erased whole or kept whole: its
// value and its owed alert (written together, as quota.SetLevel does) never part. The erasure is
// held on a rollup_runs row the test locks, after its first deletes; the level is set meanwhile.
// Before, the deletes ran one by one, and a level set between the delete of usage_levels and that
// of quota_alerts kept its value and lost its alert (found by review).
func TestALevelSetDuringATenantErasureKeepsItsAlert(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	ctx := context.Background()
	tn := fixture.Tenant(t, f.env.PG, "acme")
	setLevel := func(v float64) error { // quota.SetLevel's transaction, crossing 80 % of 100
		return pgx.BeginFunc(ctx, f.env.PG, func(tx pgx.Tx) error {
			var prev float64
			if err := tx.QueryRow(ctx, "SELECT value FROM usage_levels WHERE tenant_id = $1 AND metric = 'storage_gb' FOR UPDATE", tn.ID).Scan(&prev); err != nil && !errors.Is(err, pgx.ErrNoRows) {
				return err
			}
			if _, err := tx.Exec(ctx, `INSERT INTO usage_levels (tenant_id, metric, value) VALUES ($1, 'storage_gb', $2)
				ON CONFLICT (tenant_id, metric) DO UPDATE SET value = EXCLUDED.value`, tn.ID, v); err != nil {
				return err
			}
			if prev < 80 && v >= 80 {
				_, err := tx.Exec(ctx, `INSERT INTO quota_alerts (day, tenant_id, metric, threshold, claimed_at)
					VALUES (current_date, $1, 'storage_gb', 80, '-infinity') ON CONFLICT DO NOTHING`, tn.ID)
				return err
			}
			return nil
		})
	}
	if err := setLevel(10); err != nil {
		t.Fatal(err)
	}
	if _, err := f.env.PG.Exec(ctx, "INSERT INTO rollup_runs (date, status, tenant_id) VALUES (current_date, 'ok', $1)", tn.ID); err != nil {
		t.Fatal(err)
	}
	hold, err := f.env.PG.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer hold.Rollback(ctx)
	if _, err := hold.Exec(ctx, "SELECT 1 FROM rollup_runs WHERE tenant_id = $1 FOR UPDATE", tn.ID); err != nil {
		t.Fatal(err)
	}
	s := f.service(Config{})
	erased := make(chan error, 1)
	go func() { erased <- s.otherStores(ctx, Job{TenantID: tn.ID, Kind: KindTenant}) }()
	testenv.Eventually(t, 10*time.Second, func() error { // the erasure waits for the lock
		var waiting int
		f.env.PG.QueryRow(ctx, "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE 'DELETE FROM rollup_runs%'").Scan(&waiting)
		if waiting == 0 {
			return errors.New("the erasure is not waiting on rollup_runs yet")
		}
		return nil
	})
	set := make(chan error, 1)
	go func() { set <- setLevel(90) }()
	time.Sleep(200 * time.Millisecond) // the level's transaction commits, or waits for the erasure's
	if err := hold.Commit(ctx); err != nil {
		t.Fatal(err)
	}
	if err := <-erased; err != nil {
		t.Fatal(err)
	}
	if err := <-set; err != nil {
		t.Fatal(err)
	}
	var values, owed int
	if err := f.env.PG.QueryRow(ctx, `SELECT (SELECT count(*) FROM usage_levels WHERE tenant_id = $1),
		(SELECT count(*) FROM quota_alerts WHERE tenant_id = $1)`, tn.ID).Scan(&values, &owed); err != nil {
		t.Fatal(err)
	}
	if values != owed {
		t.Errorf("after the erasure: %d level values and %d owed alerts; want both or neither", values, owed)
	}
}
