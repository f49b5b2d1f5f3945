// Package quota owns the live per-tenant usage counters in Redis and, on top of them, quota limits:
// defaults, per-tenant overrides, checks, the atomic consume and soft alerts; and the level metrics
// (storage_gb: set, not counted) in Postgres's usage_levels, with their part of POST /usage (Levels). ClickHouse stays the
// source of truth: Redis holds each day's running counts for fast answers, and a periodic
// reconciliation with ClickHouse brings them back to the truth after any fault (reconcile.go).
package quota

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/google/uuid"
	"github.com/redis/go-redis/v9"

	"github.com/analyticsd/analyticsd/internal/rediskeys"
	"github.com/analyticsd/analyticsd/internal/scriptbatch"
	"github.com/analyticsd/analyticsd/ratelimit"
)

// CounterTTL is how long a daily counter lives: long enough to answer for yesterday after midnight.
const CounterTTL = 48 * time.Hour

// Counters are the live daily counters in Redis. Per tenant, metric and UTC day there are:
//
//	quota:{<tenant>}:<metric>:<yyyymmdd>       the count: the sum over minutes of max(live, clickhouse)
//	quota:{<tenant>}:<metric>:<yyyymmdd>:live  a hash: minute (unix seconds / 60) the rows were
//	                                           received in -> what was counted live for them
//	quota:{<tenant>}:<metric>:<yyyymmdd>:ch    a hash: minute -> what ClickHouse held of those rows
//	                                           at the last reconciliation
//
// and per tenant and day quota:{<tenant>}::reconciled:<yyyymmdd>, the unix second of the day's last
// reconciliation: without it the counters are not to be trusted (Redis lost them) until one runs.
// (The empty segment keeps it apart from every counter: a metric's name is never empty, and
// "reconciled" is a metric name like any other.)
//
// Why a maximum per minute: a row is counted live once, when its id is claimed (or consumed), and
// ClickHouse stores it once, with the same received time. So for every minute both the live count
// and ClickHouse's count are at most the truth, and once the minute's rows have all landed
// ClickHouse's count is the truth. The maximum of the two is therefore never more than the truth,
// is the truth in real time when nothing failed (live), and becomes the truth once the rows land
// whatever failed (a live count lost to a crash, a Redis flush or failover, a consume allowed while
// Redis was away, a counter fed by an instance whose clock is off: the received time is the one
// stored with the row). A live count that must be taken back (a row counted but then found to be a
// duplicate, a consume whose record failed) is subtracted; if even that is lost, minutes older than
// SettleAfter are clamped to ClickHouse's count at reconciliation.
//
// The braces are a Redis Cluster hash tag: all of one tenant's keys share a slot, so the scripts
// below may touch several of them atomically.
type Counters struct {
	rdb redis.UniversalClient
	// consumes runs the consume script: a scriptbatch.Batcher on rdb, so that concurrent consumes
	// share a round trip.
	consumes redis.Scripter
	prefix   string // prepended to every key (tests isolate themselves with it)
}

// SettleAfter is how long after a minute a live count above ClickHouse's is believed to be rows still
// on their way; after it, reconciliation takes ClickHouse's count for the minute.
const SettleAfter = 10 * time.Minute

// NewCounters returns Counters on rdb; prefix is usually "".
func NewCounters(rdb redis.UniversalClient, prefix string) *Counters {
	return &Counters{rdb: rdb, consumes: scriptbatch.New(rdb), prefix: prefix}
}

func day(t time.Time) string { return t.UTC().Format("20060102") }

// minute is the counters' time bucket of a received time.
func minute(t time.Time) int64 { return t.Unix() / 60 }

// batcher is the consume script's batcher; nil for nil Counters, or when a benchmark sends each
// consume alone.
func (c *Counters) batcher() *scriptbatch.Batcher {
	if c == nil {
		return nil
	}
	b, _ := c.consumes.(*scriptbatch.Batcher)
	return b
}

// Key is the Redis key of a tenant's metric on a UTC day.
func (c *Counters) Key(tenant uuid.UUID, metric string, d time.Time) string {
	return c.tag(tenant) + metric + ":" + day(d)
}

// tag is the start of every key of the tenant: the prefix and the tenant's hash tag,
// "<prefix>quota:{<tenant>}:".
func (c *Counters) tag(tenant uuid.UUID) string {
	return c.prefix + "quota:{" + tenant.String() + "}:"
}

