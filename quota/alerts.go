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

// catchUpAlerts fires the thresholds that today's counter of metric, now at value, is at or past
// and whose alert Redis has no mark of: thresholds a reconciliation took it past (rows the live
// counters missed, counted from ClickHouse after a fault), thresholds whose crossing could not be
// decided (Redis unreachable then), and thresholds of a limit lowered below the count. The
// reconciler calls it for each counter it recomputes, so an alert is at most one interval late.
// A mark Redis lost is set again here (a SET NX per threshold passed); whether the alert had fired
// is then for fire to find out.
func (s *Service) catchUpAlerts(ctx context.Context, tenant uuid.UUID, metric string, d time.Time, value int64) {
	now := s.now().UTC()
	if !s.cfg.Enabled || !IsDaily(metric) || !d.Equal(now.Truncate(24*time.Hour)) {
		return
	}
	limit, ok := s.limits.Of(ctx, tenant, metric)
	if !ok || limit <= 0 {
		return
	}
	for _, pct := range s.cfg.Thresholds {
		if float64(value) < limit*float64(pct)/100 {
			continue
		}
		first, err := s.counters.MarkOnce(ctx, tenant, metric+":"+strconv.Itoa(pct), d)
		if err != nil {
			s.log.Warn("quota alerts not caught up: redis unavailable", "tenant", tenant, "metric", metric, "err", err)
			return
		}
		if first {
			s.alerts.push(alert{tenant: tenant, metric: metric, pct: pct, cur: float64(value), limit: limit, day: d, at: now}, s.fire)
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

// fire records an alert — an event in the tenant's stream, an audit row, the metric, the log and
// the webhook — if its row in quota_alerts is new. Redis decided the crossing; Postgres keeps what
// fired when Redis loses its marks. With Postgres unreachable the alert is recorded anyway: a rare
// second alert is better than a missing one.
func (s *Service) fire(a alert) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	slug := s.limits.Slug(ctx, a.tenant)
	if s.pg != nil {
		tag, err := s.pg.Exec(ctx, `INSERT INTO quota_alerts (day, tenant_id, metric, threshold) VALUES ($1, $2, $3, $4)
			ON CONFLICT DO NOTHING`, a.day, a.tenant, a.metric, a.pct)
		switch {
		case err != nil:
			s.log.Warn("quota alert recorded without checking that it had not fired", "tenant", slug, "metric", a.metric, "err", err)
		case tag.RowsAffected() == 0:
			s.log.Info("quota alert had fired already", "tenant", slug, "metric", a.metric, "threshold_percent", a.pct)
			return
		default:
			// Only today's rows decide anything: each alert deletes the rows of the days before
			// yesterday, a range at the start of the primary key (empty after a day's first).
			if _, err := s.pg.Exec(ctx, "DELETE FROM quota_alerts WHERE day < $1", a.day.Add(-24*time.Hour)); err != nil {
				s.log.Warn("old quota alert rows not deleted", "err", err)
			}
		}
	}
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
