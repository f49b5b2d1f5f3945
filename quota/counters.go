// Package quota owns the live per-tenant usage counters in Redis and, on top of them, quota limits:
// defaults, per-tenant overrides, checks, the atomic consume and soft alerts. ClickHouse stays the
// source of truth; Redis holds today's running counts for fast answers and rebuilds them when lost.
package quota

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"strconv"
	"time"

	"github.com/google/uuid"
	"github.com/redis/go-redis/v9"

	"github.com/analyticsd/analyticsd/ratelimit"
)

// CounterTTL is how long a daily counter lives: long enough to answer for yesterday after midnight.
const CounterTTL = 48 * time.Hour

// Counters are the live daily counters in Redis. Per tenant and UTC day there are:
//
//	quota:{<tenant>}:<metric>:<yyyymmdd>  the count (INCRBY)
//	quota:{<tenant>}:born:<yyyymmdd>      unix second of the first live increment since Redis last lost the day
//	quota:{<tenant>}:seeded:<yyyymmdd>    set once the counters hold what ClickHouse had before "born"
//
// The braces are a Redis Cluster hash tag: all of one tenant's keys share a slot, so the scripts
// below may touch several of them atomically.
type Counters struct {
	rdb    redis.UniversalClient
	prefix string // prepended to every key (tests isolate themselves with it)
}

// NewCounters returns Counters on rdb; prefix is usually "".
func NewCounters(rdb redis.UniversalClient, prefix string) *Counters {
	return &Counters{rdb: rdb, prefix: prefix}
}

func day(t time.Time) string { return t.UTC().Format("20060102") }

// Key is the Redis key of a tenant's metric on a UTC day.
func (c *Counters) Key(tenant uuid.UUID, metric string, d time.Time) string {
	return fmt.Sprintf("%squota:{%s}:%s:%s", c.prefix, tenant, metric, day(d))
}

func (c *Counters) bornKey(tenant uuid.UUID, d time.Time) string {
	return fmt.Sprintf("%squota:{%s}:born:%s", c.prefix, tenant, day(d))
}

func (c *Counters) seededKey(tenant uuid.UUID, d time.Time) string {
	return fmt.Sprintf("%squota:{%s}:seeded:%s", c.prefix, tenant, day(d))
}

// CountLua is the counting step other scripts compose with (dedup's claim script counts a row in the
// same atomic step that claims its id, so a row is counted exactly when it is claimed). It defines:
//
//	born(key, now, ttl)  the unix second live counting of a tenant's day began, starting it at now
//	                     when it had not: rows received before it are the rebuild's to count (Seed)
//	count(key, n, ttl)   adds n to a counter, keeps it ttl seconds, returns the new value
//
// The partition at born is exact at one-second resolution: every row is counted either live (received
// at or after born) or by the rebuild from ClickHouse, never both, so a backlog of increments that
// could not be applied while Redis was down cannot be counted twice when it comes back.
const CountLua = `
local function born(key, now, ttl)
  local b = tonumber(redis.call('GET', key))
  if not b then
    b = tonumber(now)
    redis.call('SET', key, b, 'EX', ttl)
  end
  return b
end
local function count(key, n, ttl)
  local v = redis.call('INCRBY', key, n)
  redis.call('EXPIRE', key, ttl)
  return v
end
`

// addScript increments the counters (KEYS[2..]) by ARGV[4..] for rows received in the second
// ARGV[3], unless that is before the day's born (KEYS[1]). Returns the new values, or nothing when
// skipped.
var addScript = redis.NewScript(CountLua + `
if tonumber(ARGV[3]) < born(KEYS[1], ARGV[1], ARGV[2]) then return {} end
local out = {}
for i = 2, #KEYS do
  out[i - 1] = count(KEYS[i], ARGV[i + 2], ARGV[2])
end
return out
`)

// BornKey is the key holding when live counting of a tenant's day began (see CountLua).
func (c *Counters) BornKey(tenant uuid.UUID, d time.Time) string { return c.bornKey(tenant, d) }

