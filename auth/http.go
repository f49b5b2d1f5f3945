package auth

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/gofiber/fiber/v2"
	"github.com/google/uuid"

	"github.com/analyticsd/analyticsd/api"
	"github.com/analyticsd/analyticsd/tenant"
)

// TenantFinder is what the middleware needs of the tenant registry.
type TenantFinder interface {
	ByID(ctx context.Context, id uuid.UUID) (tenant.Tenant, error)
	BySlug(ctx context.Context, slug string) (tenant.Tenant, error)
}

// Authenticator turns "Authorization: Bearer <token>" (+ optional X-Tenant-Slug) into an
// api.Principal, checking the scope a route needs.
//
// Verified keys are cached: for FreshFor (default 5 s) a key is trusted without asking Postgres, so a
// revocation, a deleted tenant or a disabled one takes effect within that time on every instance (a
// rotated key's expiry takes effect at its instant). While Postgres is unreachable, a key verified
// within StaleFor (default 1 h) keeps working — analytics must not fail because the registry
// blinked — and unknown keys are refused with 503. The registry's answers (no such key or tenant,
// revoked, disabled) are never mistaken for an outage. A registry that accepts connections but does
// not answer is an outage too, after LookupTimeout.
type Authenticator struct {
	Keys     *Keys
	Tenants  TenantFinder
	FreshFor time.Duration
	StaleFor time.Duration
	// LookupTimeout bounds one credential's lookup in the registry (default 3 s). Without it, a
	// Postgres that hung (a lock, a full disk, a dropped route) held every request whose cache entry
	// was not fresh until the client gave up, stale entries and all (found by review).
	LookupTimeout time.Duration
	// MaxCached bounds each cache (verified keys, refused tokens, tenants by slug; default 100,000):
	// one that reaches it is emptied.
	MaxCached int
	// Refusals bounds the refused credentials each client address may have looked up (see
	// RefusalLimit); the zero value does not limit. Proxies say whose X-Forwarded-For names the
	// client (api.ClientAddr).
	Refusals RefusalLimit
	Proxies  api.Proxies
	now      func() time.Time
	jwt      *jwtVerifier

	mu    sync.Mutex
	cache map[[32]byte]cached // keys verified
	// refused holds definitive refusals apart from cache: anyone can send tokens that are refused,
	// and when both shared one bound, a flood of made-up keys emptied it, verified keys with it —
	// and with them the stale answers that carry a Postgres outage (found by review).
	refused map[[32]byte]cached
	bySlug  map[string]cachedTenant
	uses    map[uuid.UUID]*keyUse // keys verified here, for RecordUsage
	lookups map[netip.Prefix]*refusalBucket
	global  refusalBucket // the instance's bound on refused lookups (RefusalLimit)
	swept   time.Time     // when lookups was last swept for full buckets
	// Log, when set, hears of a request that names its client in X-Forwarded-For while no proxy is
	// trusted (once per process): behind a load balancer, every client then shares its address.
	Log        *slog.Logger
	warnedXFF  atomic.Bool
	warnedJWKS atomic.Int64 // unix seconds of the last warning that the JWKS could not be fetched
}

// keyUse is when a key was last used, kept in memory: a request only moves an atomic (at most once a
// second), and RecordUsage writes it to Postgres in the background, once per round for all keys.
type keyUse struct {
	last    atomic.Int64 // unix seconds of the last request the key authenticated
	written int64        // the value last written to Postgres; guarded by Authenticator.mu
}

func (u *keyUse) touch(now time.Time) {
	if u == nil {
		return
	}
	if s := now.Unix(); u.last.Load() < s {
		u.last.Store(s)
	}
}

type cachedTenant struct {
	t   tenant.Tenant
	at  time.Time
	err error
}

type cached struct {
	key      Key
	slug     string
	verified time.Time
	err      error // a definitive refusal (see definitive), cached briefly too
	use      *keyUse
}

// NewAuthenticator returns an Authenticator over keys and tenants, accepting host-app JWTs too
// when jwtCfg enables them.
func NewAuthenticator(keys *Keys, tenants TenantFinder, jwtCfg JWTConfig) *Authenticator {
	a := &Authenticator{Keys: keys, Tenants: tenants, FreshFor: 5 * time.Second, StaleFor: time.Hour, LookupTimeout: 3 * time.Second,
		MaxCached: 100_000, now: time.Now,
		cache: map[[32]byte]cached{}, refused: map[[32]byte]cached{}, bySlug: map[string]cachedTenant{}, uses: map[uuid.UUID]*keyUse{},
		lookups: map[netip.Prefix]*refusalBucket{}}
	if jwtCfg.Enabled() {
		a.jwt = newJWTVerifier(jwtCfg)
	}
	return a
}

