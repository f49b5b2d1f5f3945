package quota

import (
	"encoding/json"
	"errors"
	"math"
	"net/http"
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

// Levels is the level half of POST /usage, mounted by ingest's Register in that route's chain before
// its own handler. A level metric (storage_gb: a value that is set, not counted) is answered here:
// {"metric":"storage_gb","value":12.5} is stored in usage_levels, and a count of it is refused. Every
// other request goes on to ingest, which counts it — and answers every body that is not a plain
// usage request (not JSON, unknown fields, a metric that is not a string), so those are refused
// exactly as for any metric.
func (s *Service) Levels(c *fiber.Ctx) error {
	var req map[string]json.RawMessage
	if err := json.Unmarshal(c.Request().Body(), &req); err != nil {
		return c.Next()
	}
	for k := range req {
		if k != "metric" && k != "n" && k != "value" {
			return c.Next()
		}
	}
	var metric string
	if err := json.Unmarshal(req["metric"], &metric); err != nil || !s.IsLevel(metric) {
		return c.Next()
	}
	value := req["value"]
	if len(value) == 0 || string(value) == "null" {
		return api.BadRequest("invalid_body", metric+` is a level, not a count: send {"metric":"`+metric+`","value":12.5}`)
	}
	v, err := strconv.ParseFloat(string(value), 64)
	if err != nil || v < 0 || v > 1e15 || v != v {
		return api.BadRequest("invalid_value", "value must be a number from 0 to 1e15")
	}
	if s.cfg.AnalyticsDisabled {
		return api.Respond(c, http.StatusAccepted, fiber.Map{"metric": metric, "value": v, "accepted": 0, "disabled": true})
	}
	p, _ := api.PrincipalOf(c)
	if err := s.SetLevel(c.UserContext(), p.TenantID, metric, v); err != nil {
		return api.Unavailable("storage_unavailable", "could not store the level; retry shortly", 5, err)
	}
	return api.Respond(c, http.StatusAccepted, fiber.Map{"metric": metric, "value": v, "accepted": 1})
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
	if err := api.RepeatedParam(c); err != nil {
		return err
	}
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
	key := api.IdempotencyKeyOf(c) // set by the Idempotency middleware, which checked it
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
	body, ok := res.appendEnvelope(make([]byte, 0, 192))
	if !ok {
		return api.OK(c, res)
	}
	c.Status(http.StatusOK)
	c.Response().SetBodyRaw(body)
	c.Response().Header.SetContentType(fiber.MIMEApplicationJSON)
	return nil
}

// appendEnvelope appends api.OK's body for r — {"data":{...},"success":true}, byte for byte what
// encoding/json writes for it (TestConsumeBodyIsEncodingJSONs) — without reflection or the
// envelope's map (the JSON encoding was ~4 % of a consume's allocated bytes and CPU). ok=false:
// a value it does not write by hand (a metric name that needs escaping, a number JSON cannot
// hold); the caller then uses api.OK.
func (r ConsumeResult) appendEnvelope(b []byte) ([]byte, bool) {
	for i := 0; i < len(r.Metric); i++ {
		if c := r.Metric[i]; !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '_' || c == '.' || c == '-' || c == ':') {
			return b, false
		}
	}
	b = append(b, `{"data":{"metric":"`...)
	b = append(b, r.Metric...)
	b = append(b, `","allowed":`...)
	b = strconv.AppendBool(b, r.Allowed)
	var ok bool
	for _, f := range [...]struct {
		name string
		v    float64
	}{{`,"current":`, r.Current}, {`,"limit":`, r.Limit}, {`,"remaining":`, r.Remaining}} {
		b = append(b, f.name...)
		if b, ok = appendJSONFloat(b, f.v); !ok {
			return b, false
		}
	}
	b = append(b, `,"exceeded":`...)
	b = strconv.AppendBool(b, r.Exceeded)
	if r.Degraded {
		b = append(b, `,"degraded":true`...)
	}
	if r.Disabled {
		b = append(b, `,"disabled":true`...)
	}
	return append(b, `},"success":true}`...), true
}

// appendJSONFloat writes f as encoding/json does (its floatEncoder): %f-like below 1e21 and from
// 1e-6, exponent form outside, with "e-07" written "e-7". NaN and ±Inf: ok=false (JSON has none).
func appendJSONFloat(b []byte, f float64) ([]byte, bool) {
	if math.IsNaN(f) || math.IsInf(f, 0) {
		return b, false
	}
	format := byte('f')
	if abs := math.Abs(f); abs != 0 && (abs < 1e-6 || abs >= 1e21) {
		format = 'e'
	}
	b = strconv.AppendFloat(b, f, format, -1, 64)
	if format == 'e' {
		if n := len(b); n >= 4 && b[n-4] == 'e' && b[n-3] == '-' && b[n-2] == '0' {
			b[n-2] = b[n-1]
			b = b[:n-1]
		}
	}
	return b, true
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
	case errors.Is(err, ErrKeyReused):
		return api.Unprocessable("idempotency_key_reused", ErrKeyReused.Error())
	case errors.Is(err, ErrUnavailable):
		return api.Unavailable("quota_unavailable", ErrUnavailable.Error(), 0, nil)
	case errors.As(err, &resp):
		return resp
	}
	return api.Unavailable("quota_unavailable", "quota state is unavailable right now; retry shortly", 5, err)
}