// Add increments the tenant's counters for a day by deltas (rows received in the second `received`)
// and returns the new values; nil when the rows predate live counting and were left to the rebuild.
func (c *Counters) Add(ctx context.Context, tenant uuid.UUID, d, received time.Time, deltas map[string]int64) (map[string]int64, error) {
	if len(deltas) == 0 {
		return nil, nil
	}
	keys := []string{c.bornKey(tenant, d)}
	args := []any{time.Now().Unix(), int(CounterTTL.Seconds()), received.Unix()}
	metrics := make([]string, 0, len(deltas))
	for metric, n := range deltas {
		keys = append(keys, c.Key(tenant, metric, d))
		args = append(args, n)
		metrics = append(metrics, metric)
	}
	vals, err := addScript.Run(ctx, c.rdb, keys, args...).Int64Slice()
	if err != nil {
		return nil, fmt.Errorf("add usage counters for tenant %s: %w", tenant, err)
	}
	if len(vals) == 0 {
		return nil, nil
	}
	out := make(map[string]int64, len(vals))
	for i, m := range metrics {
		out[m] = vals[i]
	}
	return out, nil
}

// forgetScript deletes the seeded mark and the counters (KEYS[2..]) and moves "born" (KEYS[1]) to the
// second after now: everything received up to now — also rows whose live increment was lost in this
// very second — is then the rebuild's to count, and only later rows are counted live.
var forgetScript = redis.NewScript(`
redis.call('DEL', unpack(KEYS, 2))
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
return 1
`)

// Forget drops a tenant's counters of metrics for a day: the next use of the day seeds it again from
// ClickHouse, so each row is again counted exactly once even though some live increments never
// arrived.
func (c *Counters) Forget(ctx context.Context, tenant uuid.UUID, d time.Time, metrics []string) error {
	keys := []string{c.bornKey(tenant, d), c.seededKey(tenant, d)}
	for _, m := range metrics {
		keys = append(keys, c.Key(tenant, m, d))
	}
	if err := forgetScript.Run(ctx, c.rdb, keys, time.Now().Unix()+1, int(CounterTTL.Seconds())).Err(); err != nil {
		return fmt.Errorf("drop usage counters for tenant %s: %w", tenant, err)
	}
	return nil
}

// Read returns the counters of metrics for a day, and whether the day is seeded (its counters can be
// trusted). An unseeded day must be seeded before its values mean anything.
func (c *Counters) Read(ctx context.Context, tenant uuid.UUID, d time.Time, metrics []string) (map[string]int64, bool, error) {
	keys := make([]string, 0, len(metrics)+1)
	keys = append(keys, c.seededKey(tenant, d))
	for _, m := range metrics {
		keys = append(keys, c.Key(tenant, m, d))
	}
	vals, err := c.rdb.MGet(ctx, keys...).Result()
	if err != nil {
		return nil, false, fmt.Errorf("read usage counters for tenant %s: %w", tenant, err)
	}
	out := make(map[string]int64, len(metrics))
	for i, m := range metrics {
		if s, ok := vals[i+1].(string); ok {
			n, _ := strconv.ParseInt(s, 10, 64)
			out[m] = n
		}
	}
	return out, vals[0] != nil, nil
}

// Born returns the unix second live counting of the day began, starting it now if it had not.
func (c *Counters) Born(ctx context.Context, tenant uuid.UUID, d time.Time) (time.Time, error) {
	k := c.bornKey(tenant, d)
	if err := c.rdb.SetNX(ctx, k, time.Now().Unix(), CounterTTL).Err(); err != nil {
		return time.Time{}, fmt.Errorf("mark counting start for tenant %s: %w", tenant, err)
	}
	s, err := c.rdb.Get(ctx, k).Int64()
	if err != nil {
		return time.Time{}, fmt.Errorf("read counting start for tenant %s: %w", tenant, err)
	}
	return time.Unix(s, 0).UTC(), nil
}

// seedScript adds base counts to the day's counters once: the first caller to find the day unseeded
// applies them and records each base in the seeded hash; any later or concurrent caller changes
// nothing. topUpScript later adds what ClickHouse has gained since for the same "before born" window
// (rows that were still in an ingest spool when the day was seeded), so the counter converges to the
// truth. Both apply a base only while "born" is still the second it was counted against: after a
// Forget moved it, a base read before is stale and is refused (-1), so the caller counts again.
//
// KEYS: seeded, born, counters...; ARGV: ttl, born, counts..., metric names...
var seedScript = redis.NewScript(`
if tonumber(redis.call('GET', KEYS[2])) ~= tonumber(ARGV[2]) then return -1 end
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], '_', '1')
for i = 3, #KEYS do
  local n = tonumber(ARGV[i])
  if n ~= 0 then redis.call('INCRBY', KEYS[i], n) end
  redis.call('EXPIRE', KEYS[i], ARGV[1])
  redis.call('HSET', KEYS[1], ARGV[#KEYS + i - 2], n)
end
redis.call('EXPIRE', KEYS[1], ARGV[1])
return 1
`)

