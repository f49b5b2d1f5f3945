package quota

import (
	"context"
	"slices"
	"strconv"
	"sync"
	"time"

	"github.com/google/uuid"

	"github.com/analyticsd/analyticsd/audit"
	"github.com/analyticsd/analyticsd/erasure"
)

// How an alert fires once per tenant, metric, threshold and UTC day:
//
//   - Deciding. The request whose counting crossed the threshold sets a Redis mark (SET NX) and
//     queues the alert if it set it: a fast first answer across instances, on the request path.
//   - Recording, off the request path (alertQueue): the alert is claimed in Postgres'
//     quota_alerts, then its event is stored, its audit row written, the claim marked recorded,
//     and the webhook queued. A claim never marked recorded (a crash, an event the spool refused)
//     goes stale after alertClaimStale and may be claimed again.
//   - Catching up. Each reconciliation looks, for the counters it recomputed (today and yesterday),
//     at every threshold they are at or past, and queues those Postgres has no recorded or fresh
//     claim of — whatever Redis's marks say: a threshold passed by reconciliation rather than by a
//     live crossing, a crossing Redis could not decide, a limit lowered below the count, an alert a
//     crash or a refused event left unrecorded. Postgres, not Redis, is what says an alert fired,
//     so Redis losing its marks fires nothing twice.

// alertClaimStale is how long a claim in quota_alerts holds an alert that was not recorded: well
// beyond the longest recording (each step has its own timeout of a few seconds).
const alertClaimStale = 2 * time.Minute

// checkAlerts decides the thresholds the counter of day d crossed from prev to cur (see above).
func (s *Service) checkAlerts(ctx context.Context, tenant uuid.UUID, metric string, d time.Time, prev, cur, limit float64) {
	if limit <= 0 {
		return
	}
	now := s.now().UTC()
	for _, pct := range s.cfg.Thresholds {
		bound := limit * float64(pct) / 100
		if !(prev < bound && cur >= bound) {
			continue
		}
		first, err := s.counters.MarkOnce(ctx, tenant, metric+":"+strconv.Itoa(pct), d)
		if err != nil {
			s.log.Warn("quota alert not decided: redis unavailable; the next reconciliation fires it", "tenant", tenant, "metric", metric, "err", err)
			continue
		}
		if first {
			s.alerts.push(alert{tenant: tenant, metric: metric, pct: pct, cur: cur, limit: limit, day: d, at: now}, s.fire)
		}
	}
}

// alertDay reports whether alerts are kept for day d: today's and yesterday's (late rows), the days
// the live counters and the reconciliation cover.
func (s *Service) alertDay(d time.Time) bool {
	today := s.today()
	return d.Equal(today) || d.Equal(today.Add(-24*time.Hour))
}

// catchUpAlerts queues the alerts of day d that counters (tenant -> metric -> value) are at or past
// and that Postgres has neither recorded nor freshly claimed (see above). One query per call, and
// none when no counter is at a threshold.
func (s *Service) catchUpAlerts(ctx context.Context, d time.Time, counters map[uuid.UUID]map[string]int64) {
	if !s.cfg.Enabled || s.pg == nil || !s.alertDay(d) {
		return
	}
	var due []alert
	var tenants []uuid.UUID
	now := s.now().UTC()
	for tenant, values := range counters {
		n := len(due)
		for metric, value := range values {
			if !IsDaily(metric) {
				continue
			}
			limit, ok := s.limits.Of(ctx, tenant, metric)
			if !ok || limit <= 0 {
				continue
			}
			for _, pct := range s.cfg.Thresholds {
				if float64(value) >= limit*float64(pct)/100 {
					due = append(due, alert{tenant: tenant, metric: metric, pct: pct, cur: float64(value), limit: limit, day: d, at: now})
				}
			}
		}
		if len(due) > n {
			tenants = append(tenants, tenant)
		}
	}
	if len(due) == 0 {
		return
	}
	rows, err := s.pg.Query(ctx, `SELECT tenant_id, metric, threshold FROM quota_alerts
		WHERE day = $1 AND tenant_id = ANY($2) AND (recorded_at IS NOT NULL OR claimed_at > now() - make_interval(secs => $3))`,
		d, tenants, alertClaimStale.Seconds())
	if err != nil {
		s.log.Warn("quota alerts not caught up: postgres unavailable", "err", err)
		return
	}
	held := map[alertKey]bool{}
	for rows.Next() {
		var k alertKey
		if err := rows.Scan(&k.tenant, &k.metric, &k.pct); err != nil {
			rows.Close()
			s.log.Warn("quota alerts not caught up", "err", err)
			return
		}
		held[k] = true
	}
	if err := rows.Err(); err != nil {
		s.log.Warn("quota alerts not caught up", "err", err)
		return
	}
	for _, a := range due {
		if !held[a.key()] {
			s.alerts.push(a, s.fire)
		}
	}
}

