package quota

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"time"

	"github.com/ClickHouse/clickhouse-go/v2/lib/driver"
	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/analyticsd/analyticsd/audit"
	"github.com/analyticsd/analyticsd/internal/clock"
	"github.com/analyticsd/analyticsd/internal/labels"
	"github.com/analyticsd/analyticsd/internal/logger"
	"github.com/analyticsd/analyticsd/ratelimit"
)

// Config shapes quota behaviour.
type Config struct {
	Enabled      bool              // QUOTAS_ENABLED: false reports quotas as disabled and never refuses
	FailOpen     bool              // QUOTA_FAIL_OPEN: consume with Redis down is allowed (marked degraded)
	Thresholds   []int             // QUOTA_ALERT_THRESHOLDS, percent (default 80, 100)
	EventMetrics map[string]string // event → daily metric, the same map ingest counts with
	Webhook      WebhookConfig
	LabelCap     int
	// IdempotencyWindow is how long a consume's Idempotency-Key is remembered: the dedup window.
	// 0 (deduplication off) ignores the key: without claims, a replayed consume's increment would be
	// stored again.
	IdempotencyWindow time.Duration
	// AnalyticsDisabled (ANALYTICS_ENABLED=false): a level sent to POST /usage is acknowledged and
	// not stored, like everything ingest is sent then.
	AnalyticsDisabled bool
	// ReconcileEvery is how often the live counters are reconciled with ClickHouse
	// (QUOTA_RECONCILE_INTERVAL, default 30 s); a count is marked provisional after two intervals
	// without one.
	ReconcileEvery time.Duration
}

// Recorder writes usage durably; *ingest.Service implements it. Quota never writes ClickHouse itself.
type Recorder interface {
	// RecordIncrement stores an increment_usage received at `at` durably without touching the live
	// counters. With an idempotency key, the increment's id is derived from it: recording the same
	// consume twice stores it once. counted says the live counters have it already. A refusal the
	// client is to see (ingest's buffer is full, the server is shutting down) comes as the *api.Error
	// ingest answers its own requests with, and is returned as it is.
	RecordIncrement(ctx context.Context, tenant uuid.UUID, metric string, n int64, at time.Time, idempotencyKey string, counted bool) error
	// EmitOnce adds an event to the tenant's own event stream, once per key within the dedup window.
	EmitOnce(ctx context.Context, tenant uuid.UUID, slug, event, key string, props map[string]any) error
}

// State is one quota as check_quota returns it (docs/contract.md).
type State struct {
	Exceeded bool    `json:"exceeded"`
	Current  float64 `json:"current"`
	Limit    float64 `json:"limit"`
	// Degraded: Redis was unreachable and Current was read from ClickHouse.
	Degraded bool `json:"degraded,omitempty"`
	// Disabled: QUOTAS_ENABLED=false; nothing is ever refused.
	Disabled bool `json:"disabled,omitempty"`
	// Provisional: the day's counters have not been reconciled with ClickHouse within the bound
	// (two reconciliation intervals): after a fault Current may be below the truth until they are.
	Provisional bool `json:"provisional,omitempty"`
}

func state(current, limit float64) State {
	return State{Current: current, Limit: limit, Exceeded: current >= limit}
}

// Service answers "may tenant T spend N more of metric M?" and keeps the live counters.
type Service struct {
	cfg      Config
	counters *Counters
	limits   *Limits
	ch       driver.Conn
	db       string
	pg       *pgxpool.Pool
	audit    *audit.Log
	rec      Recorder
	log      *slog.Logger
	now      func() time.Time
	sources  map[string][]string // daily metric → events counted toward it
	webhook  *webhook
	alerts   alertQueue
	metrics  *metrics
	tenants  *labels.Capped
}

// ErrUnknownMetric: the metric has no quota. The error returned is an *UnknownMetricError.
var ErrUnknownMetric = errors.New("no quota is defined for that metric")

// UnknownMetricError is ErrUnknownMetric for one metric.
type UnknownMetricError struct{ Metric string }

func (e *UnknownMetricError) Error() string        { return fmt.Sprintf("%v: %q", ErrUnknownMetric, e.Metric) }
func (e *UnknownMetricError) Is(target error) bool { return target == ErrUnknownMetric }

