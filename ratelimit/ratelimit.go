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

// DefaultConfig returns the documented defaults: 1000 requests/s per credential, bursts of 2000.
func DefaultConfig() Config { return Config{Rate: 1000, Burst: 2000} }

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

// TakeLua defines the bucket as a Lua function, take(key, rate, burst): it refills at rate tokens/s up
// to burst, using Redis's own clock so every instance agrees, takes one token when there is one, and
// returns allowed (1 or 0) and the tokens left × 1000. A script that does a request's own work can
// define it too and take the request's token in the same round trip (quota consume does).
const TakeLua = `
local function take(key, rate, burst)
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  local b = redis.call('HMGET', key, 'tokens', 'ts')
  local tokens = tonumber(b[1]) or burst
  local ts = tonumber(b[2]) or now
  tokens = math.min(burst, tokens + math.max(0, now - ts) * rate / 1000)
  local allowed = 0
  if tokens >= 1 then
    tokens = tokens - 1
    allowed = 1
  end
  redis.call('HSET', key, 'tokens', tostring(tokens), 'ts', now)
  redis.call('PEXPIRE', key, math.ceil(burst / rate * 1000) + 1000)
  return allowed, math.floor(tokens * 1000)
end
`

var bucket = redis.NewScript(TakeLua + `return {take(KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]))}`)

// Key names the bucket of credential who of a tenant. It sits under the tenant's hash tag, so a
// script may take from it together with the tenant's other keys on one Redis Cluster slot.
func (l *Limiter) Key(tenant, who string) string {
	return l.prefix + "ratelimit:{" + tenant + "}:" + who
}

// Rate and Burst are take()'s rate and burst arguments.
func (l *Limiter) Rate() float64 { return l.cfg.Rate }
func (l *Limiter) Burst() int    { return l.cfg.Burst }

// Allow takes one request from the budget of credential who of tenant.
func (l *Limiter) Allow(ctx context.Context, tenant, who string) (Decision, error) {
	if !l.Enabled() {
		return Decision{Allowed: true, Limit: l.cfg.Burst}, nil
	}
	res, err := bucket.Run(ctx, l.rdb, []string{l.Key(tenant, who)}, l.cfg.Rate, l.cfg.Burst).Int64Slice()
	if err != nil {
		return Decision{Allowed: true, Limit: l.cfg.Burst}, fmt.Errorf("rate limit %s: %w", who, err)
	}
	return l.Decide(res[0] == 1, res[1]), nil
}

// Decide turns take()'s results (allowed, tokens left × 1000) into a Decision.
func (l *Limiter) Decide(allowed bool, milliTokens int64) Decision {
	tokens := float64(milliTokens) / 1000
	d := Decision{Allowed: allowed, Limit: l.cfg.Burst, Remaining: int(tokens)}
	d.Reset = time.Duration((float64(l.cfg.Burst) - tokens) / l.cfg.Rate * float64(time.Second))
	if !d.Allowed {
		d.Retry = time.Duration((1 - tokens) / l.cfg.Rate * float64(time.Second))
	}
	return d
}
