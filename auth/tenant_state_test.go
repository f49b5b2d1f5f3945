package auth_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/gofiber/fiber/v2"
	"github.com/google/uuid"

	"github.com/analyticsd/analyticsd/api"
	"github.com/analyticsd/analyticsd/auth"
	"github.com/analyticsd/analyticsd/internal/testenv"
	"github.com/analyticsd/analyticsd/internal/testenv/fixture"
	"github.com/analyticsd/analyticsd/tenant"
)

// registry is the tenant store with switches: gone makes it answer "no such tenant", down makes it
// fail as an unreachable Postgres does, hang makes it wait as a hung one does (until ctx ends).
type registry struct {
	*tenant.Store
	gone, down, hang atomic.Bool
}

// refusal is what the switches make the registry answer about the tenant named by which, or nil.
func (r *registry) refusal(which string) error {
	switch {
	case r.down.Load():
		return errors.New("find tenant: dial tcp: connection refused")
	case r.gone.Load():
		return fmt.Errorf("%w: %s", tenant.ErrNotFound, which)
	}
	return nil
}

func (r *registry) ByID(ctx context.Context, id uuid.UUID) (tenant.Tenant, error) {
	if r.hang.Load() {
		<-ctx.Done()
		return tenant.Tenant{}, ctx.Err()
	}
	if err := r.refusal(id.String()); err != nil {
		return tenant.Tenant{}, err
	}
	return r.Store.ByID(ctx, id)
}

func (r *registry) BySlug(ctx context.Context, slug string) (tenant.Tenant, error) {
	if r.hang.Load() {
		<-ctx.Done()
		return tenant.Tenant{}, ctx.Err()
	}
	if err := r.refusal(strconv.Quote(slug)); err != nil {
		return tenant.Tenant{}, err
	}
	return r.Store.BySlug(ctx, slug)
}

type authFixture struct {
	env    testenv.Env
	reg    *registry
	tenant tenant.Tenant
	key    string
	secret []byte
	authn  *auth.Authenticator
	srv    *fixture.Server
}

// newAuthFixture: tenant "acme" with an events:write and analytics:read key, behind an authenticator
// that trusts its cache for 50 ms (instead of 5 s) so a test can wait it out; GET /x needs
// analytics:read, GET /admin analytics:admin.
func newAuthFixture(t *testing.T) *authFixture {
	t.Helper()
	f := &authFixture{env: testenv.Migrated(t), secret: []byte("0123456789abcdef0123456789abcdef")}
	f.reg = &registry{Store: tenant.NewStore(f.env.PG)}
	f.tenant = fixture.Tenant(t, f.env.PG, "acme")
	f.key, _ = fixture.Key(t, f.env.PG, f.tenant.ID, "", auth.ScopeEventsWrite, auth.ScopeAnalyticsRead)
	f.authn = auth.NewAuthenticator(auth.NewKeys(f.env.PG), f.reg, auth.JWTConfig{Secret: f.secret})
	f.authn.FreshFor = 50 * time.Millisecond
	app := api.NewApp(api.Config{}, nil)
	app.Get("/x", f.authn.Require(auth.ScopeAnalyticsRead), func(c *fiber.Ctx) error { return c.SendString("ok") })
	app.Get("/admin", f.authn.Require(auth.ScopeAnalyticsAdmin), func(c *fiber.Ctx) error { return c.SendString("ok") })
	f.srv = fixture.Serve(t, app)
	return f
}

func (f *authFixture) jwt(t *testing.T, slug string) string {
	t.Helper()
	return fixture.JWT(t, f.secret, "u1", slug, "owner", time.Hour)
}

// status sends GET /x with the bearer token and returns the status and the error's message.
func (f *authFixture) status(t *testing.T, token string) (int, string) {
	t.Helper()
	r := f.srv.Get(t, token, "", "/x")
	var body struct {
		Error struct{ Code, Message string } `json:"error"`
	}
	_ = json.Unmarshal([]byte(r.Raw), &body)
	return r.Status, body.Error.Message
}