// alert is one threshold crossing to record, with the day it counts on and when it was found.
type alert struct {
	tenant     uuid.UUID
	metric     string
	pct        int
	cur, limit float64
	day, at    time.Time
}

type alertKey struct {
	tenant uuid.UUID
	metric string
	pct    int
}

func (a alert) key() alertKey { return alertKey{a.tenant, a.metric, a.pct} }

// alertQueue records alerts in the order they were found, on one goroutine, so that the request
// that crossed a threshold does not wait for it. Recording an alert stores an event (a spool write
// and fsync) and writes to Postgres: with Postgres slow, the consume or ingest request that crossed
// 80 % and 100 % waited for two audit inserts (6 s with every packet delayed 1 s,
// TestAlertsDoNotHoldTheCrossingRequest), up to 10 s each when it hangs. An alert already queued
// is not queued again (reconciliation rounds may find it due until it is recorded), so the queue
// holds at most one entry per tenant, metric and threshold of the two days.
type alertQueue struct {
	mu      sync.Mutex
	queue   []alert
	pending map[alertKey]time.Time // queued or being recorded: the alert's day
	running bool                   // a goroutine is draining the queue
	idle    chan struct{}          // closed when the running goroutine finds the queue empty
	closed  bool                   // after close: pushes record at once, on the caller's goroutine
}

