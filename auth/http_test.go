package auth_test

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/gofiber/fiber/v2"

	"github.com/analyticsd/analyticsd/api"
	"github.com/analyticsd/analyticsd/auth"
	"github.com/analyticsd/analyticsd/internal/testenv/fixture"
	"github.com/analyticsd/analyticsd/ratelimit"
)

// Every refusal of the middleware, byte for byte: clients parse the codes, show the messages and
// wait the Retry-After seconds, so none of them may change by accident.
func TestErrorResponses(t *testing.T) {
	t.Parallel()
	f := newAuthFixture(t)
	ctx := context.Background()
	unseen, _ := fixture.Key(t, f.env.PG, f.tenant.ID, "", auth.ScopeAnalyticsRead)
	globex := fixture.Tenant(t, f.env.PG, "globex")
	disabled, _ := fixture.Key(t, f.env.PG, globex.ID, "", auth.ScopeAnalyticsRead)
	if _, _, err := f.reg.SetDisabled(ctx, "globex", true); err != nil {
		t.Fatal(err)
	}
	// One token per 100 s, burst 1: the second request is refused for 100 s.
	limited := auth.NewAuthenticator(auth.NewKeys(f.env.PG), f.reg, auth.JWTConfig{})
	limiter := ratelimit.New(ratelimit.Config{Rate: 0.01, Burst: 1}, f.env.Redis, f.env.Prefix)
	limitedApp := api.NewApp(api.Config{}, nil)
	limitedApp.Get("/limited", limited.Require(auth.ScopeAnalyticsRead, limiter.Limit), func(c *fiber.Ctx) error { return c.SendString("ok") })
	limitedSrv := fixture.Serve(t, limitedApp)

	member := fixture.JWT(t, f.secret, "u1", "acme", "member", time.Hour)
	unauthorized := func(msg string) string {
		return `{"error":{"code":"unauthorized","message":"` + msg + `"},"success":false}`
	}
	forbidden := func(msg string) string {
		return `{"error":{"code":"forbidden","message":"` + msg + `"},"success":false}`
	}
	cases := []struct {
		name       string
		path       string
		token      string
		header     map[string]string
		down       bool // the registry is unreachable
		status     int
		retryAfter string
		want       string
	}{
		{"no credential", "/x", "", nil, false, 401, "", unauthorized(`missing credential: send Authorization: Bearer \u003cAPI key or token\u003e`)},
		{"not a key", "/x", "eyJhbGciOiJub25lIn0.e30.", nil, false, 401, "", unauthorized(`invalid token: token signature is invalid: signing method none is invalid`)},
		{"unknown key", "/x", "ak_000000000000_" + strings.Repeat("A", 43), nil, false, 401, "", unauthorized(`invalid API key`)},
		{"other slug", "/x", f.key, map[string]string{"X-Tenant-Slug": "globex"}, false, 403, "", forbidden(`X-Tenant-Slug does not match the credential's tenant`)},
		{"scope", "/admin", f.key, nil, false, 403, "", forbidden(`API key lacks the analytics:admin scope`)},
		{"role", "/admin", member, nil, false, 403, "", forbidden(`your role has no access to analytics; owner or admin is required`)},
		{"disabled tenant", "/x", disabled, nil, false, 403, "",
			`{"error":{"code":"tenant_disabled","message":"tenant \"globex\" is disabled; its credentials are refused until an operator enables it"},"success":false}`},
		{"disabled tenant's jwt", "/x", f.jwt(t, "globex"), nil, false, 403, "",
			`{"error":{"code":"tenant_disabled","message":"tenant \"globex\" is disabled; its credentials are refused until an operator enables it"},"success":false}`},
		{"registry down", "/x", unseen, nil, true, 503, "5",
			`{"error":{"code":"auth_unavailable","message":"cannot verify credentials right now; retry shortly"},"success":false}`},
		{"registry down for a jwt", "/x", f.jwt(t, "initech"), nil, true, 503, "5",
			`{"error":{"code":"auth_unavailable","message":"cannot verify credentials right now; retry shortly"},"success":false}`},
		{"rate limited", "/limited", f.key, nil, false, 429, "100",
			`{"error":{"code":"rate_limited","message":"too many requests for this credential; slow down and retry after the Retry-After seconds"},"success":false}`},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			f.reg.down.Store(c.down)
			defer f.reg.down.Store(false)
			srv, req := f.srv, fixture.Request{Path: c.path, Key: c.token, Header: c.header}
			if c.path == "/limited" {
				srv = limitedSrv
				// The request that takes the only token, just before (Retry-After counts down from 100).
				if r := srv.Do(t, req); r.Status != 200 {
					t.Fatalf("first request: %d %s", r.Status, r.Raw)
				}
			}
			r := srv.Do(t, req)
			if r.Status != c.status || r.Header.Get("Retry-After") != c.retryAfter || r.Raw != c.want {
				t.Errorf("got %d, Retry-After %q:\n%s\nwant %d, Retry-After %q:\n%s", r.Status, r.Header.Get("Retry-After"), r.Raw, c.status, c.retryAfter, c.want)
			}
		})
	}
}
