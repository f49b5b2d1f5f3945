package main

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/url"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/analyticsd/analyticsd/auth"
	"github.com/analyticsd/analyticsd/internal/testenv"
	"github.com/analyticsd/analyticsd/internal/testenv/fixture"
)

// A user's erasure end to end on the real server: events acknowledged a moment before the request are
// still in the spool (a 3 s flush interval keeps them there) when the job starts; the job waits for
// them to ship and erases them too. Afterwards /events, the export, /active-users and ClickHouse
// itself find nothing of the user, another user and another tenant keep everything, and events the
// user sends after the erasure are stored.
func TestEraseUserEndToEnd(t *testing.T) {
	e := testenv.Migrated(t)
	getenv := stackEnv(t, e, map[string]string{"ANALYTICS_ADDR": freeAddr(t), "ANALYTICS_SPOOL_DIR": t.TempDir(),
		"INGEST_FLUSH_INTERVAL": "3s", "AUTH_JWT_SECRET": ""})
	base := serveInProcess(t, getenv)
	acme := fixture.Tenant(t, e.PG, "acme")
	globex := fixture.Tenant(t, e.PG, "globex")
	write, _ := fixture.Key(t, e.PG, acme.ID, "w", auth.ScopeEventsWrite)
	read, _ := fixture.Key(t, e.PG, acme.ID, "r", auth.ScopeAnalyticsRead)
	admin, _ := fixture.Key(t, e.PG, acme.ID, "a", auth.ScopeAnalyticsAdmin)
	gwrite, _ := fixture.Key(t, e.PG, globex.ID, "gw", auth.ScopeEventsWrite)
	srv := fixture.At(t, base)
	post := func(key, user string, n int) {
		t.Helper()
		var b strings.Builder
		b.WriteString("[")
		for i := range n {
			if i > 0 {
				b.WriteString(",")
			}
			fmt.Fprintf(&b, `{"event":"auth.user.login","user_id":%q,"props":{"email":"%s@example.com"},"ip":"10.1.2.3"}`, user, user)
		}
		b.WriteString("]")
		r := srv.Do(t, fixture.Request{Method: http.MethodPost, Path: "/api/analytics/events", Key: key, Body: []byte(b.String()),
			Header: map[string]string{"Content-Type": "application/json"}})
		if r.Status != 202 {
			t.Fatalf("ingest: got %d %s", r.Status, r.Raw)
		}
	}
	count := func(tenant uuid.UUID, user string) uint64 {
		t.Helper()
		var n uint64
		if err := e.CH.QueryRow(context.Background(), "SELECT count() FROM "+e.DB+".events WHERE tenant_id = ? AND user_id = ?", tenant, user).Scan(&n); err != nil {
			t.Fatal(err)
		}
		return n
	}
	post(write, "alice", 4)
	withID := func() fixture.Response {
		return srv.Do(t, fixture.Request{Method: http.MethodPost, Path: "/api/analytics/events", Key: write,
			Body:   []byte(`{"id":"0190b5c2-7f00-7000-8000-000000000042","event":"auth.user.login","user_id":"alice"}`),
			Header: map[string]string{"Content-Type": "application/json"}})
	}
	if r := withID(); r.Status != 202 {
		t.Fatalf("ingest with an id: got %d %s", r.Status, r.Raw)
	}
	post(write, "bob", 4)
	post(gwrite, "alice", 3)
	testenv.Eventually(t, 20*time.Second, func() error {
		if n := count(acme.ID, "alice") + count(acme.ID, "bob") + count(globex.ID, "alice"); n != 12 {
			return fmt.Errorf("%d of 12 events stored", n)
		}
		return nil
	})
	post(write, "alice", 6) // acknowledged, and in the spool for the next 3 s
	if n := count(acme.ID, "alice"); n != 5 {
		t.Fatalf("alice's newest events are already in ClickHouse (%d rows); the test needs them in the spool", n)
	}
	r := srv.Do(t, fixture.Request{Method: http.MethodDelete, Path: "/api/analytics/users/alice", Key: admin})
	if r.Status != 202 {
		t.Fatalf("DELETE /users/alice: got %d %s", r.Status, r.Raw)
	}
	job := r.Data()["id"].(string)
	var status map[string]any
	testenv.Eventually(t, 60*time.Second, func() error {
		r := srv.Get(t, admin, "", "/api/analytics/erasures/"+job)
		if status = r.Data(); r.Status != 200 || status["status"] != "done" {
			return fmt.Errorf("job: %d %s", r.Status, r.Raw)
		}
		return nil
	})
	if status["rows_erased"] != float64(11) {
		t.Errorf("rows erased: got %v, want 11 (5 stored, 6 from the spool)", status["rows_erased"])
	}
	if n := count(acme.ID, "alice"); n != 0 {
		t.Errorf("ClickHouse: %d rows of alice left, want 0", n)
	}
	if n := count(acme.ID, "bob") + count(globex.ID, "alice"); n != 7 {
		t.Errorf("others: got %d rows, want 7 (bob's 4, globex's alice's 3)", n)
	}
	q := url.Values{"user_id": {"alice"}}.Encode()
	if r := srv.Get(t, read, "", "/api/analytics/events?"+q); r.Status != 200 || len(r.Data()["events"].([]any)) != 0 {
		t.Errorf("/events?user_id=alice: got %d %s, want no events", r.Status, r.Raw)
	}
	if r := srv.Get(t, read, "", "/api/analytics/export.ndjson?"+q); r.Status != 200 || strings.Contains(r.Raw, "alice") {
		t.Errorf("export: got %d %q, want nothing of alice", r.Status, r.Raw)
	}
	r = srv.Get(t, read, "", "/api/analytics/active-users")
	if r.Status != 200 || r.Data()["users"] != float64(1) || r.Data()["events"] != float64(4) {
		t.Errorf("/active-users: got %d %s, want bob alone (1 user, 4 events)", r.Status, r.Raw)
	}
	// The daily aggregate keeps its count: it holds no personal data.
	var agg int64
	if err := e.CH.QueryRow(context.Background(), "SELECT sum(count) FROM "+e.DB+".daily_usage WHERE tenant_id = ? AND metric = 'auth.user.login'", acme.ID).Scan(&agg); err != nil || agg != 15 {
		t.Errorf("daily_usage: got %d (%v), want 15 (kept)", agg, err)
	}
	// A client retrying an erased event with its id is told it is a duplicate: it stays erased.
	if r := withID(); r.Status != 202 || !strings.Contains(r.Raw, "0190b5c2-7f00-7000-8000-000000000042") {
		t.Errorf("the erased event sent again: got %d %s, want 202 listing it as a duplicate", r.Status, r.Raw)
	}
	post(write, "alice", 2)
	testenv.Eventually(t, 20*time.Second, func() error {
		if n := count(acme.ID, "alice"); n != 2 {
			return fmt.Errorf("alice's new events: %d of 2 stored", n)
		}
		return nil
	})
	if r := srv.Get(t, read, "", "/api/analytics/erasures/"+job); r.Status != 403 {
		t.Errorf("a read key on /erasures: got %d, want 403", r.Status)
	}
}

