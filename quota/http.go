package quota

import (
	"errors"
	"net/http"
	"strconv"

	"github.com/gofiber/fiber/v2"

	"github.com/analyticsd/analyticsd/api"
)

// Register mounts GET /quotas, GET /quotas/:metric (read) and POST /quotas/:metric/consume (write,
// which may leave the rate-limit check to the consume script: see api.Meter), each consume behind
// writeMW (e.g. the Idempotency-Key middleware) after write.
func (s *Service) Register(r fiber.Router, read, write fiber.Handler, writeMW ...fiber.Handler) {
	r.Get("/quotas", read, s.getAll)
	r.Get("/quotas/:metric", read, s.getOne)
	r.Post("/quotas/:metric/consume", append([]fiber.Handler{write}, append(writeMW, s.postConsume)...)...)
}

func (s *Service) getAll(c *fiber.Ctx) error {
	p, _ := api.PrincipalOf(c)
	states, err := s.States(c.UserContext(), p.TenantID)
	if err != nil {
		return s.unavailable(err)
	}
	return api.OK(c, states)
}

func notFound(metric string) error {
	return &api.Error{Status: http.StatusNotFound, Code: "unknown_quota",
		Message: "no quota is defined for " + strconv.Quote(metric) + "; GET /api/analytics/quotas lists them"}
}

func (s *Service) getOne(c *fiber.Ctx) error {
	p, _ := api.PrincipalOf(c)
	metric := c.Params("metric") // a copy: api.NewApp's app hands out no borrowed strings
	st, err := s.State(c.UserContext(), p.TenantID, metric)
	if errors.Is(err, ErrUnknownMetric) {
		return notFound(metric)
	}
	if err != nil {
		return s.unavailable(err)
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
	// The rate-limit token, when the route left it to us (auth.RequireDeferred), is taken by the
	// consume script itself: one Redis round trip instead of two.
	m := api.MeterOf(c)
	var gate *Gate
	if m != nil {
		gate = &Gate{}
		gate.Key, gate.Rate, gate.Burst = m.Bucket()
	}
	key := c.Get("Idempotency-Key")
	res, err := s.ConsumeWith(c.UserContext(), p.TenantID, metric, n, ConsumeOptions{Gate: gate, IdempotencyKey: key})
	if gate != nil && gate.Ran {
		if err := m.Apply(c, gate.Allowed, gate.MilliTokens); err != nil {
			return err
		}
	}
	switch {
	case errors.Is(err, ErrUnknownMetric):
		return notFound(metric)
	case err != nil:
		var se api.StatusError
		if errors.As(err, &se) {
			return err
		}
		return s.unavailable(err)
	case !res.Allowed:
		return &api.Error{Status: http.StatusTooManyRequests, Code: "quota_exceeded",
			Message: "quota " + metric + " would be exceeded: " + strconv.FormatFloat(res.Current, 'f', -1, 64) + " of " +
				strconv.FormatFloat(res.Limit, 'f', -1, 64) + " used today (UTC); it resets at 00:00 UTC",
			Details: res, Header: map[string]string{fiber.HeaderRetryAfter: strconv.Itoa(s.SecondsToNextDay())}}
	}
	if res.Degraded {
		c.Set("X-Analytics-Degraded", "quota counters unavailable; allowed by QUOTA_FAIL_OPEN")
	}
	return api.OK(c, res)
}

func (s *Service) unavailable(err error) error {
	var se api.StatusError
	if errors.As(err, &se) {
		return err
	}
	return &api.Error{Status: http.StatusServiceUnavailable, Code: "quota_unavailable",
		Message: "quota state is unavailable right now; retry shortly", Header: map[string]string{fiber.HeaderRetryAfter: "5"}, Cause: err}
}