// A tenant the registry says does not exist is an answer, not an outage: its key must not be served
// from the stale cache (the hour meant for a Postgres outage). Before, a not-found tenant behind a
// verified key counted as "registry unreachable" and the key kept working from the cache.
func TestKeyOfMissingTenantIsRefusedNotServedStale(t *testing.T) {
	f := newAuthFixture(t)
	for _, token := range []string{f.key, f.jwt(t, "acme")} {
		if code, msg := f.status(t, token); code != 200 {
			t.Fatalf("before: got %d %s, want 200", code, msg)
		}
	}
	f.reg.gone.Store(true)
	time.Sleep(60 * time.Millisecond) // past FreshFor
	if code, msg := f.status(t, f.key); code != 401 && code != 403 {
		t.Errorf("API key of a tenant the registry no longer has: got %d %q, want it refused (401/403)", code, msg)
	}
	if code, msg := f.status(t, f.jwt(t, "acme")); code != 401 && code != 403 {
		t.Errorf("JWT of a tenant the registry no longer has: got %d %q, want it refused (401/403)", code, msg)
	}
}

// A real outage still uses the stale cache: a key verified within StaleFor keeps working while the
// registry is unreachable, and a key never seen is refused with 503.
func TestRegistryOutageUsesStaleCache(t *testing.T) {
	f := newAuthFixture(t)
	token := f.jwt(t, "acme")
	for _, tok := range []string{f.key, token} {
		if code, msg := f.status(t, tok); code != 200 {
			t.Fatalf("before: got %d %s, want 200", code, msg)
		}
	}
	f.reg.down.Store(true)
	time.Sleep(60 * time.Millisecond) // not a poll: past FreshFor, so the stale cache is what answers
	for name, tok := range map[string]string{"key": f.key, "jwt": token} {
		if code, msg := f.status(t, tok); code != 200 {
			t.Errorf("%s during a registry outage: got %d %q, want 200 from the stale cache", name, code, msg)
		}
	}
	if code, _ := f.status(t, f.jwt(t, "other")); code != 503 {
		t.Errorf("JWT of an unseen tenant during an outage: got %d, want 503", code)
	}
}

// Deleting a tenant (its keys go with it) refuses its key and its JWTs within FreshFor.
func TestDeletedTenantIsRefused(t *testing.T) {
	f := newAuthFixture(t)
	token := f.jwt(t, "acme")
	for _, tok := range []string{f.key, token} {
		if code, msg := f.status(t, tok); code != 200 {
			t.Fatalf("before: got %d %s, want 200", code, msg)
		}
	}
	if _, err := f.env.PG.Exec(context.Background(), "DELETE FROM tenants WHERE id = $1", f.tenant.ID); err != nil {
		t.Fatal(err)
	}
	time.Sleep(60 * time.Millisecond) // not a poll: the promise is "within FreshFor" (50 ms)
	if code, msg := f.status(t, f.key); code != 401 {
		t.Errorf("key of a deleted tenant: got %d %q, want 401", code, msg)
	}
	if code, msg := f.status(t, token); code != 401 {
		t.Errorf("JWT of a deleted tenant: got %d %q, want 401", code, msg)
	}
}

// A disabled tenant's key and JWTs get a 403 that says so, within FreshFor; enabling restores them.
// The registry's "disabled" is an answer, so it is not served around from the stale cache either.
func TestDisabledTenantIsRefused(t *testing.T) {
	f := newAuthFixture(t)
	ctx := context.Background()
	token := f.jwt(t, "acme")
	for _, tok := range []string{f.key, token} {
		if code, msg := f.status(t, tok); code != 200 {
			t.Fatalf("before: got %d %s, want 200", code, msg)
		}
	}
	if _, changed, err := f.reg.SetDisabled(ctx, "acme", true); err != nil || !changed {
		t.Fatalf("disable: changed %v, err %v", changed, err)
	}
	if _, changed, err := f.reg.SetDisabled(ctx, "acme", true); err != nil || changed {
		t.Errorf("disable again: changed %v, err %v; want no change and no error", changed, err)
	}
	time.Sleep(60 * time.Millisecond) // not a poll: the promise is "within FreshFor" (50 ms)
	for name, tok := range map[string]string{"key": f.key, "jwt": token} {
		if code, msg := f.status(t, tok); code != 403 || !strings.Contains(msg, "disabled") {
			t.Errorf("%s of a disabled tenant: got %d %q, want 403 saying the tenant is disabled", name, code, msg)
		}
	}
	if _, _, err := f.reg.SetDisabled(ctx, "acme", false); err != nil {
		t.Fatal(err)
	}
	time.Sleep(60 * time.Millisecond) // not a poll: past FreshFor
	for name, tok := range map[string]string{"key": f.key, "jwt": token} {
		if code, msg := f.status(t, tok); code != 200 {
			t.Errorf("%s after enabling: got %d %q, want 200", name, code, msg)
		}
	}
}