// The CLI: set-timezone validates and is audited once; erase user and erase tenant (confirmed) run
// jobs to the end with --run and leave the other tenant alone.
func TestCLITimeZoneAndErase(t *testing.T) {
	e := testenv.Migrated(t)
	getenv := stackEnv(t, e, nil)
	cliTenant(t, getenv, "acme")
	cliTenant(t, getenv, "globex")
	if r := runCmd(t, getenv, "tenant", "set-timezone", "--tenant", "acme", "--zone", "Mars/Olympus"); r.code != 2 {
		t.Errorf("a bad zone: exit %d %s, want 2", r.code, r.stderr)
	}
	for range 2 {
		if r := runCmd(t, getenv, "tenant", "set-timezone", "--tenant", "acme", "--zone", "Asia/Kathmandu"); r.code != 0 {
			t.Fatalf("set-timezone: exit %d %s", r.code, r.stderr)
		}
	}
	if n := auditCount(t, e, "tenant.set_timezone"); n != 1 {
		t.Errorf("audit rows: got %d, want 1 (the second call changed nothing)", n)
	}
	if r := runCmd(t, getenv, "tenant", "show", "--tenant", "acme", "--json"); !strings.Contains(r.stdout, `"time_zone": "Asia/Kathmandu"`) {
		t.Errorf("show: %s", r.stdout)
	}
	ids := map[string]uuid.UUID{}
	for _, slug := range []string{"acme", "globex"} {
		var id uuid.UUID
		if err := e.PG.QueryRow(context.Background(), "SELECT id FROM tenants WHERE slug = $1", slug).Scan(&id); err != nil {
			t.Fatal(err)
		}
		ids[slug] = id
		now := time.Now().UTC().Truncate(time.Second)
		e.Insert(t, "events", "tenant_id, ts, id, received_at, event, source, user_id, props, ip, request_id",
			[]any{id, now, uuid.New(), now, "auth.user.login", "app", "zoe", "{}", "", ""},
			[]any{id, now, uuid.New(), now, "auth.user.login", "app", "yann", "{}", "", ""})
	}
	r := runCmd(t, getenv, "erase", "user", "--tenant", "acme", "--user", "zoe", "--run", "--json")
	var j struct {
		Status     string `json:"status"`
		RowsErased int    `json:"rows_erased"`
	}
	if r.code != 0 || json.Unmarshal([]byte(r.stdout), &j) != nil || j.Status != "done" || j.RowsErased != 1 {
		t.Fatalf("erase user: exit %d %s %s", r.code, r.stdout, r.stderr)
	}
	stdin = strings.NewReader("acm\n")
	t.Cleanup(func() { stdin = os.Stdin })
	if r := runCmd(t, getenv, "erase", "tenant", "--tenant", "acme", "--run"); r.code != 2 {
		t.Errorf("erase tenant with a wrong confirmation: exit %d, want 2", r.code)
	}
	stdin = strings.NewReader("acme\n")
	if r := runCmd(t, getenv, "erase", "tenant", "--tenant", "acme", "--run"); r.code != 0 || !strings.Contains(r.stdout, "done, 1 rows erased") {
		t.Fatalf("erase tenant: exit %d %s %s", r.code, r.stdout, r.stderr)
	}
	for slug, want := range map[string]uint64{"acme": 0, "globex": 2} {
		var n uint64
		if err := e.CH.QueryRow(context.Background(), "SELECT count() FROM "+e.DB+".events WHERE tenant_id = ?", ids[slug]).Scan(&n); err != nil || n != want {
			t.Errorf("%s events: got %d (%v), want %d", slug, n, err, want)
		}
	}
	// A job that failed for good says so, with its last error.
	failed := uuid.New()
	if _, err := e.PG.Exec(context.Background(), `INSERT INTO erasure_jobs (id, tenant_id, kind, status, actor, attempts, error, finished_at)
		VALUES ($1, $2, 'user', 'failed', 'test', 8, 'delete from events: code: 241, memory limit exceeded', now())`, failed, ids["globex"]); err != nil {
		t.Fatal(err)
	}
	if r := runCmd(t, getenv, "erase", "status", "--tenant", "globex", "--job", failed.String()); r.code != 0 ||
		!strings.Contains(r.stdout, "failed after 8 attempts: delete from events: code: 241, memory limit exceeded") {
		t.Errorf("erase status of a failed job: exit %d %q %s", r.code, r.stdout, r.stderr)
	}
}