// LiveKey is the hash of what was counted live per received minute (see Counters).
func (c *Counters) LiveKey(tenant uuid.UUID, metric string, d time.Time) string {
	return c.counterKeys(tenant, metric, d)[1]
}

// BaseKey is the hash of ClickHouse's count per received minute (see Counters).
func (c *Counters) BaseKey(tenant uuid.UUID, metric string, d time.Time) string {
	return c.counterKeys(tenant, metric, d)[2]
}

// counterKeys are a counter's three keys — the count, its live hash, its ClickHouse hash — in the
// order the scripts take them.
func (c *Counters) counterKeys(tenant uuid.UUID, metric string, d time.Time) []string {
	k := c.Key(tenant, metric, d)
	return []string{k, k + ":live", k + ":ch"}
}

func (c *Counters) reconciledKey(tenant uuid.UUID, d time.Time) string {
	return c.tag(tenant) + reconciledMark + day(d)
}

// reconciledMark follows a tenant's tag in its reconciliation marks: an empty metric segment, which
// no counter has.
const reconciledMark = ":reconciled:"

// CountLua is the counting step other scripts compose with (dedup's claim script counts a row in the
// same atomic step that claims its id, so a row is counted exactly when it is claimed). It defines
//
//	count(counter, live, base, minute, n, ttl)  adds n (negative: takes back) to the live count of
//	                                            the minute, never below 0, moves the counter by what
//	                                            that changes max(live, base) for the minute, and
//	                                            returns the change and the counter's new value
const CountLua = `
local function count(counter, live, base, minute, n, ttl)
  local l = tonumber(redis.call('HGET', live, minute) or '0')
  local b = tonumber(redis.call('HGET', base, minute) or '0')
  local nl = math.max(l + n, 0)
  redis.call('HSET', live, minute, string.format('%d', nl))
  redis.call('EXPIRE', live, ttl)
  local by = math.max(nl, b) - math.max(l, b)
  local v
  if by ~= 0 then
    v = redis.call('INCRBY', counter, string.format('%d', by))
  else
    v = tonumber(redis.call('GET', counter) or '0')
  end
  redis.call('EXPIRE', counter, ttl)
  return by, v
end
`

// addScript counts rows live: KEYS are (counter, live, base) triples, ARGV the ttl, the received
// minute and one amount per triple. Returns each counter's change and new value.
var addScript = redis.NewScript(CountLua + `
local out = {}
for i = 1, #KEYS, 3 do
  local by, v = count(KEYS[i], KEYS[i + 1], KEYS[i + 2], ARGV[2], tonumber(ARGV[3 + (i - 1) / 3]), ARGV[1])
  out[#out + 1] = by
  out[#out + 1] = v
end
return out
`)

// Change is what counting did to one counter: by how much it moved, and its value after.
type Change struct{ By, Value int64 }

// Add counts deltas (metric -> n; negative takes a live count back) for rows of a tenant's day that
// were received at `received`, and returns what each counter did.
func (c *Counters) Add(ctx context.Context, tenant uuid.UUID, d, received time.Time, deltas map[string]int64) (map[string]Change, error) {
	if len(deltas) == 0 {
		return nil, nil
	}
	keys := make([]string, 0, 3*len(deltas))
	args := []any{int(CounterTTL.Seconds()), minute(received)}
	metrics := make([]string, 0, len(deltas))
	for metric, n := range deltas {
		keys = append(keys, c.counterKeys(tenant, metric, d)...)
		args = append(args, n)
		metrics = append(metrics, metric)
	}
	vals, err := addScript.Run(ctx, c.rdb, keys, args...).Int64Slice()
	if err != nil {
		return nil, fmt.Errorf("add usage counters for tenant %s: %w", tenant, err)
	}
	out := make(map[string]Change, len(metrics))
	for i, m := range metrics {
		out[m] = Change{By: vals[2*i], Value: vals[2*i+1]}
	}
	return out, nil
}

