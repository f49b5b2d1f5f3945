package client

import (
	"bytes"
	"compress/gzip"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"strconv"
	"strings"
	"time"
)

// APIError is an error answer of the server: its status, its error code and message (see the README's
// "API at a glance"), and the Retry-After it sent, if any.
type APIError struct {
	StatusCode int
	Code       string
	Message    string
	RetryAfter time.Duration
	// Details is the error's "details" member as sent (e.g. each rejected event of a 400), if any.
	Details json.RawMessage
}

func (e *APIError) Error() string {
	if e.Code == "" {
		return fmt.Sprintf("analyticsd: %d %s", e.StatusCode, http.StatusText(e.StatusCode))
	}
	return fmt.Sprintf("analyticsd: %d %s: %s", e.StatusCode, e.Code, e.Message)
}

// Is makes errors.Is(err, ErrQuotaExceeded) true for a consume the quota refused.
func (e *APIError) Is(target error) bool {
	return target == ErrQuotaExceeded && e.StatusCode == http.StatusTooManyRequests && e.Code == "quota_exceeded"
}

// RejectedError is the server's reason for rejecting one event of a batch it otherwise stored.
type RejectedError struct {
	Reason string
}

func (e *RejectedError) Error() string { return "analyticsd: event rejected: " + e.Reason }

// retryable says whether an answer may be retried: the server or a proxy was busy or failed
// (429, 5xx, 408), or an earlier attempt of the same request still runs (409
// idempotency_key_in_use). A quota refusal (429 quota_exceeded) is an answer, not a failure.
func retryable(e *APIError) bool {
	switch {
	case e.StatusCode == http.StatusTooManyRequests:
		return e.Code != "quota_exceeded"
	case e.StatusCode == http.StatusConflict:
		return e.Code == "idempotency_key_in_use"
	case e.StatusCode == http.StatusRequestTimeout:
		return true
	}
	return e.StatusCode >= 500
}

// request is one logical call: every attempt sends the same bytes and the same Idempotency-Key.
type request struct {
	method, path string // path includes any query
	body         []byte
	gzipped      bool
	key          string // Idempotency-Key, "" for none
	events       int    // what a retry counts in Metrics.BatchRetried
}

// envelope is the server's answer: {"success":true,"data":...} or {"success":false,"error":{...}}.
type envelope struct {
	Data  json.RawMessage `json:"data"`
	Error *struct {
		Code    string          `json:"code"`
		Message string          `json:"message"`
		Details json.RawMessage `json:"details"`
	} `json:"error"`
}

// call sends r until it gets a final answer, attempts run out, or ctx ends, and decodes a 2xx's
// data into out (when not nil). A final error answer is an *APIError.
func (c *Client) call(ctx context.Context, r request, out any) error {
	var last error
	for attempt := 1; ; attempt++ {
		if err := ctx.Err(); err != nil {
			return stopped(err, last)
		}
		status, header, body, err := c.attempt(ctx, r)
		var wait time.Duration
		switch {
		case err != nil && ctx.Err() != nil:
			return stopped(ctx.Err(), err)
		case err != nil:
			last = err
		case status >= 200 && status < 300:
			if out == nil {
				return nil
			}
			var env envelope
			if err := json.Unmarshal(body, &env); err != nil {
				return fmt.Errorf("analyticsd client: %s %s: %d answer is not analyticsd's JSON: %w", r.method, r.path, status, err)
			}
			if err := json.Unmarshal(env.Data, out); err != nil {
				return fmt.Errorf("analyticsd client: %s %s: decode answer: %w", r.method, r.path, err)
			}
			return nil
		default:
			apiErr := parseError(status, header, body)
			if !retryable(apiErr) {
				return apiErr
			}
			last, wait = apiErr, apiErr.RetryAfter
		}
		if c.cfg.MaxAttempts > 0 && attempt >= c.cfg.MaxAttempts {
			return fmt.Errorf("analyticsd client: %s %s: gave up after %d attempts: %w", r.method, r.path, attempt, last)
		}
		// A Retry-After is honoured up to maxRetryAfter: otherwise one maintenance page's
		// "Retry-After: 3600" would hold every batch for an hour per attempt, far past MaxAttempts'
		// few minutes, before OnFailure hears of it.
		d := max(backoff(attempt, c.cfg.MinBackoff, c.cfg.MaxBackoff), min(wait, c.maxRetryAfter))
		c.retried.Add(1)
		if c.metrics != nil {
			c.metrics.BatchRetried(r.events)
		}
		c.log.Warn("request failed; retrying", "method", r.method, "path", r.path, "attempt", attempt,
			"events", r.events, "in", d.String(), "err", last)
		t := time.NewTimer(d)
		select {
		case <-t.C:
		case <-ctx.Done():
			t.Stop()
			return stopped(ctx.Err(), last)
		}
	}
}