// `erase user --run` runs the oldest open job first, which may be another tenant's erasure: that job
// must be finished whole, its Redis keys included. Failed before: the CLI gave its runner Redis only
// for `erase tenant`, and the other tenant's job was marked done with its keys left in Redis.
func TestCLIEraseRunFinishesAnotherTenantsJobWhole(t *testing.T) {
	e := testenv.Migrated(t)
	getenv := stackEnv(t, e, nil)
	cliTenant(t, getenv, "acme")
	cliTenant(t, getenv, "globex")
	ctx := context.Background()
	ids := map[string]uuid.UUID{}
	for _, slug := range []string{"acme", "globex"} {
		var id uuid.UUID
		if err := e.PG.QueryRow(ctx, "SELECT id FROM tenants WHERE slug = $1", slug).Scan(&id); err != nil {
			t.Fatal(err)
		}
		ids[slug] = id
	}
	key := "quota:{" + ids["globex"].String() + "}:builds_daily:20261130"
	if err := e.Redis.Set(ctx, key, 5, time.Hour).Err(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { e.Redis.Del(context.Background(), key) })
	if _, err := e.PG.Exec(ctx, `INSERT INTO erasure_jobs (id, tenant_id, kind, status, actor, created_at)
		VALUES ($1, $2, 'tenant', 'queued', 'test', now() - interval '1 minute')`, uuid.New(), ids["globex"]); err != nil {
		t.Fatal(err)
	}
	if r := runCmd(t, getenv, "erase", "user", "--tenant", "acme", "--user", "zoe", "--run"); r.code != 0 {
		t.Fatalf("erase user --run: exit %d %s %s", r.code, r.stdout, r.stderr)
	}
	var open int
	if err := e.PG.QueryRow(ctx, "SELECT count(*) FROM erasure_jobs WHERE tenant_id = $1 AND status <> 'done'", ids["globex"]).Scan(&open); err != nil || open != 0 {
		t.Fatalf("globex's tenant erasure: %d jobs not done (%v); want it run first", open, err)
	}
	if n, err := e.Redis.Exists(ctx, key).Result(); err != nil || n != 0 {
		t.Errorf("globex's Redis key after its tenant erasure ran: exists=%d (%v), want deleted", n, err)
	}
}
