package rollup_test

import (
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/analyticsd/analyticsd/erasure"
	"github.com/analyticsd/analyticsd/rollup"
)

// ledgerRow records, as a finished user erasure of tenant would have, n events of metric on day taken
// out of the raw events (erasure_jobs, an applied erasure_rounds row, erased_usage).
func (f *fixture) ledgerRow(t *testing.T, tenant uuid.UUID, day time.Time, metric string, n int64) {
	t.Helper()
	ctx := ctxT(t)
	job := uuid.New()
	for _, q := range []struct {
		sql  string
		args []any
	}{
		{"INSERT INTO erasure_jobs (id, tenant_id, kind, status, actor, finished_at) VALUES ($1, $2, 'user', 'done', 'test', now())", []any{job, tenant}},
		{"INSERT INTO erasure_rounds (job_id, round, tenant_id, user_digest, ids, rows, applied, applied_at) VALUES ($1, 1, $2, '', '{}', $3, true, now())",
			[]any{job, tenant, n}},
		{"INSERT INTO erased_usage (tenant_id, date, metric, minute, n, job_id, round) VALUES ($1, $2::date, $3, $4, $5, $6, 1)",
			[]any{tenant, day.Format(time.DateOnly), metric, day.Add(9*time.Hour).Unix() / 60, n, job}},
	} {
		if _, err := f.env.PG.Exec(ctx, q.sql, q.args...); err != nil {
			t.Fatalf("%s: %v", q.sql, err)
		}
	}
}

// tenantErasure inserts a tenant-erasure job for tenant with status and returns its id.
func (f *fixture) tenantErasure(t *testing.T, tenant uuid.UUID, status, step string) uuid.UUID {
	t.Helper()
	id := uuid.New()
	if _, err := f.env.PG.Exec(ctxT(t), "INSERT INTO erasure_jobs (id, tenant_id, kind, status, step, actor) VALUES ($1, $2, 'tenant', $3, $4, 'test')",
		id, tenant, status, step); err != nil {
		t.Fatal(err)
	}
	return id
}

// A rollup that runs while a tenant's erasure is open neither repairs the tenant's daily_usage nor
// publishes billed rows for it. Between the job's ClickHouse step (daily_usage and the raw rows gone)
// and its Postgres step (erased_usage deleted last), the ledger of earlier user erasures made the raw
// side 5 and the aggregate 0: the rollup inserted a +5 repair after the daily_usage mutation, which
// survived the job (the erased tenant kept auth.user.login=5). A raw/aggregate difference read just
// before the mutation and written just after it survives the same way. Tenant u, with the same
// differences and no open tenant erasure, is repaired as before; once t's job is no longer open
// (failed here), t is repaired too.
func TestOpenTenantErasureHoldsTheTenant(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	ctx := ctxT(t)
	erased, other := f.tenant(t, "acme"), f.tenant(t, "globex")
	d := f.daysAgo(1)
	for _, id := range []uuid.UUID{erased, other} {
		f.events(t, repeat(2, id, d.Add(10*time.Hour), "email.sent")...)
	}
	r := f.reconciler(nil, nil)
	if _, err := r.RunDate(ctx, d, rollup.AllTenants(), "test"); err != nil {
		t.Fatal(err)
	}
	billedBefore := counts{k(erased, "email.sent"): 2, k(other, "email.sent"): 2}
	if got := f.postgres(t, d); got.String() != billedBefore.String() {
		t.Fatalf("billed before: got %v, want %v", got, billedBefore)
	}

	// Both tenants: 5 logins in the ledger and none in daily_usage (as after the job's ClickHouse
	// step), and an aggregate one short of the raw email.sent events.
	for _, id := range []uuid.UUID{erased, other} {
		f.ledgerRow(t, id, d, "auth.user.login", 5)
		f.aggregateRow(t, id, d, "email.sent", -1)
	}
	job := f.tenantErasure(t, erased, "running", "deleted")

	res, err := r.RunDate(ctx, d, rollup.AllTenants(), "test")
	if err != nil {
		t.Fatal(err)
	}
	if res.Repaired != 2 {
		t.Errorf("run with the tenant erasure open: repaired %d, want 2 (the other tenant's rows only)", res.Repaired)
	}
	wantAgg := counts{k(erased, "email.sent"): 1, k(other, "email.sent"): 2, k(other, "auth.user.login"): 5}
	if got := f.aggregate(t, d); got.String() != wantAgg.String() {
		t.Errorf("daily_usage with the tenant erasure open: got %v, want %v", got, wantAgg)
	}
	// The erased tenant's billed rows are left as they were (its job's Postgres step deletes them).
	wantBilled := counts{k(erased, "email.sent"): 2, k(other, "email.sent"): 2, k(other, "auth.user.login"): 5}
	if got := f.postgres(t, d); got.String() != wantBilled.String() {
		t.Errorf("billed with the tenant erasure open: got %v, want %v", got, wantBilled)
	}

	// A run for the erased tenant alone holds it too; a queued job holds it as a running one does.
	if _, err := f.env.PG.Exec(ctx, "UPDATE erasure_jobs SET status = 'queued', step = '' WHERE id = $1", job); err != nil {
		t.Fatal(err)
	}
	if res, err := r.RunDate(ctx, d, rollup.OneTenant(erased), "test"); err != nil || res.Repaired != 0 || res.Changed != 0 {
		t.Errorf("run for the erased tenant alone: %+v %v, want nothing repaired or changed", res, err)
	}
	if got := f.aggregate(t, d); got.String() != wantAgg.String() {
		t.Errorf("daily_usage after a run for the erased tenant alone: got %v, want %v", got, wantAgg)
	}

	// A finished tenant erasure does not hold its tenant (the other one's, done here, nor the user
	// erasures behind the ledger rows); once the erased tenant's job is no longer open, it is repaired.
	f.tenantErasure(t, other, "done", "other")
	if _, err := f.env.PG.Exec(ctx, "UPDATE erasure_jobs SET status = 'failed' WHERE id = $1", job); err != nil {
		t.Fatal(err)
	}
	res, err = r.RunDate(ctx, d, rollup.AllTenants(), "test")
	if err != nil {
		t.Fatal(err)
	}
	if res.Repaired != 2 {
		t.Errorf("run after the tenant erasure failed: repaired %d, want 2", res.Repaired)
	}
	want := counts{k(erased, "email.sent"): 2, k(erased, "auth.user.login"): 5, k(other, "email.sent"): 2, k(other, "auth.user.login"): 5}
	if got := f.aggregate(t, d); got.String() != want.String() {
		t.Errorf("daily_usage after the tenant erasure failed: got %v, want %v", got, want)
	}
	if got := f.postgres(t, d); got.String() != want.String() {
		t.Errorf("billed after the tenant erasure failed: got %v, want %v", got, want)
	}
}

