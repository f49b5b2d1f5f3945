package auth

import (
	"context"
	"crypto/sha256"
	"errors"
	"strings"
	"sync"
	"time"

	"github.com/gofiber/fiber/v2"
	"github.com/google/uuid"

	"github.com/analyticsd/analyticsd/api"
	"github.com/analyticsd/analyticsd/tenant"
)

// TenantFinder is what the middleware needs of the tenant registry.
type TenantFinder interface {
	ByID(ctx context.Context, id uuid.UUID) (tenant.Tenant, error)
}

// Authenticator turns "Authorization: Bearer <token>" (+ optional X-Tenant-Slug) into an
// api.Principal, checking the scope a route needs.
//
// Verified keys are cached: for FreshFor (default 5 s) a key is trusted without asking Postgres, so a
// revocation takes effect within that time on every instance. While Postgres is unreachable, a key
// verified within StaleFor (default 1 h) keeps working — analytics must not fail because the registry
// blinked — and unknown keys are refused with 503.
type Authenticator struct {
	Keys     *Keys
	Tenants  TenantFinder
	FreshFor time.Duration
	StaleFor time.Duration
	now      func() time.Time

	mu    sync.Mutex
	cache map[[32]byte]cached
}

type cached struct {
	key      Key
	slug     string
	verified time.Time
	err      error // ErrInvalidKey / ErrRevokedKey, cached briefly too
}

// NewAuthenticator returns an Authenticator over keys and tenants.
func NewAuthenticator(keys *Keys, tenants TenantFinder) *Authenticator {
	return &Authenticator{Keys: keys, Tenants: tenants, FreshFor: 5 * time.Second, StaleFor: time.Hour, now: time.Now,
		cache: map[[32]byte]cached{}}
}

const maxCached = 100_000

// verify returns the key record and its tenant's slug, from the cache when fresh.
func (a *Authenticator) verify(ctx context.Context, token string) (Key, string, error) {
	h := sha256.Sum256([]byte(token))
	now := a.now()
	a.mu.Lock()
	c, hit := a.cache[h]
	a.mu.Unlock()
	if hit && now.Sub(c.verified) < a.FreshFor {
		return c.key, c.slug, c.err
	}
	key, err := a.Keys.Verify(ctx, token)
	var slug string
	if err == nil {
		var t tenant.Tenant
		t, err = a.Tenants.ByID(ctx, key.TenantID)
		slug = t.Slug
	}
	if err != nil && !errors.Is(err, ErrInvalidKey) && !errors.Is(err, ErrRevokedKey) {
		// The registry is unreachable: fall back to a recent verification.
		if hit && c.err == nil && now.Sub(c.verified) < a.StaleFor {
			return c.key, c.slug, nil
		}
		return Key{}, "", err
	}
	a.mu.Lock()
	if len(a.cache) >= maxCached {
		clear(a.cache)
	}
	a.cache[h] = cached{key: key, slug: slug, verified: now, err: err}
	a.mu.Unlock()
	return key, slug, err
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
// X-Tenant-Slug header is sent, belongs to that tenant.
func (a *Authenticator) Require(scope Scope) fiber.Handler {
	return func(c *fiber.Ctx) error {
		token, ok := bearer(c.Get(fiber.HeaderAuthorization))
		if !ok {
			return api.Unauthorized("missing credential: send Authorization: Bearer <API key>")
		}
		if !LooksLikeKey(token) {
			return api.Unauthorized("invalid credential: the bearer token is not an analyticsd API key")
		}
		key, slug, err := a.verify(c.UserContext(), token)
		switch {
		case errors.Is(err, ErrInvalidKey):
			return api.Unauthorized("invalid API key")
		case errors.Is(err, ErrRevokedKey):
			return api.Unauthorized("API key has been revoked")
		case err != nil:
			return &api.Error{Status: fiber.StatusServiceUnavailable, Code: "auth_unavailable",
				Message: "cannot verify credentials right now; retry shortly", Header: map[string]string{"Retry-After": "5"}}
		}
		if want := c.Get("X-Tenant-Slug"); want != "" && want != slug {
			return api.Forbidden("X-Tenant-Slug does not match the credential's tenant")
		}
		if !key.Has(scope) {
			return api.Forbidden("API key lacks the " + string(scope) + " scope")
		}
		api.SetPrincipal(c, api.Principal{TenantID: key.TenantID, Slug: slug, Actor: "apikey:" + key.Prefix})
		return c.Next()
	}
}
