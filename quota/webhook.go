package quota

import (
	"bytes"
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"log/slog"
	"net/http"
	"strconv"
	"sync"
	"time"
)

// WebhookConfig is the optional alert webhook.
type WebhookConfig struct {
	URL      string        // QUOTA_ALERT_WEBHOOK_URL; empty disables it
	Secret   string        // QUOTA_ALERT_WEBHOOK_SECRET: HMAC-SHA256 key of the signature header
	Attempts int           // deliveries tried before giving up (default 6)
	Backoff  time.Duration // first retry delay, doubling (default 1 s)
	Timeout  time.Duration // one delivery (default 5 s)
}

type alertPayload struct {
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

// SignatureHeader carries "t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>">": receivers recompute
// it with the shared secret and reject old timestamps, which stops replays.
const SignatureHeader = "X-Analytics-Signature"

// Sign returns the signature header value for body at time ts.
func Sign(secret string, ts int64, body []byte) string {
	mac := hmac.New(sha256.New, []byte(secret))
	fmt.Fprintf(mac, "%d.", ts)
	mac.Write(body)
	return "t=" + strconv.FormatInt(ts, 10) + ",v1=" + hex.EncodeToString(mac.Sum(nil))
}

type webhook struct {
	cfg    WebhookConfig
	client *http.Client
	log    *slog.Logger
	wg     sync.WaitGroup
	quit   chan struct{}
	once   sync.Once
	mu     sync.Mutex
	closed bool // after close: nothing more is sent (its wg.Add would race close's wg.Wait)
}

func newWebhook(cfg WebhookConfig, log *slog.Logger) *webhook {
	if cfg.Attempts <= 0 {
		cfg.Attempts = 6
	}
	if cfg.Backoff <= 0 {
		cfg.Backoff = time.Second
	}
	if cfg.Timeout <= 0 {
		cfg.Timeout = 5 * time.Second
	}
	return &webhook{cfg: cfg, client: &http.Client{Timeout: cfg.Timeout}, log: log, quit: make(chan struct{})}
}

// send delivers p in the background, retrying with exponential backoff on errors and non-2xx answers.
func (w *webhook) send(p alertPayload) {
	if w.cfg.URL == "" {
		return
	}
	body, err := json.Marshal(p)
	if err != nil {
		return
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.closed {
		w.log.Warn("quota alert webhook not sent: shutting down", "type", p.Type, "tenant", p.Tenant, "metric", p.Metric)
		return
	}
	w.wg.Add(1)
	go func() {
		defer w.wg.Done()
		delay := w.cfg.Backoff
		for attempt := 1; attempt <= w.cfg.Attempts; attempt++ {
			err := w.deliver(body)
			if err == nil {
				return
			}
			if attempt == w.cfg.Attempts {
				w.log.Error("quota alert webhook failed; giving up", "attempts", attempt, "type", p.Type, "tenant", p.Tenant, "err", err)
				return
			}
			select {
			case <-time.After(delay):
			case <-w.quit:
				return
			}
			delay *= 2
		}
	}()
}

func (w *webhook) deliver(body []byte) error {
	req, err := http.NewRequest(http.MethodPost, w.cfg.URL, bytes.NewReader(body))
	if err != nil {
		return err
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("User-Agent", "analyticsd-quota-alerts")
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

// close waits for deliveries in flight until ctx ends, then abandons their retries.
func (w *webhook) close(ctx context.Context) {
	w.mu.Lock()
	w.closed = true
	w.mu.Unlock()
	done := make(chan struct{})
	go func() { w.wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-ctx.Done():
		w.once.Do(func() { close(w.quit) })
		<-done
	}
}