// tenantBySlug resolves a JWT's tenant claim, cached like keys (fresh 5 s, stale up to 1 h while
// Postgres is unreachable).
func (a *Authenticator) tenantBySlug(ctx context.Context, slug string) (tenant.Tenant, error) {
	now := a.now()
	a.mu.Lock()
	c, hit := a.bySlug[slug]
	a.mu.Unlock()
	if hit && now.Sub(c.at) < a.FreshFor {
		return c.t, c.err
	}
	lctx, cancel := a.lookup(ctx)
	t, err := a.Tenants.BySlug(lctx, slug)
	cancel()
	if err != nil && !definitive(err) {
		if hit && c.err == nil && now.Sub(c.at) < a.StaleFor {
			return c.t, nil
		}
		return t, err
	}
	a.mu.Lock()
	if len(a.bySlug) >= a.MaxCached {
		clear(a.bySlug)
	}
	a.bySlug[slug] = cachedTenant{t: t, at: now, err: err}
	a.mu.Unlock()
	return t, err
}

// verify returns the key record and its tenant's slug, from the cache when fresh. from gives the
// client's address, whose lookups of credentials not verified before the Refusals limit bounds; it is
// asked only for such a lookup.
func (a *Authenticator) verify(ctx context.Context, token string, from client) (Key, string, error) {
	h := sha256.Sum256([]byte(token))
	now := a.now()
	a.mu.Lock()
	c, hit := a.cache[h]
	known := hit
	if !hit {
		c, hit = a.refused[h]
		// A key refused because its tenant was disabled is a real key: enabling the tenant must
		// bring it back at once, not after the address's bound refills (made-up keys from the same
		// address held a re-enabled tenant's key refused as disabled; found by review).
		known = hit && errors.Is(c.err, tenant.ErrDisabled)
	}
	if hit && now.Sub(c.verified) < a.FreshFor {
		a.mu.Unlock()
		return c.answer(now)
	}
	charged := !known && a.Refusals.PerMinute > 0
	var bucket netip.Prefix
	if charged {
		a.mu.Unlock()
		bucket = addrKey(from.addr())
		a.mu.Lock()
		if ok, wait := a.takeLookup(bucket, now); !ok {
			a.mu.Unlock()
			if hit && c.err != nil {
				// Refused before: that answer still holds far more likely than not (revoked and
				// expired keys stay so), and "retry later" would have the client retry forever.
				return c.answer(now)
			}
			return Key{}, "", errRefusalsLimited{wait: wait}
		}
	}
	a.mu.Unlock()
	lctx, cancel := a.lookup(ctx)
	key, err := a.Keys.Verify(lctx, token)
	var slug string
	if err == nil {
		var t tenant.Tenant
		t, err = a.Tenants.ByID(lctx, key.TenantID)
		slug = t.Slug
		if err == nil && t.Disabled() {
			err = fmt.Errorf("%w: %q", tenant.ErrDisabled, t.Slug)
		}
	}
	cancel()
	if err != nil && !definitive(err) {
		if charged {
			a.mu.Lock()
			a.giveBack(bucket)
			a.mu.Unlock()
		}
		// The registry is unreachable: fall back to a recent verification.
		if hit && c.err == nil && now.Sub(c.verified) < a.StaleFor {
			return c.answer(now)
		}
		return Key{}, "", err
	}
	c = cached{key: key, slug: slug, verified: now, err: err}
	a.mu.Lock()
	if charged && err == nil {
		a.giveBack(bucket)
	}
	if err == nil {
		if c.use = a.uses[key.ID]; c.use == nil {
			if len(a.uses) >= a.MaxCached {
				clear(a.uses)
			}
			c.use = &keyUse{}
			a.uses[key.ID] = c.use
		}
		remember(a.cache, h, c, a.MaxCached)
		delete(a.refused, h)
	} else {
		remember(a.refused, h, c, a.MaxCached)
		delete(a.cache, h) // revoked, expired, its tenant gone or disabled
	}
	a.mu.Unlock()
	return c.answer(now)
}

// lookup is ctx bounded by LookupTimeout, for one credential's lookup in the registry.
func (a *Authenticator) lookup(ctx context.Context) (context.Context, context.CancelFunc) {
	if a.LookupTimeout <= 0 {
		return context.WithCancel(ctx)
	}
	return context.WithTimeout(ctx, a.LookupTimeout)
}

// remember caches c under h, emptying m first when it holds max entries.
func remember(m map[[32]byte]cached, h [32]byte, c cached, max int) {
	if len(m) >= max {
		clear(m)
	}
	m[h] = c
}

