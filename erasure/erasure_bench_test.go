package erasure

import (
	"context"
	"math/rand"
	"os"
	"strconv"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/analyticsd/analyticsd/internal/testenv"
)

// BenchmarkEraseOneUser measures erasing one user's events among ANALYTICS_BENCH_EVENTS events
// (e.g. 10000000; skipped without it): 50 tenants, 5,000 users each, timestamps over the last 30
// days, so the user's rows sit in every daily partition. It reports the job's wall time and the rows
// erased; run it alone, the mutation rewrites every part that holds one of the rows:
//
//	ANALYTICS_BENCH_EVENTS=10000000 go test -run - -bench EraseOneUser -benchtime 1x ./erasure/
//
// ANALYTICS_BENCH_USER_ROWS=N gives the erased user N of the events instead (a heavy user: N/2,000
// rounds of the job, in batches of ten).
func BenchmarkEraseOneUser(b *testing.B) {
	n := testenv.BenchEvents(b)
	env := testenv.Migrated(b)
	ctx := context.Background()
	rng := rand.New(rand.NewSource(1))
	tenants := make([]uuid.UUID, 50)
	for i := range tenants {
		tenants[i] = uuid.New()
	}
	now := time.Now().UTC()
	heavy, _ := strconv.Atoi(os.Getenv("ANALYTICS_BENCH_USER_ROWS"))
	env.LoadEvents(b, n, func(i int) (uuid.UUID, time.Time, string, string) {
		ts := now.Add(-time.Duration(rng.Int63n(int64(30 * 24 * time.Hour)))).Truncate(time.Second)
		if i < heavy {
			return tenants[0], ts, "auth.user.login", "heavy-user"
		}
		return tenants[rng.Intn(len(tenants))], ts, "auth.user.login", "user-" + strconv.Itoa(rng.Intn(5000))
	})
	s := (&stores{env: env}).service(Config{Poll: 100 * time.Millisecond})
	user := "heavy-user"
	if heavy == 0 {
		if err := env.CH.QueryRow(ctx, "SELECT user_id FROM "+env.DB+".events WHERE tenant_id = ? LIMIT 1", tenants[0]).Scan(&user); err != nil {
			b.Fatal(err)
		}
	}
	b.ResetTimer()
	t0 := time.Now()
	j, err := s.EraseUser(ctx, tenants[0], user, "bench")
	if err != nil {
		b.Fatal(err)
	}
	if _, err := s.RunOne(ctx); err != nil {
		b.Fatal(err)
	}
	took := time.Since(t0)
	b.StopTimer()
	j, err = s.Get(ctx, tenants[0], j.ID)
	if err != nil || j.Status != StatusDone {
		b.Fatalf("job: %+v %v", j, err)
	}
	b.ReportMetric(took.Seconds(), "erase-s")
	b.ReportMetric(float64(j.RowsErased), "rows-erased")
	b.Logf("erased %d rows of one user among %d events in %s", j.RowsErased, n, took.Round(time.Millisecond))
}