// Twelve recorded rounds of 4,500 ids each, their deletes still pending: the rollup leaves those
// 54,000 ids out of its count of the raw events, one AST element each, and 18.16 refused the query
// ("AST is too big. Maximum: 50000") until the read raised max_ast_elements with max_query_size.
// Each round holds one of the user's 12 stored events and counts it in erased_usage, so the raw side
// is 12 either way and nothing is repaired.
func TestManyPendingRoundsFitTheQuery(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	ctx := ctxT(t)
	a := f.tenant(t, "acme")
	d := f.daysAgo(1)
	const rounds, perRound = 12, 4500
	f.userEvents(t, a, "erin", "auth.user.login", d.Add(8*time.Hour), 0, rounds)
	var stored []uuid.UUID
	rows, err := f.env.CH.Query(ctx, "SELECT id FROM "+f.env.DB+".events WHERE tenant_id = ? ORDER BY ts", a)
	if err != nil {
		t.Fatal(err)
	}
	for rows.Next() {
		var id uuid.UUID
		if err := rows.Scan(&id); err != nil {
			t.Fatal(err)
		}
		stored = append(stored, id)
	}
	rows.Close()
	if len(stored) != rounds {
		t.Fatalf("stored events: got %d, want %d", len(stored), rounds)
	}
	job := uuid.New()
	if _, err := f.env.PG.Exec(ctx, "INSERT INTO erasure_jobs (id, tenant_id, kind, status, actor) VALUES ($1, $2, 'user', 'running', 'test')", job, a); err != nil {
		t.Fatal(err)
	}
	for i, ev := range stored {
		ids := []string{ev.String()}
		for len(ids) < perRound {
			ids = append(ids, uuid.NewString())
		}
		if _, err := f.env.PG.Exec(ctx, "INSERT INTO erasure_rounds (job_id, round, tenant_id, user_digest, ids, rows) VALUES ($1, $2, $3, $4, $5::text[]::uuid[], 1)",
			job, i+1, a, erasure.UserDigest("erin"), ids); err != nil {
			t.Fatal(err)
		}
		if _, err := f.env.PG.Exec(ctx, "INSERT INTO erased_usage (tenant_id, date, metric, minute, n, job_id, round) VALUES ($1, $2::date, 'auth.user.login', $3, 1, $4, $5)",
			a, d.Format(time.DateOnly), d.Add(8*time.Hour).Unix()/60, job, i+1); err != nil {
			t.Fatal(err)
		}
	}
	res, err := f.reconciler(nil, nil).RunDate(ctx, d, rollup.AllTenants(), "test")
	if err != nil {
		t.Fatalf("rollup with %d pending ids: %v", rounds*perRound, err)
	}
	if res.Repaired != 0 || !res.RawChecked {
		t.Errorf("rollup with %d pending ids: %+v, want raw-checked, nothing repaired", rounds*perRound, res)
	}
	want := counts{k(a, "auth.user.login"): rounds}
	if got := f.postgres(t, d); got.String() != want.String() {
		t.Errorf("billed: got %v, want %v", got, want)
	}
}
