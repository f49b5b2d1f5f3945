package ingest

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"regexp"
	"slices"
	"sort"
	"strconv"
	"time"

	"github.com/gofiber/fiber/v2"
	"github.com/google/uuid"

	"github.com/analyticsd/analyticsd/api"
	"github.com/analyticsd/analyticsd/internal/clock"
	"github.com/analyticsd/analyticsd/internal/logger"
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
	log     *slog.Logger
	now     func() time.Time
}

// NewService wires the ingest API. counter may be nil (no live counters).
func NewService(cfg Config, w *Writer, counter Counter, m *Metrics, log *slog.Logger) *Service {
	if cfg.EventMetrics == nil {
		cfg.EventMetrics = DefaultEventMetrics()
	}
	log = logger.Or(log)
	s := &Service{cfg: cfg, w: w, metrics: m, log: log, now: clock.Now}
	if counter != nil {
		s.counts = newLiveCounts(counter, m, log, cfg.CounterEvery)
		go s.counts.run()
		if w != nil {
			// Rows counted live when accepted but found at ship time to be duplicates, or quarantined:
			// their live counts are taken back.
			// With claims, a row is counted by the claim that proves it new (at request time, or when
			// shipped if that claim could not be made).
			w.sh.live.Store(&liveHooks{
				uncounted: func(tenant uuid.UUID, d, received time.Time, metric string, n int64) {
					s.counts.add(map[countKey]map[string]int64{{tenant, d, received}: {metric: -n}})
				},
				eventMetrics: cfg.EventMetrics,
				counted: func(tenant uuid.UUID, d time.Time, metric string, by, value int64) {
					ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
					defer cancel()
					counter.Counted(ctx, tenant, d, metric, by, value)
				},
			})
		}
	}
	return s
}

// RecordIncrement stores an increment durably. counted says the live counters have it already
// (quota's consume counted it in its own script); otherwise its claim counts it. With an idempotency
// key the increment's id is derived from it, so a retried consume stores its spend once. It
// implements part of quota.Recorder, for quota's consume endpoint: a refusal (the buffer is full, the
// server is shutting down) comes back as the response ingest's own endpoints give (httpError).
func (s *Service) RecordIncrement(ctx context.Context, tenant uuid.UUID, metric string, n int64, at time.Time, idempotencyKey string, counted bool) error {
	id := newID()
	if idempotencyKey != "" {
		// The metric is part of the name: the same key on another metric's consume is another spend.
		id = derivedID(tenant, "consume\x00"+metric, idempotencyKey, 0)
	}
	b := newBatch(nil, []Increment{{ID: id, TenantID: tenant, Ts: at.UTC().Truncate(time.Second), Metric: metric, N: n}})
	b.setFlags(idempotencyKey == "", counted)
	_, err := s.store(ctx, b)
	return httpError(err)
}

// Emit adds a server-generated event (e.g. apikey.rate_limited) to the tenant's own stream, durably.
func (s *Service) Emit(ctx context.Context, tenant uuid.UUID, slug, event string, props map[string]any) error {
	return s.emit(ctx, tenant, slug, event, props, "")
}

// EmitOnce is Emit for an event that may be sent again (a quota alert recorded a second time after
// a crash): its id is derived from key, so within the dedup window a second one is a duplicate and
// stored and counted nowhere.
func (s *Service) EmitOnce(ctx context.Context, tenant uuid.UUID, slug, event, key string, props map[string]any) error {
	return s.emit(ctx, tenant, slug, event, props, key)
}

func (s *Service) emit(ctx context.Context, tenant uuid.UUID, slug, event string, props map[string]any, key string) error {
	if !s.cfg.Enabled {
		return nil
	}
	b, err := json.Marshal(props)
	if err != nil {
		return err
	}
	now := s.now().UTC()
	id := newID()
	if key != "" {
		id = derivedID(tenant, "emit\x00"+event, key, 0)
	}
	row := Row{ID: id, TenantID: tenant, Ts: now.Truncate(time.Second), ReceivedAt: now.Truncate(time.Second), Event: event, Source: "job", Props: string(b)}
	bt := newBatch([]Row{row}, nil)
	bt.setFlags(key == "", false)
	if _, err := s.store(ctx, bt); err != nil {
		return err
	}
	s.count(api.Principal{TenantID: tenant, Slug: slug}, bt, now)
	return nil
}

