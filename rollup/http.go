package rollup

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/gofiber/fiber/v2"

	"github.com/analyticsd/analyticsd/api"
)

// MaxAgeDays is how far back an on-demand run (HTTP) may go; older days are the CLI's, for operators.
const MaxAgeDays = 400

// ParseDate reads an on-demand run's date=YYYY-MM-DD: a UTC day before today (today is still being
// counted; publishing it would freeze a partial count as the billed record until tomorrow's run) and at
// most MaxAgeDays before it.
func ParseDate(s string, now time.Time) (time.Time, error) {
	if s == "" {
		return time.Time{}, badDate("date is required: POST /api/analytics/rollup?date=YYYY-MM-DD (a UTC day)")
	}
	day, err := time.Parse(time.DateOnly, s)
	if err != nil {
		if len(s) > 40 {
			s = s[:40] + "…"
		}
		return time.Time{}, badDate(fmt.Sprintf("date=%q is not a date: use YYYY-MM-DD (a UTC day), e.g. 2024-01-15", s))
	}
	today := Day(now)
	if day.After(today) {
		return time.Time{}, badDate(fmt.Sprintf("date %s is in the future: today (UTC) is %s", s, today.Format(time.DateOnly)))
	}
	if day.Equal(today) {
		return time.Time{}, badDate(fmt.Sprintf("date %s is today (UTC), which is still being counted: reconcile a past day; "+
			"today is reconciled automatically after midnight UTC", s))
	}
	if day.Before(today.AddDate(0, 0, -MaxAgeDays)) {
		return time.Time{}, badDate(fmt.Sprintf("date %s is more than %d days ago: ask an operator to run `analyticsd rollup --date %s`", s, MaxAgeDays, s))
	}
	return day, nil
}

// DateError is a date an on-demand run cannot take; its message says which dates it can.
type DateError struct{ Msg string }

func (e *DateError) Error() string { return e.Msg }

func badDate(msg string) error { return &DateError{msg} }

// Register mounts POST /rollup?date=YYYY-MM-DD on r behind admin (the analytics:admin middleware). It
// reconciles the caller's tenant only and answers {date, tenants, metrics, rows, duration_ms, ...}.
func (r *Reconciler) Register(router fiber.Router, admin fiber.Handler) {
	router.Post("/rollup", admin, r.postRollup)
}

func (r *Reconciler) postRollup(c *fiber.Ctx) error {
	p, ok := api.PrincipalOf(c)
	if !ok {
		return api.Unauthorized("missing credential: send Authorization: Bearer <API key or token>")
	}
	if err := api.RepeatedParam(c); err != nil {
		return err
	}
	day, err := ParseDate(c.Query("date"), r.now())
	if err != nil {
		return httpError(err)
	}
	ctx, cancel := context.WithTimeout(c.UserContext(), 5*time.Minute)
	defer cancel()
	res, err := r.RunDate(ctx, day, OneTenant(p.TenantID), p.Actor)
	if err != nil {
		return httpError(err)
	}
	return api.OK(c, res)
}

// httpError maps the endpoint's errors to responses: a date it cannot take is a 400; a run that
// failed (ClickHouse or Postgres did not answer) is a 503 to retry in 30 s, its cause logged.
func httpError(err error) error {
	var date *DateError
	if errors.As(err, &date) {
		return api.BadRequest("invalid_parameter", date.Msg)
	}
	return api.Unavailable("rollup_failed", "the rollup did not complete because analytics storage did not answer; retry shortly", 30, err)
}
