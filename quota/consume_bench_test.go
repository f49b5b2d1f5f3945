package quota

import (
	"context"
	"net/http"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/gofiber/fiber/v2"
	"github.com/redis/go-redis/v9"
	"github.com/valyala/fasthttp"

	"github.com/analyticsd/analyticsd/api"
	"github.com/analyticsd/analyticsd/auth"
	"github.com/analyticsd/analyticsd/ratelimit"
)

// BenchmarkConsume prices POST /quotas/:metric/consume behind authentication and the rate limit, the
// way serve mounts it, and counts the Redis commands each consume sends: one, the consume script that
// also takes the request's rate-limit token (two would be the limiter's own round trip back).
//
//	go test -run - -bench Consume -benchtime 2000x ./quota/
func BenchmarkConsume(b *testing.B) {
	h := newHarness(b)
	var calls atomic.Int64
	h.env.Redis.AddHook(countCalls{&calls})
	s := h.service(b, Config{Enabled: true}, map[string]float64{"builds_daily": 1e12}, nil)
	app := api.NewApp(api.Config{}, nil)
	authn := auth.NewAuthenticator(auth.NewKeys(h.env.PG), h.tenants, auth.JWTConfig{})
	rl := ratelimit.New(ratelimit.Config{Rate: 1e9, Burst: 1e9}, h.env.Redis, h.env.Prefix)
	s.Register(app.Group("/api/analytics"), authn.Require(auth.ScopeAnalyticsRead, rl.Limit), authn.Require(auth.ScopeEventsWrite, rl.Defer))
	handler := app.Handler()
	consume := func() {
		var fc fasthttp.RequestCtx
		fc.Request.Header.SetMethod(http.MethodPost)
		fc.Request.SetRequestURI("/api/analytics/quotas/builds_daily/consume")
		fc.Request.Header.Set(fiber.HeaderAuthorization, "Bearer "+h.keyW)
		handler(&fc)
		if st := fc.Response.StatusCode(); st != http.StatusOK {
			b.Fatalf("consume: %d %s", st, fc.Response.Body())
		}
	}
	consume() // the day's first consume reconciles the counters first
	calls.Store(0)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		consume()
	}
	b.StopTimer()
	b.ReportMetric(float64(calls.Load())/float64(b.N), "redis-calls/op")
}

// countCalls counts the commands a client sends (a pipeline counts once: one round trip).
type countCalls struct{ n *atomic.Int64 }

func (h countCalls) DialHook(next redis.DialHook) redis.DialHook { return next }

func (h countCalls) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error { h.n.Add(1); return next(ctx, cmd) }
}

func (h countCalls) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return func(ctx context.Context, cmds []redis.Cmder) error { h.n.Add(1); return next(ctx, cmds) }
}

// BenchmarkConsumeConcurrent runs consumes from 16 goroutines at once (as 16 keep-alive connections
// would), calling the service as the handler does, with the consume scripts batched (scriptbatch,
// as serve runs them) and each sent alone. Besides the wall time per consume it reports the CPU that
// this process and Redis spent per consume, and the round trips per consume:
//
//	go test -run - -bench ConsumeConcurrent -benchtime 20000x ./quota/
func BenchmarkConsumeConcurrent(b *testing.B) {
	h := newHarness(b)
	s := h.service(b, Config{Enabled: true}, map[string]float64{"builds_daily": 1e12}, nil)
	batched := s.counters.consumes
	var calls atomic.Int64 // one hook for every run: a hook per run would slow the later ones
	rdb := h.env.Redis
	rdb.AddHook(countCalls{&calls})
	for _, v := range []struct {
		name    string
		scripts redis.Scripter
	}{{"batched", batched}, {"alone", h.env.Redis}} {
		b.Run(v.name, func(b *testing.B) {
			s.counters.consumes = v.scripts
			ctx := context.Background()
			if _, err := s.Consume(ctx, h.tenant.ID, "builds_daily", 1); err != nil {
				b.Fatal(err)
			}
			calls.Store(0)
			cpu0, rcpu0 := processCPU(b), redisCPU(b, rdb)
			b.SetParallelism(8) // 16 goroutines on 2 cores
			b.ResetTimer()
			b.RunParallel(func(pb *testing.PB) {
				for pb.Next() {
					if res, err := s.Consume(ctx, h.tenant.ID, "builds_daily", 1); err != nil || !res.Allowed {
						b.Errorf("consume: %+v, %v", res, err)
						return
					}
				}
			})
			b.StopTimer()
			b.ReportMetric(float64((processCPU(b)-cpu0).Microseconds())/float64(b.N), "cpu-µs/op")
			b.ReportMetric(float64((redisCPU(b, rdb)-rcpu0).Microseconds())/float64(b.N), "redis-cpu-µs/op")
			b.ReportMetric(float64(calls.Load())/float64(b.N), "round-trips/op")
		})
	}
}

// processCPU is the CPU (user and system) this process has used.
func processCPU(b *testing.B) time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		b.Fatal(err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// redisCPU is the CPU Redis reports it has used (INFO cpu; on a cluster, the master this client
// reaches first).
func redisCPU(b *testing.B, rdb redis.UniversalClient) time.Duration {
	info, err := rdb.Info(context.Background(), "cpu").Result()
	if err != nil {
		b.Fatal(err)
	}
	var total float64
	for _, line := range strings.Split(info, "\n") {
		k, v, ok := strings.Cut(strings.TrimSpace(line), ":")
		if ok && (k == "used_cpu_sys" || k == "used_cpu_user") {
			f, err := strconv.ParseFloat(v, 64)
			if err != nil {
				b.Fatalf("INFO cpu: %s: %v", line, err)
			}
			total += f
		}
	}
	return time.Duration(total * float64(time.Second))
}
