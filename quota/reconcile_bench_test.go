package quota

import (
	"context"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/analyticsd/analyticsd/tenant"
)

// BenchmarkReconcileRound prices one round of the live counters' reconciliation with ClickHouse:
// 1M mapped events of today spread over 100 tenants and every minute since midnight (as many as
// have passed), read per tenant, metric and minute, and applied to Redis. "full" sends every minute
// (the first round, every tenth, a day Redis lost); "steady" only what changed (nothing here).
//
//	go test -run - -bench ReconcileRound -benchtime 5x ./quota/
func BenchmarkReconcileRound(b *testing.B) {
	h := newHarness(b)
	s := h.service(b, Config{Enabled: true}, nil, nil)
	ctx := context.Background()
	now := time.Now().UTC()
	today := now.Truncate(24 * time.Hour)
	minutes := max(int(now.Sub(today)/time.Minute), 1)
	tenants := make([]uuid.UUID, 100)
	for i := range tenants {
		tn, err := tenant.NewStore(h.env.PG).Create(ctx, "r"+uuid.NewString()[:8], "")
		if err != nil {
			b.Fatal(err)
		}
		tenants[i] = tn.ID
	}
	events := []string{"apikey.request", "builder.generate.completed", "email.sent", "auth.user.login"}
	const n = 1_000_000
	batch, err := h.env.CH.PrepareBatch(ctx, "INSERT INTO "+h.env.DB+".events (tenant_id, ts, id, received_at, event, source, user_id, props, ip, request_id)")
	if err != nil {
		b.Fatal(err)
	}
	for i := 0; i < n; i++ {
		at := today.Add(time.Duration(i%minutes) * time.Minute)
		if err := batch.Append(tenants[i%len(tenants)], at, uuid.New(), at, events[i%len(events)], "api", "", "{}", "", ""); err != nil {
			b.Fatal(err)
		}
	}
	if err := batch.Send(); err != nil {
		b.Fatal(err)
	}
	b.Run("full", func(b *testing.B) {
		for i := 0; i < b.N; i++ {
			st, err := s.ReconcileOnce(ctx)
			if err != nil || st.Counters == 0 {
				b.Fatalf("%+v, %v", st, err)
			}
			b.ReportMetric(float64(st.Minutes), "minutes/round")
		}
	})
	b.Run("steady", func(b *testing.B) {
		r := &reconciler{s: s, sent: map[sentKey]int64{}}
		r.round = 1 // the next round is not a full one
		if _, err := r.run(ctx); err != nil {
			b.Fatal(err)
		}
		b.ResetTimer()
		for i := 0; i < b.N; i++ {
			r.round = 1
			st, err := r.run(ctx)
			if err != nil {
				b.Fatal(err)
			}
			b.ReportMetric(float64(st.Minutes), "minutes/round")
		}
	})
}
