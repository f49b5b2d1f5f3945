package quota

import (
	"context"
	"strconv"
	"sync"
	"time"

	"github.com/google/uuid"

	"github.com/analyticsd/analyticsd/audit"
)

// checkAlerts fires each threshold the counter crossed from prev to cur, once per tenant, metric and
// day across all instances (a Redis SET NX decides which instance fires). The decision is made here,
// on the path of whatever counted (a consume, ingest's claim of a request's rows, a shipment); the
// firing is queued (see alertQueue).
func (s *Service) checkAlerts(ctx context.Context, tenant uuid.UUID, metric string, prev, cur, limit float64) {
	if limit <= 0 {
		return
	}
	now := s.now().UTC()
	day := now.Truncate(24 * time.Hour)
	for _, pct := range s.cfg.Thresholds {
		bound := limit * float64(pct) / 100
		if !(prev < bound && cur >= bound) {
			continue
		}
		first, err := s.counters.MarkOnce(ctx, tenant, metric+":"+strconv.Itoa(pct), day)
		if err != nil {
			s.log.Warn("quota alert not recorded: redis unavailable", "tenant", tenant, "metric", metric, "err", err)
			continue
		}
		if first {
			s.alerts.push(alert{tenant: tenant, metric: metric, pct: pct, cur: cur, limit: limit, day: day, at: now}, s.fire)
		}
	}
}

// alert is one threshold crossing to record, with the day and time it was found.
type alert struct {
	tenant     uuid.UUID
	metric     string
	pct        int
	cur, limit float64
	day, at    time.Time
}

// alertQueue records alerts in the order they were found, on one goroutine, so that the request
// that crossed a threshold does not wait for it. Recording an alert stores an event (a spool write
// and fsync), inserts an audit row in Postgres and queues the webhook: with Postgres slow, the
// consume or ingest request that crossed 80 % and 100 % waited for two audit inserts (6 s with
// every packet delayed 1 s, TestAlertsDoNotHoldTheCrossingRequest), up to 10 s each when it hangs.
// Alerts are rare (one per tenant, metric, threshold and day), so the queue has no bound.
type alertQueue struct {
	mu      sync.Mutex
	queue   []alert
	running bool          // a goroutine is draining the queue
	idle    chan struct{} // closed when the running goroutine finds the queue empty
	closed  bool          // after close: pushes record at once, on the caller's goroutine
}

func (q *alertQueue) push(a alert, record func(alert)) {
	q.mu.Lock()
	if q.closed {
		q.mu.Unlock()
		record(a)
		return
	}
	q.queue = append(q.queue, a)
	if !q.running {
		q.running, q.idle = true, make(chan struct{})
		go q.drain(record)
	}
	q.mu.Unlock()
}

func (q *alertQueue) drain(record func(alert)) {
	for {
		q.mu.Lock()
		if len(q.queue) == 0 {
			q.running = false
			close(q.idle)
			q.mu.Unlock()
			return
		}
		a := q.queue[0]
		q.queue = q.queue[1:]
		q.mu.Unlock()
		record(a)
	}
}

// wait returns when everything queued so far is recorded, or when ctx ends.
func (q *alertQueue) wait(ctx context.Context) {
	q.mu.Lock()
	idle, running := q.idle, q.running
	q.mu.Unlock()
	if !running {
		return
	}
	select {
	case <-idle:
	case <-ctx.Done():
	}
}

func (q *alertQueue) close(ctx context.Context) {
	q.mu.Lock()
	q.closed = true
	q.mu.Unlock()
	q.wait(ctx)
}

// WaitAlerts returns when the alerts found so far are recorded (or ctx ends). serve calls it before
// the spool's last flush, so that their events are still taken.
func (s *Service) WaitAlerts(ctx context.Context) { s.alerts.wait(ctx) }

// fire records an alert: an event in the tenant's stream, an audit row, the metric, the log and the
// webhook.
func (s *Service) fire(a alert) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	slug := s.limits.Slug(ctx, a.tenant)
	kind := "quota.warning"
	if a.pct >= 100 {
		kind = "quota.exceeded"
		s.metrics.exceeded.WithLabelValues(s.tenants.Value(slug), a.metric).Inc()
	}
	s.metrics.alerts.WithLabelValues(strconv.Itoa(a.pct)).Inc()
	day := a.day.Format(time.DateOnly)
	props := map[string]any{"metric": a.metric, "current": a.cur, "limit": a.limit, "threshold_percent": a.pct, "day": day}
	if s.rec != nil {
		if err := s.rec.Emit(ctx, a.tenant, slug, kind, props); err != nil {
			s.log.Error("quota alert event not stored", "tenant", slug, "metric", a.metric, "err", err)
		}
	}
	if s.audit != nil {
		if err := s.audit.Record(ctx, audit.Entry{TenantID: a.tenant, Actor: "quota", Action: kind, Target: a.metric, Meta: props}); err != nil {
			s.log.Error("quota alert not audited", "tenant", slug, "metric", a.metric, "err", err)
		}
	}
	s.log.Info("quota alert", "type", kind, "tenant", slug, "metric", a.metric, "current", a.cur, "limit", a.limit)
	s.webhook.send(alertPayload{Type: kind, TenantID: a.tenant.String(), Tenant: slug, Metric: a.metric, Current: a.cur, Limit: a.limit,
		ThresholdPercent: a.pct, Day: day, At: a.at.Format(time.RFC3339)})
}