// Close stops the live counter feed after flushing what it holds. Close the Writer separately.
func (s *Service) Close() { s.counts.close() }

// Register mounts POST /events and POST /usage on r behind mw (authentication first, then e.g. the
// Idempotency-Key middleware); both take gzip bodies. levels, when not nil, answers the /usage
// requests that name a level metric (storage_gb: set, not counted), just before postUsage; quota owns
// them (quota.Service.Levels).
func (s *Service) Register(r fiber.Router, levels fiber.Handler, mw ...fiber.Handler) {
	r.Post("/events", append(slices.Clip(mw), s.postEvents)...)
	usage := append(slices.Clip(mw), plainBody)
	if levels != nil {
		usage = append(usage, levels)
	}
	r.Post("/usage", append(usage, s.postUsage)...)
}

// maxUsageBody caps a POST /usage body once decompressed (a usage request is a few dozen bytes).
const maxUsageBody = 64 << 10

// plainBody decodes a POST /usage body's Content-Encoding in place — gzip, as POST /events takes it,
// or none — so the handlers after it (quota's levels among them) read plain JSON. Any other encoding
// is a 415, not bytes read as JSON (a "br" body was stored as if it were plain), and a body over
// maxUsageBody once decompressed is a 413.
func plainBody(c *fiber.Ctx) error {
	enc := c.Request().Header.Peek(fiber.HeaderContentEncoding)
	if len(enc) == 0 && len(c.Request().Body()) <= maxUsageBody {
		return c.Next()
	}
	body, err := Decompress(c.Request().Body(), string(enc), maxUsageBody)
	if err != nil {
		return httpError(err)
	}
	if len(enc) > 0 {
		c.Request().SetBody(body)
		c.Request().Header.Del(fiber.HeaderContentEncoding)
	}
	return c.Next()
}

// EventsResult is the body of a 202 (or, with nothing accepted, the details of a 400).
type EventsResult struct {
	// Accepted counts the events stored by this request.
	Accepted int         `json:"accepted"`
	Rejected []ItemError `json:"rejected"`
	// Duplicates are events acknowledged without being stored again: their id was already taken, by
	// an earlier request of the tenant (within the dedup window) or earlier in this one.
	Duplicates []Duplicate `json:"duplicates"`
	// Disabled is set when ANALYTICS_ENABLED=false: nothing was stored.
	Disabled bool   `json:"disabled,omitempty"`
	Message  string `json:"message,omitempty"`
}

// Duplicate is one event of a request that was already stored.
type Duplicate struct {
	Index int       `json:"index"`
	ID    uuid.UUID `json:"id"`
}

// idempotencyKey is the request's Idempotency-Key when the Idempotency middleware checked it, ""
// otherwise (see api.IdempotencyKeyOf).
func idempotencyKey(c *fiber.Ctx) string { return api.IdempotencyKeyOf(c) }

