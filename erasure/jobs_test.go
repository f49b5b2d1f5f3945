package erasure

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/ClickHouse/clickhouse-go/v2"
	"github.com/ClickHouse/clickhouse-go/v2/lib/driver"
	"github.com/google/uuid"

	"github.com/analyticsd/analyticsd/api"
	"github.com/analyticsd/analyticsd/audit"
	"github.com/analyticsd/analyticsd/auth"
	"github.com/analyticsd/analyticsd/ingest/spool"
	"github.com/analyticsd/analyticsd/internal/testenv"
	"github.com/analyticsd/analyticsd/internal/testenv/fixture"
	"github.com/analyticsd/analyticsd/tenant"
)

// failingDeletes is a ClickHouse whose deletes always fail: a failure a real server cannot be made to
// produce on demand (on 18.16 a broken mutation just never finishes).
type failingDeletes struct{ driver.Conn }

var errInjected = errors.New("injected: mutation refused")

func (c failingDeletes) Exec(ctx context.Context, query string, args ...any) error {
	if strings.HasPrefix(query, "ALTER TABLE") || strings.HasPrefix(query, "DELETE FROM") {
		return errInjected
	}
	return c.Conn.Exec(ctx, query, args...)
}

// A job that cannot succeed is tried MaxAttempts times with a backoff, then failed with its error,
// which GET /erasures/{id} shows; a failed job is not taken again, its user id is blanked, and the
// same request sent again erases the user — finishing the failed job's recorded round without
// counting its rows twice.
func TestFailingJobIsFailedAndCanBeSentAgain(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	ctx := context.Background()
	acme := fixture.Tenant(t, f.env.PG, "acme")
	admin, _ := fixture.Key(t, f.env.PG, acme.ID, "a-admin", auth.ScopeAnalyticsAdmin)
	f.env.Insert(t, "events", eventCols, rows(acme.ID, "gina", 5)...)
	layout := f.env.Layout() // on an 18.16 cluster the deletes go through Shards' own connections
	layout.Shards = layout.Shards.Wrap(func(_ string, c driver.Conn) driver.Conn { return failingDeletes{c} })
	// The backoff is long enough that the check below comes inside it on a loaded machine: with 50 ms
	// a clean-clone run on the cluster at load 8 took the job again before the check (2026-11-30).
	broken := New(Config{Layout: layout, Poll: 20 * time.Millisecond, MaxAttempts: 2, Backoff: time.Second},
		failingDeletes{f.env.CH}, f.env.PG, audit.New(f.env.PG), nil)
	j, err := broken.EraseUser(ctx, acme.ID, "gina", "test")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := broken.RunOne(ctx); !errors.Is(err, errInjected) {
		t.Fatalf("attempt 1: got %v, want the injected failure", err)
	}
	if got := f.job(t, broken, acme.ID, j.ID); got.Status != StatusRunning || got.Attempts != 1 || !strings.Contains(got.Error, "injected") {
		t.Fatalf("after attempt 1: %+v, want running, 1 attempt, the error", got)
	}
	if ran, _ := broken.RunOne(ctx); ran {
		t.Fatal("the job was taken again before its backoff ended")
	}
	time.Sleep(1100 * time.Millisecond)
	if ran, err := broken.RunOne(ctx); !ran || !errors.Is(err, errInjected) {
		t.Fatalf("attempt 2: got %v %v, want the injected failure", ran, err)
	}
	got := f.job(t, broken, acme.ID, j.ID)
	if got.Status != StatusFailed || got.Attempts != 2 || !strings.Contains(got.Error, "injected") || got.UserID != "" || got.FinishedAt == nil {
		t.Fatalf("after the last attempt: %+v, want failed, 2 attempts, the error, no user id", got)
	}
	time.Sleep(80 * time.Millisecond)
	if ran, err := broken.RunOne(ctx); ran || err != nil {
		t.Errorf("a failed job was taken again: %v %v", ran, err)
	}
	app := api.NewApp(api.Config{}, nil)
	authn := auth.NewAuthenticator(auth.NewKeys(f.env.PG), tenant.NewStore(f.env.PG), auth.JWTConfig{})
	broken.Register(app.Group("/api/analytics"), authn.Require(auth.ScopeAnalyticsAdmin))
	r := fixture.Serve(t, app).Get(t, admin, "", "/api/analytics/erasures/"+j.ID.String())
	if r.Status != 200 || r.Data()["status"] != "failed" || !strings.Contains(fmt.Sprint(r.Data()["error"]), "injected") || r.Data()["attempts"] != float64(2) {
		t.Errorf("GET /erasures/{id}: got %d %s, want failed with the error and 2 attempts", r.Status, r.Raw)
	}

	if err := broken.Leave(ctx); err != nil { // its process ends: the next job does not wait for its acknowledgement
		t.Fatal(err)
	}
	s := f.service(Config{})
	again, err := s.EraseUser(ctx, acme.ID, "gina", "test")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.RunOne(ctx); err != nil {
		t.Fatal(err)
	}
	if got := f.job(t, s, acme.ID, again.ID); got.Status != StatusDone || got.RowsErased != 5 {
		t.Errorf("the request sent again: %+v, want done with 5 rows", got)
	}
	if n := f.count(t, acme.ID, "gina"); n != 0 {
		t.Errorf("gina: %d rows left, want 0", n)
	}
	var recorded int64
	if err := f.env.PG.QueryRow(ctx, "SELECT sum(n)::bigint FROM erased_usage WHERE tenant_id = $1", acme.ID).Scan(&recorded); err != nil || recorded != 5 {
		t.Errorf("erased_usage: got %d (%v), want 5 (each row once)", recorded, err)
	}
}