// Rotating a key: the new one has the old one's tenant and scopes; the old one works through the
// overlap and is refused from its expiry on — at that instant when it was verified during the overlap,
// even from a cache entry that is still fresh.
func TestRotatedKeyExpiresAfterOverlap(t *testing.T) {
	f := newAuthFixture(t)
	f.authn.FreshFor = time.Minute // expiry must not wait for the cache
	ctx := context.Background()
	keys := auth.NewKeys(f.env.PG)
	old, err := keys.Find(ctx, f.tenant.ID, f.key)
	if err != nil {
		t.Fatal(err)
	}
	plain, nk, ok, err := keys.Rotate(ctx, old.ID, "", 1500*time.Millisecond)
	if err != nil {
		t.Fatal(err)
	}
	if nk.TenantID != f.tenant.ID || fmt.Sprint(nk.Scopes) != fmt.Sprint(old.Scopes) || ok.ExpiresAt == nil {
		t.Errorf("rotate: new %+v, old %+v; want the same tenant and scopes, and the old key expiring", nk, ok)
	}
	if code, msg := f.status(t, plain); code != 200 {
		t.Errorf("new key: got %d %q, want 200", code, msg)
	}
	if code, msg := f.status(t, f.key); code != 200 {
		t.Errorf("old key inside the overlap: got %d %q, want 200", code, msg)
	}
	time.Sleep(time.Until(*ok.ExpiresAt) + 50*time.Millisecond) // not a poll: waits out the overlap
	if code, msg := f.status(t, f.key); code != 401 || !strings.Contains(msg, "expired") {
		t.Errorf("old key after the overlap: got %d %q, want 401 saying it expired", code, msg)
	}
	if _, err := keys.Verify(ctx, f.key); !errors.Is(err, auth.ErrExpiredKey) {
		t.Errorf("Verify of the old key after the overlap: %v, want ErrExpiredKey", err)
	}
	if code, msg := f.status(t, plain); code != 200 {
		t.Errorf("new key after the overlap: got %d %q, want 200", code, msg)
	}
	if _, _, _, err := keys.Rotate(ctx, old.ID, "", time.Hour); !errors.Is(err, auth.ErrNotRotatable) {
		t.Errorf("rotating an expired key: %v, want ErrNotRotatable", err)
	}
}

func discardLog() *slog.Logger { return slog.New(slog.DiscardHandler) }

// Made-up keys cannot push verified ones out of the cache: after a flood of well-formed keys that
// are refused, a key verified before still works from the cache through a registry outage. Before,
// refusals and verifications shared one bound, the flood emptied it, and the key got 503 (found by
// review: 100,000 random keys, which anyone can send, did that).
func TestAFloodOfRefusedKeysKeepsVerifiedOnesCached(t *testing.T) {
	f := newAuthFixture(t)
	f.authn.MaxCached = 10
	if code, msg := f.status(t, f.key); code != 200 {
		t.Fatalf("before: got %d %s, want 200", code, msg)
	}
	for i := range 30 {
		made := fmt.Sprintf("ak_%012x_%s", i, strings.Repeat("A", 43))
		if code, _ := f.status(t, made); code != 401 {
			t.Fatalf("made-up key %d: got %d, want 401", i, code)
		}
	}
	f.reg.down.Store(true)
	time.Sleep(60 * time.Millisecond) // past FreshFor: the stale cache is what answers
	if code, msg := f.status(t, f.key); code != 200 {
		t.Errorf("verified key during an outage after a flood of refused keys: got %d %q, want 200 from the cache", code, msg)
	}
}

