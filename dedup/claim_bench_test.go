package dedup

import (
	"context"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/redis/go-redis/v9"

	"github.com/analyticsd/analyticsd/internal/testenv"
	"github.com/analyticsd/analyticsd/quota"
)

func redisCPU(b *testing.B, rdb redis.UniversalClient) float64 {
	info, err := rdb.Info(context.Background(), "cpu").Result()
	if err != nil {
		b.Fatal(err)
	}
	total := 0.0
	for _, line := range strings.Split(info, "\n") {
		for _, k := range []string{"used_cpu_sys:", "used_cpu_user:"} {
			if v, ok := strings.CutPrefix(strings.TrimSpace(line), k); ok {
				f, _ := strconv.ParseFloat(v, 64)
				total += f
			}
		}
	}
	return total
}

// BenchmarkClaim500 claims 500 new event ids (a 500-event request), 1 in 10 counted toward a metric.
func BenchmarkClaim500(b *testing.B) {
	rdb, prefix := testenv.Redis(b)
	counters := quota.NewCounters(rdb, prefix)
	s := NewStore(rdb, prefix, time.Hour, &Counting{Keys: counters, Lua: quota.CountLua, TTL: quota.CounterTTL})
	tenant := uuid.New()
	now := time.Now().UTC()
	today := now.Truncate(24 * time.Hour)
	unit := func(i int) (string, int64, time.Time, time.Time) {
		if i%10 == 0 {
			return "api_requests_daily", 1, today, now
		}
		return "", 0, time.Time{}, time.Time{}
	}
	ids := make([]uuid.UUID, 500)
	cpu := redisCPU(b, rdb)
	b.ResetTimer()
	for n := 0; n < b.N; n++ {
		for i := range ids {
			ids[i] = uuid.New()
		}
		if _, _, err := s.Claim(context.Background(), tenant, 'e', uint64(n)+1, ids, unit, nil); err != nil {
			b.Fatal(err)
		}
	}
	b.StopTimer()
	b.ReportMetric((redisCPU(b, rdb)-cpu)*1e6/float64(b.N*len(ids)), "redis-µs/id")
}
