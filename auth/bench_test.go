package auth

import (
	"context"
	"fmt"
	"testing"

	"github.com/gofiber/fiber/v2"
	"github.com/valyala/fasthttp"

	"github.com/analyticsd/analyticsd/api"
	"github.com/analyticsd/analyticsd/internal/testenv"
	"github.com/analyticsd/analyticsd/tenant"
)

// BenchmarkRequireAPIKey measures what authentication adds to every ingest request once the key is
// in the cache (the hot path: Postgres is asked again only every FreshFor): the fiber middleware
// from the Authorization header to c.Next, without rate limiting. "parallel" runs it on every core
// with one key, as a busy ingest client does.
func BenchmarkRequireAPIKey(b *testing.B) {
	env := testenv.Migrated(b)
	ctx := context.Background()
	tn, err := tenant.NewStore(env.PG).Create(ctx, "bench", "")
	if err != nil {
		b.Fatal(err)
	}
	keys := NewKeys(env.PG)
	plain, _, err := keys.Create(ctx, tn.ID, "bench", []Scope{ScopeEventsWrite})
	if err != nil {
		b.Fatal(err)
	}
	a := NewAuthenticator(keys, tenant.NewStore(env.PG), JWTConfig{})
	app := fiber.New()
	app.Post("/e", a.Require(ScopeEventsWrite), func(c *fiber.Ctx) error { return c.SendStatus(fiber.StatusAccepted) })
	h := app.Handler()
	request := func() *fasthttp.RequestCtx {
		var fc fasthttp.RequestCtx
		fc.Request.Header.SetMethod("POST")
		fc.Request.SetRequestURI("/e")
		fc.Request.Header.Set("Authorization", "Bearer "+plain)
		return &fc
	}
	if fc := request(); func() int { h(fc); return fc.Response.StatusCode() }() != fiber.StatusAccepted {
		b.Fatal("the benchmark's key is not accepted")
	}
	b.Run("serial", func(b *testing.B) {
		fc := request()
		b.ReportAllocs()
		for b.Loop() {
			h(fc)
		}
		if fc.Response.StatusCode() != fiber.StatusAccepted {
			b.Fatalf("status %d", fc.Response.StatusCode())
		}
	})
	b.Run("parallel", func(b *testing.B) {
		b.ReportAllocs()
		b.RunParallel(func(pb *testing.PB) {
			fc := request()
			for pb.Next() {
				h(fc)
			}
		})
	})
}

// BenchmarkMadeUpKeys measures what a client sending a new made-up key with every request costs: a
// Postgres lookup each without the per-address bound ("unbounded"), a 429 from memory once the
// address's bucket is empty ("bounded").
func BenchmarkMadeUpKeys(b *testing.B) {
	env := testenv.Migrated(b)
	for _, bc := range []struct {
		name string
		lim  RefusalLimit
	}{{"unbounded", RefusalLimit{}}, {"bounded", RefusalLimit{PerMinute: 1, Burst: 1}}} {
		b.Run(bc.name, func(b *testing.B) {
			a := NewAuthenticator(NewKeys(env.PG), tenant.NewStore(env.PG), JWTConfig{})
			a.Refusals = bc.lim
			app := api.NewApp(api.Config{}, nil)
			app.Get("/e", a.Require(ScopeAnalyticsRead), func(c *fiber.Ctx) error { return c.SendStatus(fiber.StatusOK) })
			h := app.Handler()
			var fc fasthttp.RequestCtx
			fc.Request.Header.SetMethod("GET")
			fc.Request.SetRequestURI("/e")
			var n uint64
			b.ReportAllocs()
			for b.Loop() {
				n++
				fc.Request.Header.Set("Authorization", fmt.Sprintf("Bearer ak_%012x_%043d", n, n))
				h(&fc)
			}
			if code := fc.Response.StatusCode(); code != fiber.StatusUnauthorized && code != fiber.StatusTooManyRequests {
				b.Fatalf("status %d", code)
			}
		})
	}
}
