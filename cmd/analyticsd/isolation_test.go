package main

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/analyticsd/analyticsd/auth"
	"github.com/analyticsd/analyticsd/internal/testenv"
	"github.com/analyticsd/analyticsd/internal/testenv/fixture"
)

// Property: whatever mix of tenants, API keys, JWTs and X-Tenant-Slug headers is sent to whichever
// endpoint, no response carries another tenant's data and no write lands in another tenant.
func TestRandomCredentialMixesNeverCrossTenants(t *testing.T) {
	e := testenv.Migrated(t)
	ctx := context.Background()
	secret := "0123456789abcdef0123456789abcdef-prop"
	slugs := []string{"alpha", "bravo", "charlie"}
	type cred struct {
		tenant string // "" for credentials that must be refused
		token  string
		reads  bool
		writes bool
	}
	var creds []cred
	ids := map[string]uuid.UUID{}
	for _, slug := range slugs {
		tn := fixture.Tenant(t, e.PG, slug)
		ids[slug] = tn.ID
		for _, scopes := range [][]auth.Scope{{auth.ScopeEventsWrite}, {auth.ScopeAnalyticsRead}, auth.AllScopes} {
			k, _ := fixture.Key(t, e.PG, tn.ID, "p", scopes...)
			c := cred{tenant: slug, token: k}
			for _, s := range scopes {
				c.reads = c.reads || s == auth.ScopeAnalyticsRead
				c.writes = c.writes || s == auth.ScopeEventsWrite
			}
			creds = append(creds, c)
		}
		for _, role := range []string{"owner", "admin", "member", "viewer"} {
			tok := fixture.JWT(t, []byte(secret), "u-"+role, slug, role, time.Hour)
			ok := role == "owner" || role == "admin"
			creds = append(creds, cred{tenant: slug, token: tok, reads: ok, writes: ok})
		}
	}
	forged := fixture.JWT(t, []byte("not-the-secret-not-the-secret-xx"), "x", "alpha", "owner", time.Hour)
	creds = append(creds, cred{token: forged}, cred{token: "ak_000000000000_" + strings.Repeat("x", 43)}, cred{token: ""})

	base := serveInProcess(t, stackEnv(t, e, map[string]string{"ANALYTICS_ADDR": freeAddr(t), "ANALYTICS_SPOOL_DIR": t.TempDir(),
		"AUTH_JWT_SECRET": secret, "INGEST_FLUSH_INTERVAL": "50ms", "RATE_LIMIT_RPS": "0"}))
	endpoints := []struct {
		method, path string
		write        bool
	}{
		{"GET", "/api/analytics/events?limit=1000", false},
		{"GET", "/api/analytics/usage?metric[]=prop.write&fill=zero", false},
		{"GET", "/api/analytics/metrics?metric=prop.write", false},
		{"GET", "/api/analytics/event-names", false},
		{"GET", "/api/analytics/active-users?event=prop.write", false},
		{"GET", "/api/analytics/export.csv", false},
		{"GET", "/api/analytics/quotas", false},
		{"POST", "/api/analytics/events", true},
		{"POST", "/api/analytics/usage", true},
		{"POST", "/api/analytics/quotas/api_requests_daily/consume", true},
	}
	rng := rand.New(rand.NewPCG(7, 11))
	written := map[string]int{}
	for i := 0; i < 400; i++ {
		c := creds[rng.IntN(len(creds))]
		ep := endpoints[rng.IntN(len(endpoints))]
		slugChoices := append([]string{"", "nobody"}, slugs...)
		slug := slugChoices[rng.IntN(len(slugChoices))]
		var body io.Reader
		foreignClaim := false
		if ep.path == "/api/analytics/events" {
			// The body claims a random tenant and marks the row with the credential's tenant.
			claimed := slugs[rng.IntN(len(slugs))]
			foreignClaim = claimed != c.tenant
			body = strings.NewReader(fmt.Sprintf(`{"event":"prop.write","user_id":"from-%s","tenant_id":%q}`, c.tenant, ids[claimed]))
		} else if ep.method == "POST" && strings.HasSuffix(ep.path, "/usage") {
			body = strings.NewReader(`{"metric":"prop_write","n":1}`)
		}
		req, _ := http.NewRequest(ep.method, base+ep.path, body)
		req.Header.Set("Content-Type", "application/json")
		if c.token != "" {
			req.Header.Set("Authorization", "Bearer "+c.token)
		}
		if slug != "" {
			req.Header.Set("X-Tenant-Slug", slug)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		raw, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		allowed := c.tenant != "" && (slug == "" || slug == c.tenant) && ((ep.write && c.writes) || (!ep.write && c.reads))
		switch {
		case c.tenant == "" && resp.StatusCode != 401:
			t.Errorf("invalid credential on %s %s: %d", ep.method, ep.path, resp.StatusCode)
		case c.tenant != "" && !allowed && resp.StatusCode != 403:
			t.Errorf("%s credential with slug %q on %s %s: %d %.200s, want 403", c.tenant, slug, ep.method, ep.path, resp.StatusCode, raw)
		case allowed && foreignClaim && (resp.StatusCode != 400 || !bytes.Contains(raw, []byte("tenant always comes from the API key"))):
			t.Errorf("%s credential writing with another tenant's tenant_id: %d %.200s, want 400", c.tenant, resp.StatusCode, raw)
		case allowed && !foreignClaim && resp.StatusCode >= 300:
			t.Errorf("%s credential with slug %q on %s %s: %d %.200s, want success", c.tenant, slug, ep.method, ep.path, resp.StatusCode, raw)
		}
		for _, other := range slugs {
			if other != c.tenant && bytes.Contains(raw, []byte("from-"+other)) {
				t.Fatalf("%s credential saw %s's data on %s %s: %.300s", c.tenant, other, ep.method, ep.path, raw)
			}
		}
		if allowed && ep.path == "/api/analytics/events" && ep.method == "POST" && bytes.Contains(raw, []byte(`"accepted":1`)) {
			written[c.tenant]++
		}
	}
	// Every stored row is in the tenant whose credential wrote it, once every accepted write is stored.
	testenv.Eventually(t, 10*time.Second, func() error {
		for _, slug := range slugs {
			var n uint64
			if err := e.CH.QueryRow(ctx, "SELECT count() FROM "+e.DB+".events WHERE tenant_id = ? AND event = 'prop.write'", ids[slug]).Scan(&n); err != nil {
				t.Fatal(err)
			}
			if n != uint64(written[slug]) {
				return fmt.Errorf("tenant %s: %d rows stored, %d writes accepted", slug, n, written[slug])
			}
		}
		return nil
	})
	for _, slug := range slugs {
		rows, err := e.CH.Query(ctx, "SELECT user_id, count() FROM "+e.DB+".events WHERE tenant_id = ? AND event = 'prop.write' GROUP BY user_id", ids[slug])
		if err != nil {
			t.Fatal(err)
		}
		for rows.Next() {
			var user string
			var n uint64
			rows.Scan(&user, &n)
			if user != "from-"+slug {
				t.Errorf("tenant %s holds %d rows written by %s", slug, n, user)
			}
		}
		rows.Close()
	}
	t.Logf("writes accepted per tenant: %v", written)
}