// Anyone can send made-up API keys, and each new one cost a Postgres lookup: a client looping over
// random keys turned every request into a query. Per address, lookups that end refused are bounded;
// past the bound an unknown credential is answered 429 without a lookup, while keys this process has
// verified keep working from that address, and other addresses are unaffected. Before, the sixth
// made-up key was looked up and refused 401 like the first.
func TestMadeUpKeysAreBoundedPerAddress(t *testing.T) {
	f := newAuthFixture(t)
	f.authn.Refusals = auth.RefusalLimit{PerMinute: 1, Burst: 5}
	proxies, err := api.ParseProxies("127.0.0.1")
	if err != nil {
		t.Fatal(err)
	}
	f.authn.Proxies = proxies
	from := func(addr, token string) fixture.Response {
		return f.srv.Do(t, fixture.Request{Path: "/x", Key: token, Header: map[string]string{"X-Forwarded-For": addr}})
	}
	made := func(i int) string { return fmt.Sprintf("ak_%012x_%s", 0xbad000+i, strings.Repeat("B", 43)) }
	const attacker, neighbour = "203.0.113.7", "198.51.100.9"
	if r := from(attacker, f.key); r.Status != 200 {
		t.Fatalf("the tenant's key before: %d %s", r.Status, r.Raw)
	}
	for i := range 5 {
		if r := from(attacker, made(i)); r.Status != 401 {
			t.Fatalf("made-up key %d within the burst: %d %s, want 401", i, r.Status, r.Raw)
		}
	}
	// The same refused key again is answered from the cache of refusals and costs nothing.
	if r := from(attacker, made(4)); r.Status != 401 {
		t.Errorf("a refused key sent again: %d %s, want 401 from the cache", r.Status, r.Raw)
	}
	r := from(attacker, made(5))
	if r.Status != 429 || !strings.Contains(r.Raw, "too_many_refused_credentials") {
		t.Fatalf("made-up key past the burst: %d %s, want 429 too_many_refused_credentials", r.Status, r.Raw)
	}
	if ra, err := strconv.Atoi(r.Header.Get("Retry-After")); err != nil || ra < 1 || ra > 60 {
		t.Errorf("Retry-After %q, want 1–60 s (one lookup a minute)", r.Header.Get("Retry-After"))
	}
	// A spoofed left-most X-Forwarded-For is the client's own writing: it does not buy a new bucket.
	if r := from("192.0.2.1, "+attacker, made(6)); r.Status != 429 {
		t.Errorf("made-up key with a spoofed left-most hop: %d %s, want 429", r.Status, r.Raw)
	}
	time.Sleep(60 * time.Millisecond) // past FreshFor: the tenant's key is checked again
	if r := from(attacker, f.key); r.Status != 200 {
		t.Errorf("the tenant's verified key from the limited address: %d %s, want 200 (re-checked, not limited)", r.Status, r.Raw)
	}
	if r := from(neighbour, made(7)); r.Status != 401 {
		t.Errorf("a made-up key from another address: %d %s, want 401 (its own bucket)", r.Status, r.Raw)
	}
}

// Keys that verify, and lookups that an outage lost, take nothing from their address's bound: a busy
// client behind one address with many valid keys is never limited.
func TestValidKeysCostNoRefusals(t *testing.T) {
	f := newAuthFixture(t)
	f.authn.Refusals = auth.RefusalLimit{PerMinute: 1, Burst: 2}
	keys := make([]string, 10)
	for i := range keys {
		keys[i], _ = fixture.Key(t, f.env.PG, f.tenant.ID, fmt.Sprintf("k%d", i), auth.ScopeAnalyticsRead)
	}
	for i, k := range keys[:5] {
		if code, msg := f.status(t, k); code != 200 {
			t.Fatalf("valid key %d: %d %s, want 200", i, code, msg)
		}
	}
	f.reg.down.Store(true) // the keys are found, their tenant cannot be read: an outage, not a refusal
	for i, k := range keys[5:] {
		if code, msg := f.status(t, k); code != 503 {
			t.Fatalf("new valid key %d while the registry is down: %d %s, want 503", i, code, msg)
		}
	}
	f.reg.down.Store(false)
	for i := range 2 {
		made := fmt.Sprintf("ak_%012x_%s", 0xd0f000+i, strings.Repeat("C", 43))
		if code, msg := f.status(t, made); code != 401 {
			t.Errorf("made-up key %d after valid keys and an outage: %d %s, want 401 (the bound untouched)", i, code, msg)
		}
	}
	if code, msg := f.status(t, fmt.Sprintf("ak_%012x_%s", 0xd0f002, strings.Repeat("C", 43))); code != 429 {
		t.Errorf("the third made-up key: %d %s, want 429 (the bound is 2)", code, msg)
	}
}