// stopped is the error of a call whose ctx ended, with the failure that made it wait, if any.
func stopped(ctxErr, last error) error {
	if last == nil {
		return fmt.Errorf("analyticsd client: %w", ctxErr)
	}
	return fmt.Errorf("analyticsd client: %w (last attempt: %w)", ctxErr, last)
}

// attempt sends r once, within Config.Timeout.
func (c *Client) attempt(ctx context.Context, r request) (int, http.Header, []byte, error) {
	ctx, cancel := context.WithTimeout(ctx, c.cfg.Timeout)
	defer cancel()
	var body io.Reader
	if r.body != nil {
		body = bytes.NewReader(r.body)
	}
	req, err := http.NewRequestWithContext(ctx, r.method, c.base+r.path, body)
	if err != nil {
		return 0, nil, nil, err
	}
	req.Header.Set("Authorization", "Bearer "+c.cfg.APIKey)
	req.Header.Set("User-Agent", "analyticsd-go-client/1")
	if c.cfg.TenantSlug != "" {
		req.Header.Set("X-Tenant-Slug", c.cfg.TenantSlug)
	}
	if r.body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	if r.gzipped {
		req.Header.Set("Content-Encoding", "gzip")
	}
	if r.key != "" {
		req.Header.Set("Idempotency-Key", r.key)
	}
	resp, err := c.hc.Do(req)
	if err != nil {
		return 0, nil, nil, err
	}
	defer resp.Body.Close()
	// Answers are small; a larger body is not analyticsd's and is cut off.
	b, err := io.ReadAll(io.LimitReader(resp.Body, 4<<20))
	if err != nil {
		return 0, nil, nil, fmt.Errorf("read answer: %w", err)
	}
	return resp.StatusCode, resp.Header, b, nil
}

// parseError reads an error answer; a body that is not analyticsd's (a proxy's page) leaves Code empty.
// A redirect is explained: the request was not delivered, and Endpoint should name where it points.
func parseError(status int, h http.Header, body []byte) *APIError {
	e := &APIError{StatusCode: status, RetryAfter: retryAfter(h.Get("Retry-After"), time.Now())}
	var env envelope
	if json.Unmarshal(body, &env) == nil && env.Error != nil {
		e.Code, e.Message, e.Details = env.Error.Code, env.Error.Message, env.Error.Details
	}
	if status >= 300 && status < 400 && e.Code == "" {
		e.Code = "redirected"
		e.Message = fmt.Sprintf("the server redirects to %q; redirects are not followed (a POST would arrive as a GET): set Endpoint to the final URL", h.Get("Location"))
	}
	return e
}

// retryAfter reads a Retry-After header: delay-seconds or an HTTP date. Absent or unreadable is 0.
func retryAfter(v string, now time.Time) time.Duration {
	v = strings.TrimSpace(v)
	if v == "" {
		return 0
	}
	if s, err := strconv.ParseInt(v, 10, 64); err == nil {
		if s < 0 {
			return 0
		}
		return time.Duration(min(s, int64(24*time.Hour/time.Second))) * time.Second
	}
	if t, err := http.ParseTime(v); err == nil && t.After(now) {
		return t.Sub(now)
	}
	return 0
}

// backoff is the delay before retry number attempt (1 for the first): lo doubled attempt-1 times,
// capped at hi, then jittered uniformly between half and all of it, so that clients that failed
// together do not retry together.
func backoff(attempt int, lo, hi time.Duration) time.Duration {
	d := hi
	if attempt <= 62 {
		if v := lo << (attempt - 1); v > 0 && v < hi {
			d = v
		}
	}
	half := d / 2
	return half + rand.N(d-half+1)
}

// gzipBody compresses b.
func gzipBody(b []byte) []byte {
	var buf bytes.Buffer
	zw, _ := gzip.NewWriterLevel(&buf, gzip.BestSpeed)
	_, _ = zw.Write(b)
	_ = zw.Close()
	return buf.Bytes()
}

// eventsResult is the data of POST /events' 202, and the details of its 400 invalid_events.
type eventsResult struct {
	Accepted   *int        `json:"accepted"`
	Rejected   []rejection `json:"rejected"`
	Duplicates []struct{}  `json:"duplicates"`
	Disabled   bool        `json:"disabled"`
	Message    string      `json:"message"`
}

// rejection is one event the server rejected, by its index in the batch.
type rejection struct {
	Index int    `json:"index"`
	Error string `json:"error"`
}