var topUpScript = redis.NewScript(`
if tonumber(redis.call('GET', KEYS[2])) ~= tonumber(ARGV[2]) then return -1 end
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local added = 0
for i = 3, #KEYS do
  local n = tonumber(ARGV[i])
  local field = ARGV[#KEYS + i - 2]
  local old = tonumber(redis.call('HGET', KEYS[1], field) or '0')
  if n > old then
    redis.call('INCRBY', KEYS[i], n - old)
    redis.call('EXPIRE', KEYS[i], ARGV[1])
    redis.call('HSET', KEYS[1], field, n)
    added = added + (n - old)
  end
end
return added
`)

// ErrStaleBase: the counters were dropped and live counting restarted after the base was read.
var ErrStaleBase = errors.New("quota counters were reset while their base was read; read it again")

func (c *Counters) baseArgs(tenant uuid.UUID, d, born time.Time, base map[string]int64) ([]string, []any) {
	keys := []string{c.seededKey(tenant, d), c.bornKey(tenant, d)}
	args := []any{int(CounterTTL.Seconds()), born.Unix()}
	var names []any
	for m, n := range base {
		keys = append(keys, c.Key(tenant, m, d))
		args = append(args, n)
		names = append(names, m)
	}
	return keys, append(args, names...)
}

// Seed applies base (what ClickHouse holds from before born) to the day's counters, once. It returns
// ErrStaleBase when born is no longer the day's "born".
func (c *Counters) Seed(ctx context.Context, tenant uuid.UUID, d, born time.Time, base map[string]int64) (bool, error) {
	keys, args := c.baseArgs(tenant, d, born, base)
	applied, err := seedScript.Run(ctx, c.rdb, keys, args...).Int()
	if err != nil {
		return false, fmt.Errorf("seed usage counters for tenant %s: %w", tenant, err)
	}
	if applied == -1 {
		return false, ErrStaleBase
	}
	return applied == 1, nil
}

// TopUp raises a seeded day's counters to a newer reading of the same base window, adding only what
// was not added before (atomic, so concurrent top-ups never add twice). It returns how much it added,
// or ErrStaleBase when born is no longer the day's "born".
func (c *Counters) TopUp(ctx context.Context, tenant uuid.UUID, d, born time.Time, base map[string]int64) (int64, error) {
	keys, args := c.baseArgs(tenant, d, born, base)
	added, err := topUpScript.Run(ctx, c.rdb, keys, args...).Int64()
	if err != nil {
		return 0, fmt.Errorf("top up usage counters for tenant %s: %w", tenant, err)
	}
	if added == -1 {
		return 0, ErrStaleBase
	}
	return added, nil
}

// consumeScript is the atomic check-and-increment.
//
//	KEYS: counter, seeded, rate-limit bucket (the counter again when there is none), idempotency
//	      marker (the counter again when there is none)
//	ARGV: n, limit, ttl, gated (1/0), rate, burst, marked (1/0), marker ttl
//
// With a bucket it first takes the request's rate-limit token (ratelimit's take()) and stops at -2
// when refused. With a marker — a consume sent with an Idempotency-Key — a marker already set means
// this consume was allowed before: 2 with the value it left, and nothing spent again; an allowed
// consume sets the marker in the same step as the spend, so a retry after a crash can never spend
// twice. Then: -1 when the day is not seeded yet, 0 with the current value when n more would pass
// the limit, 1 with the new value when allowed. The last two elements are take()'s outcome.
var consumeScript = redis.NewScript(ratelimit.TakeLua + `
local taken, left = 1, 0
if ARGV[4] == '1' then
  taken, left = take(KEYS[3], tonumber(ARGV[5]), tonumber(ARGV[6]))
  if taken == 0 then return {-2, 0, taken, left} end
end
if ARGV[7] == '1' then
  local prev = redis.call('GET', KEYS[4])
  if prev then return {2, tonumber(prev), taken, left} end
end
if redis.call('EXISTS', KEYS[2]) == 0 then return {-1, 0, taken, left} end
local cur = tonumber(redis.call('GET', KEYS[1]) or '0')
local n = tonumber(ARGV[1])
if cur + n > tonumber(ARGV[2]) then return {0, cur, taken, left} end
local v = redis.call('INCRBY', KEYS[1], n)
redis.call('EXPIRE', KEYS[1], ARGV[3])
if ARGV[7] == '1' then redis.call('SET', KEYS[4], v, 'EX', ARGV[8]) end
return {1, v, taken, left}
`)

