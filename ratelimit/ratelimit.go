// Package ratelimit owns per-credential request rate limits: a token bucket per API key (or JWT
// subject) kept in Redis, so every instance shares one budget. It only answers "may this credential
// make one more request now?"; the HTTP layer turns a no into a 429.
package ratelimit

import (
	"context"
	"fmt"
	"time"

	"github.com/redis/go-redis/v9"
)

// Config sets the bucket: Rate requests per second refill, up to Burst at once. Rate 0 disables.
type Config struct {
	Rate  float64 // RATE_LIMIT_RPS
	Burst int     // RATE_LIMIT_BURST
}

// Decision is the outcome of one Allow.
type Decision struct {
	Allowed   bool
	Limit     int           // the burst size (X-RateLimit-Limit)
	Remaining int           // whole tokens left (X-RateLimit-Remaining)
	Reset     time.Duration // until the bucket is full again (X-RateLimit-Reset)
	Retry     time.Duration // until one token is available, when refused (Retry-After)
}

// Limiter is a Redis token bucket.
type Limiter struct {
	cfg    Config
	rdb    redis.UniversalClient
	prefix string
}

// New returns a Limiter; prefix namespaces its keys (tests).
func New(cfg Config, rdb redis.UniversalClient, prefix string) *Limiter {
	if cfg.Burst <= 0 {
		cfg.Burst = int(cfg.Rate)
	}
	return &Limiter{cfg: cfg, rdb: rdb, prefix: prefix}
}

// Enabled reports whether limits apply.
func (l *Limiter) Enabled() bool { return l != nil && l.cfg.Rate > 0 }

// bucket refills at ARGV[1] tokens/s up to ARGV[2], using Redis's own clock so every instance agrees,
// and takes one token when there is one. Returns {allowed, tokens left × 1000}.
var bucket = redis.NewScript(`
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local b = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(b[1]) or burst
local ts = tonumber(b[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - ts) * rate / 1000)
local allowed = 0
if tokens >= 1 then
  tokens = tokens - 1
  allowed = 1
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', now)
redis.call('PEXPIRE', KEYS[1], math.ceil(burst / rate * 1000) + 1000)
return {allowed, math.floor(tokens * 1000)}
`)

// Allow takes one request from who's budget.
func (l *Limiter) Allow(ctx context.Context, who string) (Decision, error) {
	d := Decision{Allowed: true, Limit: l.cfg.Burst}
	if !l.Enabled() {
		return d, nil
	}
	res, err := bucket.Run(ctx, l.rdb, []string{l.prefix + "ratelimit:{" + who + "}"}, l.cfg.Rate, l.cfg.Burst).Int64Slice()
	if err != nil {
		return d, fmt.Errorf("rate limit %s: %w", who, err)
	}
	tokens := float64(res[1]) / 1000
	d.Allowed = res[0] == 1
	d.Remaining = int(tokens)
	d.Reset = time.Duration((float64(l.cfg.Burst) - tokens) / l.cfg.Rate * float64(time.Second))
	if !d.Allowed {
		d.Retry = time.Duration((1 - tokens) / l.cfg.Rate * float64(time.Second))
	}
	return d, nil
}