// answer is the cached verification as of now: a key that expired since is refused at its expiry,
// not up to FreshFor later.
func (c cached) answer(now time.Time) (Key, string, error) {
	if c.err == nil && c.key.Expired(now) {
		return Key{}, "", ErrExpiredKey
	}
	if c.err == nil {
		c.use.touch(now)
	}
	return c.key, c.slug, c.err
}

// FlushUsage writes the last use of every key used since the previous flush to api_keys.last_used_at,
// in one statement, and returns how many keys it wrote. A failed flush is retried by the next one.
func (a *Authenticator) FlushUsage(ctx context.Context) (int, error) {
	var ids []uuid.UUID
	var ats []time.Time
	var uses []*keyUse
	a.mu.Lock()
	for id, u := range a.uses {
		if last := u.last.Load(); last > u.written {
			ids, ats, uses = append(ids, id), append(ats, time.Unix(last, 0)), append(uses, u)
		}
	}
	a.mu.Unlock()
	if len(ids) == 0 {
		return 0, nil
	}
	if err := a.Keys.MarkUsed(ctx, ids, ats); err != nil {
		return 0, err
	}
	a.mu.Lock()
	for i, u := range uses {
		u.written = max(u.written, ats[i].Unix())
	}
	a.mu.Unlock()
	return len(ids), nil
}

// RecordUsage flushes the keys' last use every `every` (a minute in serve: each key's row is written
// at most once a minute per instance, never on a request's path) until ctx ends, then once more
// within 5 s so a clean shutdown loses nothing. A key's LAST USED is thus up to `every` behind.
func (a *Authenticator) RecordUsage(ctx context.Context, every time.Duration, log *slog.Logger) {
	tick := time.NewTicker(every)
	defer tick.Stop()
	flush := func(ctx context.Context) {
		if n, err := a.FlushUsage(ctx); err != nil {
			log.Warn("api keys' last use not written; retried next round", "err", err)
		} else if n > 0 {
			log.Debug("api keys' last use written", "keys", n)
		}
	}
	for {
		select {
		case <-tick.C:
			flush(ctx)
		case <-ctx.Done():
			fctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
			flush(fctx)
			cancel()
			return
		}
	}
}

// definitive reports whether err is the registry's answer about a credential (no such key, revoked
// or expired, no such tenant, tenant disabled) rather than a failure to ask: only a failure to ask
// may fall back to the stale cache. A tenant that was gone once counted as an outage, and its key
// kept working from the cache.
func definitive(err error) bool {
	return errors.Is(err, ErrInvalidKey) || errors.Is(err, ErrRevokedKey) || errors.Is(err, ErrExpiredKey) ||
		errors.Is(err, tenant.ErrNotFound) || errors.Is(err, tenant.ErrDisabled)
}

// bearer extracts the token from an Authorization header.
func bearer(h string) (string, bool) {
	scheme, token, ok := strings.Cut(strings.TrimSpace(h), " ")
	if !ok || !strings.EqualFold(scheme, "Bearer") {
		return "", false
	}
	token = strings.TrimSpace(token)
	return token, token != ""
}

// Require returns middleware admitting requests whose credential carries scope and, when the
// X-Tenant-Slug header is sent, belongs to that tenant. An API key needs the scope itself; a JWT's
// role must grant it (owner/admin: all analytics scopes; member/viewer: none). It attaches the
// request's api.Principal and passes the request on to then when given — the middleware that
// follows authentication within the one handler a route's Register takes (the rate limit:
// ratelimit.Limiter.Limit or Defer, which call c.Next themselves) — or else to the route's next
// handler. It authenticates and authorises; it limits nothing.
func (a *Authenticator) Require(scope Scope, then ...fiber.Handler) fiber.Handler {
	next := (*fiber.Ctx).Next
	if len(then) > 0 {
		next = then[0]
	}
	return func(c *fiber.Ctx) error {
		token, ok := bearer(c.Get(fiber.HeaderAuthorization))
		if !ok {
			return api.Unauthorized("missing credential: send Authorization: Bearer <API key or token>")
		}
		var p api.Principal
		var scopes []Scope
		var err error
		if LooksLikeKey(token) || a.jwt == nil {
			p, scopes, err = a.fromKey(c.UserContext(), token, client{a, c})
		} else {
			p, scopes, err = a.fromJWT(c.UserContext(), token)
		}
		if err != nil {
			return err
		}
		if want := c.Get("X-Tenant-Slug"); want != "" && want != p.Slug {
			return api.Forbidden("forbidden", "X-Tenant-Slug does not match the credential's tenant")
		}
		if !slices.Contains(scopes, scope) {
			if strings.HasPrefix(p.Actor, "jwt:") {
				return api.Forbidden("forbidden", "your role has no access to analytics; owner or admin is required")
			}
			return api.Forbidden("forbidden", "API key lacks the "+string(scope)+" scope")
		}
		api.SetPrincipal(c, p)
		return next(c)
	}
}