// With two instances, a job deletes only once the other instance's spool has shipped what it held
// and its quarantine was scrubbed: rows the other instance acknowledged before the request, still in
// its spool when the job starts, are erased too. A registered instance whose heartbeat is stale (it
// died; its spool ships with `analyticsd spool drain`) is not waited for.
func TestEveryInstanceShipsBeforeTheDelete(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	dir1, dir2 := t.TempDir(), t.TempDir()
	sp2, err := spool.Open(spool.Options{Dir: dir2, Format: 3})
	if err != nil {
		t.Fatal(err)
	}
	defer sp2.Close()
	held, err := sp2.Create() // the other instance's segment with the user's rows, not shipped yet
	if err != nil {
		t.Fatal(err)
	}
	f.env.Insert(t, "events", eventCols, rows(f.a, "hank", 4)...)
	if _, err := f.env.PG.Exec(ctx, "INSERT INTO erasure_instances (id, heartbeat_at) VALUES ('dead', now() - interval '1 hour')"); err != nil {
		t.Fatal(err)
	}
	var scrubs sync.Map
	scrubber := func(name string, n int) Scrubber {
		return func(_ context.Context, tn uuid.UUID, user string) (int, error) {
			scrubs.Store(name, tn.String()+"/"+user)
			return n, nil
		}
	}
	one := f.service(Config{Instance: "one", Barrier: SpoolBarrier(dir1, 5*time.Millisecond, 5*time.Second), Quarantine: scrubber("one", 0)})
	two := f.service(Config{Instance: "two", Barrier: SpoolBarrier(dir2, 5*time.Millisecond, 30*time.Second), Quarantine: scrubber("two", 2)})
	if err := two.beat(ctx); err != nil { // instance two is up
		t.Fatal(err)
	}
	actx, stopAcking := context.WithCancel(ctx)
	acking := make(chan struct{})
	go func() {
		defer close(acking)
		for actx.Err() == nil {
			if err := two.Acknowledge(actx); err != nil && actx.Err() == nil {
				t.Errorf("instance two: %v", err)
			}
			time.Sleep(10 * time.Millisecond)
		}
	}()
	defer func() { stopAcking(); <-acking }()

	j, err := one.EraseUser(ctx, f.a, "hank", "test")
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { _, err := one.RunOne(ctx); done <- err }()
	select {
	case err := <-done:
		t.Fatalf("the job ended (%v) while instance two's spool still held rows", err)
	case <-time.After(300 * time.Millisecond):
	}
	if n := f.count(t, f.a, "hank"); n != 4 {
		t.Fatalf("hank's rows while the job waits: %d, want 4 (no delete yet)", n)
	}
	// Instance two ships its segment: the rows reach ClickHouse, then the segment goes.
	f.env.Insert(t, "events", eventCols, rows(f.a, "hank", 3)...)
	if err := held.Seal(); err != nil {
		t.Fatal(err)
	}
	if err := sp2.Remove(held); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("the job did not finish once instance two shipped")
	}
	if got := f.job(t, one, f.a, j.ID); got.Status != StatusDone || got.RowsErased != 9 {
		t.Errorf("job: %+v, want done with 9 rows (4 + 3 shipped meanwhile + 2 from two's quarantine)", got)
	}
	if n := f.count(t, f.a, "hank"); n != 0 {
		t.Errorf("hank: %d rows left, want 0", n)
	}
	for _, name := range []string{"one", "two"} {
		if v, _ := scrubs.Load(name); v != f.a.String()+"/hank" {
			t.Errorf("instance %s's quarantine scrub: got %v, want the job's tenant and user", name, v)
		}
	}
	// Leaving the register: a job no longer waits for the instance. Its acknowledger stops first (as
	// Attend's does before it leaves): one still running re-registers the instance at its next pass,
	// which made this check fail now and then (once in a clean-clone run on the cluster).
	stopAcking()
	<-acking
	if err := two.Leave(ctx); err != nil {
		t.Fatal(err)
	}
	if n := f.registered(t, "two"); n != 0 {
		t.Errorf("instance two after Leave: %d rows, want none", n)
	}
}

