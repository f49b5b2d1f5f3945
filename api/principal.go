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