// ErrUnavailable: the counters did not answer and QUOTA_FAIL_OPEN=false, so nothing was spent.
var ErrUnavailable = errors.New("quota counters are unavailable and QUOTA_FAIL_OPEN=false; retry shortly")

// NewService wires quotas. rec may be set later with SetRecorder (ingest is built after quota).
func NewService(cfg Config, counters *Counters, limits *Limits, ch driver.Conn, db string, pg *pgxpool.Pool,
	auditLog *audit.Log, reg prometheus.Registerer, log *slog.Logger) *Service {
	cfg.defaults()
	log = logger.Or(log)
	s := &Service{cfg: cfg, counters: counters, limits: limits, ch: ch, db: db, pg: pg, audit: auditLog, log: log, now: clock.Now,
		sources: map[string][]string{}, tenants: labels.NewCapped(cfg.LabelCap),
		metrics: newMetrics(reg, counters),
	}
	for ev, m := range cfg.EventMetrics {
		s.sources[m] = append(s.sources[m], ev)
	}
	s.webhook = newWebhook(cfg.Webhook, pg, log, s.metrics.webhooks)
	return s
}

// RunWebhooks delivers the alert webhooks due in Postgres' outbox (webhook.go), this instance's and
// those other instances left, until ctx ends; deliveries in flight then finish (each within the
// webhook's timeout) before it returns. Without a webhook URL it returns at once.
func (s *Service) RunWebhooks(ctx context.Context) { s.webhook.run(ctx) }

// SetRecorder attaches the durable writer (ingest).
func (s *Service) SetRecorder(r Recorder) { s.rec = r }

// Close records the alerts still queued (up to ctx); alerts found after it are recorded on the
// caller's goroutine. Stop RunReconciler and RunWebhooks with their contexts.
func (s *Service) Close(ctx context.Context) {
	s.alerts.close(ctx)
}

func (s *Service) today() time.Time { return s.now().UTC().Truncate(24 * time.Hour) }

// Add is the live counter feed from ingest (it implements ingest.Counter): it counts rows received
// at `received` on the day's counters (negative deltas take counts back) and fires alerts for
// thresholds the new values cross.
func (s *Service) Add(ctx context.Context, tenant uuid.UUID, d, received time.Time, deltas map[string]int64) error {
	changes, err := s.counters.Add(ctx, tenant, d, received, deltas)
	if err != nil {
		return err
	}
	for m, c := range changes {
		s.Counted(ctx, tenant, d, m, c.By, c.Value)
	}
	return nil
}

// Counted hears that counting added by to a counter, now at value: it fires the alerts the
// counter crossed (it implements ingest.Counter).
func (s *Service) Counted(ctx context.Context, tenant uuid.UUID, d time.Time, metric string, by, value int64) {
	if !s.cfg.Enabled || by <= 0 || !s.alertDay(d) || !IsDaily(metric) {
		return
	}
	if lim, ok := s.limits.Of(ctx, tenant, metric); ok {
		s.checkAlerts(ctx, tenant, metric, d, float64(value-by), float64(value), lim)
	}
}

// counted returns, per daily metric, what ClickHouse holds for the tenant's day: mapped events and
// explicit increments (the answer while Redis is away).
func (s *Service) counted(ctx context.Context, tenant uuid.UUID, d time.Time) (map[string]int64, error) {
	counts, err := s.clickhouseCounts(ctx, tenant, d)
	if err != nil {
		return nil, err
	}
	out := map[string]int64{}
	for metric, minutes := range counts[tenant] {
		for _, n := range minutes {
			out[metric] += n
		}
	}
	return out, nil
}