func (s *Service) postEvents(c *fiber.Ctx) error {
	p, _ := api.PrincipalOf(c)
	if !s.cfg.Enabled {
		return api.Respond(c, http.StatusAccepted, EventsResult{Rejected: []ItemError{}, Disabled: true,
			Message: "analytics is disabled on this server (ANALYTICS_ENABLED=false); events were not stored"})
	}
	format, err := FormatOf(c.Get(fiber.HeaderContentType))
	if err != nil {
		return httpError(err)
	}
	// The raw body: fiber's c.Body() would gunzip it without any size limit.
	body, err := Decompress(c.Request().Body(), c.Get(fiber.HeaderContentEncoding), s.cfg.Limits.MaxBodyBytes)
	if err != nil {
		return httpError(err)
	}
	events, rejected, err := Decode(body, format, s.cfg.Limits.MaxEvents)
	if err != nil {
		return httpError(err)
	}
	now := s.now()
	key := idempotencyKey(c)
	rows := make([]Row, 0, len(events))
	index := make([]int, 0, len(events)) // each row's position in the request
	var dups []Duplicate
	first := make(map[uuid.UUID]bool, len(events))
	minted := key == "" // every id made here: none sent, and no key to derive them from
	for i := range events {
		row, err := s.cfg.Limits.Validate(&events[i], p.TenantID, now)
		if err != nil {
			rejected = append(rejected, ItemError{Index: events[i].index, Line: events[i].line, Error: err.Error()})
			continue
		}
		if events[i].ID == "" && key != "" {
			// A retry of this request (same key, same body) gets the same ids, so its events are
			// recognised as duplicates even when the key's stored response is gone.
			row.ID = derivedID(p.TenantID, "event", key, events[i].index)
		}
		if first[row.ID] {
			dups = append(dups, Duplicate{events[i].index, row.ID})
			continue
		}
		minted = minted && events[i].ID == ""
		first[row.ID] = true
		rows = append(rows, row)
		index = append(index, events[i].index)
	}
	sort.Slice(rejected, func(i, j int) bool { return rejected[i].Index < rejected[j].Index })
	if len(rejected) > 0 {
		s.metrics.Rejected.WithLabelValues("validation").Add(float64(len(rejected)))
	}
	res := EventsResult{Rejected: rejected}
	if res.Rejected == nil {
		res.Rejected = []ItemError{}
	}
	if len(rows) == 0 {
		res.Duplicates = []Duplicate{}
		return api.BadRequest("invalid_events", fmt.Sprintf("no event was accepted: %d rejected; see details.rejected for each one", len(rejected))).WithDetails(res)
	}
	b := newBatch(rows, nil)
	b.setFlags(minted, false)
	checked, err := s.store(c.UserContext(), b)
	if err != nil {
		return httpError(err)
	}
	if !checked {
		c.Set("X-Analytics-Degraded", "duplicates not checked at request time (redis unavailable); they are dropped before storage")
	}
	res.Accepted = len(rows)
	evDup, _, _, _ := b.claim.get()
	for i, d := range evDup {
		if d {
			dups = append(dups, Duplicate{index[i], rows[i].ID})
			res.Accepted--
		}
	}
	sort.Slice(dups, func(i, j int) bool { return dups[i].Index < dups[j].Index })
	res.Duplicates = dups
	if res.Duplicates == nil {
		res.Duplicates = []Duplicate{}
	}
	if len(dups) > 0 {
		s.metrics.Duplicates.WithLabelValues("request").Add(float64(len(dups)))
	}
	s.count(p, b, now)
	return api.Respond(c, http.StatusAccepted, res)
}

// store appends a batch durably, then claims its ids; a full or closing writer refuses the batch
// (*FullError, ErrClosed). It reports whether the claims were checked: false when Redis could not
// answer (the rows are then checked when shipped) or when the writer keeps nothing durable to claim
// against.
func (s *Service) store(ctx context.Context, b *batch) (bool, error) {
	if err := s.w.Append(ctx, b); err != nil {
		return false, err
	}
	claims := s.w.sh.claims
	if claims == nil || b.minted {
		return true, nil // nothing to claim, or nothing that can have a copy
	}
	if !s.w.Durable() {
		// A claim must never outlive a row that was not kept: in memory mode ids are claimed when
		// shipped, not here.
		return false, nil
	}
	// The rows are durable: only now may their ids be claimed. (A claim made before, by a request
	// that then failed, would turn the client's retry into a loss.)
	evDup, incDup, epoch, err := s.claim(ctx, claims, b)
	if err != nil {
		s.metrics.ClaimErrors.Inc()
		s.log.Warn("event ids not claimed at request time; they are checked when shipped", "err", err)
		return false, nil
	}
	b.claim.settle(evDup, incDup, epoch)
	return true, nil
}