// recordingConn keeps the text and arguments of every statement sent through it.
type recordingConn struct {
	driver.Conn
	mu   *sync.Mutex
	sent *[]string
}

func (c recordingConn) note(q string, args []any) {
	c.mu.Lock()
	defer c.mu.Unlock()
	*c.sent = append(*c.sent, q+" "+fmt.Sprint(args...))
}

func (c recordingConn) Exec(ctx context.Context, q string, args ...any) error {
	c.note(q, args)
	return c.Conn.Exec(ctx, q, args...)
}

func (c recordingConn) Query(ctx context.Context, q string, args ...any) (driver.Rows, error) {
	c.note(q, args)
	return c.Conn.Query(ctx, q, args...)
}

func (c recordingConn) QueryRow(ctx context.Context, q string, args ...any) driver.Row {
	c.note(q, args)
	return c.Conn.QueryRow(ctx, q, args...)
}

// No statement a user's erasure sends to ClickHouse carries the user id — neither its text nor its
// bound values (clickhouse-go renders those into the text, which ZooKeeper's DDL queue and query_log
// keep): rows are found by SHA256(user_id) and deleted by event id. On one server the test also reads
// system.query_log, with log_queries on for its own connection.
func TestNoUserIDReachesClickHouse(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	ctx := context.Background()
	const user = "ivy.secret@example.org"
	f.env.Insert(t, "events", eventCols, rows(f.a, user, 6)...)
	conn := f.env.CH
	single := !f.env.Layout().Clustered()
	if single {
		opts, err := clickhouse.ParseDSN(testenv.ClickHouseDSN(t))
		if err != nil {
			t.Fatal(err)
		}
		opts.Settings = clickhouse.Settings{"log_queries": 1}
		if conn, err = clickhouse.Open(opts); err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
	}
	var mu sync.Mutex
	var sent []string
	start := time.Now().Add(-time.Second)
	layout := f.env.Layout()
	layout.Shards = layout.Shards.Wrap(func(_ string, c driver.Conn) driver.Conn { return recordingConn{c, &mu, &sent} })
	s := New(Config{Layout: layout, Poll: 20 * time.Millisecond, RoundRows: 4}, recordingConn{conn, &mu, &sent}, f.env.PG, audit.New(f.env.PG), nil)
	j, err := s.EraseUser(ctx, f.a, user, "test")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.RunOne(ctx); err != nil {
		t.Fatal(err)
	}
	if got := f.job(t, s, f.a, j.ID); got.Status != StatusDone || got.RowsErased != 6 {
		t.Fatalf("job: %+v, want done with 6 rows (two rounds of at most 4)", got)
	}
	deletes := map[string]bool{} // on an 18.16 cluster each round's delete is sent to every shard
	for _, q := range sent {
		if strings.Contains(q, user) {
			t.Errorf("a statement carries the user id: %.300s", q)
		}
		if strings.Contains(q, "DELETE") {
			deletes[q] = true
		}
	}
	if deletes := len(deletes); deletes != 2 {
		t.Errorf("deletes sent: %d, want 2 (rounds of 4 rows)", deletes)
	}
	if !single {
		return
	}
	if err := f.env.CH.Exec(ctx, "SYSTEM FLUSH LOGS"); err != nil {
		t.Fatal(err)
	}
	var logged, leaked uint64
	err = f.env.CH.QueryRow(ctx, "SELECT countIf(query LIKE '%SHA256(user_id)%'), countIf(position(query, ?) > 0) FROM system.query_log WHERE event_time >= ? AND query LIKE ?",
		user, start, "%"+f.env.DB+".events%").Scan(&logged, &leaked)
	if err != nil {
		t.Fatal(err)
	}
	if logged == 0 {
		t.Fatal("system.query_log holds none of the job's statements: the check below would prove nothing")
	}
	if leaked != 0 {
		t.Errorf("system.query_log: %d statements on the events table carry the user id", leaked)
	}
}