// An attacker with as many addresses as the map of buckets holds (an IPv6 /47 of /64s) must not
// reset the bound by filling it. Before, a full map was emptied and every bucket, the attacker's
// exhausted one included, was full again (found by review).
func TestFillingTheMapOfAddressesKeepsTheirBounds(t *testing.T) {
	f := newAuthFixture(t)
	f.authn.MaxCached = 20
	f.authn.Refusals = auth.RefusalLimit{PerMinute: 1, Burst: 3}
	f.authn.Proxies, _ = api.ParseProxies("127.0.0.1")
	from := func(addr, token string) int {
		return f.srv.Do(t, fixture.Request{Path: "/x", Key: token, Header: map[string]string{"X-Forwarded-For": addr}}).Status
	}
	made := func(i int) string { return fmt.Sprintf("ak_%012x_%s", 0xcafe000+i, strings.Repeat("R", 43)) }
	const attacker = "2001:db8:aaaa:1::1"
	for i := range 3 {
		from(attacker, made(i))
	}
	if c := from(attacker, made(3)); c != 429 {
		t.Fatalf("the attacker's bucket is not empty after its burst: %d", c)
	}
	for i := range 40 { // the attacker's other /64s, one made-up key each
		from(fmt.Sprintf("2001:db8:aaaa:%x::1", 0x100+i), made(1000+i))
	}
	if c := from(attacker, made(4)); c != 429 {
		t.Errorf("the exhausted address after the map was filled: %d, want 429 (its bucket kept)", c)
	}
	if c := from("2001:db8:bbbb::1", made(2000)); c != 429 {
		t.Errorf("a new address while the map is full of partly spent buckets: %d, want 429 (the shared overflow bucket is spent)", c)
	}
}

// Many addresses at once (a botnet, an IPv6 /48 of /64s) are bounded by the instance's own bucket:
// past it, unknown credentials wait, while verified keys go on working.
func TestTheInstanceBoundsRefusalsFromEverywhere(t *testing.T) {
	f := newAuthFixture(t)
	f.authn.Refusals = auth.RefusalLimit{PerMinute: 1, Burst: 1}
	f.authn.Proxies, _ = api.ParseProxies("127.0.0.1")
	if code, msg := f.status(t, f.key); code != 200 {
		t.Fatalf("the tenant's key before: %d %s", code, msg)
	}
	limited := 0
	for i := range auth.GlobalFactor + 5 {
		made := fmt.Sprintf("ak_%012x_%s", 0xdd0000+i, strings.Repeat("G", 43))
		r := f.srv.Do(t, fixture.Request{Path: "/x", Key: made, Header: map[string]string{"X-Forwarded-For": fmt.Sprintf("2001:db8:cc:%x::1", i)}})
		if r.Status == 429 {
			limited++
		}
	}
	if limited != 5 {
		t.Errorf("%d made-up keys from as many addresses, one each: %d answered 429, want the 5 past the instance's bound of %d", auth.GlobalFactor+5, limited, auth.GlobalFactor)
	}
	time.Sleep(60 * time.Millisecond) // past FreshFor: the key is checked again
	if code, msg := f.status(t, f.key); code != 200 {
		t.Errorf("a verified key while the instance's bound is spent: %d %s, want 200", code, msg)
	}
}

// A revoked key sent from an address whose bucket is empty gets its refusal, not "retry later":
// before, it was answered 429 with Retry-After, and a client retries that forever (found by review).
func TestARevokedKeyFromALimitedAddressIsToldItIsRevoked(t *testing.T) {
	f := newAuthFixture(t)
	f.authn.Refusals = auth.RefusalLimit{PerMinute: 1, Burst: 3}
	k, rec := fixture.Key(t, f.env.PG, f.tenant.ID, "to-revoke", auth.ScopeAnalyticsRead)
	if code, msg := f.status(t, k); code != 200 {
		t.Fatalf("the key before: %d %s", code, msg)
	}
	if _, err := f.env.PG.Exec(t.Context(), "UPDATE api_keys SET revoked_at = now() WHERE id = $1", rec.ID); err != nil {
		t.Fatal(err)
	}
	time.Sleep(60 * time.Millisecond)
	if code, msg := f.status(t, k); code != 401 {
		t.Fatalf("revoked: %d %s, want 401", code, msg)
	}
	for i := range 4 {
		f.status(t, fmt.Sprintf("ak_%012x_%s", 0xee0000+i, strings.Repeat("V", 43)))
	}
	time.Sleep(60 * time.Millisecond)
	if code, msg := f.status(t, k); code != 401 || !strings.Contains(msg, "revoked") {
		t.Errorf("the revoked key from a limited address: %d %q, want 401 revoked", code, msg)
	}
}

