package quota

import (
	"bytes"
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"log/slog"
	"net/http"
	"strconv"
	"sync"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/prometheus/client_golang/prometheus"
)

// How an alert reaches QUOTA_ALERT_WEBHOOK_URL: through an outbox in Postgres. The transaction
// that records an alert in quota_alerts (alerts.go) also stores the payload and makes it due, so a
// delivery outlives a shutdown, a crash and a receiver that is down, whichever instance runs next.
// Each instance's delivery loop (Service.RunWebhooks) takes due rows with FOR UPDATE SKIP LOCKED
// under a lease id (their due time moves to the lease's end), posts them, and records the outcome
// under that id: delivered, due again after a backoff, or abandoned after the last attempt. An
// attempt counts when its outcome is recorded, so takes that die unposted do not spend the
// attempts (they are bounded apart). Every time compared is Postgres' now(), so instances' clocks
// do not matter. Delivery is at least once: a receiver that processed a post but answered after
// the timeout, or whose answer could not be recorded (Postgres away, the instance dead), sees a
// repeat; the payload's id is the same in every attempt, for receivers to drop repeats.

// WebhookConfig is the optional alert webhook.
type WebhookConfig struct {
	URL    string // QUOTA_ALERT_WEBHOOK_URL; empty disables it
	Secret string // QUOTA_ALERT_WEBHOOK_SECRET: HMAC-SHA256 key of the signature header
	// Attempts before an alert's delivery is abandoned (default 16: with the default backoff, the
	// last one comes ~4.5 h after the first, well before the row leaves with its alert).
	Attempts int
	Backoff  time.Duration // delay after the first failed attempt, doubling (default 1 s)
	// MaxBackoff caps the delay between two attempts (default 1 h).
	MaxBackoff time.Duration
	Timeout    time.Duration // QUOTA_ALERT_WEBHOOK_TIMEOUT: one delivery (default 5 s)
	// Poll is how often an idle delivery loop looks for due rows another instance left (default 5 s);
	// a loop also wakes when its own instance records an alert, and when a retry it knows of is due.
	Poll time.Duration
}

// alertPayload is the JSON posted for an alert.
type alertPayload struct {
	// ID is the same for every delivery of one alert (tenant, metric, threshold and day).
	ID               string  `json:"id"`
	Type             string  `json:"type"` // quota.warning or quota.exceeded
	TenantID         string  `json:"tenant_id"`
	Tenant           string  `json:"tenant"`
	Metric           string  `json:"metric"`
	Current          float64 `json:"current"`
	Limit            float64 `json:"limit"`
	ThresholdPercent int     `json:"threshold_percent"`
	Day              string  `json:"day"`
	At               string  `json:"at"`
}

// alertNamespace derives alert ids: a name-based UUID of the tenant, metric, threshold and day.
var alertNamespace = uuid.MustParse("5b6c1f3e-6a59-4a57-9c56-1e0c84e2a4b1")

func (a alert) id() uuid.UUID {
	return uuid.NewSHA1(alertNamespace, []byte(a.tenant.String()+"\x00"+a.day.Format(time.DateOnly)+"\x00"+a.metric+"\x00"+strconv.Itoa(a.pct)))
}

// SignatureHeader carries "t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>">": receivers recompute
// it with the shared secret and reject old timestamps, which stops replays.
const SignatureHeader = "X-Analytics-Signature"

// AttemptHeader carries the delivery's attempt number, from 1.
const AttemptHeader = "X-Analytics-Delivery-Attempt"

// Sign returns the signature header value for body at time ts.
func Sign(secret string, ts int64, body []byte) string {
	mac := hmac.New(sha256.New, []byte(secret))
	fmt.Fprintf(mac, "%d.", ts)
	mac.Write(body)
	return "t=" + strconv.FormatInt(ts, 10) + ",v1=" + hex.EncodeToString(mac.Sum(nil))
}

// webhookBatch is how many due rows one look takes.
const webhookBatch = 32

type webhook struct {
	cfg      WebhookConfig
	client   *http.Client
	pg       *pgxpool.Pool
	log      *slog.Logger
	wake     chan struct{} // an alert was recorded here: look now
	failing  bool          // the last look failed (run's goroutine only)
	outcomes *prometheus.CounterVec
}

