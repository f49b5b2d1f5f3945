package api

import (
	"github.com/gofiber/fiber/v2"
	"github.com/google/uuid"
)

// Principal is who a request acts for: a tenant, and the credential that proved it. The auth
// middleware sets it; handlers read it, and take the tenant from it — never from the request body.
type Principal struct {
	TenantID uuid.UUID
	Slug     string
	// Actor names the credential for audit logs and rate limits: "apikey:<prefix>" or "jwt:<sub>".
	Actor string
}

const principalKey = "analyticsd.principal"

// SetPrincipal attaches p to the request.
func SetPrincipal(c *fiber.Ctx, p Principal) { c.Locals(principalKey, p) }

// PrincipalOf returns the request's principal; ok is false on routes without authentication.
func PrincipalOf(c *fiber.Ctx) (Principal, bool) {
	p, ok := c.Locals(principalKey).(Principal)
	return p, ok
}

// Meter is a request's rate-limit token left to its handler, whose own Redis script takes it in the
// same round trip (ratelimit.Limiter.Defer sets it; ratelimit.MeterOf is the handler's side). It
// is carried here so that a middleware answering without the handler needs no rate-limit code.
type Meter interface {
	// TakeNow takes the token the usual way, for a request answered without the handler (an
	// Idempotency-Key replay): it returns the 429 when refused.
	TakeNow(c *fiber.Ctx) error
}

const meterKey = "analyticsd.meter"

// SetMeter leaves the request's rate-limit token to its handler.
func SetMeter(c *fiber.Ctx, m Meter) { c.Locals(meterKey, m) }

// MeterOf returns the request's meter; nil when the request was metered already or rate limits
// are off.
func MeterOf(c *fiber.Ctx) Meter {
	m, _ := c.Locals(meterKey).(Meter)
	return m
}

const idempotencyKey = "analyticsd.idempotency_key"

// SetIdempotencyKey records that the request's Idempotency-Key is checked (dedup's middleware): only
// then may a handler derive row ids from it.
func SetIdempotencyKey(c *fiber.Ctx, key string) { c.Locals(idempotencyKey, key) }

// IdempotencyKeyOf returns the request's Idempotency-Key as its middleware checked it: "" on a route
// without that middleware (the Segment endpoints, where messageId decides, or deduplication off),
// whatever the request's header says. Ids derived from a key nothing checks would make a second,
// different request under the same key a "duplicate" of the first, dropped.
func IdempotencyKeyOf(c *fiber.Ctx) string {
	k, _ := c.Locals(idempotencyKey).(string)
	return k
}