// Behind a load balancer not listed in ANALYTICS_TRUSTED_PROXIES every client is the balancer's
// address, and one client's made-up keys hold up every other client's new keys (the review's finding
// against the shipped manifests, which list none). That is said in the log, once.
func TestXForwardedForWithoutTrustedProxiesIsLogged(t *testing.T) {
	f := newAuthFixture(t)
	f.authn.Refusals = auth.RefusalLimit{PerMinute: 1, Burst: 3}
	var logged strings.Builder
	f.authn.Log = slog.New(slog.NewTextHandler(&logged, nil))
	for i := range 3 {
		made := fmt.Sprintf("ak_%012x_%s", 0xff0000+i, strings.Repeat("X", 43))
		f.srv.Do(t, fixture.Request{Path: "/x", Key: made, Header: map[string]string{"X-Forwarded-For": "198.51.100.1"}})
	}
	if n := strings.Count(logged.String(), "ANALYTICS_TRUSTED_PROXIES is empty"); n != 1 {
		t.Errorf("the warning was logged %d times, want once:\n%s", n, logged.String())
	}
}

// A registry that accepts the connection but never answers (a lock, a full disk, a dropped route) is
// an outage, answered within LookupTimeout: a key verified before works from the stale cache, an
// unseen one gets 503. Before, both waited as long as the client did, holding a request each (found
// by review).
func TestHungRegistryIsAnOutageNotAHang(t *testing.T) {
	f := newAuthFixture(t)
	f.authn.LookupTimeout = 300 * time.Millisecond
	if code, msg := f.status(t, f.key); code != 200 {
		t.Fatalf("before: got %d %s, want 200", code, msg)
	}
	unseen, _ := fixture.Key(t, f.env.PG, f.tenant.ID, "unseen", auth.ScopeAnalyticsRead)
	f.reg.hang.Store(true)
	defer f.reg.hang.Store(false)
	time.Sleep(60 * time.Millisecond) // past FreshFor: the registry is asked
	for _, tc := range []struct {
		name, token string
		want        int
	}{{"verified key", f.key, 200}, {"unseen key", unseen, 503}, {"jwt of an unseen tenant", f.jwt(t, "other"), 503}} {
		got := make(chan int, 1)
		go func() { code, _ := f.status(t, tc.token); got <- code }()
		select {
		case code := <-got:
			if code != tc.want {
				t.Errorf("%s while the registry hangs: %d, want %d", tc.name, code, tc.want)
			}
		case <-time.After(5 * time.Second):
			t.Fatalf("%s while the registry hangs: no answer in 5 s (LookupTimeout is 300 ms)", tc.name)
		}
	}
}

// A tenant enabled again gets its keys back at once, even from an address whose bound on refused
// lookups is spent: its key is a real one, refused only for its tenant's state. Before, the cached
// "disabled" was served without a lookup until the bound refilled (found by review).
func TestReenabledTenantIsNotRefusedAsDisabledWhileLookupsAreLimited(t *testing.T) {
	f := newAuthFixture(t)
	f.authn.Refusals = auth.RefusalLimit{PerMinute: 1, Burst: 3}
	ctx := context.Background()
	if code, msg := f.status(t, f.key); code != 200 {
		t.Fatalf("before: got %d %s, want 200", code, msg)
	}
	if _, _, err := f.reg.SetDisabled(ctx, "acme", true); err != nil {
		t.Fatal(err)
	}
	time.Sleep(60 * time.Millisecond)
	if code, msg := f.status(t, f.key); code != 403 {
		t.Fatalf("disabled: got %d %s, want 403", code, msg)
	}
	for i := range 4 {
		f.status(t, fmt.Sprintf("ak_%012x_%s", 0xab0000+i, strings.Repeat("E", 43)))
	}
	if code, _ := f.status(t, fmt.Sprintf("ak_%012x_%s", 0xab0010, strings.Repeat("E", 43))); code != 429 {
		t.Fatalf("a made-up key after the burst: %d, want 429 (the bound is spent)", code)
	}
	if _, _, err := f.reg.SetDisabled(ctx, "acme", false); err != nil {
		t.Fatal(err)
	}
	time.Sleep(60 * time.Millisecond)
	if code, msg := f.status(t, f.key); code != 200 {
		t.Errorf("the re-enabled tenant's key from the limited address: %d %q, want 200", code, msg)
	}
}