// accounts says whether res is an answer to a batch of n events: each one stored, a duplicate or
// rejected (a server with ANALYTICS_ENABLED=false stores none and says so). Anything else — a
// proxy's 200 page, another endpoint's data — acknowledges nothing.
func (res *eventsResult) accounts(n int) bool {
	if res.Disabled {
		return true
	}
	return res.Accepted != nil && *res.Accepted >= 0 && *res.Accepted+len(res.Duplicates)+len(res.Rejected) == n
}

// sendBatch sends one batch until it is acknowledged or given up on, and records what became of it.
func (c *Client) sendBatch(items []item) {
	var buf bytes.Buffer
	buf.WriteByte('[')
	for i, it := range items {
		if i > 0 {
			buf.WriteByte(',')
		}
		buf.Write(it.raw)
	}
	buf.WriteByte(']')
	r := request{method: http.MethodPost, path: "/api/analytics/events", body: buf.Bytes(), key: NewID(), events: len(items)}
	if !c.cfg.DisableGzip {
		r.body, r.gzipped = gzipBody(r.body), true
	}
	var res eventsResult
	err := c.call(c.ctx, r, &res)
	var apiErr *APIError
	if errors.As(err, &apiErr) && len(items) > 1 && (apiErr.StatusCode == http.StatusRequestEntityTooLarge ||
		apiErr.StatusCode == http.StatusBadRequest && apiErr.Code == "invalid_body") {
		// 413: the server takes fewer events or bytes per request than this batch (its
		// INGEST_MAX_EVENTS, INGEST_MAX_BODY_BYTES). 400 invalid_body: one event it cannot read fails
		// the whole request. Either way, send the batch in halves, down to the event at fault (at
		// most 2n-1 requests). Each half is a new request with its own key; the event ids still keep
		// every event from being stored twice.
		c.log.Warn("batch refused as a whole; sending it in halves", "events", len(items), "err", apiErr)
		c.sendBatch(items[:len(items)/2])
		c.sendBatch(items[len(items)/2:])
		return
	}
	if errors.As(err, &apiErr) && apiErr.StatusCode == http.StatusBadRequest && apiErr.Code == "invalid_events" {
		// No event was accepted; details say why each was rejected.
		var det eventsResult
		if json.Unmarshal(apiErr.Details, &det) == nil && det.accounts(len(items)) {
			res, err = det, nil
		}
	}
	if err == nil && !res.accounts(len(items)) {
		err = fmt.Errorf("analyticsd client: POST /api/analytics/events: the 2xx answer accounts for none or some of the %d events sent (is Endpoint analyticsd's base URL?)", len(items))
	}
	last := items[len(items)-1].seq
	if err != nil {
		seqs := make([]uint64, len(items))
		for i, it := range items {
			seqs[i] = it.seq
		}
		c.fail(items, err)
		c.prog.finish(last, seqs)
		return
	}
	if res.Disabled {
		c.log.Warn("the server does not store events (ANALYTICS_ENABLED=false); they were acknowledged", "events", len(items), "message", res.Message)
	}
	var rejected []item
	var reasons []error
	seen := make(map[int]bool, len(res.Rejected))
	for _, rj := range res.Rejected {
		if rj.Index >= 0 && rj.Index < len(items) && !seen[rj.Index] {
			seen[rj.Index] = true
			rejected = append(rejected, items[rj.Index])
			reasons = append(reasons, &RejectedError{Reason: rj.Error})
		}
	}
	seqs := make([]uint64, len(rejected))
	for i, it := range rejected {
		seqs[i] = it.seq
	}
	if len(rejected) > 0 {
		c.fail(rejected, reasons...)
	}
	sent := len(items) - len(rejected)
	c.sent.Add(uint64(sent))
	if c.metrics != nil && sent > 0 {
		c.metrics.EventsSent(sent)
	}
	c.prog.finish(last, seqs)
}

// fail records one failed batch: items given up on, with one error for all of them or one each
// (the rejected events of a stored batch). OnFailure gets one Failure per distinct error.
func (c *Client) fail(items []item, errs ...error) {
	c.failedBatches.Add(1)
	c.failedEvents.Add(uint64(len(items)))
	if c.metrics != nil {
		c.metrics.BatchFailed(len(items))
	}
	c.log.Error("events given up on", "events", len(items), "first_id", items[0].id, "first_event", items[0].name, "err", errs[0])
	if c.cfg.OnFailure == nil {
		return
	}
	if len(errs) == 1 {
		evs := make([]Event, len(items))
		for i, it := range items {
			evs[i] = it.event()
		}
		c.cfg.OnFailure(Failure{Events: evs, Err: errs[0]})
		return
	}
	for i, it := range items {
		c.cfg.OnFailure(Failure{Events: []Event{it.event()}, Err: errs[i]})
	}
}
