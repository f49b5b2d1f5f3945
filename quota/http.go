package quota

import (
	"errors"
	"strconv"

	"github.com/gofiber/fiber/v2"

	"github.com/analyticsd/analyticsd/api"
	"github.com/analyticsd/analyticsd/ratelimit"
)

// Register mounts GET /quotas, GET /quotas/:metric (read) and POST /quotas/:metric/consume (write,
// which may leave the request's rate-limit token to the consume script: ratelimit.Limiter.Defer),
// each consume behind writeMW (e.g. the Idempotency-Key middleware) after write.
func (s *Service) Register(r fiber.Router, read, write fiber.Handler, writeMW ...fiber.Handler) {
	r.Get("/quotas", read, s.getAll)
	r.Get("/quotas/:metric", read, s.getOne)
	r.Post("/quotas/:metric/consume", append([]fiber.Handler{write}, append(writeMW, s.postConsume)...)...)
}

func (s *Service) getAll(c *fiber.Ctx) error {
	p, _ := api.PrincipalOf(c)
	states, err := s.States(c.UserContext(), p.TenantID)
	if err != nil {
		return httpError(err)
	}
	return api.OK(c, states)
}

func (s *Service) getOne(c *fiber.Ctx) error {
	p, _ := api.PrincipalOf(c)
	metric := c.Params("metric") // a copy: api.NewApp's app hands out no borrowed strings
	st, err := s.State(c.UserContext(), p.TenantID, metric)
	if err != nil {
		return httpError(err)
	}
	return api.OK(c, st)
}

func (s *Service) postConsume(c *fiber.Ctx) error {
	p, _ := api.PrincipalOf(c)
	metric := c.Params("metric") // outlives the handler (increment, alerts, labels): a copy, see api.NewApp
	n := int64(1)
	if v := c.Query("n"); v != "" {
		var err error
		if n, err = strconv.ParseInt(v, 10, 64); err != nil || n < 1 || n > 1_000_000_000 {
			return api.BadRequest("invalid_parameter", "n must be a whole number from 1 to 1000000000 (default 1)")
		}
	}
	// The request's meter, when the route left it to us (ratelimit.Limiter.Defer), is taken by the
	// consume script itself: one Redis round trip instead of two.
	m := ratelimit.MeterOf(c)
	key := c.Get("Idempotency-Key")
	res, err := s.ConsumeWith(c.UserContext(), p.TenantID, metric, n, ConsumeOptions{Meter: m, IdempotencyKey: key})
	if err := m.Apply(c); err != nil {
		return err
	}
	switch {
	case err != nil:
		return httpError(err)
	case !res.Allowed:
		return api.TooMany("quota_exceeded", "quota "+metric+" would be exceeded: "+strconv.FormatFloat(res.Current, 'f', -1, 64)+" of "+
			strconv.FormatFloat(res.Limit, 'f', -1, 64)+" used today (UTC); it resets at 00:00 UTC", s.SecondsToNextDay()).WithDetails(res)
	}
	if res.Degraded {
		c.Set("X-Analytics-Degraded", "quota counters unavailable; allowed by QUOTA_FAIL_OPEN")
	}
	return api.OK(c, res)
}

// httpError maps quota's errors to responses: an unknown metric is a 404, a consume of a level a 400,
// counters that are down with QUOTA_FAIL_OPEN=false a 503 (which has never carried a Retry-After).
// The recorder's refusal (ingest's full buffer, its shutdown) is already a response and stays as it
// is. Anything else is state that could not be read: a 503 to retry in 5 s, its cause logged.
func httpError(err error) error {
	var unknown *UnknownMetricError
	var param *ParamError
	var resp *api.Error
	switch {
	case errors.As(err, &unknown):
		return api.NotFound("unknown_quota", "no quota is defined for "+strconv.Quote(unknown.Metric)+"; GET /api/analytics/quotas lists them")
	case errors.As(err, &param):
		return api.BadRequest("invalid_parameter", param.Msg)
	case errors.Is(err, ErrUnavailable):
		return api.Unavailable("quota_unavailable", ErrUnavailable.Error(), 0, nil)
	case errors.As(err, &resp):
		return resp
	}
	return api.Unavailable("quota_unavailable", "quota state is unavailable right now; retry shortly", 5, err)
}