// States returns every quota of the tenant (GET /quotas).
func (s *Service) States(ctx context.Context, tenant uuid.UUID) (map[string]State, error) {
	limits := s.limits.For(ctx, tenant)
	var daily, levels []string
	for _, m := range Metrics(limits) {
		if IsDaily(m) {
			daily = append(daily, m)
		} else {
			levels = append(levels, m)
		}
	}
	out := make(map[string]State, len(limits))
	cur, degraded, provisional, err := s.dailyCurrent(ctx, tenant, daily)
	if err != nil {
		return nil, err
	}
	for _, m := range daily {
		st := state(float64(cur[m]), limits[m])
		st.Degraded, st.Provisional = degraded, provisional
		out[m] = st
	}
	lv, err := s.levelValues(ctx, tenant)
	if err != nil {
		return nil, err
	}
	for _, m := range levels {
		out[m] = state(lv[m], limits[m])
	}
	if !s.cfg.Enabled {
		for m, st := range out {
			st.Exceeded, st.Disabled = false, true
			out[m] = st
		}
	}
	return out, nil
}

// State returns one quota.
func (s *Service) State(ctx context.Context, tenant uuid.UUID, metric string) (State, error) {
	all, err := s.States(ctx, tenant)
	if err != nil {
		return State{}, err
	}
	st, ok := all[metric]
	if !ok {
		return State{}, &UnknownMetricError{metric}
	}
	return st, nil
}

// dailyCurrent reads today's counters, reconciling them first if Redis lost them; with Redis down
// it answers from ClickHouse and says so (degraded). provisional: the day was last reconciled longer
// ago than the bound (ClickHouse unreachable, or no reconciler running).
func (s *Service) dailyCurrent(ctx context.Context, tenant uuid.UUID, metrics []string) (vals map[string]int64, degraded, provisional bool, err error) {
	d := s.today()
	var at time.Time
	vals, at, err = s.counters.Read(ctx, tenant, d, metrics)
	if err == nil && (at.IsZero() || s.now().Sub(at) > s.provisionalAfter()) {
		// Never reconciled (Redis lost the day), or not lately (a tenant the periodic round does
		// not visit: nothing stored today): reconcile it now.
		if rerr := s.reconcileTenant(ctx, tenant, d); rerr == nil {
			vals, at, err = s.counters.Read(ctx, tenant, d, metrics)
		} else if at.IsZero() {
			err = rerr // nothing to trust; a stale reconciliation is still an answer (provisional)
		}
	}
	if err == nil {
		return vals, false, s.now().Sub(at) > s.provisionalAfter(), nil
	}
	s.log.Warn("quota counters unavailable; answering from clickhouse", "err", err)
	vals, cerr := s.counted(ctx, tenant, d)
	if cerr != nil {
		return nil, true, true, fmt.Errorf("quota counters: redis: %v; clickhouse: %w", err, cerr)
	}
	return vals, true, false, nil
}

// provisionalAfter is how old a day's last reconciliation may be before its counts are marked
// provisional: two rounds, and a little for a slow one.
func (s *Service) provisionalAfter() time.Duration {
	return 2*s.cfg.ReconcileEvery + 5*time.Second
}

func (s *Service) levelValues(ctx context.Context, tenant uuid.UUID) (map[string]float64, error) {
	out := map[string]float64{}
	rows, err := s.pg.Query(ctx, "SELECT metric, value FROM usage_levels WHERE tenant_id = $1", tenant)
	if err != nil {
		return nil, fmt.Errorf("read usage levels: %w", err)
	}
	defer rows.Close()
	for rows.Next() {
		var m string
		var v float64
		if err := rows.Scan(&m, &v); err != nil {
			return nil, err
		}
		out[m] = v
	}
	return out, rows.Err()
}

// IsLevel reports whether metric is a level quota (set, not counted), e.g. storage_gb.
func (s *Service) IsLevel(metric string) bool {
	_, ok := s.limits.defaults[metric]
	return ok && !IsDaily(metric)
}