// reconcileScript raises a counter's ClickHouse counts (KEYS[3]) to a new reading — a count never
// goes down, so a reading older than one already applied changes nothing — clamps live counts of
// minutes before ARGV[2] to ClickHouse's, and sets the counter (KEYS[1]) to the sum over minutes of
// max(live, clickhouse) computed afresh, which also repairs a counter that lost writes.
//
//	KEYS: counter, live, base; ARGV: ttl, settle minute, then minute, count pairs
//
// Returns the counter before and after, and whether the ClickHouse hash existed before this call.
var reconcileScript = redis.NewScript(`
local had = redis.call('EXISTS', KEYS[3])
for i = 3, #ARGV, 2 do
  local v = tonumber(ARGV[i + 1])
  if v > tonumber(redis.call('HGET', KEYS[3], ARGV[i]) or '0') then redis.call('HSET', KEYS[3], ARGV[i], ARGV[i + 1]) end
end
local base = {}
local raw = redis.call('HGETALL', KEYS[3])
for i = 1, #raw, 2 do base[raw[i]] = tonumber(raw[i + 1]) end
local settle = tonumber(ARGV[2])
local total, seen = 0, {}
raw = redis.call('HGETALL', KEYS[2])
for i = 1, #raw, 2 do
  local m, l = raw[i], tonumber(raw[i + 1])
  local b = base[m] or 0
  if l > b and tonumber(m) < settle then
    redis.call('HSET', KEYS[2], m, string.format('%d', b))
    l = b
  end
  total = total + math.max(l, b)
  seen[m] = true
end
for m, b in pairs(base) do
  if not seen[m] then total = total + b end
end
local before = tonumber(redis.call('GET', KEYS[1]) or '0')
redis.call('SET', KEYS[1], string.format('%d', total), 'EX', ARGV[1])
for i = 2, 3 do
  if redis.call('EXISTS', KEYS[i]) == 1 then redis.call('EXPIRE', KEYS[i], ARGV[1]) end
end
return {before, total, had}
`)

// Reconciled is what one Reconcile did: the counter before and after, and whether Redis still had
// the counter's ClickHouse counts from earlier rounds (false: send them all again).
type Reconciled struct {
	Before, After int64
	HadBase       bool
}

// Reconcile applies ClickHouse's counts per received minute (base: unix minute -> count) to a
// tenant's counter of metric for a day and recomputes it; live counts of minutes before settle are
// clamped to ClickHouse's.
func (c *Counters) Reconcile(ctx context.Context, tenant uuid.UUID, metric string, d, settle time.Time, base map[int64]int64) (Reconciled, error) {
	args := make([]any, 0, 2+2*len(base))
	args = append(args, int(CounterTTL.Seconds()), minute(settle))
	for m, n := range base {
		args = append(args, m, n)
	}
	keys := c.counterKeys(tenant, metric, d)
	vals, err := reconcileScript.Run(ctx, c.rdb, keys, args...).Int64Slice()
	if err != nil {
		return Reconciled{}, fmt.Errorf("reconcile usage counter %s for tenant %s: %w", metric, tenant, err)
	}
	return Reconciled{Before: vals[0], After: vals[1], HadBase: vals[2] == 1}, nil
}

