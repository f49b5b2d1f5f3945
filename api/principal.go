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

// Meter is a request's rate-limit check left to its handler, which takes the token inside its own
// Redis script and so saves a round trip (auth's RequireDeferred sets it; quota consume uses it).
type Meter interface {
	// Bucket is what the script passes to ratelimit's take(): the key, the rate and the burst.
	Bucket() (key string, rate float64, burst int)
	// Apply reports take()'s outcome: it sets the rate-limit headers and, when the token was
	// refused, returns the 429 to answer with.
	Apply(c *fiber.Ctx, allowed bool, milliTokens int64) error
	// TakeNow takes the token the usual way, for a request answered without the handler (an
	// Idempotency-Key replay): it returns the 429 when refused.
	TakeNow(c *fiber.Ctx) error
}

const meterKey = "analyticsd.meter"

// SetMeter leaves the request's rate-limit check to its handler.
func SetMeter(c *fiber.Ctx, m Meter) { c.Locals(meterKey, m) }

// MeterOf returns the check the handler must make; nil when the request was metered already or
// rate limits are off.
func MeterOf(c *fiber.Ctx) Meter {
	m, _ := c.Locals(meterKey).(Meter)
	return m
}
