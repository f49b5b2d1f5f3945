package ingest

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"regexp"
	"sort"
	"strconv"
	"time"

	"github.com/gofiber/fiber/v2"
	"github.com/google/uuid"

	"github.com/analyticsd/analyticsd/api"
)

// Config shapes the ingest endpoints.
type Config struct {
	Enabled      bool // ANALYTICS_ENABLED: false makes ingest an acknowledged no-op
	Limits       Limits
	EventMetrics map[string]string // event → daily quota metric (QUOTA_EVENT_MAP)
	// CounterEvery is how often live counter deltas are sent to Redis (default 100 ms).
	CounterEvery time.Duration
}

// Service is the ingest API: it validates, stores through the Writer and bumps live counters.
type Service struct {
	cfg     Config
	w       *Writer
	metrics *Metrics
	counts  *liveCounts
	levels  Levels
	log     *slog.Logger
	now     func() time.Time
}

// NewService wires the ingest API. counter may be nil (no live counters).
func NewService(cfg Config, w *Writer, counter Counter, m *Metrics, log *slog.Logger) *Service {
	if cfg.EventMetrics == nil {
		cfg.EventMetrics = DefaultEventMetrics()
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	s := &Service{cfg: cfg, w: w, metrics: m, log: log, now: time.Now}
	if counter != nil {
		s.counts = newLiveCounts(counter, m, log, cfg.CounterEvery)
		go s.counts.run()
	}
	return s
}

// Levels sets level metrics (e.g. storage_gb: a value that is set, not counted); *quota.Service
// implements it.
type Levels interface {
	IsLevel(metric string) bool
	SetLevel(ctx context.Context, tenant uuid.UUID, metric string, value float64) error
}

// UseLevels lets POST /usage set level metrics with {"metric":"storage_gb","value":12.5}.
func (s *Service) UseLevels(l Levels) { s.levels = l }

// RecordIncrement stores an increment durably without touching the live counters (quota's consume
// has already counted it). It implements part of quota.Recorder.
func (s *Service) RecordIncrement(ctx context.Context, tenant uuid.UUID, metric string, n int64) error {
	now := s.now().UTC()
	return s.store(ctx, nil, []Increment{{ID: uuid.New(), TenantID: tenant, Ts: now.Truncate(time.Second), Metric: metric, N: n}})
}

// Emit adds a server-generated event (e.g. quota.exceeded) to the tenant's own stream, durably.
func (s *Service) Emit(ctx context.Context, tenant uuid.UUID, slug, event string, props map[string]any) error {
	if !s.cfg.Enabled {
		return nil
	}
	b, err := json.Marshal(props)
	if err != nil {
		return err
	}
	now := s.now().UTC()
	row := Row{ID: uuid.New(), TenantID: tenant, Ts: now.Truncate(time.Second), ReceivedAt: now.Truncate(time.Second), Event: event, Source: "job", Props: string(b)}
	if err := s.store(ctx, []Row{row}, nil); err != nil {
		return err
	}
	s.count(api.Principal{TenantID: tenant, Slug: slug}, []Row{row}, nil, now)
	return nil
}

// Close stops the live counter feed after flushing what it holds. Close the Writer separately.
func (s *Service) Close() { s.counts.close() }

// Register mounts POST /events and POST /usage on r; write is the auth middleware they require.
func (s *Service) Register(r fiber.Router, write fiber.Handler) {
	r.Post("/events", write, s.postEvents)
	r.Post("/usage", write, s.postUsage)
}

// EventsResult is the body of a 202 (or, with nothing accepted, the details of a 400).
type EventsResult struct {
	Accepted int         `json:"accepted"`
	Rejected []ItemError `json:"rejected"`
	// Disabled is set when ANALYTICS_ENABLED=false: nothing was stored.
	Disabled bool   `json:"disabled,omitempty"`
	Message  string `json:"message,omitempty"`
}

func (s *Service) postEvents(c *fiber.Ctx) error {
	p, _ := api.PrincipalOf(c)
	if !s.cfg.Enabled {
		return api.Respond(c, http.StatusAccepted, EventsResult{Rejected: []ItemError{}, Disabled: true,
			Message: "analytics is disabled on this server (ANALYTICS_ENABLED=false); events were not stored"})
	}
	format, err := FormatOf(c.Get(fiber.HeaderContentType))
	if err != nil {
		return err
	}
	// The raw body: fiber's c.Body() would gunzip it without any size limit.
	body, err := Decompress(c.Request().Body(), c.Get(fiber.HeaderContentEncoding), s.cfg.Limits.MaxBodyBytes)
	if err != nil {
		return err
	}
	events, rejected, err := Decode(body, format, s.cfg.Limits.MaxEvents)
	if err != nil {
		return err
	}
	now := s.now()
	rows := make([]Row, 0, len(events))
	for i := range events {
		row, err := s.cfg.Limits.Validate(&events[i], p.TenantID, now)
		if err != nil {
			rejected = append(rejected, ItemError{events[i].index, err.Error()})
			continue
		}
		rows = append(rows, row)
	}
	sort.Slice(rejected, func(i, j int) bool { return rejected[i].Index < rejected[j].Index })
	if len(rejected) > 0 {
		s.metrics.Rejected.WithLabelValues("validation").Add(float64(len(rejected)))
	}
	res := EventsResult{Accepted: len(rows), Rejected: rejected}
	if res.Rejected == nil {
		res.Rejected = []ItemError{}
	}
	if len(rows) == 0 {
		return &api.Error{Status: http.StatusBadRequest, Code: "invalid_events",
			Message: fmt.Sprintf("no event was accepted: %d rejected; see details.rejected for each one", len(rejected)), Details: res}
	}
	if err := s.store(c.UserContext(), rows, nil); err != nil {
		return err
	}
	s.count(p, rows, nil, now)
	return api.Respond(c, http.StatusAccepted, res)
}

// store appends durably, turning a full or closing writer into a 503 with Retry-After.
func (s *Service) store(ctx context.Context, rows []Row, incs []Increment) error {
	err := s.w.Append(ctx, rows, incs)
	var full *FullError
	switch {
	case err == nil:
		return nil
	case errors.As(err, &full):
		return &api.Error{Status: http.StatusServiceUnavailable, Code: full.ErrorCode(), Message: full.Error(),
			Header: map[string]string{fiber.HeaderRetryAfter: strconv.Itoa(full.RetryAfterSeconds())}}
	case errors.Is(err, ErrClosed):
		return &api.Error{Status: http.StatusServiceUnavailable, Code: "shutting_down",
			Message: "server is shutting down; retry on another instance", Header: map[string]string{fiber.HeaderRetryAfter: "1"}}
	}
	return err
}

// count updates Prometheus and the live quota counters for what was just stored.
func (s *Service) count(p api.Principal, rows []Row, incs []Increment, now time.Time) {
	type es struct{ event, source string }
	perEvent := map[es]int{}
	deltas := map[countKey]map[string]int64{}
	today := now.UTC().Truncate(24 * time.Hour)
	bump := func(day time.Time, metric string, n int64) {
		// Live counters cover today and yesterday (late events); older days live in ClickHouse only.
		if day.Before(today.Add(-24*time.Hour)) || day.After(today) {
			return
		}
		k := countKey{p.TenantID, day, now.UTC().Truncate(time.Second)}
		if deltas[k] == nil {
			deltas[k] = map[string]int64{}
		}
		deltas[k][metric] += n
	}
	for i := range rows {
		perEvent[es{rows[i].Event, rows[i].Source}]++
		if metric, ok := s.cfg.EventMetrics[rows[i].Event]; ok {
			bump(rows[i].Ts.Truncate(24*time.Hour), metric, 1)
		}
	}
	for _, in := range incs {
		bump(in.Ts.Truncate(24*time.Hour), in.Metric, in.N)
	}
	tenant := s.metrics.tenants.Value(p.Slug)
	for k, n := range perEvent {
		s.metrics.Events.WithLabelValues(tenant, s.metrics.events.Value(k.event), k.source).Add(float64(n))
	}
	for _, d := range deltas {
		for metric, n := range d {
			if n > 0 {
				s.metrics.Usage.WithLabelValues(tenant, s.metrics.events.Value(metric)).Add(float64(n))
			}
		}
	}
	s.counts.add(deltas)
}

// UsageRequest is the guide's increment_usage(metric, n).
type UsageRequest struct {
	Metric string          `json:"metric"`
	N      json.RawMessage `json:"n"`
	// Value sets a level metric (storage_gb) instead of adding to a count.
	Value json.RawMessage `json:"value"`
}

var metricRe = regexp.MustCompile(`^[a-z][a-z0-9_.-]*$`)

// ValidMetric reports whether m is a well-formed usage metric name (≤128 bytes).
func ValidMetric(m string) bool { return len(m) <= 128 && metricRe.MatchString(m) }

func (s *Service) postUsage(c *fiber.Ctx) error {
	p, _ := api.PrincipalOf(c)
	var req UsageRequest
	if err := json.Unmarshal(c.Request().Body(), &req); err != nil {
		return api.BadRequest("invalid_body", `body must be JSON like {"metric":"api_requests_daily","n":1}`)
	}
	if !ValidMetric(req.Metric) {
		return api.BadRequest("invalid_metric", "metric must be lowercase letters, digits, '_', '.' or '-', starting with a letter, at most 128 bytes, e.g. \"api_requests_daily\"")
	}
	if len(req.Value) > 0 && string(req.Value) != "null" {
		return s.setLevel(c, p, req)
	}
	if s.levels != nil && s.levels.IsLevel(req.Metric) {
		return api.BadRequest("invalid_body", req.Metric+` is a level, not a count: send {"metric":"`+req.Metric+`","value":12.5}`)
	}
	n := int64(1)
	if len(req.N) > 0 && string(req.N) != "null" {
		v, err := strconv.ParseInt(string(req.N), 10, 64)
		if err != nil || v == 0 || v > 1_000_000_000 || v < -1_000_000_000 {
			return api.BadRequest("invalid_n", "n must be a non-zero whole number between -1000000000 and 1000000000 (default 1)")
		}
		n = v
	}
	if !s.cfg.Enabled {
		return api.Respond(c, http.StatusAccepted, fiber.Map{"metric": req.Metric, "n": n, "accepted": 0, "disabled": true,
			"message": "analytics is disabled on this server (ANALYTICS_ENABLED=false); usage was not stored"})
	}
	now := s.now().UTC()
	inc := Increment{ID: uuid.New(), TenantID: p.TenantID, Ts: now.Truncate(time.Second), Metric: req.Metric, N: n}
	if err := s.store(c.UserContext(), nil, []Increment{inc}); err != nil {
		return err
	}
	s.count(p, nil, []Increment{inc}, now)
	return api.Respond(c, http.StatusAccepted, fiber.Map{"metric": req.Metric, "n": n, "accepted": 1, "id": inc.ID})
}

func (s *Service) setLevel(c *fiber.Ctx, p api.Principal, req UsageRequest) error {
	if s.levels == nil || !s.levels.IsLevel(req.Metric) {
		return api.BadRequest("invalid_body", req.Metric+` is counted, not a level: send {"metric":"`+req.Metric+`","n":1} (value is for level metrics such as storage_gb)`)
	}
	v, err := strconv.ParseFloat(string(req.Value), 64)
	if err != nil || v < 0 || v > 1e15 || v != v {
		return api.BadRequest("invalid_value", "value must be a number from 0 to 1e15")
	}
	if !s.cfg.Enabled {
		return api.Respond(c, http.StatusAccepted, fiber.Map{"metric": req.Metric, "value": v, "accepted": 0, "disabled": true})
	}
	if err := s.levels.SetLevel(c.UserContext(), p.TenantID, req.Metric, v); err != nil {
		return &api.Error{Status: http.StatusServiceUnavailable, Code: "storage_unavailable", Message: "could not store the level; retry shortly",
			Header: map[string]string{fiber.HeaderRetryAfter: "5"}, Cause: err}
	}
	return api.Respond(c, http.StatusAccepted, fiber.Map{"metric": req.Metric, "value": v, "accepted": 1})
}
