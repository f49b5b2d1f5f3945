package api

import (
	"slices"
	"strings"

	"github.com/gofiber/fiber/v2"

	"github.com/analyticsd/analyticsd/internal/excerpt"
)

// RepeatedParam refuses a query parameter given more than once (n=1&n=100000), except those in
// multi, which take several values: fiber's c.Query returns the first, and silently taking it would
// answer another request than the one sent. multi[0], if any, is named in the message.
func RepeatedParam(c *fiber.Ctx, multi ...string) *Error {
	var err *Error
	seen := map[string]bool{}
	c.Context().QueryArgs().VisitAll(func(k, _ []byte) {
		key := string(k)
		if err != nil || slices.Contains(multi, key) {
			return
		}
		if seen[key] {
			msg := excerpt.Short(key) + "= is given more than once; give it once"
			if len(multi) > 0 {
				msg += " (only " + multi[0] + " takes several values)"
			}
			err = BadRequest("invalid_parameter", msg)
		}
		seen[key] = true
	})
	return err
}

// UnknownParam refuses a query parameter not in allowed, naming the ones the route takes: a
// misspelt filter (evnt=, start=, from_date=) silently ignored answers a wider request than the one
// meant — every event instead of one kind, the default 30 days instead of the range asked (found by
// review).
func UnknownParam(c *fiber.Ctx, allowed []string) *Error {
	var err *Error
	c.Context().QueryArgs().VisitAll(func(k, _ []byte) {
		if err == nil && !slices.Contains(allowed, string(k)) {
			err = BadRequest("invalid_parameter", excerpt.Short(string(k))+"= is not a parameter of "+c.Path()+"; it takes "+strings.Join(allowed, ", "))
		}
	})
	return err
}
