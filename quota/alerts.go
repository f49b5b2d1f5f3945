package quota

import (
	"context"
	"encoding/json"
	"errors"
	"slices"
	"strconv"
	"sync"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"

	"github.com/analyticsd/analyticsd/audit"
	"github.com/analyticsd/analyticsd/erasure"
)

// How an alert fires once per tenant, metric, threshold and UTC day:
//
//   - Deciding. The request whose counting crossed the threshold sets a Redis mark (SET NX) and
//     queues the alert if it set it: a fast first answer across instances, on the request path.
//   - Recording, off the request path (alertQueue): the alert is claimed in Postgres'
//     quota_alerts; its event is stored with an id derived from the alert (so a second one within
//     the dedup window is a duplicate); its audit row, the claim's "recorded" and the webhook's
//     payload (an outbox: webhook.go) commit together. A claim never marked
//     recorded (a crash, a refused event, a failed commit) goes stale after alertClaimStale and
//     may be claimed again; without Postgres nothing is recorded until it answers.
//   - Catching up. Each reconciliation looks, for the counters it recomputed (today and yesterday),
//     at every threshold they are at or past, and queues those Postgres has no recorded or fresh
//     claim of — whatever Redis's marks say: a threshold passed by reconciliation rather than by a
//     live crossing, a crossing Redis could not decide, a limit lowered below the count, an alert a
//     crash or a refused event left unrecorded. Postgres, not Redis, is what says an alert fired,
//     so Redis losing its marks fires nothing twice.
//   - Levels (storage_gb: set, not counted) decide in Postgres instead: the transaction that sets a
//     value across a threshold also writes the alert's row, unclaimed (owedAlert), and the
//     reconciliation fires owed rows left unrecorded (catchUpLevelAlerts). So a level's alert
//     fires on a crossing, once per day, and a crash, Redis or a failed recording cannot lose it.

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

// owedAlert writes a level's alert row unclaimed (a claim long stale), with the crossing's value and
// limit, so that claimAlert takes it and the catch-up finds it until it is recorded; nothing if the
// day's alert has a row already.
const owedAlert = `INSERT INTO quota_alerts (day, tenant_id, metric, threshold, claimed_at, level_value, level_limit)
	VALUES ($1, $2, $3, $4, '-infinity', $5, $6) ON CONFLICT DO NOTHING`

