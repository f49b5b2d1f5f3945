package ratelimit

import (
	"math"
	"strconv"
	"time"

	"github.com/gofiber/fiber/v2"

	"github.com/analyticsd/analyticsd/api"
)

// Limit is middleware, mounted after authentication, that takes one token from the bucket of the
// request's credential (its api.Principal) and sets the X-RateLimit-* headers; a refusal is the 429.
// Redis being unreachable lets the request through: analytics must not fail because its rate
// limiter did. Without limits, or on a route without a principal, it passes the request on.
func (l *Limiter) Limit(c *fiber.Ctx) error {
	p, ok := api.PrincipalOf(c)
	if !l.Enabled() || !ok {
		return c.Next()
	}
	if err := l.take(c, p); err != nil {
		return err
	}
	return c.Next()
}

// Defer is Limit for a handler that takes the request's token inside its own Redis script: it leaves
// the request a Meter (MeterOf), which the handler passes to its Script and then Applies. A request
// that fails before a script took its token is metered here afterwards, so an error can still become
// a 429 — never a success, which the handler may already have acted on.
func (l *Limiter) Defer(c *fiber.Ctx) error {
	p, ok := api.PrincipalOf(c)
	if !l.Enabled() || !ok {
		return c.Next()
	}
	m := &Meter{l: l, p: p}
	api.SetMeter(c, m)
	err := c.Next()
	if err != nil && !m.taken {
		// The handler stopped before its script took the token (a bad request, Redis unreachable):
		// meter the request the usual way, so those are rate-limited too.
		if lerr := l.take(c, p); lerr != nil {
			return lerr
		}
	}
	return err
}

// Meter is a request's rate-limit token left to its handler by Defer: the handler's own Redis script
// takes it (Script.Run), saving the limiter's round trip, and Apply answers for it. It implements
// api.Meter, through which a middleware that answers without the handler (an Idempotency-Key replay)
// takes it with TakeNow. A request's meter is taken once, by whichever comes first.
type Meter struct {
	l        *Limiter
	p        api.Principal
	taken    bool     // by a script or by TakeNow
	byScript bool     // by a script: d is its outcome, for Apply
	d        Decision // the script's outcome
}

// MeterOf returns the request's meter; nil when the route takes the token itself (Limit) or rate
// limits are off. Every method of Meter accepts nil.
func MeterOf(c *fiber.Ctx) *Meter {
	m, _ := api.MeterOf(c).(*Meter)
	return m
}

// Refused reports whether a script took the meter's token and was refused: the step did not run.
func (m *Meter) Refused() bool { return m != nil && m.byScript && !m.d.Allowed }

// Apply answers for the token a script took: it sets the X-RateLimit-* headers and, when the token
// was refused, returns the 429 to answer with. With no script having taken it, it does nothing.
func (m *Meter) Apply(c *fiber.Ctx) error {
	if m == nil || !m.byScript {
		return nil
	}
	return m.l.answer(c, m.p, m.d)
}

// TakeNow takes the token the usual way, for a request answered without its handler: it returns the
// 429 when refused. A meter taken already is left as it is.
func (m *Meter) TakeNow(c *fiber.Ctx) error {
	if m == nil || m.taken {
		return nil
	}
	m.taken = true
	return m.l.take(c, m.p)
}

// take takes one token of p's bucket and answers for it; Redis unreachable lets the request through.
func (l *Limiter) take(c *fiber.Ctx, p api.Principal) error {
	d, err := l.Allow(c.UserContext(), p.TenantID.String(), p.Actor)
	if err != nil {
		return nil
	}
	return l.answer(c, p, d)
}

// answer sets the rate-limit headers of a decision and, when it refuses, returns the 429 (telling
// OnLimited at most once a minute per credential).
func (l *Limiter) answer(c *fiber.Ctx, p api.Principal, d Decision) error {
	c.Set("X-RateLimit-Limit", strconv.Itoa(d.Limit))
	c.Set("X-RateLimit-Remaining", strconv.Itoa(d.Remaining))
	c.Set("X-RateLimit-Reset", strconv.Itoa(int(math.Ceil(d.Reset.Seconds()))))
	if d.Allowed {
		return nil
	}
	if l.OnLimited != nil && l.firstInAMinute(p, time.Now()) {
		go l.OnLimited(p)
	}
	return api.TooMany("rate_limited", "too many requests for this credential; slow down and retry after the Retry-After seconds",
		max(1, int(math.Ceil(d.Retry.Seconds()))))
}

// firstInAMinute reports whether p's credential was refused for the first time in a minute (and
// remembers now if so). A credential is its tenant and actor: two tenants' JWTs may carry the same
// sub ("jwt:<sub>"), and one tenant's refusals must not silence the other's.
func (l *Limiter) firstInAMinute(p api.Principal, now time.Time) bool {
	k := p.TenantID.String() + "\x00" + p.Actor
	l.mu.Lock()
	defer l.mu.Unlock()
	if now.Sub(l.limitedAt[k]) < time.Minute {
		return false
	}
	if len(l.limitedAt) >= maxLimited {
		clear(l.limitedAt)
	}
	l.limitedAt[k] = now
	return true
}

// maxLimited bounds the credentials remembered for OnLimited.
const maxLimited = 100_000
