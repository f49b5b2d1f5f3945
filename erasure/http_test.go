package erasure

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/analyticsd/analyticsd/api"
	"github.com/analyticsd/analyticsd/auth"
	"github.com/analyticsd/analyticsd/internal/testenv/fixture"
	"github.com/analyticsd/analyticsd/tenant"
)

func TestHTTP(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	a, b := fixture.Tenant(t, f.env.PG, "acme"), fixture.Tenant(t, f.env.PG, "globex")
	admin, _ := fixture.Key(t, f.env.PG, a.ID, "a-admin", auth.ScopeAnalyticsAdmin)
	read, _ := fixture.Key(t, f.env.PG, a.ID, "a-read", auth.ScopeAnalyticsRead)
	otherAdmin, _ := fixture.Key(t, f.env.PG, b.ID, "b-admin", auth.ScopeAnalyticsAdmin)
	f.env.Insert(t, "events", eventCols, rows(a.ID, "user/1 é", 3)...)
	s := f.service(Config{})
	srv := serveErasures(t, f, s)
	del := func(key, path string) fixture.Response {
		return srv.Do(t, fixture.Request{Method: "DELETE", Path: path, Key: key})
	}

	if r := del(read, "/api/analytics/users/x"); r.Status != 403 {
		t.Errorf("analytics:read erasing: got %d, want 403", r.Status)
	}
	r := del(admin, "/api/analytics/users/user%2F1%20%C3%A9")
	if r.Status != 202 || r.Data()["status"] != "queued" || r.Data()["user_id"] != "user/1 é" {
		t.Fatalf("DELETE /users: got %d %s, want 202 queued for user/1 é", r.Status, r.Raw)
	}
	id := r.Data()["id"].(string)
	if _, err := s.RunOne(context.Background()); err != nil {
		t.Fatal(err)
	}
	r = srv.Get(t, admin, "", "/api/analytics/erasures/"+id)
	if r.Status != 200 || r.Data()["status"] != "done" || r.Data()["rows_erased"] != float64(3) {
		t.Errorf("GET /erasures: got %d %s, want done with 3 rows", r.Status, r.Raw)
	}
	if r := srv.Get(t, otherAdmin, "", "/api/analytics/erasures/"+id); r.Status != 404 {
		t.Errorf("another tenant's job: got %d, want 404", r.Status)
	}
	if r := srv.Get(t, admin, "", "/api/analytics/erasures/"+uuid.NewString()); r.Status != 404 {
		t.Errorf("unknown job: got %d, want 404", r.Status)
	}
	if r := del(admin, "/api/analytics/users/"+strings.Repeat("u", 256)); r.Status != 400 {
		t.Errorf("a 256-byte user id: got %d, want 400", r.Status)
	}

	f.env.Insert(t, "events", eventCols, rows(b.ID, "kept", 2)...)
	for _, q := range []string{"", "?confirm=", "?confirm=globex"} {
		if r := del(admin, "/api/analytics/data"+q); r.Status != 400 || !strings.Contains(r.Raw, "confirmation_required") {
			t.Errorf("DELETE /data%s: got %d %s, want 400 confirmation_required", q, r.Status, r.Raw)
		}
	}
	r = del(admin, "/api/analytics/data?confirm=acme")
	if r.Status != 202 || r.Data()["kind"] != "tenant" {
		t.Fatalf("DELETE /data?confirm=acme: got %d %s", r.Status, r.Raw)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if _, err := s.RunOne(ctx); err != nil {
		t.Fatal(err)
	}
	if n := f.count(t, b.ID, ""); n != 2 {
		t.Errorf("the other tenant after an offboarding: got %d events, want 2", n)
	}
}

// A user id holding NUL bytes (events take it, sent as \u0000) is erased like any other, and one
// that is not UTF-8 (no event can hold it) is a 400 naming the user id. Found by review: both were
// a 503 with Retry-After — Postgres' text refused the bytes — so such a user could never be erased
// and a client honouring Retry-After retried forever.
func TestEraseAUserIDWithNULBytes(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	a := fixture.Tenant(t, f.env.PG, "acme")
	admin, _ := fixture.Key(t, f.env.PG, a.ID, "a-admin", auth.ScopeAnalyticsAdmin)
	f.env.Insert(t, "events", eventCols, rows(a.ID, "user\x00nul", 4)...)
	f.env.Insert(t, "events", eventCols, rows(a.ID, "user", 2)...)
	s := f.service(Config{})
	srv := serveErasures(t, f, s)

	r := srv.Do(t, fixture.Request{Method: "DELETE", Path: "/api/analytics/users/user%00nul", Key: admin})
	if r.Status != 202 || r.Data()["user_id"] != "user\x00nul" {
		t.Fatalf("DELETE /users/user%%00nul: %d %s, want 202 queued for the id as sent", r.Status, r.Raw)
	}
	if ran, err := s.RunOne(context.Background()); !ran || err != nil {
		t.Fatalf("RunOne: %v %v", ran, err)
	}
	if n := f.count(t, a.ID, "user\x00nul"); n != 0 {
		t.Errorf("rows of the user with a NUL byte after the erasure: %d, want 0", n)
	}
	if n := f.count(t, a.ID, "user"); n != 2 {
		t.Errorf("rows of \"user\": %d, want the 2 kept", n)
	}
	r = srv.Do(t, fixture.Request{Method: "DELETE", Path: "/api/analytics/users/bad%FFutf8", Key: admin})
	if r.Status != 400 || !strings.Contains(r.Raw, "UTF-8") {
		t.Errorf("DELETE /users/bad%%FFutf8: %d %s, want 400 saying the id must be UTF-8", r.Status, r.Raw)
	}
}

// serveErasures serves s's routes as serve mounts them, behind API keys with analytics:admin.
func serveErasures(t *testing.T, f *stores, s *Service) *fixture.Server {
	app := api.NewApp(api.Config{}, nil)
	authn := auth.NewAuthenticator(auth.NewKeys(f.env.PG), tenant.NewStore(f.env.PG), auth.JWTConfig{})
	s.Register(app.Group("/api/analytics"), authn.Require(auth.ScopeAnalyticsAdmin))
	return fixture.Serve(t, app)
}

// A release before 0012, still running during a rolling upgrade, reads only user_id. For an id with
// NUL bytes that must neither erase another user's events nor end the job with the id kept:
// user_id shows the id past 255 bytes (no event's user_id is that long), the previous release's
// finishing statement is refused, and this release then erases the user. Found by review: the
// previous release read "user\uFFFDnul" — another user id, whose events it would erase — and its
// "done" left the id in user_bytes for good.
func TestANULUserIDJobIsSafeFromThePreviousRelease(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	ctx := context.Background()
	f.env.Insert(t, "events", eventCols, rows(f.a, "user\x00nul", 4)...)
	f.env.Insert(t, "events", eventCols, rows(f.a, "user\ufffdnul", 3)...)
	s := f.service(Config{})
	j, err := s.EraseUser(ctx, f.a, "user\x00nul", "test")
	if err != nil {
		t.Fatal(err)
	}
	var shown string
	if err := f.env.PG.QueryRow(ctx, "SELECT user_id FROM erasure_jobs WHERE id = $1", j.ID).Scan(&shown); err != nil {
		t.Fatal(err)
	}
	if len(shown) <= 255 {
		t.Errorf("user_id %q (%d bytes): the previous release would erase the events of that id; want it past 255 bytes", shown, len(shown))
	}
	if _, err := f.env.PG.Exec(ctx, previousReleaseDone, j.ID); err == nil {
		t.Error("the previous release marked the job done with the id's bytes kept")
	}
	if ran, err := s.RunOne(ctx); !ran || err != nil {
		t.Fatalf("RunOne: %v %v", ran, err)
	}
	if got := f.job(t, s, f.a, j.ID); got.Status != StatusDone || got.UserID != "" || got.RowsErased != 4 {
		t.Errorf("job: %+v, want done with 4 rows and the id blanked", got)
	}
	if n := f.count(t, f.a, "user\x00nul"); n != 0 {
		t.Errorf("rows of the user with a NUL byte: %d, want 0", n)
	}
	if n := f.count(t, f.a, "user\ufffdnul"); n != 3 {
		t.Errorf("rows of user\\ufffdnul, another user: %d, want the 3 kept", n)
	}
}

// Only an id with NUL bytes keeps them apart: any other job's row is what a release before 0012
// reads and can finish, so a rolling upgrade changes nothing for it (the check on ended jobs would
// have refused its "done" and left the job to this release).
func TestAnOrdinaryUserIDJobIsFinishedByThePreviousRelease(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	ctx := context.Background()
	s := f.service(Config{})
	j, err := s.EraseUser(ctx, f.a, "alice", "test")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.env.PG.Exec(ctx, previousReleaseDone, j.ID); err != nil {
		t.Errorf("the previous release could not finish an ordinary job: %v", err)
	}
}

// An erasure of an id with NUL bytes is refused (409, naming the instances) while an instance of a
// release that reads only user_id is live: it would erase nothing of the user and scrub nothing
// from its quarantine. Once that instance's heartbeat is stale, the erasure is taken. Found by
// review: such an instance took the job, saved step "clickhouse" having deleted nothing, and this
// release then finished it without deleting.
func TestANULUserIDErasureWaitsForOlderInstances(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	ctx := context.Background()
	a := fixture.Tenant(t, f.env.PG, "acme")
	admin, _ := fixture.Key(t, f.env.PG, a.ID, "a-admin", auth.ScopeAnalyticsAdmin)
	s := f.service(Config{})
	srv := serveErasures(t, f, s)
	if _, err := f.env.PG.Exec(ctx, "INSERT INTO erasure_instances (id) VALUES ('old-release-1')"); err != nil {
		t.Fatal(err)
	}
	r := srv.Do(t, fixture.Request{Method: "DELETE", Path: "/api/analytics/users/user%00nul", Key: admin})
	if r.Status != 409 || !strings.Contains(r.Raw, "old-release-1") {
		t.Errorf("with an older instance live: %d %s, want 409 naming it", r.Status, r.Raw)
	}
	if r := srv.Do(t, fixture.Request{Method: "DELETE", Path: "/api/analytics/users/alice", Key: admin}); r.Status != 202 {
		t.Errorf("an ordinary id with an older instance live: %d %s, want 202", r.Status, r.Raw)
	}
	if _, err := f.env.PG.Exec(ctx, "UPDATE erasure_instances SET heartbeat_at = now() - interval '1 hour' WHERE id = 'old-release-1'"); err != nil {
		t.Fatal(err)
	}
	if r := srv.Do(t, fixture.Request{Method: "DELETE", Path: "/api/analytics/users/user%00nul", Key: admin}); r.Status != 202 {
		t.Errorf("once the older instance is gone: %d %s, want 202", r.Status, r.Raw)
	}
}

// If an older instance runs such a job anyway (started after it was queued: a rollback), saving
// step "clickhouse" after deleting nothing, this release runs the delete again when it takes the
// job over: the user's rows go. Found by review (the review's statements of the previous release's
// attempt, replayed).
func TestANULUserIDJobTakenOverAfterAnOlderAttemptIsErased(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	ctx := context.Background()
	f.env.Insert(t, "events", eventCols, rows(f.a, "user\x00nul", 4)...)
	s := f.service(Config{Stale: time.Second})
	j, err := s.EraseUser(ctx, f.a, "user\x00nul", "test")
	if err != nil {
		t.Fatal(err)
	}
	for _, q := range []string{
		`UPDATE erasure_jobs SET status = 'running', started_at = coalesce(started_at, now()), heartbeat_at = now() WHERE id = $1`,
		`UPDATE erasure_jobs SET step = 'spool', heartbeat_at = now() WHERE id = $1`,
		`UPDATE erasure_jobs SET step = 'clickhouse', heartbeat_at = now() WHERE id = $1`,
		`UPDATE erasure_jobs SET error = 'finish: check violation', attempts = 1, heartbeat_at = now() - interval '1 minute' WHERE id = $1`,
	} {
		if _, err := f.env.PG.Exec(ctx, q, j.ID); err != nil {
			t.Fatalf("%s: %v", q, err)
		}
	}
	if ran, err := s.RunOne(ctx); !ran || err != nil {
		t.Fatalf("RunOne: %v %v", ran, err)
	}
	if got, n := f.job(t, s, f.a, j.ID), f.count(t, f.a, "user\x00nul"); got.Status != StatusDone || n != 0 {
		t.Errorf("job %s with %d of the user's rows left, want done with none", got.Status, n)
	}
}

// An older instance that starts after a NUL-id erasure was accepted (a pod restarted mid-rollout)
// and acknowledges it has scrubbed nothing (it reads the padded user_id): the job does not pass its
// acknowledgements while that instance is live. Found by review: it ended done, the user's rows left
// in that instance's quarantine, to be stored again by a requeue.
func TestAnOlderInstanceAcknowledgingANULUserIDJobHoldsItBack(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	ctx := context.Background()
	s := f.service(Config{Stale: 5 * time.Second, AckWait: 300 * time.Millisecond})
	j, err := s.EraseUser(ctx, f.a, "u\x00y", "test")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.env.PG.Exec(ctx, "INSERT INTO erasure_instances (id) VALUES ('old-restarted')"); err != nil {
		t.Fatal(err)
	}
	if _, err := f.env.PG.Exec(ctx, "INSERT INTO erasure_acks (job_id, instance, scrubbed) VALUES ($1, 'old-restarted', 0)", j.ID); err != nil {
		t.Fatal(err)
	}
	if ran, err := s.RunOne(ctx); !ran || err == nil || !strings.Contains(err.Error(), "old-restarted") {
		t.Errorf("RunOne with the older instance live: %v, %v; want the attempt failed waiting for it", ran, err)
	}
	if got := f.job(t, s, f.a, j.ID); got.Status == StatusDone {
		t.Errorf("job done while an older instance, which scrubbed nothing, is live")
	}
}

// previousReleaseDone is the statement by which the release before 0012 finished a job, verbatim
// (6372ea6^): it blanks user_id and knows nothing of user_bytes.
const previousReleaseDone = `UPDATE erasure_jobs SET status = 'done', user_id = '', error = '', finished_at = now() WHERE id = $1`
