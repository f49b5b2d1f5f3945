package quota

import (
	"context"
	"net/http"
	"sync/atomic"
	"testing"

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