// Run registers the instance and acknowledges open jobs beside its runner, and leaves the register
// when it stops, so no job waits a minute for an instance that shut down.
func TestRunRegistersAcknowledgesAndLeaves(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	ctx := context.Background()
	s := f.service(Config{Instance: "runner"})
	j, err := s.EraseUser(ctx, f.a, "ivan", "test")
	if err != nil {
		t.Fatal(err)
	}
	rctx, stop := context.WithCancel(ctx)
	ran := make(chan struct{})
	go func() { defer close(ran); s.Run(rctx) }()
	testenv.Eventually(t, 10*time.Second, func() error {
		var registered, acked bool
		if err := f.env.PG.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM erasure_instances WHERE id = 'runner'),
			EXISTS (SELECT 1 FROM erasure_acks WHERE job_id = $1 AND instance = 'runner')`, j.ID).Scan(&registered, &acked); err != nil {
			return err
		}
		if got := f.job(t, s, f.a, j.ID); !registered || !acked || got.Status != StatusDone {
			return fmt.Errorf("registered %v, acknowledged %v, job %s", registered, acked, got.Status)
		}
		return nil
	})
	stop()
	<-ran
	if n := f.registered(t, "runner"); n != 0 {
		t.Errorf("after Run returned: %d rows for the instance, want none", n)
	}
}

// An instance whose spool takes longer than Stale to ship (ClickHouse slow or down for it) stays
// registered: its heartbeat runs on its own, so another instance's job keeps waiting for its
// acknowledgement instead of taking it for dead and deleting before its rows ship. Failed before:
// the heartbeat was renewed only between acknowledgements, and the job was done after Stale.
func TestHeartbeatOutlivesASlowSpool(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	f.env.Insert(t, "events", eventCols, rows(f.a, "ivy", 2)...)
	release := make(chan struct{})
	slow := func(ctx context.Context) error { // instance two's spool: ships when released
		select {
		case <-release:
			return nil
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	const stale = 2 * time.Second
	one := f.service(Config{Instance: "one", Stale: stale})
	two := f.service(Config{Instance: "two", Stale: stale, Barrier: slow})
	actx, stopTwo := context.WithCancel(ctx)
	attended := make(chan struct{})
	go func() { defer close(attended); two.Attend(actx) }()
	defer func() { stopTwo(); <-attended }()
	testenv.Eventually(t, 10*time.Second, func() error {
		if f.registered(t, "two") != 1 {
			return fmt.Errorf("instance two not registered")
		}
		return nil
	})
	j, err := one.EraseUser(ctx, f.a, "ivy", "test")
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { _, err := one.RunOne(ctx); done <- err }()
	select {
	case err := <-done:
		got := f.job(t, one, f.a, j.ID)
		t.Fatalf("the job ended (%v, %s) while instance two had not shipped its spool, %s after it began waiting", err, got.Status, 3*stale)
	case <-time.After(3 * stale):
	}
	if n := f.count(t, f.a, "ivy"); n != 2 {
		t.Fatalf("ivy's rows while the job waits: %d, want 2 (no delete yet)", n)
	}
	close(release)
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("the job did not finish once instance two shipped")
	}
	if got := f.job(t, one, f.a, j.ID); got.Status != StatusDone || got.RowsErased != 2 {
		t.Errorf("job: %+v, want done with 2 rows", got)
	}
}

// Each process registers under an id of its own, so every instance killed without leaving (kill -9,
// OOM) used to stay in the register forever. One silent for ForgetAfter is now dropped; one that
// stopped recently stays, for an operator to see.
func TestAcknowledgeForgetsInstancesSilentForADay(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	ctx := context.Background()
	if _, err := f.env.PG.Exec(ctx, `INSERT INTO erasure_instances (id, heartbeat_at) VALUES
		('killed-long-ago', now() - make_interval(secs => $1)), ('killed-lately', now() - interval '1 hour')`,
		(ForgetAfter + time.Minute).Seconds()); err != nil {
		t.Fatal(err)
	}
	if err := f.service(Config{Instance: "live"}).Acknowledge(ctx); err != nil {
		t.Fatal(err)
	}
	for id, want := range map[string]int{"killed-long-ago": 0, "killed-lately": 1, "live": 1} {
		if n := f.registered(t, id); n != want {
			t.Errorf("instance %s: %d rows in the register, want %d", id, n, want)
		}
	}
}

// An import checks for open erasures of its tenants when it starts, and a job queued later used to
// delete while the import went on inserting: the user's rows it inserted after the delete escaped
// it (found by review). A job now holds its delete while an import into its database holds the
// import lock — not as a failed attempt — and erases what the import brought once it has ended.
func TestAnErasureWaitsForARunningImport(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	ctx := context.Background()
	acme := fixture.Tenant(t, f.env.PG, "acme")
	f.env.Insert(t, "events", eventCols, rows(acme.ID, "gina", 5)...)
	s := f.service(Config{Backoff: time.Second, MaxAttempts: 1})
	defer s.Leave(ctx)
	importing, err := f.env.PG.Acquire(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer importing.Release()
	if _, err := importing.Exec(ctx, "SELECT pg_advisory_lock(hashtext($1))", ImportLock(s.cfg.Layout.DB)); err != nil {
		t.Fatal(err)
	}
	j, err := s.EraseUser(ctx, acme.ID, "gina", "test")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.RunOne(ctx); err == nil || !strings.Contains(err.Error(), "import") {
		t.Fatalf("a job while an import runs: %v, want it held naming the import", err)
	}
	if got := f.job(t, s, acme.ID, j.ID); got.Status != StatusRunning || got.Attempts != 0 {
		t.Errorf("the held job: %+v, want running with no attempt spent (MaxAttempts is 1)", got)
	}
	if n := f.count(t, acme.ID, "gina"); n != 5 {
		t.Errorf("gina's rows while the import runs: %d, want 5 (nothing deleted yet)", n)
	}
	f.env.Insert(t, "events", eventCols, rows(acme.ID, "gina", 2)...) // what the import still inserts
	if _, err := importing.Exec(ctx, "SELECT pg_advisory_unlock(hashtext($1))", ImportLock(s.cfg.Layout.DB)); err != nil {
		t.Fatal(err)
	}
	time.Sleep(1100 * time.Millisecond) // not a poll: the Backoff the held job waits
	if ran, err := s.RunOne(ctx); !ran || err != nil {
		t.Fatalf("the job after the import: ran %v, %v", ran, err)
	}
	if got := f.job(t, s, acme.ID, j.ID); got.Status != StatusDone {
		t.Errorf("the job after the import: %+v, want done", got)
	}
	if n := f.count(t, acme.ID, "gina"); n != 0 {
		t.Errorf("gina's rows after the erasure: %d, want 0 (the import's too)", n)
	}
}

// A killed import releases its lock at once, but its last ClickHouse insert may still be running and
// commit. A job that went by the lock alone deleted, and the insert landed after it: the erased
// user's rows were back with the job "done" (found by review). It now waits for the insert too.
func TestAnErasureWaitsForAKilledImportsInsert(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	ctx := context.Background()
	acme := fixture.Tenant(t, f.env.PG, "acme")
	f.env.Insert(t, "events", eventCols, rows(acme.ID, "gina", 3)...)
	s := f.service(Config{Backoff: time.Second, MaxAttempts: 3})
	defer s.Leave(ctx)
	// What a killed import left running on ClickHouse: its last insert, of gina's rows, under the
	// importer's query id. No import holds the Postgres lock any more.
	qid := ImportQueryIDPrefix(s.cfg.Layout.DB) + uuid.NewString()
	inserted := make(chan error, 1)
	go func() {
		inserted <- f.env.CH.Exec(clickhouse.Context(ctx, clickhouse.WithQueryID(qid)),
			"INSERT INTO "+f.env.DB+".events ("+eventCols+") SELECT toUUID(?), now(), generateUUIDv4(), now(), 'auth.user.login', 'app', 'gina', '{}', '', '' "+
				"FROM numbers(3) WHERE sleepEachRow(1) = 0 SETTINGS max_block_size = 3", acme.ID.String())
	}()
	for deadline := time.Now().Add(5 * time.Second); ; {
		var n uint64
		if err := f.env.CH.QueryRow(ctx, "SELECT count() FROM system.processes WHERE query_id = ?", qid).Scan(&n); err != nil {
			t.Fatal(err)
		}
		if n > 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the insert never showed in system.processes")
		}
		time.Sleep(20 * time.Millisecond)
	}
	j, err := s.EraseUser(ctx, acme.ID, "gina", "test")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.RunOne(ctx); err == nil || !strings.Contains(err.Error(), "import") {
		t.Errorf("the job while the killed import's insert runs: %v, want it held naming the import", err)
	}
	if n := f.count(t, acme.ID, "gina"); n != 3 {
		t.Errorf("gina's rows while the insert runs: %d, want 3 (nothing deleted yet)", n)
	}
	if err := <-inserted; err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); { // the job ends once the insert has
		if got := f.job(t, s, acme.ID, j.ID); got.Status == StatusDone {
			break
		}
		_, _ = s.RunOne(ctx)
		time.Sleep(100 * time.Millisecond)
	}
	if got := f.job(t, s, acme.ID, j.ID); got.Status != StatusDone || got.Attempts != 0 {
		t.Fatalf("the job after the insert ended: %+v, want done, no attempt spent waiting", got)
	}
	if n := f.count(t, acme.ID, "gina"); n != 0 {
		t.Errorf("the job is done, and gina has %d rows: the killed import's insert landed after its delete", n)
	}
}

// A tenant job whose ClickHouse delete is done (step "clickhouse") has only Postgres and Redis left,
// and finishes while ClickHouse is down. b8808d1 asked ClickHouse for an import's insert on every
// attempt, so such a job spent its attempts and was failed for good, the tenant's Postgres rows and
// Redis keys never erased (found by review).
func TestATenantJobPastItsDeleteDoesNotNeedClickHouse(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	ctx := context.Background()
	if _, err := f.env.PG.Exec(ctx, "INSERT INTO tenants (id, slug) VALUES ($1, $2)", f.a, "t-"+f.a.String()[:8]); err != nil {
		t.Fatal(err)
	}
	if _, err := f.env.PG.Exec(ctx, "INSERT INTO analytics_daily_usage (tenant_id, date, metric, count) VALUES ($1, current_date, 'auth.user.login', 9)", f.a); err != nil {
		t.Fatal(err)
	}
	f.env.Insert(t, "events", eventCols, rows(f.a, "erin", 2)...)
	var redisUp atomic.Bool
	keys := func(context.Context, uuid.UUID) (int, error) {
		if !redisUp.Load() {
			return 0, errors.New("injected: redis blip")
		}
		return 1, nil
	}
	cfg := Config{DeleteKeys: keys, MaxAttempts: 2, Backoff: 200 * time.Millisecond}
	s := f.service(cfg)
	j, err := s.EraseTenant(ctx, f.a, "test")
	if err != nil {
		t.Fatal(err)
	}
	_, _ = s.RunOne(ctx) // the delete is done; Redis fails: attempt 1 of 2
	if got := f.job(t, s, f.a, j.ID); got.Step != stepDeleted || got.Attempts != 1 {
		t.Fatalf("after attempt 1: %+v, want step %q with 1 attempt", got, stepDeleted)
	}
	// Redis is back; ClickHouse is now unreachable (its work for this job is over).
	redisUp.Store(true)
	down, err := clickhouse.Open(&clickhouse.Options{Addr: []string{"127.0.0.1:1"}, DialTimeout: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	cfg.Layout = f.env.Layout()
	cfg.Poll = 20 * time.Millisecond
	s2 := New(cfg, down, f.env.PG, s.audit, nil)
	time.Sleep(time.Second) // the backoff
	if _, err := s2.RunOne(ctx); err != nil {
		t.Logf("attempt 2: %v", err)
	}
	if got := f.job(t, s, f.a, j.ID); got.Status != StatusDone {
		t.Errorf("a job past its ClickHouse delete, Postgres and Redis up, ClickHouse down: %s after %d attempts (%s), want done", got.Status, got.Attempts, got.Error)
	}
}