func newWebhook(cfg WebhookConfig, pg *pgxpool.Pool, log *slog.Logger, outcomes *prometheus.CounterVec) *webhook {
	if cfg.Attempts <= 0 {
		cfg.Attempts = 16
	}
	if cfg.Backoff <= 0 {
		cfg.Backoff = time.Second
	}
	if cfg.MaxBackoff <= 0 {
		cfg.MaxBackoff = time.Hour
	}
	if cfg.Timeout <= 0 {
		cfg.Timeout = DefaultConfig().Webhook.Timeout
	}
	if cfg.Poll <= 0 {
		cfg.Poll = 5 * time.Second
	}
	return &webhook{cfg: cfg, client: &http.Client{Timeout: cfg.Timeout}, pg: pg, log: log,
		wake: make(chan struct{}, 1), outcomes: outcomes}
}

// enabled says whether alerts get a webhook: a URL, and Postgres for the outbox.
func (w *webhook) enabled() bool { return w.cfg.URL != "" && w.pg != nil }

// notify wakes the delivery loop after an alert was recorded with a payload.
func (w *webhook) notify() {
	select {
	case w.wake <- struct{}{}:
	default:
	}
}

// lease is how long a taken row is this instance's: its delivery, then the record of the outcome
// (a Postgres step of its own timeout), with a margin. A row whose lease ended is taken again.
func (w *webhook) lease() time.Duration { return 2*w.cfg.Timeout + 30*time.Second }

// backoff is the delay after the attempt-th failed attempt.
func (w *webhook) backoff(attempt int) time.Duration {
	d := w.cfg.Backoff
	for i := 1; i < attempt && d < w.cfg.MaxBackoff; i++ {
		d *= 2
	}
	return min(d, w.cfg.MaxBackoff)
}

// span is the time the attempts take when each fails at once: the backoffs between them.
func (w *webhook) span() time.Duration {
	var d time.Duration
	for a := 1; a < w.cfg.Attempts; a++ {
		d += w.backoff(a)
	}
	return d
}

// run delivers due rows until ctx ends; deliveries in flight then finish (each within Timeout) and
// their outcomes are recorded before it returns.
func (w *webhook) run(ctx context.Context) {
	if !w.enabled() {
		return
	}
	for {
		wait := w.deliverDue(ctx)
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			return
		case <-w.wake:
		case <-t.C:
		}
		t.Stop()
	}
}

// taken is a row this instance leased: its key, payload, lease and counts so far.
type taken struct {
	day      time.Time
	tenant   uuid.UUID
	metric   string
	pct      int
	body     string
	lease    uuid.UUID
	attempts int           // posts with a recorded outcome before this one
	leases   int           // takes, this one included
	age      time.Duration // since the alert was recorded (Postgres' clock)
}

// deliverDue takes up to webhookBatch due rows, delivers them concurrently, records each outcome,
// and returns how long to wait before looking again.
func (w *webhook) deliverDue(ctx context.Context) time.Duration {
	if ctx.Err() != nil {
		return w.cfg.Poll
	}
	rows, err := w.take()
	if err != nil {
		if !w.failing { // once per outage, not every poll
			w.log.Warn("quota alert webhooks not taken: postgres unavailable; they wait in quota_alerts", "err", err)
		}
		w.failing = true
		return w.cfg.Poll
	}
	w.failing = false
	var wg sync.WaitGroup
	for _, r := range rows {
		wg.Add(1)
		go func() {
			defer wg.Done()
			// Takes that never recorded an outcome (instances that died holding the row, or takes
			// whose answer was lost) are bounded too, like attempts in number and in time: a row taken
			// that often, and recorded longer ago than the attempts' span, is given up unposted. (By
			// number alone, a Postgres whose answers came late for 11 minutes — a lease each —
			// abandoned healthy alerts: found by review.)
			if lost := r.leases - 1 - r.attempts; lost >= w.cfg.Attempts && r.age >= w.span() {
				w.settle(r, false, fmt.Errorf("taken %d times without an outcome", lost))
				return
			}
			w.settle(r, true, w.deliver([]byte(r.body), r.attempts+1))
		}()
	}
	wg.Wait()
	if len(rows) == webhookBatch {
		return 0
	}
	return w.untilDue(ctx)
}

