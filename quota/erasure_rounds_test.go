package quota

import (
	"context"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/analyticsd/analyticsd/audit"
	"github.com/analyticsd/analyticsd/erasure"
)

// Twelve pending rounds of 4,500 ids on one tenant-day (a failed erasure's rounds) put 54,000
// literals in the reconciliation's count: over 18.16's max_ast_elements of 50,000 ("Code: 168 AST is
// too big"), which raising max_query_size alone did not lift, so every reconciliation of the day
// failed. The count still answers, and adds the rounds' recorded counts. Before the AST settings
// clickhouseCounts failed with code 168.
func TestReconcileWithManyPendingRounds(t *testing.T) {
	t.Parallel()
	h := newHarness(t)
	s := h.service(t, Config{Enabled: true}, nil, nil)
	ctx := context.Background()
	now := time.Now().UTC().Truncate(time.Second)
	today := now.Truncate(24 * time.Hour)
	rows := make([][]any, 3)
	for i := range rows {
		rows[i] = []any{h.tenant.ID, now, uuid.New(), now, "apikey.request", "api", "bob", "{}", "", ""}
	}
	h.env.Insert(t, "events", "tenant_id, ts, id, received_at, event, source, user_id, props, ip, request_id", rows...)

	e := erasure.New(erasure.Config{Layout: h.env.Layout()}, h.env.CH, h.env.PG, audit.New(h.env.PG), nil)
	j, err := e.EraseUser(ctx, h.tenant.ID, "alice", "test")
	if err != nil {
		t.Fatal(err)
	}
	m := now.Unix() / 60
	for r := 1; r <= 12; r++ {
		ids := make([]uuid.UUID, 4500)
		for i := range ids {
			ids[i] = uuid.New()
		}
		if _, err := h.env.PG.Exec(ctx, `INSERT INTO erasure_rounds (job_id, round, tenant_id, user_digest, ids, rows) VALUES ($1, $2, $3, $4, $5, 1)`,
			j.ID, r, h.tenant.ID, erasure.UserDigest("alice"), ids); err != nil {
			t.Fatal(err)
		}
		if _, err := h.env.PG.Exec(ctx, `INSERT INTO erased_usage (tenant_id, date, metric, minute, n, job_id, round) VALUES ($1, $2::date, 'apikey.request', $3, 1, $4, $5)`,
			h.tenant.ID, today.Format(time.DateOnly), m, j.ID, r); err != nil {
			t.Fatal(err)
		}
	}
	for _, tenant := range []uuid.UUID{h.tenant.ID, uuid.Nil} { // one tenant, and every tenant (the periodic pass)
		got, err := s.clickhouseCounts(ctx, tenant, today)
		if err != nil {
			t.Fatalf("counts of %s with 12 pending rounds: %v", tenant, err)
		}
		if n := got[h.tenant.ID]["api_requests_daily"][m]; n != 3+12 {
			t.Errorf("counts of %s: minute %d holds %d, want 3 raw + 12 recorded", tenant, m, n)
		}
	}
}