func (q *alertQueue) push(a alert, record func(alert)) {
	q.mu.Lock()
	if d, ok := q.pending[a.key()]; ok && d.Equal(a.day) {
		q.mu.Unlock()
		return
	}
	if q.closed {
		q.mu.Unlock()
		record(a)
		return
	}
	if q.pending == nil {
		q.pending = map[alertKey]time.Time{}
	}
	q.pending[a.key()] = a.day
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
		q.mu.Lock()
		delete(q.pending, a.key())
		q.mu.Unlock()
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

// WaitAlerts returns when the alerts found so far are recorded (or ctx ends). serve calls it, for a
// few seconds, before the spool's last flush, so that their events are still taken; one not
// recorded by then is caught up by the next reconciliation of any instance.
func (s *Service) WaitAlerts(ctx context.Context) { s.alerts.wait(ctx) }

// fire records an alert (see the top of this file). With Postgres unreachable the alert is recorded
// anyway: a rare second alert is better than a missing one.
func (s *Service) fire(a alert) {
	step := func() (context.Context, context.CancelFunc) {
		return context.WithTimeout(context.Background(), 5*time.Second)
	}
	ctx, cancel := step()
	slug := s.limits.Slug(ctx, a.tenant)
	cancel()
	claimed := false
	if s.pg != nil {
		ctx, cancel := step()
		var err error
		claimed, err = s.claimAlert(ctx, a)
		cancel()
		switch {
		case err != nil:
			s.log.Warn("quota alert recorded without checking that it had not fired", "tenant", slug, "metric", a.metric, "err", err)
		case !claimed:
			return // recorded, or being recorded, by another instance
		}
	}
	kind := "quota.warning"
	if a.pct >= 100 {
		kind = "quota.exceeded"
	}
	day := a.day.Format(time.DateOnly)
	props := map[string]any{"metric": a.metric, "current": a.cur, "limit": a.limit, "threshold_percent": a.pct, "day": day}
	if s.rec != nil {
		ctx, cancel := step()
		err := s.rec.Emit(ctx, a.tenant, slug, kind, props)
		cancel()
		if err != nil {
			// Released, so that the next reconciliation fires it again: the event is the part of
			// the alert the tenant sees in its own stream.
			s.log.Error("quota alert event not stored; the next reconciliation fires it again", "tenant", slug, "metric", a.metric, "err", err)
			if claimed {
				s.releaseAlert(a)
			}
			return
		}
	}
	if s.audit != nil {
		ctx, cancel := step()
		if err := s.audit.Record(ctx, audit.Entry{TenantID: a.tenant, Actor: "quota", Action: kind, Target: a.metric, Meta: props}); err != nil {
			s.log.Error("quota alert not audited", "tenant", slug, "metric", a.metric, "err", err)
		}
		cancel()
	}
	if claimed {
		ctx, cancel := step()
		if _, err := s.pg.Exec(ctx, "UPDATE quota_alerts SET recorded_at = now() WHERE day = $1 AND tenant_id = $2 AND metric = $3 AND threshold = $4",
			a.day, a.tenant, a.metric, a.pct); err != nil {
			s.log.Warn("quota alert not marked recorded: it may fire again", "tenant", slug, "metric", a.metric, "err", err)
		}
		cancel()
	}
	if kind == "quota.exceeded" {
		s.metrics.exceeded.WithLabelValues(s.tenants.Value(slug), a.metric).Inc()
	}
	s.metrics.alerts.WithLabelValues(strconv.Itoa(a.pct)).Inc()
	s.log.Info("quota alert", "type", kind, "tenant", slug, "metric", a.metric, "current", a.cur, "limit", a.limit)
	s.webhook.send(alertPayload{Type: kind, TenantID: a.tenant.String(), Tenant: slug, Metric: a.metric, Current: a.cur, Limit: a.limit,
		ThresholdPercent: a.pct, Day: day, At: a.at.Format(time.RFC3339)})
}

// claimAlert claims an alert in quota_alerts: a new row, or one whose claim went stale unrecorded.
// It reports false when the alert is recorded, or freshly claimed elsewhere, or when the tenant's
// data is being erased (an alert event then would outlive the erasure).
func (s *Service) claimAlert(ctx context.Context, a alert) (bool, error) {
	erasing, err := erasure.TenantsDeleting(ctx, s.pg, a.at.Add(-time.Minute))
	if err != nil {
		return false, err
	}
	if slices.Contains(erasing, a.tenant) {
		return false, nil
	}
	tag, err := s.pg.Exec(ctx, `INSERT INTO quota_alerts (day, tenant_id, metric, threshold) VALUES ($1, $2, $3, $4)
		ON CONFLICT (day, tenant_id, metric, threshold) DO UPDATE SET claimed_at = now()
		WHERE quota_alerts.recorded_at IS NULL AND quota_alerts.claimed_at <= now() - make_interval(secs => $5)`,
		a.day, a.tenant, a.metric, a.pct, alertClaimStale.Seconds())
	if err != nil {
		return false, err
	}
	if tag.RowsAffected() == 0 {
		return false, nil
	}
	// Only today's and yesterday's rows decide anything: each claim deletes older days', a range at
	// the start of the primary key (empty after a day's first).
	if _, err := s.pg.Exec(ctx, "DELETE FROM quota_alerts WHERE day < $1", s.today().Add(-24*time.Hour)); err != nil {
		s.log.Warn("old quota alert rows not deleted", "err", err)
	}
	return true, nil
}

// releaseAlert gives up a claim that was not recorded, so that a catch-up claims it again at once.
func (s *Service) releaseAlert(a alert) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if _, err := s.pg.Exec(ctx, "DELETE FROM quota_alerts WHERE day = $1 AND tenant_id = $2 AND metric = $3 AND threshold = $4 AND recorded_at IS NULL",
		a.day, a.tenant, a.metric, a.pct); err != nil {
		s.log.Warn("quota alert claim not released: it fires again once stale", "metric", a.metric, "err", err)
	}
}
