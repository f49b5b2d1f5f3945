package client

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"strconv"
)

// ErrQuotaExceeded matches (errors.Is) the error of a Consume the quota refused.
var ErrQuotaExceeded = errors.New("quota exceeded")

// Quota is one quota as the server reports it (GET /api/analytics/quotas/{metric}).
type Quota struct {
	// Exceeded is Current >= Limit.
	Exceeded bool    `json:"exceeded"`
	Current  float64 `json:"current"`
	Limit    float64 `json:"limit"`
	// Degraded: the server's counters (Redis) were unreachable and Current was read from ClickHouse.
	Degraded bool `json:"degraded"`
	// Disabled: the server runs with QUOTAS_ENABLED=false and never refuses.
	Disabled bool `json:"disabled"`
	// Provisional: the day's counters were not reconciled lately; Current may be short of the truth.
	Provisional bool `json:"provisional"`
}

// ConsumeResult is the answer of a consume, allowed or not.
type ConsumeResult struct {
	Metric    string  `json:"metric"`
	Allowed   bool    `json:"allowed"`
	Current   float64 `json:"current"`
	Limit     float64 `json:"limit"`
	Remaining float64 `json:"remaining"`
	Exceeded  bool    `json:"exceeded"`
	Degraded  bool    `json:"degraded"`
	Disabled  bool    `json:"disabled"`
}

// IncrementUsage adds n (1 to 1,000,000,000) to a usage metric of today, e.g. "api_requests_daily" —
// the guide's increment_usage. Its retries share one Idempotency-Key, so the increment is counted
// once however many attempts it takes. A refusal (an unknown or dotted metric, a bad n) is an
// *APIError.
func (c *Client) IncrementUsage(ctx context.Context, metric string, n int64) error {
	body, err := json.Marshal(struct {
		Metric string `json:"metric"`
		N      int64  `json:"n"`
	}{metric, n})
	if err != nil {
		return err
	}
	// Uncompressed: the usage endpoint reads plain JSON, and the body is a few bytes.
	var res struct{}
	if err := c.call(ctx, request{method: http.MethodPost, path: "/api/analytics/usage", body: body, key: NewID(), events: 1}, &res); err != nil {
		return fmt.Errorf("increment usage %s: %w", metric, err)
	}
	return nil
}

// CheckQuota reads one quota — the guide's check_quota. It needs a key with analytics:read. An
// unknown metric is a 404 *APIError (code unknown_quota).
func (c *Client) CheckQuota(ctx context.Context, metric string) (Quota, error) {
	var q Quota
	if err := c.call(ctx, request{method: http.MethodGet, path: "/api/analytics/quotas/" + url.PathEscape(metric), events: 1}, &q); err != nil {
		return Quota{}, fmt.Errorf("check quota %s: %w", metric, err)
	}
	return q, nil
}

// Consume spends n of a daily quota if, and only if, the quota stays within its limit: the check and
// the spend are one atomic step on the server. When the quota refuses, Consume returns the result
// (Allowed false, with Current and Limit) and an error matching ErrQuotaExceeded whose *APIError
// carries the Retry-After (the time to 00:00 UTC); that refusal is not retried. Retries of one
// Consume share an Idempotency-Key, so it spends at most once.
func (c *Client) Consume(ctx context.Context, metric string, n int64) (ConsumeResult, error) {
	var res ConsumeResult
	path := "/api/analytics/quotas/" + url.PathEscape(metric) + "/consume?n=" + strconv.FormatInt(n, 10)
	err := c.call(ctx, request{method: http.MethodPost, path: path, key: NewID(), events: 1}, &res)
	if err == nil {
		return res, nil
	}
	if e, ok := err.(*APIError); ok && errors.Is(e, ErrQuotaExceeded) {
		_ = json.Unmarshal(e.Details, &res)
		res.Allowed = false
		return res, fmt.Errorf("consume %s: %w", metric, e)
	}
	return ConsumeResult{}, fmt.Errorf("consume %s: %w", metric, err)
}