// take leases due rows under a new lease id: their due time moves to the lease's end, so an
// instance that dies while delivering leaves them to be taken again when the lease ends. An attempt
// is counted only with its outcome (settle). Not under run's context: a stop cancelling the
// statement after Postgres committed it would leave rows leased and undelivered for a lease (seen
// as a flaky test: one alert of two undelivered for 40 s).
func (w *webhook) take() ([]taken, error) {
	qctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	lease := uuid.New()
	rows, err := w.pg.Query(qctx, `UPDATE quota_alerts q
		SET webhook_due_at = now() + make_interval(secs => $1), webhook_lease = $3, webhook_leases = q.webhook_leases + 1
		FROM (SELECT day, tenant_id, metric, threshold FROM quota_alerts
			WHERE webhook_due_at <= now() AND webhook_body IS NOT NULL ORDER BY webhook_due_at LIMIT $2 FOR UPDATE SKIP LOCKED) due
		WHERE q.day = due.day AND q.tenant_id = due.tenant_id AND q.metric = due.metric AND q.threshold = due.threshold
		RETURNING q.day, q.tenant_id, q.metric, q.threshold, q.webhook_body, q.webhook_attempts, q.webhook_leases,
			extract(epoch FROM now() - q.recorded_at)::float8`,
		w.lease().Seconds(), webhookBatch, lease)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var out []taken
	for rows.Next() {
		r := taken{lease: lease}
		var age float64
		if err := rows.Scan(&r.day, &r.tenant, &r.metric, &r.pct, &r.body, &r.attempts, &r.leases, &age); err != nil {
			return nil, err
		}
		r.age = time.Duration(age * float64(time.Second))
		out = append(out, r)
	}
	return out, rows.Err()
}

// settle records the outcome of this take of r, if the row is still under its lease: delivered
// (err nil), due again after a backoff, or abandoned after the last attempt. posted says a request
// was made (it counts as an attempt). The outcome is counted and logged only once recorded: an
// instance whose lease ended has no say.
func (w *webhook) settle(r taken, posted bool, err error) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	attempts := r.attempts
	if posted {
		attempts++
	}
	const where = ` WHERE day = $1 AND tenant_id = $2 AND metric = $3 AND threshold = $4 AND webhook_lease = $5`
	args := []any{r.day, r.tenant, r.metric, r.pct, r.lease, attempts}
	outcome := "delivered"
	q := `UPDATE quota_alerts SET webhook_attempts = $6, webhook_lease = NULL, `
	switch {
	case err == nil:
		q += `webhook_due_at = NULL, webhook_outcome = 'delivered', webhook_done_at = now()` + where
	case attempts >= w.cfg.Attempts || !posted:
		outcome = "abandoned"
		q += `webhook_due_at = NULL, webhook_outcome = 'abandoned', webhook_done_at = now()` + where
	default:
		outcome = "retried"
		q += `webhook_due_at = now() + make_interval(secs => $7)` + where
		args = append(args, w.backoff(attempts).Seconds())
	}
	tag, perr := w.pg.Exec(ctx, q, args...)
	switch {
	case perr != nil:
		// The lease ends and the row is taken again: a delivered one is then posted once more.
		w.log.Warn("quota alert webhook outcome not recorded: it is attempted again when its lease ends", "outcome", outcome, "err", perr)
		return
	case tag.RowsAffected() == 0:
		w.log.Debug("quota alert webhook outcome not recorded: the lease ended, another instance has the row", "outcome", outcome)
		return
	}
	if w.outcomes != nil {
		w.outcomes.WithLabelValues(outcome).Inc()
	}
	switch outcome {
	case "abandoned":
		w.log.Error("quota alert webhook failed; giving up", "attempts", attempts, "metric", r.metric, "threshold", r.pct, "err", err)
	case "retried":
		w.log.Debug("quota alert webhook failed; retrying", "attempt", attempts, "metric", r.metric, "err", err)
	}
}

// untilDue is the time until the earliest due row, at most Poll.
func (w *webhook) untilDue(ctx context.Context) time.Duration {
	qctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	var secs *float64
	if err := w.pg.QueryRow(qctx, `SELECT extract(epoch FROM min(webhook_due_at) - now())::float8
		FROM quota_alerts WHERE webhook_due_at IS NOT NULL`).Scan(&secs); err != nil || secs == nil {
		return w.cfg.Poll
	}
	return min(max(time.Duration(*secs*float64(time.Second)), 0), w.cfg.Poll)
}

// deliver posts body once; an error or an answer other than 2xx is a failed attempt.
func (w *webhook) deliver(body []byte, attempt int) error {
	req, err := http.NewRequest(http.MethodPost, w.cfg.URL, bytes.NewReader(body))
	if err != nil {
		return err
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("User-Agent", "analyticsd-quota-alerts")
	req.Header.Set(AttemptHeader, strconv.Itoa(attempt))
	if w.cfg.Secret != "" {
		req.Header.Set(SignatureHeader, Sign(w.cfg.Secret, time.Now().Unix(), body))
	}
	resp, err := w.client.Do(req)
	if err != nil {
		return err
	}
	resp.Body.Close()
	if resp.StatusCode < 200 || resp.StatusCode > 299 {
		return fmt.Errorf("webhook answered %s", resp.Status)
	}
	return nil
}