// client is the request a credential came with, for its address.
type client struct {
	a *Authenticator
	c *fiber.Ctx
}

// addr is the request's client address (api.ClientAddr). With no proxy trusted, a request that names
// its client in X-Forwarded-For comes through a proxy whose clients all count as one address: that is
// logged, once.
func (cl client) addr() netip.Addr {
	a := cl.a
	if len(a.Proxies) == 0 && a.Log != nil && len(cl.c.Request().Header.Peek(fiber.HeaderXForwardedFor)) > 0 && a.warnedXFF.CompareAndSwap(false, true) {
		a.Log.Warn("requests carry X-Forwarded-For but ANALYTICS_TRUSTED_PROXIES is empty: every client behind that proxy counts as its address for AUTH_REFUSALS_*, "+
			"so one client sending made-up keys holds up the others' new keys; list your load balancers in ANALYTICS_TRUSTED_PROXIES",
			"peer", cl.c.Context().RemoteIP().String())
	}
	return api.ClientAddr(cl.c, a.Proxies)
}

// registryDown is the 503 for a credential that cannot be checked: the keys or tenants did not answer.
func registryDown() error {
	return api.Unavailable("auth_unavailable", "cannot verify credentials right now; retry shortly", 5, nil)
}

// tenantDisabled is the 403 for a disabled tenant's credentials.
func tenantDisabled(slug string) error {
	return api.Forbidden("tenant_disabled", "tenant "+strconv.Quote(slug)+" is disabled; its credentials are refused until an operator enables it")
}

func (a *Authenticator) fromKey(ctx context.Context, token string, from client) (api.Principal, []Scope, error) {
	if !LooksLikeKey(token) {
		return api.Principal{}, nil, api.Unauthorized("invalid credential: the bearer token is not an analyticsd API key")
	}
	key, slug, err := a.verify(ctx, token, from)
	var limited errRefusalsLimited
	switch {
	case errors.As(err, &limited):
		if a.Refusals.Limited != nil {
			a.Refusals.Limited.Inc()
		}
		return api.Principal{}, nil, api.TooMany("too_many_refused_credentials",
			"too many unknown or refused credentials from your address (or from everywhere at once); retry later with a valid API key",
			int(math.Ceil(limited.wait.Seconds())))
	case errors.Is(err, ErrInvalidKey):
		return api.Principal{}, nil, api.Unauthorized("invalid API key")
	case errors.Is(err, ErrRevokedKey):
		return api.Principal{}, nil, api.Unauthorized("API key has been revoked")
	case errors.Is(err, ErrExpiredKey):
		return api.Principal{}, nil, api.Unauthorized("API key has expired (it was rotated); use its replacement")
	case errors.Is(err, tenant.ErrNotFound):
		return api.Principal{}, nil, api.Unauthorized("invalid API key: its tenant does not exist")
	case errors.Is(err, tenant.ErrDisabled):
		return api.Principal{}, nil, tenantDisabled(slug)
	case err != nil:
		return api.Principal{}, nil, registryDown()
	}
	return api.Principal{TenantID: key.TenantID, Slug: slug, Actor: "apikey:" + key.Prefix}, key.Scopes, nil
}

func (a *Authenticator) fromJWT(ctx context.Context, token string) (api.Principal, []Scope, error) {
	claims, err := a.jwt.verify(ctx, token)
	if errors.Is(err, errJWKSUnavailable) {
		// Logged at most every 30 s (a fetch is tried no more often): every RS256 request with an
		// unknown kid meets the outage, and anyone can send such tokens.
		if now := time.Now().Unix(); a.Log != nil && now-a.warnedJWKS.Load() >= 30 && a.warnedJWKS.Swap(now) < now-29 {
			a.Log.Warn("JWTs answered 503: their kid is not in the JWKS held and the JWKS could not be fetched", "err", err)
		}
		return api.Principal{}, nil, registryDown()
	}
	if err != nil {
		return api.Principal{}, nil, api.Unauthorized(err.Error())
	}
	t, err := a.tenantBySlug(ctx, claims.Tenant)
	if errors.Is(err, tenant.ErrNotFound) {
		return api.Principal{}, nil, api.Unauthorized("invalid token: its tenant does not exist")
	}
	if err != nil {
		return api.Principal{}, nil, registryDown()
	}
	if t.Disabled() {
		return api.Principal{}, nil, tenantDisabled(t.Slug)
	}
	return api.Principal{TenantID: t.ID, Slug: t.Slug, Actor: "jwt:" + claims.Subject}, claims.scopes(), nil
}