// catchUpLevelAlerts queues the level alerts of today and yesterday that are owed and unrecorded
// (their row unclaimed, or its claim stale), with the value and limit they crossed (a later value,
// back below the limit, would make a "quota.exceeded" read wrong: found by review). A level whose
// row was erased with its tenant fires nothing.
func (s *Service) catchUpLevelAlerts(ctx context.Context) {
	if !s.cfg.Enabled || s.pg == nil {
		return
	}
	var levels []string
	for m := range s.limits.defaults {
		if s.IsLevel(m) {
			levels = append(levels, m)
		}
	}
	if len(levels) == 0 {
		return
	}
	rows, err := s.pg.Query(ctx, `SELECT a.day, a.tenant_id, a.metric, a.threshold, coalesce(a.level_value, l.value), a.level_limit
		FROM quota_alerts a JOIN usage_levels l ON l.tenant_id = a.tenant_id AND l.metric = a.metric
		WHERE a.day >= $1 AND a.metric = ANY($2) AND a.recorded_at IS NULL
			AND a.claimed_at <= now() - make_interval(secs => $3)`,
		s.today().Add(-24*time.Hour), levels, alertClaimStale.Seconds())
	if err != nil {
		s.log.Warn("level alerts not caught up: postgres unavailable", "err", err)
		return
	}
	var due []alert
	now := s.now().UTC()
	for rows.Next() {
		a := alert{at: now}
		var limit *float64
		if err := rows.Scan(&a.day, &a.tenant, &a.metric, &a.pct, &a.cur, &limit); err != nil {
			rows.Close()
			s.log.Warn("level alerts not caught up", "err", err)
			return
		}
		if limit != nil {
			a.limit = *limit
		}
		due = append(due, a)
	}
	if err := rows.Err(); err != nil {
		s.log.Warn("level alerts not caught up", "err", err)
		return
	}
	for _, a := range due {
		if !s.alertDay(a.day) {
			continue
		}
		if a.limit <= 0 { // a row written before the crossing's limit was kept
			limit, ok := s.limits.Of(ctx, a.tenant, a.metric)
			if !ok || limit <= 0 {
				continue
			}
			a.limit = limit
		}
		s.alerts.push(a, s.fire)
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

type pendingKey struct {
	alertKey
	day int64
}

func (a alert) pending() pendingKey { return pendingKey{a.key(), a.day.Unix()} }

// alertQueue records alerts in the order they were found, on one goroutine, so that the request
// that crossed a threshold does not wait for it. Recording an alert stores an event (a spool write
// and fsync) and writes to Postgres: with Postgres slow, the consume or ingest request that crossed
// 80 % and 100 % waited for two audit inserts (6 s with every packet delayed 1 s,
// TestAlertsDoNotHoldTheCrossingRequest), up to 10 s each when it hung. An alert already queued
// is not queued again (reconciliation rounds may find it due until it is recorded), so the queue
// holds at most one entry per tenant, metric and threshold of the two days.
type alertQueue struct {
	mu      sync.Mutex
	queue   []alert
	pending map[pendingKey]bool // queued or being recorded
	running bool                // a goroutine is draining the queue
	idle    chan struct{}       // closed when the running goroutine finds the queue empty
	closed  bool                // after close: pushes record at once, on the caller's goroutine
}

func (q *alertQueue) push(a alert, record func(alert)) {
	q.mu.Lock()
	if q.pending[a.pending()] {
		q.mu.Unlock()
		return
	}
	if q.closed {
		q.mu.Unlock()
		record(a)
		return
	}
	if q.pending == nil {
		q.pending = map[pendingKey]bool{}
	}
	q.pending[a.pending()] = true
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
		delete(q.pending, a.pending())
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

// fire records an alert (see the top of this file): it claims the alert's row, stores its event
// (with an id derived from the alert, so that storing it again after a crash is a duplicate),
// writes the audit row, marks the claim recorded and makes the webhook due in one transaction, then
// counts, logs and wakes the webhook's delivery loop. Without Postgres nothing is recorded: the
// catch-up after it answers again fires the alert.
func (s *Service) fire(a alert) {
	step := func() (context.Context, context.CancelFunc) {
		return context.WithTimeout(context.Background(), 5*time.Second)
	}
	ctx, cancel := step()
	slug := s.limits.Slug(ctx, a.tenant)
	cancel()
	var token time.Time // the claim's claimed_at
	if s.pg != nil {
		ctx, cancel := step()
		held, tok, err := s.claimAlert(ctx, a)
		cancel()
		if err != nil {
			s.log.Warn("quota alert waits for postgres: the next reconciliation after it answers fires it", "tenant", slug, "metric", a.metric, "err", err)
			return
		}
		if !held {
			return // recorded or being recorded elsewhere, or the tenant's data is being erased
		}
		token = tok
	}
	kind := "quota.warning"
	if a.pct >= 100 {
		kind = "quota.exceeded"
	}
	day := a.day.Format(time.DateOnly)
	props := map[string]any{"metric": a.metric, "current": a.cur, "limit": a.limit, "threshold_percent": a.pct, "day": day}
	if s.rec != nil {
		ctx, cancel := step()
		err := s.rec.EmitOnce(ctx, a.tenant, slug, kind, day+"\x00"+a.metric+"\x00"+strconv.Itoa(a.pct), props)
		cancel()
		if err != nil {
			s.log.Error("quota alert event not stored; the next reconciliation fires it again", "tenant", slug, "metric", a.metric, "err", err)
			s.releaseAlert(a, token)
			return
		}
	}
	entry := audit.Entry{TenantID: a.tenant, Actor: "quota", Action: kind, Target: a.metric, Meta: props}
	var hook []byte
	if s.pg != nil {
		// The webhook's payload, due once the alert is recorded: stored whether or not this
		// instance has the URL, for the instances that do (a fleet part-way through setting it).
		var err error
		if hook, err = json.Marshal(alertPayload{ID: a.id().String(), Type: kind, TenantID: a.tenant.String(), Tenant: slug, Metric: a.metric,
			Current: a.cur, Limit: a.limit, ThresholdPercent: a.pct, Day: day, At: a.at.Format(time.RFC3339)}); err != nil {
			s.log.Error("quota alert webhook payload not built", "metric", a.metric, "err", err)
		}
		ctx, cancel := step()
		recorded, err := s.recordAlert(ctx, a, token, entry, hook)
		cancel()
		if err != nil {
			s.log.Error("quota alert not recorded: it fires again once its claim is stale (its event only once)", "tenant", slug, "metric", a.metric, "err", err)
			return
		}
		if !recorded {
			return // its claim went stale and another instance took it over
		}
	} else if s.audit != nil {
		ctx, cancel := step()
		if err := s.audit.Record(ctx, entry); err != nil {
			s.log.Error("quota alert not audited", "tenant", slug, "metric", a.metric, "err", err)
		}
		cancel()
	}
	if kind == "quota.exceeded" {
		s.metrics.exceeded.WithLabelValues(s.tenants.Value(slug), a.metric).Inc()
	}
	s.metrics.alerts.WithLabelValues(strconv.Itoa(a.pct)).Inc()
	s.log.Info("quota alert", "type", kind, "tenant", slug, "metric", a.metric, "current", a.cur, "limit", a.limit)
	if hook != nil {
		s.webhook.notify()
	}
}

// claimAlert claims an alert in quota_alerts: a new row, or one whose claim went stale unrecorded.
// It returns the claim's token (its claimed_at), or false when the alert is recorded, freshly
// claimed elsewhere, or when the tenant's data is being erased or was within minutes (an alert
// event then would outlive the erasure; the margin covers clocks that differ).
func (s *Service) claimAlert(ctx context.Context, a alert) (bool, time.Time, error) {
	erasing, err := erasure.TenantsErasing(ctx, s.pg)
	if err != nil {
		return false, time.Time{}, err
	}
	ended, err := erasure.TenantsDeleting(ctx, s.pg, a.at.Add(-5*time.Minute))
	if err != nil {
		return false, time.Time{}, err
	}
	if slices.Contains(erasing, a.tenant) || slices.Contains(ended, a.tenant) {
		return false, time.Time{}, nil
	}
	var token time.Time
	err = s.pg.QueryRow(ctx, `INSERT INTO quota_alerts (day, tenant_id, metric, threshold) VALUES ($1, $2, $3, $4)
		ON CONFLICT (day, tenant_id, metric, threshold) DO UPDATE SET claimed_at = now()
		WHERE quota_alerts.recorded_at IS NULL AND quota_alerts.claimed_at <= now() - make_interval(secs => $5)
		RETURNING claimed_at`, a.day, a.tenant, a.metric, a.pct, alertClaimStale.Seconds()).Scan(&token)
	if errors.Is(err, pgx.ErrNoRows) {
		return false, time.Time{}, nil
	}
	if err != nil {
		return false, time.Time{}, err
	}
	// Only today's and yesterday's rows decide anything: each claim deletes older days', a range at
	// the start of the primary key (empty after a day's first), with a day's margin for instances
	// whose clocks are on either side of midnight.
	if _, err := s.pg.Exec(ctx, "DELETE FROM quota_alerts WHERE day < $1", s.today().Add(-48*time.Hour)); err != nil {
		s.log.Warn("old quota alert rows not deleted", "err", err)
	}
	return true, token, nil
}

// recordAlert marks the claim (token) recorded, writes the audit row and, with hook, stores the
// webhook's payload due now, in one transaction; false when the claim is no longer this one (it went
// stale and another instance took it over).
func (s *Service) recordAlert(ctx context.Context, a alert, token time.Time, e audit.Entry, hook []byte) (bool, error) {
	recorded := false
	var body *string
	if hook != nil {
		b := string(hook)
		body = &b
	}
	err := pgx.BeginFunc(ctx, s.pg, func(tx pgx.Tx) error {
		tag, err := tx.Exec(ctx, `UPDATE quota_alerts SET recorded_at = now(),
				webhook_body = $6, webhook_due_at = CASE WHEN $6::text IS NULL THEN NULL ELSE now() END
			WHERE day = $1 AND tenant_id = $2 AND metric = $3 AND threshold = $4 AND claimed_at = $5 AND recorded_at IS NULL`,
			a.day, a.tenant, a.metric, a.pct, token, body)
		if err != nil || tag.RowsAffected() == 0 {
			return err
		}
		recorded = true
		return audit.RecordIn(ctx, tx, e)
	})
	return recorded && err == nil, err
}

// releaseAlert gives up this instance's claim (token), unrecorded, so that a catch-up claims it
// again at once: the row stays, unclaimed (a level's owed alert lives in it).
func (s *Service) releaseAlert(a alert, token time.Time) {
	if s.pg == nil {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if _, err := s.pg.Exec(ctx, `UPDATE quota_alerts SET claimed_at = '-infinity'
		WHERE day = $1 AND tenant_id = $2 AND metric = $3 AND threshold = $4 AND claimed_at = $5 AND recorded_at IS NULL`,
		a.day, a.tenant, a.metric, a.pct, token); err != nil {
		s.log.Warn("quota alert claim not released: it fires again once stale", "metric", a.metric, "err", err)
	}
}