// Gate is a rate-limit bucket (see api.Meter) that a consume takes the request's token from in the
// same script, saving the separate round trip. Ran reports that the script took it; Allowed and
// MilliTokens are then take()'s outcome. A refused token consumes nothing.
type Gate struct {
	Key         string
	Rate        float64
	Burst       int
	Ran         bool
	Allowed     bool
	MilliTokens int64
}

// Marker is the once-only record of an idempotent consume: its key, and how long it is kept.
type Marker struct {
	Key string
	TTL time.Duration
}

// ConsumeOutcome is what one run of the consume script decided.
type ConsumeOutcome struct {
	Allowed  bool
	Seeded   bool  // false: the day's counters must be seeded first, nothing was decided
	Replayed bool  // the marker was set: an earlier run allowed this consume; nothing was spent now
	Value    int64 // the counter after the consume (or as it stands, when refused)
}

// Consume adds n to the counter only if the result stays within limit. With a gate, it first takes
// the rate-limit token; when that is refused (gate.Allowed false) nothing else happens. With a
// marker, a consume already allowed under it is reported as Replayed instead of spending again.
func (c *Counters) Consume(ctx context.Context, tenant uuid.UUID, metric string, d time.Time, n, limit int64, gate *Gate, marker *Marker) (ConsumeOutcome, error) {
	counter := c.Key(tenant, metric, d)
	keys := []string{counter, c.seededKey(tenant, d), counter, counter}
	args := []any{n, limit, int(CounterTTL.Seconds()), 0, 0, 0, 0, 0}
	if gate != nil {
		keys[2] = gate.Key
		args[3], args[4], args[5] = 1, gate.Rate, gate.Burst
	}
	if marker != nil {
		keys[3] = marker.Key
		args[6], args[7] = 1, max(int(marker.TTL.Seconds()), 1)
	}
	res, err := consumeScript.Run(ctx, c.rdb, keys, args...).Int64Slice()
	if err != nil {
		return ConsumeOutcome{}, fmt.Errorf("consume %s for tenant %s: %w", metric, tenant, err)
	}
	if gate != nil {
		gate.Ran, gate.Allowed, gate.MilliTokens = true, res[2] == 1, res[3]
	}
	switch res[0] {
	case -2:
		return ConsumeOutcome{Seeded: true}, nil
	case -1:
		return ConsumeOutcome{}, nil
	case 2:
		return ConsumeOutcome{Allowed: true, Seeded: true, Replayed: true, Value: res[1]}, nil
	}
	return ConsumeOutcome{Allowed: res[0] == 1, Seeded: true, Value: res[1]}, nil
}

// MarkerKey is the key of an idempotent consume's marker, under the tenant's hash tag.
func (c *Counters) MarkerKey(tenant uuid.UUID, metric, idempotencyKey string) string {
	sum := sha256.Sum256([]byte(metric + "\x00" + idempotencyKey))
	return fmt.Sprintf("%squota:{%s}:consumed:%s", c.prefix, tenant, hex.EncodeToString(sum[:]))
}

var undoScript = redis.NewScript(`
redis.call('DECRBY', KEYS[1], ARGV[1])
if #KEYS > 1 then redis.call('DEL', KEYS[2]) end
return 1
`)

// Undo takes n back (a consume whose durable record failed), with its marker if it had one: a retry
// must then spend again rather than be told it was allowed.
func (c *Counters) Undo(ctx context.Context, tenant uuid.UUID, metric string, d time.Time, n int64, marker *Marker) error {
	keys := []string{c.Key(tenant, metric, d)}
	if marker != nil {
		keys = append(keys, marker.Key)
	}
	return undoScript.Run(ctx, c.rdb, keys, n).Err()
}

// MarkOnce sets key (under the tenant's hash tag) if absent and reports whether this call set it.
// Alerts use it to fire exactly once per tenant, metric, day and threshold across instances.
func (c *Counters) MarkOnce(ctx context.Context, tenant uuid.UUID, name string, d time.Time) (bool, error) {
	k := fmt.Sprintf("%squota:{%s}:alert:%s:%s", c.prefix, tenant, name, day(d))
	return c.rdb.SetNX(ctx, k, 1, CounterTTL).Result()
}

// Get reads one counter; a missing counter reads as 0 with ok=false.
func (c *Counters) Get(ctx context.Context, tenant uuid.UUID, metric string, d time.Time) (int64, bool, error) {
	n, err := c.rdb.Get(ctx, c.Key(tenant, metric, d)).Int64()
	if err == redis.Nil {
		return 0, false, nil
	}
	if err != nil {
		return 0, false, fmt.Errorf("read usage counter %s for tenant %s: %w", metric, tenant, err)
	}
	return n, true, nil
}