// claim claims a batch's ids, events and increments apart (a batch belongs to one tenant), counting
// the rows that are new in the same step.
func (s *Service) claim(ctx context.Context, claims Claims, b *batch) (evDup, incDup []bool, epoch time.Time, err error) {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 2*time.Second)
	defer cancel()
	now := s.now()
	var dup [2][]bool
	for k, kind := range [2]Kind{KindEvent, KindIncrement} {
		tenant, ids := b.ids(kind)
		if len(ids) == 0 {
			continue
		}
		unit := func(i int) (string, int64, time.Time, time.Time) { return s.w.sh.unit(kind, b, i, now) }
		if dup[k], epoch, err = claims.Claim(ctx, tenant, kind, b.wid, ids, unit, s.w.sh.countedFor(tenant)); err != nil {
			return nil, nil, epoch, err
		}
	}
	return dup[0], dup[1], epoch, nil
}

// count updates Prometheus for the rows of b that are new (duplicates found by the claim are not
// counted again) and, without claims, feeds the live quota counters; with claims the claim that
// proved the rows new has counted them already (or will, when they ship).
func (s *Service) count(p api.Principal, b *batch, now time.Time) {
	evDup, incDup, _, settled := b.claim.get()
	rows, incs := b.events, b.incs
	if settled {
		rows, incs = keep(rows, evDup), keep(incs, incDup)
	}
	live := s.w == nil || s.w.sh.claims == nil || b.minted
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
		s.metrics.Events.WithLabelValues(tenant, s.metrics.events.Value(tenant, k.event), k.source).Add(float64(n))
	}
	for _, d := range deltas {
		for metric, n := range d {
			if n > 0 {
				s.metrics.Usage.WithLabelValues(tenant, s.metrics.events.Value(tenant, metric)).Add(float64(n))
			}
		}
	}
	if live {
		s.counts.addNow(deltas)
	}
}

// UsageRequest is the contract's increment_usage(metric, n) (docs/contract.md).
type UsageRequest struct {
	Metric string          `json:"metric"`
	N      json.RawMessage `json:"n"`
	// Value sets a level metric (storage_gb) instead of adding to a count. Levels are answered before
	// postUsage (Register's levels), so a value that reaches it names a counted metric: refused.
	Value json.RawMessage `json:"value"`
}

var metricRe = regexp.MustCompile(`^[a-z][a-z0-9_-]*$`)

// ValidMetric reports whether m is a well-formed usage metric name (≤128 bytes): lowercase letters,
// digits, '_' and '-', starting with a letter, and no '.'. Metric names and event names are two
// namespaces that cannot meet — an event name always has a '.' (ValidEventName) — so an increment
// can never be counted as an event, nor an event as an increment, in daily_usage, /usage or the KPIs.
func ValidMetric(m string) bool { return len(m) <= 128 && metricRe.MatchString(m) }

// MetricRule says what ValidMetric wants, for error messages.
const MetricRule = "a usage metric is lowercase letters, digits, '_' or '-', starting with a letter, at most 128 bytes, and has no '.' (dotted names are event names), e.g. \"api_requests_daily\""