// SetLevel records a level metric's current value (POST usage with "value"). The thresholds the
// value crosses upward (from the previous one) are owed alerts, written to quota_alerts in the same
// transaction as the value, so that a crash, Redis or a failed recording cannot lose them (the
// reconciliation's catch-up fires an owed alert left unrecorded: catchUpLevelAlerts).
func (s *Service) SetLevel(ctx context.Context, tenant uuid.UUID, metric string, value float64) error {
	limit, limited := s.limits.For(ctx, tenant)[metric]
	limited = limited && limit > 0 && s.cfg.Enabled
	day := s.today()
	var owed []int
	err := pgx.BeginFunc(ctx, s.pg, func(tx pgx.Tx) error {
		var prev float64
		if err := tx.QueryRow(ctx, "SELECT value FROM usage_levels WHERE tenant_id = $1 AND metric = $2 FOR UPDATE", tenant, metric).Scan(&prev); err != nil && !errors.Is(err, pgx.ErrNoRows) {
			return err
		}
		if _, err := tx.Exec(ctx, `INSERT INTO usage_levels (tenant_id, metric, value) VALUES ($1, $2, $3)
			ON CONFLICT (tenant_id, metric) DO UPDATE SET value = EXCLUDED.value, updated_at = now()`, tenant, metric, value); err != nil {
			return err
		}
		if !limited {
			return nil
		}
		for _, pct := range s.cfg.Thresholds {
			if bound := limit * float64(pct) / 100; !(prev < bound && value >= bound) {
				continue
			}
			tag, err := tx.Exec(ctx, owedAlert, day, tenant, metric, pct, value, limit)
			if err != nil {
				return err
			}
			if tag.RowsAffected() == 1 {
				owed = append(owed, pct)
			}
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("set level %s for tenant %s: %w", metric, tenant, err)
	}
	now := s.now().UTC()
	for _, pct := range owed {
		s.alerts.push(alert{tenant: tenant, metric: metric, pct: pct, cur: value, limit: limit, day: day, at: now}, s.fire)
	}
	return nil
}

// ConsumeResult is the outcome of a consume.
type ConsumeResult struct {
	Metric    string  `json:"metric"`
	Allowed   bool    `json:"allowed"`
	Current   float64 `json:"current"`
	Limit     float64 `json:"limit"`
	Remaining float64 `json:"remaining"`
	Exceeded  bool    `json:"exceeded"`
	Degraded  bool    `json:"degraded,omitempty"`
	Disabled  bool    `json:"disabled,omitempty"`
}

// Consume atomically checks and spends n of a daily metric: allowed only when the counter stays
// within the limit. An allowed spend is also stored durably as an increment (so ClickHouse, billing and
// a rebuilt counter all see it). With Redis down it follows FailOpen.
func (s *Service) Consume(ctx context.Context, tenant uuid.UUID, metric string, n int64) (ConsumeResult, error) {
	return s.ConsumeWith(ctx, tenant, metric, n, ConsumeOptions{})
}

// ConsumeOptions are a consume request's extras.
type ConsumeOptions struct {
	// Meter, when set, is the request's rate-limit token, taken in the consume's own Redis script.
	// When it was refused (Meter.Refused), nothing was consumed and the result is meaningless: the
	// caller answers with Meter.Apply.
	Meter *ratelimit.Meter
	// IdempotencyKey, when set, makes a retry of the consume (same key) spend nothing again: it is
	// answered as allowed, with the spend recorded once.
	IdempotencyKey string
}

// ConsumeWith is Consume with a request's options.
func (s *Service) ConsumeWith(ctx context.Context, tenant uuid.UUID, metric string, n int64, o ConsumeOptions) (ConsumeResult, error) {
	lim, ok := s.limits.Of(ctx, tenant, metric)
	if !ok {
		return ConsumeResult{}, &UnknownMetricError{metric}
	}
	if !IsDaily(metric) {
		return ConsumeResult{}, &ParamError{fmt.Sprintf("%s is a level, not a daily count: set it with POST /api/analytics/usage {\"metric\":%q,\"value\":N}", metric, metric)}
	}
	res := ConsumeResult{Metric: metric, Limit: lim}
	// One instant for the spend: its live count, its day and the increment's stored ts all follow
	// it, so a consume at 23:59:59.9 counts on the same day everywhere.
	at := s.now().UTC().Truncate(time.Second)
	d := at.Truncate(24 * time.Hour)
	limit := int64(math.Floor(lim))
	if !s.cfg.Enabled {
		limit = math.MaxInt64 / 2
		res.Disabled = true
	}
	var marker *Marker
	if o.IdempotencyKey != "" && s.cfg.IdempotencyWindow > 0 {
		// Kept as long as the increment's claim can be (up to two windows): a retry the marker has
		// forgotten would spend again while its increment is dropped as a duplicate.
		marker = &Marker{Key: s.counters.MarkerKey(tenant, metric, o.IdempotencyKey), TTL: 2 * s.cfg.IdempotencyWindow}
	}
	out, err := s.counters.Consume(ctx, tenant, metric, at, n, limit, o.Meter, marker)
	if err == nil && o.Meter.Refused() {
		return res, nil
	}
	if err == nil && !out.Reconciled {
		if err = s.reconcileTenant(ctx, tenant, d); err == nil {
			// The meter was taken by the first run: this one only consumes.
			out, err = s.counters.Consume(ctx, tenant, metric, at, n, limit, o.Meter, marker)
		}
	}
	if err == nil && out.KeyReused {
		return res, ErrKeyReused
	}
	v := out.Value
	if err != nil {
		if !s.cfg.FailOpen {
			return res, ErrUnavailable
		}
		s.log.Warn("quota consume with redis unavailable: allowed (QUOTA_FAIL_OPEN)", "tenant", tenant, "metric", metric, "err", err)
		res.Allowed, res.Degraded = true, true
		if cur, cerr := s.counted(ctx, tenant, d); cerr == nil {
			v = cur[metric] + n
		}
	} else {
		res.Allowed = out.Allowed
	}
	if res.Allowed && s.recordsAgain(out) {
		// A replayed consume records again too: if the first run died before its record was durable,
		// this one stores it — on the first run's day, where its spend was counted; if not, the id
		// derived from the key makes it a duplicate.
		// A degraded consume (Redis unreachable) counted nothing: the increment's claim counts it.
		key := ""
		if marker != nil {
			key = o.IdempotencyKey
		}
		if out.Replayed && !out.FirstAt.IsZero() {
			at = out.FirstAt
		}
		if err := s.rec.RecordIncrement(ctx, tenant, metric, n, at, key, !res.Degraded); err != nil {
			if !res.Degraded && !out.Replayed {
				if uerr := s.counters.Undo(ctx, tenant, metric, at, n, marker); uerr != nil {
					s.log.Error("undo consume after a failed record", "tenant", tenant, "metric", metric, "err", uerr)
				}
			}
			return res, err
		}
		if s.cfg.Enabled && !res.Degraded && !out.Replayed {
			s.checkAlerts(ctx, tenant, metric, d, float64(v-n), float64(v), lim)
		}
	}
	res.Current = float64(v)
	res.Remaining = math.Max(0, lim-res.Current)
	res.Exceeded = s.cfg.Enabled && res.Current >= lim
	return res, nil
}

// ErrKeyReused refuses a consume whose Idempotency-Key an earlier consume of another n used, within
// the marker's life (two dedup windows): answering it "allowed" would grant a spend nobody made.
var ErrKeyReused = errors.New("this Idempotency-Key was used by a consume of another amount; send a new key for a new consume")

// recordsAgain reports whether an allowed consume stores its increment: always a first run; a retry
// (Replayed) only while the first run's increment is surely still claimed — claims live one to two
// windows from their claim, which follows the spend; less a margin for clocks that differ between
// instances — so that its derived id makes the record a duplicate if the first run stored it.
// Later, recording again could store the spend a second time. The cost: a first run that died
// between its spend and its durable record, retried only a window later, is not stored (and the
// reconciliation then takes its spend out of the live counter). A marker that did not record the
// time replays as before.
func (s *Service) recordsAgain(out ConsumeOutcome) bool {
	w := s.cfg.IdempotencyWindow
	return !out.Replayed || out.FirstAt.IsZero() || s.now().Sub(out.FirstAt) < w-min(w/10, time.Minute)
}

// SecondsToNextDay is the Retry-After of a refused consume: the counter resets at 00:00 UTC.
func (s *Service) SecondsToNextDay() int {
	now := s.now().UTC()
	return int(math.Ceil(now.Truncate(24 * time.Hour).Add(24 * time.Hour).Sub(now).Seconds()))
}

// ParamError is a bad request to the quota API; its message says what to do instead.
type ParamError struct{ Msg string }

func (e *ParamError) Error() string { return e.Msg }