// ReconciledTenants lists the tenants Redis marks as reconciled for a day (a SCAN of the keyspace:
// the periodic reconciliation does it on its full rounds only).
func (c *Counters) ReconciledTenants(ctx context.Context, d time.Time) ([]uuid.UUID, error) {
	var out []uuid.UUID
	err := rediskeys.Scan(ctx, c.rdb, c.prefix+"quota:{*}:"+reconciledMark+day(d), func(key string) error {
		k := strings.TrimPrefix(key, c.prefix+"quota:{")
		if i := strings.IndexByte(k, '}'); i > 0 {
			if t, err := uuid.Parse(k[:i]); err == nil {
				out = append(out, t)
			}
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("list reconciled tenants: %w", err)
	}
	return out, nil
}

// Forget deletes a tenant's counters of metrics for a day, their ClickHouse hashes and the day's mark
// (what a reconciliation wrote), keeping what was counted live: the next reconciliation recomputes
// them, and reads meanwhile treat the day as never reconciled.
func (c *Counters) Forget(ctx context.Context, tenant uuid.UUID, d time.Time, metrics []string) error {
	keys := []string{c.reconciledKey(tenant, d)}
	for _, m := range metrics {
		keys = append(keys, c.Key(tenant, m, d), c.BaseKey(tenant, m, d))
	}
	if err := c.rdb.Del(ctx, keys...).Err(); err != nil { // one slot: they share the tenant's hash tag
		return fmt.Errorf("forget usage counters of tenant %s: %w", tenant, err)
	}
	return nil
}

// MarkReconciled records that a tenant's counters for a day were reconciled at `at`.
func (c *Counters) MarkReconciled(ctx context.Context, tenant uuid.UUID, d, at time.Time) error {
	if err := c.rdb.Set(ctx, c.reconciledKey(tenant, d), at.Unix(), CounterTTL).Err(); err != nil {
		return fmt.Errorf("mark usage counters of tenant %s reconciled: %w", tenant, err)
	}
	return nil
}

// Read returns the counters of metrics for a day and when the day was last reconciled (zero: never,
// or Redis lost it — the values are then not to be trusted until a reconciliation).
func (c *Counters) Read(ctx context.Context, tenant uuid.UUID, d time.Time, metrics []string) (map[string]int64, time.Time, error) {
	keys := make([]string, 0, len(metrics)+1)
	keys = append(keys, c.reconciledKey(tenant, d))
	for _, m := range metrics {
		keys = append(keys, c.Key(tenant, m, d))
	}
	vals, err := c.rdb.MGet(ctx, keys...).Result()
	if err != nil {
		return nil, time.Time{}, fmt.Errorf("read usage counters for tenant %s: %w", tenant, err)
	}
	out := make(map[string]int64, len(metrics))
	for i, m := range metrics {
		if s, ok := vals[i+1].(string); ok {
			n, _ := strconv.ParseInt(s, 10, 64)
			out[m] = n
		}
	}
	var at time.Time
	if s, ok := vals[0].(string); ok {
		if n, err := strconv.ParseInt(s, 10, 64); err == nil {
			at = time.Unix(n, 0).UTC()
		}
	}
	return out, at, nil
}

// consumeScript is the atomic check-and-increment; ratelimit composes it with the taking of the
// request's rate-limit token (its meter), so a metered consume is still one round trip.
//
//	KEYS: counter, live, base, reconciled, idempotency marker, the marker's amount and time (the
//	      counter again for both when there is no marker)
//	ARGV: n, limit, ttl, marked (1/0), marker ttl, minute, the spend's unix time
//
// With a marker — a consume sent with an Idempotency-Key — a marker already set means a consume
// under that key was allowed before, and nothing is spent again: 2 with the value it left and its
// unix time when its n is this one's (a retry), 3 when it spent another n (the key reused for
// another request: refused, never answered "allowed" for a spend nobody made). An allowed consume
// sets the marker (the value, as before) and its amount key ("n time") in the same step as the
// spend, so a retry after a crash can never spend twice. The amount has a key of its own so that a
// marker still reads as a plain number to a version before it (during a rolling deploy, or after a
// rollback, that version's script returns tonumber(marker)); a marker without one (written by such
// a version) replays as it did, its time unknown. Then: -1 when the day was never reconciled (Redis
// lost it), 0 with the current value when n more would pass the limit, 1 with the new value when
// allowed (counted live in its minute). Numbers are written with %d: Lua's own conversion writes
// 1e14 and above as "1e+14".
var consumeScript = ratelimit.NewScript(CountLua + `
if ARGV[4] == '1' then
  local prev = redis.call('GET', KEYS[5])
  if prev then
    local meta = redis.call('GET', KEYS[6])
    local pv, pn, pat = prev, nil, nil
    if meta then
      pn, pat = string.match(meta, '^(%d+) (%d+)$')
    else -- a marker "value n time" in one key, as one build (never released) wrote it
      local v1, n1, t1 = string.match(prev, '^(%S+) (%d+) (%d+)$')
      if v1 then pv, pn, pat = v1, n1, t1 end
    end
    if pn and pn ~= ARGV[1] then return {3, tonumber(pv) or 0} end
    return {2, tonumber(pv) or 0, tonumber(pat) or 0}
  end
end
if redis.call('EXISTS', KEYS[4]) == 0 then return {-1, 0} end
local cur = tonumber(redis.call('GET', KEYS[1]) or '0')
local n = tonumber(ARGV[1])
if cur + n > tonumber(ARGV[2]) then return {0, cur} end
local _, v = count(KEYS[1], KEYS[2], KEYS[3], ARGV[6], n, ARGV[3])
if ARGV[4] == '1' then
  redis.call('SET', KEYS[5], string.format('%d', v), 'EX', ARGV[5])
  redis.call('SET', KEYS[6], ARGV[1] .. ' ' .. ARGV[7], 'EX', ARGV[5])
end
return {1, v}
`)

// Marker is the once-only record of an idempotent consume: its key, and how long it is kept.
type Marker struct {
	Key string
	TTL time.Duration
}

// amountKey holds the marked consume's n and unix time, beside the marker (same hash tag).
func (m *Marker) amountKey() string { return m.Key + ":n" }

// ConsumeOutcome is what one run of the consume script decided.
type ConsumeOutcome struct {
	Allowed    bool
	Reconciled bool // false: the day's counters must be reconciled first, nothing was decided
	Replayed   bool // the marker was set: an earlier run allowed this consume; nothing was spent now
	// FirstAt is when the earlier run spent (Replayed; zero for a marker that did not record it).
	FirstAt time.Time
	// KeyReused: the marker was set by a consume of another n under the same key; nothing was
	// spent, and Allowed is false.
	KeyReused bool
	Value     int64 // the counter after the consume (or as it stands, when refused)
}

// Consume adds n to the counter of the day of `at` — counted live in at's minute, the received time
// its increment is stored with — only if the result stays within limit. With a meter not yet taken,
// the same script first takes the request's rate-limit token; when that is refused (m.Refused)
// nothing else happens. With a marker, a consume already allowed under it is reported as Replayed
// instead of spending again.
func (c *Counters) Consume(ctx context.Context, tenant uuid.UUID, metric string, at time.Time, n, limit int64, m *ratelimit.Meter, marker *Marker) (ConsumeOutcome, error) {
	tag, dd := c.tag(tenant), day(at)
	k := tag + metric + ":" + dd
	keys := []string{k, k + ":live", k + ":ch", tag + reconciledMark + dd, k, k} // the marker's slots: the counter again when unused
	args := []any{n, limit, int(CounterTTL.Seconds()), 0, 0, minute(at), at.Unix()}
	if marker != nil {
		keys[4], keys[5] = marker.Key, marker.amountKey()
		args[3], args[4] = 1, max(int(marker.TTL.Seconds()), 1)
	}
	res, err := consumeScript.Run(ctx, c.consumes, m, keys, args...)
	if err != nil {
		return ConsumeOutcome{}, fmt.Errorf("consume %s for tenant %s: %w", metric, tenant, err)
	}
	switch {
	case m.Refused():
		return ConsumeOutcome{Reconciled: true}, nil
	case len(res) < 2:
		return ConsumeOutcome{}, fmt.Errorf("consume %s for tenant %s: the script answered %v", metric, tenant, res)
	case res[0] == -1:
		return ConsumeOutcome{}, nil
	case res[0] == 2:
		o := ConsumeOutcome{Allowed: true, Reconciled: true, Replayed: true, Value: res[1]}
		if len(res) > 2 && res[2] > 0 {
			o.FirstAt = time.Unix(res[2], 0).UTC()
		}
		return o, nil
	case res[0] == 3:
		return ConsumeOutcome{Reconciled: true, KeyReused: true, Value: res[1]}, nil
	}
	return ConsumeOutcome{Allowed: res[0] == 1, Reconciled: true, Value: res[1]}, nil
}

// MarkerKey is the key of an idempotent consume's marker, under the tenant's hash tag.
func (c *Counters) MarkerKey(tenant uuid.UUID, metric, idempotencyKey string) string {
	sum := sha256.Sum256([]byte(metric + "\x00" + idempotencyKey))
	return c.tag(tenant) + "consumed:" + hex.EncodeToString(sum[:])
}

var undoScript = redis.NewScript(CountLua + `
count(KEYS[1], KEYS[2], KEYS[3], ARGV[2], -tonumber(ARGV[1]), ARGV[3])
for i = 4, #KEYS do redis.call('DEL', KEYS[i]) end
return 1
`)

// Undo takes back a consume of n at `at` whose durable record failed, with its marker if it had
// one: a retry must then spend again rather than be told it was allowed. Like every take-back it
// never takes the minute's live count below zero, and keeps the keys' expiry.
func (c *Counters) Undo(ctx context.Context, tenant uuid.UUID, metric string, at time.Time, n int64, marker *Marker) error {
	keys := c.counterKeys(tenant, metric, at)
	if marker != nil {
		keys = append(keys, marker.Key, marker.amountKey())
	}
	return undoScript.Run(ctx, c.rdb, keys, n, minute(at), int(CounterTTL.Seconds())).Err()
}

// MarkOnce sets key (under the tenant's hash tag) if absent and reports whether this call set it.
// Alerts use it to fire exactly once per tenant, metric, day and threshold across instances.
func (c *Counters) MarkOnce(ctx context.Context, tenant uuid.UUID, name string, d time.Time) (bool, error) {
	k := c.tag(tenant) + "alert:" + name + ":" + day(d)
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
