package query

import (
	"context"
	"fmt"
	"math/rand"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/analyticsd/analyticsd/internal/testenv"
)

// BenchmarkReadsInZone measures the usage (90 days, 4 metrics) and KPI reads of the busiest tenant
// in UTC (daily_usage) and in zones with an offset (daily_usage moved across midnight by
// usage_quarter_hour, and — "raw", the baseline in the same run — by the raw rows), on
// ANALYTICS_BENCH_EVENTS events (e.g. 10000000) spread like cmd/analytics-bench's workload: 50 tenants
// with a Zipf share (the busiest holds about a quarter), the catalog's event names, timestamps over the
// last 30 days. Without the variable it is skipped. It reports p50 and p99 of each read in ms:
//
//	ANALYTICS_BENCH_EVENTS=10000000 go test -run - -bench ReadsInZone -benchtime 1x ./query/
func BenchmarkReadsInZone(b *testing.B) {
	n := testenv.BenchEvents(b)
	env := testenv.Migrated(b)
	ctx := context.Background()
	rng := rand.New(rand.NewSource(1))
	zipf := rand.NewZipf(rng, 1.1, 1, 49)
	tenants := make([]uuid.UUID, 50)
	for i := range tenants {
		tenants[i] = uuid.New()
	}
	names := []string{"apikey.request", "auth.user.login", "webhook.delivered", "email.sent", "auth.user.registered",
		"builder.generate.completed", "builder.generate.started", "files.uploaded", "webhook.failed", "email.failed",
		"apikey.rate_limited", "payments.checkout.created", "payments.subscription.active", "payments.subscription.canceled"}
	now := time.Now().UTC()
	env.LoadEvents(b, n, func(int) (uuid.UUID, time.Time, string, string) {
		ts := now.Add(-time.Duration(rng.Int63n(int64(30 * 24 * time.Hour)))).Truncate(time.Second)
		return tenants[zipf.Uint64()], ts, names[rng.Intn(len(names))], "user-" + strconv.Itoa(rng.Intn(5000))
	})
	slots := NewStore(env.CH, env.DB, env.PG, 30*time.Second)
	raw := NewStore(env.CH, env.DB, env.PG, 30*time.Second)
	raw.qh.checked = time.Now().Add(time.Hour) // never asks: reads the raw rows
	busiest := tenants[0]
	metrics := []string{"auth.user.registered", "auth.user.login", "builder.generate.completed", "apikey.request"}
	for _, zone := range []string{"UTC", "America/New_York", "Asia/Kolkata", "raw:America/New_York", "raw:Asia/Kolkata"} {
		s := slots
		if name, ok := strings.CutPrefix(zone, "raw:"); ok {
			s = raw
			zone = name
		}
		z, err := ParseZone(zone)
		if err != nil {
			b.Fatal(err)
		}
		if s == raw {
			zone = "raw-" + zone
		}
		for _, read := range []struct {
			name string
			run  func() error
		}{
			{"usage-90d", func() error {
				_, err := s.UsageIn(ctx, busiest, metrics, z, z.Date(now).AddDate(0, 0, -89), z.Date(now), false)
				return err
			}},
			{"kpis", func() error { _, err := s.KPIsIn(ctx, busiest, metrics, z); return err }},
		} {
			var ms []float64
			for i := 0; i < 5; i++ { // warm-up
				if err := read.run(); err != nil {
					b.Fatal(err)
				}
			}
			for i := 0; i < 100; i++ {
				t0 := time.Now()
				if err := read.run(); err != nil {
					b.Fatal(err)
				}
				ms = append(ms, float64(time.Since(t0).Microseconds())/1000)
			}
			slices.Sort(ms)
			p50, p99 := ms[len(ms)/2], ms[len(ms)*99/100]
			b.ReportMetric(p50, fmt.Sprintf("%s-%s-p50-ms", read.name, zone))
			b.ReportMetric(p99, fmt.Sprintf("%s-%s-p99-ms", read.name, zone))
			b.Logf("%-16s %-10s p50 %6.1f ms  p99 %6.1f ms", zone, read.name, p50, p99)
		}
	}
}