func (s *Service) postUsage(c *fiber.Ctx) error {
	p, _ := api.PrincipalOf(c)
	var req UsageRequest
	if err := json.Unmarshal(c.Request().Body(), &req); err != nil {
		return api.BadRequest("invalid_body", `body must be JSON like {"metric":"api_requests_daily","n":1}`)
	}
	if err := unknownField(c.Request().Body(), usageFields); err != nil {
		return api.BadRequest("invalid_body", err.Error())
	}
	if ValidEventName(req.Metric) {
		return api.BadRequest("invalid_metric", strconv.Quote(req.Metric)+" is an event name: events are counted from POST /api/analytics/events, and "+MetricRule)
	}
	if !ValidMetric(req.Metric) {
		return api.BadRequest("invalid_metric", "metric: "+MetricRule)
	}
	if len(req.Value) > 0 && string(req.Value) != "null" {
		return api.BadRequest("invalid_body", req.Metric+` is counted, not a level: send {"metric":"`+req.Metric+`","n":1} (value is for level metrics such as storage_gb)`)
	}
	n := int64(1)
	if len(req.N) > 0 && string(req.N) != "null" {
		v, err := strconv.ParseInt(string(req.N), 10, 64)
		if err != nil || v < 1 || v > 1_000_000_000 {
			// No negative n: usage is what tenants are billed on, and a write key must not be able
			// to erase its own.
			return api.BadRequest("invalid_n", "n must be a whole number from 1 to 1000000000 (default 1); usage cannot be taken back")
		}
		n = v
	}
	if !s.cfg.Enabled {
		return api.Respond(c, http.StatusAccepted, fiber.Map{"metric": req.Metric, "n": n, "accepted": 0, "disabled": true,
			"message": "analytics is disabled on this server (ANALYTICS_ENABLED=false); usage was not stored"})
	}
	now := s.now().UTC()
	id := newID()
	if key := idempotencyKey(c); key != "" {
		id = derivedID(p.TenantID, "usage", key, 0)
	}
	inc := Increment{ID: id, TenantID: p.TenantID, Ts: now.Truncate(time.Second), Metric: req.Metric, N: n}
	b := newBatch(nil, []Increment{inc})
	b.setFlags(idempotencyKey(c) == "", false)
	checked, err := s.store(c.UserContext(), b)
	if err != nil {
		return httpError(err)
	}
	if !checked {
		c.Set("X-Analytics-Degraded", "duplicates not checked at request time (redis unavailable); they are dropped before storage")
	}
	s.count(p, b, now)
	accepted, duplicate := 1, false
	if _, incDup, _, ok := b.claim.get(); ok && incDup[0] {
		accepted, duplicate = 0, true
	}
	return api.Respond(c, http.StatusAccepted, fiber.Map{"metric": req.Metric, "n": n, "accepted": accepted, "duplicate": duplicate, "id": inc.ID})
}

// keep returns the elements of xs whose dup flag is false.
func keep[T any](xs []T, dup []bool) []T {
	if !slices.Contains(dup, true) {
		return xs
	}
	out := make([]T, 0, len(xs))
	for i := range xs {
		if !dup[i] {
			out = append(out, xs[i])
		}
	}
	return out
}

// idNamespace is the UUID namespace of ids derived from idempotency keys.
var idNamespace = uuid.MustParse("6f1c2d3e-4a5b-4c6d-8e7f-a0b1c2d3e4f5")

// derivedID is the id of the index-th row of a request sent with an Idempotency-Key: a name-based
// (SHA-1, version 5) UUID of the tenant, the endpoint, the key and the position, so a retry of the
// request yields the same ids and its rows are recognised as duplicates.
func derivedID(tenant uuid.UUID, scope, key string, index int) uuid.UUID {
	return uuid.NewSHA1(idNamespace, []byte(tenant.String()+"\x00"+scope+"\x00"+key+"\x00"+strconv.Itoa(index)))
}

// newID is the id of a row that came without one: a time-ordered UUID (version 7).
func newID() uuid.UUID {
	id, err := uuid.NewV7()
	if err != nil {
		return uuid.New()
	}
	return id
}

// httpError maps ingest's errors to responses, for both endpoints and for quota's consume (through
// RecordIncrement): a body refused as a whole is a 400, 413 or 415 with the decoder's message; a full
// writer and a closing one are 503s with Retry-After, so clients back off instead of losing events.
// Anything else stays as it is: a logged 500 here, quota's own 503 for a consume. Refusals of single
// fields are the handlers' own.
func httpError(err error) error {
	if err == nil {
		return nil
	}
	var req *RequestError
	var full *FullError
	switch {
	case errors.As(err, &req) && errors.Is(req.Kind, ErrTooLarge):
		return api.TooLarge(req.Message)
	case errors.As(err, &req) && errors.Is(req.Kind, ErrUnsupported):
		return api.Unsupported(req.Message)
	case errors.As(err, &req):
		return api.BadRequest("invalid_body", req.Message)
	case errors.As(err, &full):
		return api.Unavailable("ingest_unavailable", full.Error(), full.RetryAfterSeconds(), nil)
	case errors.Is(err, ErrClosed):
		return api.Unavailable("shutting_down", "server is shutting down; retry on another instance", 1, nil)
	}
	return err
}
