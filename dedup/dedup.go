// Package dedup owns what analyticsd remembers so that retries are harmless: which event and
// increment ids each tenant has had within the dedup window, and which batch (accepted request) owns
// each; and the first response to every request sent with an Idempotency-Key. Both live in Redis
// under the tenant's hash tag, so all of a tenant's keys share one Redis Cluster slot and each
// script touches one slot. It stores nothing itself: ingest asks it at request time (Claim) and
// again when shipping (Verify), and decides from the answers.
//
// Keys, per tenant T:
//
//	dedup:{T}:epoch        unix second the tenant's claim history began (set on first use; Redis
//	                       losing its data shows as a newer epoch)
//	dedup:{T}:began        the same instant in unix nanoseconds: what tells apart two histories
//	                       begun in one second (Redis losing its data in the second the history
//	                       began). Binaries before it read only epoch; one whose began is missing or
//	                       disagrees with epoch (a history begun by such a binary) is epoch's second.
//	dedup:{T}:e:<bucket>   a hash: event id (16 bytes) -> the batch id holding it (8 bytes), for the
//	                       ids first claimed in that window-long time bucket; kept two windows
//	dedup:{T}:i:<bucket>   the same for increment ids
//	idem:{T}:<sha256>      an Idempotency-Key's request fingerprint and first response
//
// A claim is looked up in the current bucket and the one before, so an id is remembered for at least
// one window and at most two. Fields of a few hashes, rather than a key per id with its own expiry,
// cost Redis about 2 µs of CPU and 93 bytes per id instead of 4.5–5 µs and ~120 bytes
// (BenchmarkClaim500 and BenchmarkLuaVariants, this package). Nearly all of it is adding the id to
// the hash: looking 500 ids up in both buckets costs 0.15 µs per id, inserting them 1.8–2 µs, and
// spreading a tenant's ids over many small hashes (listpack-encoded) saves memory (28 bytes per id)
// but not CPU (2.2–3.9 µs), so the claims stay in one hash per bucket.
package dedup

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/google/uuid"
	"github.com/redis/go-redis/v9"

	"github.com/analyticsd/analyticsd/internal/clock"
)

// Store is the claims and idempotency registry in Redis.
type Store struct {
	rdb      redis.UniversalClient
	prefix   string // prepended to every key (tests isolate themselves with it)
	window   time.Duration
	now      func() time.Time
	counting *Counting
	claim    *redis.Script

	mu       sync.Mutex
	floor    time.Time         // the latest Redis restart noticed (see restartFloor)
	floorAt  time.Time         // when it was last looked at
	loss     time.Time         // the latest loss of claims this process knows of (see Loss)
	lossSeen time.Time         // when it first learnt of it, by its own clock
	seen     map[string]string // run ids read last, for noticing a restart while Redis cannot record it
	gen      string            // the generation of the recorded run ids last seen (restartScript)
	looks    uint64            // looks at the run ids begun, and the newest whose answer was taken in
	applied  uint64
	runIDsFn func(ctx context.Context) (map[string]string, error)

	holder atomic.Value // string: this process's liveness mark, once KeepAlive runs

	markMu  sync.Mutex
	markers map[string]string // cluster master address -> its marker key (markerKey)
}

// Counting is the live usage counters a claim adds to, in the same atomic step (quota's): a row is
// counted exactly when its id is claimed, so no crash, retry or timeout can count it twice or skip it.
type Counting struct {
	Keys interface {
		Key(tenant uuid.UUID, metric string, day time.Time) string
		LiveKey(tenant uuid.UUID, metric string, day time.Time) string
		BaseKey(tenant uuid.UUID, metric string, day time.Time) string
	}
	// Lua defines count(counter, live, base, minute, n, ttl) (quota.CountLua).
	Lua string
	// TTL is how long a counter is kept.
	TTL time.Duration
}

// Unit says what row i of a claim adds to the live counters when its id turns out new: a metric
// ("" for nothing), an amount, the UTC day it counts on, and when the row was received (the live
// counters count per received minute, the time ClickHouse stores with the row).
type Unit = func(i int) (metric string, n int64, day, received time.Time)

// Counted is told what a claim added to a counter: by how much, and the value after (for alerts).
type Counted = func(day time.Time, metric string, by, value int64)

// NewStore returns a Store keeping ids and idempotent responses for window. counting may be nil
// (claims count nothing).
func NewStore(rdb redis.UniversalClient, prefix string, window time.Duration, counting *Counting) *Store {
	lua := ""
	if counting != nil {
		lua = counting.Lua
	}
	s := &Store{rdb: rdb, prefix: prefix, window: window, now: clock.Now, counting: counting, claim: redis.NewScript(lua + claimLua)}
	s.runIDsFn = s.runIDs
	return s
}

// Window is how long an id or an Idempotency-Key is remembered.
func (s *Store) Window() time.Duration { return s.window }

func (s *Store) epochKey(tenant uuid.UUID) string {
	return fmt.Sprintf("%sdedup:{%s}:epoch", s.prefix, tenant)
}

func (s *Store) beganKey(tenant uuid.UUID) string {
	return fmt.Sprintf("%sdedup:{%s}:began", s.prefix, tenant)
}

// epochOf is a tenant's epoch from its epoch (unix seconds) and began (unix nanoseconds) values.
func epochOf(epoch, began string) (time.Time, error) {
	sec, err := strconv.ParseInt(epoch, 10, 64)
	if err != nil {
		return time.Time{}, fmt.Errorf("claim epoch %q: %w", epoch, err)
	}
	if ns, err := strconv.ParseInt(began, 10, 64); err == nil && ns/1e9 == sec {
		return time.Unix(0, ns).UTC(), nil
	}
	return time.Unix(sec, 0).UTC(), nil
}

// bucketKey is the hash holding the claims of a kind ('e' events, 'i' increments) first made in a
// window-long time bucket.
func (s *Store) bucketKey(tenant uuid.UUID, kind byte, bucket int64) string {
	return fmt.Sprintf("%sdedup:{%s}:%c:%d", s.prefix, tenant, kind, bucket)
}

// claimLua claims ids, each for its batch: an id held in the previous or current bucket (KEYS[3],
// KEYS[2]) keeps its holder; an id held by neither is claimed in the current bucket, which is kept
// two windows. It counts the rows it claims now. State per id: 2 claimed now, 1 its batch held it
// already, 0 another batch holds it. The first two elements are the tenant's epoch (KEYS[1], unix
// seconds) and began (KEYS[4], unix nanoseconds, or empty), both started now when epoch is missing;
// after the states come (counter, added, value) triples.
//
//	ARGV: window, now ("<unix seconds> <unix nanoseconds>"), n, counter ttl, min received,
//	      bucket ttl, the ids (16 bytes each), the batch ids (8 bytes each, or 8 bytes for all),
//	      the rows that count (6 bytes each: position from 0, uint32, and group from 1, uint16,
//	      little-endian), then per group: its counter's KEYS index, amount, received (unix
//	      second), its live and base hashes' KEYS indexes
//
// Ids and counted rows travel packed — a request's rows fall into a few groups (a metric and day
// each) — so a claim is a dozen arguments, not six per id: that halved what building and sending a
// 500-id claim cost analyticsd. They are looked up a thousand at a time with HMGET and the new ones
// claimed with one HSET — the script runs alone, so that is as atomic as HSETNX per id, and a
// Redis call per id was most of the claim's cost (2.5 µs of Redis CPU per event in a REST run).
var claimLua = `
local n = tonumber(ARGV[3])
local epoch = redis.call('GET', KEYS[1])
local began
if epoch then
  began = redis.call('GET', KEYS[4])
else
  epoch, began = string.match(ARGV[2], '^(%S+) (%S+)$')
  redis.call('SET', KEYS[1], epoch)
  redis.call('SET', KEYS[4], began)
end
local out = {epoch, began or ''}
local ids, wids = ARGV[7], ARGV[8]
local shared = #wids == 8
local prev = redis.call('EXISTS', KEYS[3]) == 1
local mine = {}
for first = 1, n, 1000 do
  local last = math.min(n, first + 999)
  local list = {}
  for i = first, last do list[#list + 1] = string.sub(ids, 16 * i - 15, 16 * i) end
  local before = {}
  if prev then before = redis.call('HMGET', KEYS[3], unpack(list)) end
  local now = redis.call('HMGET', KEYS[2], unpack(list))
  local claim = {}
  for k, id in ipairs(list) do
    local i = first + k - 1
    local w = wids
    if not shared then w = string.sub(wids, 8 * i - 7, 8 * i) end
    local v = before[k] or now[k] or mine[id]
    if v then
      out[i + 2] = (v == w) and 1 or 0
    else
      mine[id] = w
      claim[#claim + 1] = id
      claim[#claim + 1] = w
      out[i + 2] = 2
    end
  end
  if #claim > 0 then redis.call('HSET', KEYS[2], unpack(claim)) end
end
redis.call('EXPIRE', KEYS[2], ARGV[6])
local minrecv = tonumber(ARGV[5])
local sums, order = {}, {}
local rows = ARGV[9]
for p = 1, #rows, 6 do
  local b1, b2, b3, b4, g1, g2 = string.byte(rows, p, p + 5)
  if out[b1 + 256 * (b2 + 256 * (b3 + 256 * b4)) + 3] == 2 then
    local g = g1 + 256 * g2
    if not sums[g] then
      sums[g] = 0
      order[#order + 1] = g
    end
    sums[g] = sums[g] + tonumber(ARGV[6 + 5 * g])
  end
end
local byCounter, counters = {}, {}
for _, g in ipairs(order) do
  local a = 5 + 5 * g -- group g's arguments: counter, amount, received, live, base
  local recv = tonumber(ARGV[a + 2])
  if recv >= minrecv then
    local c = tonumber(ARGV[a])
    local by, v = count(KEYS[c], KEYS[tonumber(ARGV[a + 3])], KEYS[tonumber(ARGV[a + 4])], math.floor(recv / 60), sums[g], ARGV[4])
    if not byCounter[c] then
      byCounter[c] = {0, 0}
      counters[#counters + 1] = c
    end
    byCounter[c][1] = byCounter[c][1] + by
    byCounter[c][2] = v
  end
end
for _, c in ipairs(counters) do
  out[#out + 1] = c
  out[#out + 1] = byCounter[c][1]
  out[#out + 1] = byCounter[c][2]
end
return out
`

// run claims ids (batch wids[i] for ids[i]) and counts the newly claimed rows received at or after
// minReceived, returning each id's state and the tenant's epoch.
func (s *Store) run(ctx context.Context, tenant uuid.UUID, kind byte, ids []uuid.UUID, wids []uint64, minReceived time.Time, unit Unit, counted Counted) ([]int64, time.Time, error) {
	n := len(ids)
	now := s.now()
	bucket := now.Unix() / s.windowSeconds()
	keys := []string{s.epochKey(tenant), s.bucketKey(tenant, kind, bucket), s.bucketKey(tenant, kind, bucket-1), s.beganKey(tenant)}
	ttl := int64(1)
	if s.counting != nil {
		ttl = max(int64(s.counting.TTL/time.Second), 1)
	}
	packedIDs := make([]byte, 0, 16*n)
	for i := range ids {
		packedIDs = append(packedIDs, ids[i][:]...)
	}
	shared := true
	for _, w := range wids {
		shared = shared && w == wids[0]
	}
	var packedWids []byte
	if shared {
		packedWids = binary.LittleEndian.AppendUint64(nil, wids[0])
	} else {
		packedWids = make([]byte, 0, 8*n)
		for _, w := range wids {
			packedWids = binary.LittleEndian.AppendUint64(packedWids, w)
		}
	}
	args := []any{s.windowSeconds(), strconv.FormatInt(now.Unix(), 10) + " " + strconv.FormatInt(now.UnixNano(), 10), n, ttl, minReceived.Unix(), 2*s.windowSeconds() + 3600, packedIDs, packedWids}
	type counter struct {
		day    time.Time
		metric string
	}
	index := map[string]int{} // extra key -> its KEYS index (1-based)
	named := map[int]counter{}
	keyIndex := func(k string) int {
		if i, ok := index[k]; ok {
			return i
		}
		keys = append(keys, k)
		index[k] = len(keys)
		return len(keys)
	}
	var rows []byte
	var groupArgs []any
	if unit != nil && s.counting != nil {
		type group struct {
			metric        string
			amount        int64
			day, received int64 // unix seconds
		}
		groups := map[group]int{} // -> its number, from 1
		for i := range ids {
			metric, amount, d, received := unit(i)
			if metric == "" {
				continue
			}
			k := group{metric, amount, d.Unix(), received.Unix()}
			g, ok := groups[k]
			if !ok {
				if len(groups) == 1<<16-1 {
					return nil, time.Time{}, fmt.Errorf("claim: more than %d counter groups in one call", 1<<16-1)
				}
				c := keyIndex(s.counting.Keys.Key(tenant, metric, d))
				l := keyIndex(s.counting.Keys.LiveKey(tenant, metric, d))
				b := keyIndex(s.counting.Keys.BaseKey(tenant, metric, d))
				named[c] = counter{d, metric}
				g = len(groups) + 1
				groups[k] = g
				groupArgs = append(groupArgs, c, amount, received.Unix(), l, b)
			}
			rows = binary.LittleEndian.AppendUint32(rows, uint32(i))
			rows = binary.LittleEndian.AppendUint16(rows, uint16(g))
		}
	}
	args = append(append(args, rows), groupArgs...)
	raw, err := s.claim.Run(ctx, s.rdb, keys, args...).Slice()
	if err != nil {
		return nil, time.Time{}, err
	}
	if len(raw) < n+2 {
		return nil, time.Time{}, fmt.Errorf("claim script answered %d values for %d ids", len(raw), n)
	}
	epochStr, _ := raw[0].(string)
	beganStr, _ := raw[1].(string)
	epoch, err := epochOf(epochStr, beganStr)
	if err != nil {
		return nil, time.Time{}, err
	}
	res := make([]int64, len(raw)-2)
	for i, v := range raw[2:] {
		if res[i], err = toInt64(v); err != nil {
			return nil, time.Time{}, fmt.Errorf("claim script: %w", err)
		}
	}
	if counted != nil {
		for j := n; j+2 < len(res); j += 3 {
			c := named[int(res[j])]
			counted(c.day, c.metric, res[j+1], res[j+2])
		}
	}
	return res[:n], epoch, nil
}

// Claim records, for a batch whose rows are durable, that batch wid holds ids of a kind; dup[i]
// reports that another batch held ids[i] already. Rows claimed now are counted in the same step
// (unit). The epoch is when the tenant's claims began.
func (s *Store) Claim(ctx context.Context, tenant uuid.UUID, kind byte, wid uint64, ids []uuid.UUID, unit Unit, counted Counted) ([]bool, time.Time, error) {
	wids := make([]uint64, len(ids))
	for i := range wids {
		wids[i] = wid
	}
	states, epoch, err := s.run(ctx, tenant, kind, ids, wids, time.Time{}, unit, counted)
	if err != nil {
		return nil, time.Time{}, fmt.Errorf("claim %d ids for tenant %s: %w", len(ids), tenant, err)
	}
	if epoch, err = s.withFloor(ctx, epoch, time.Second); err != nil {
		return nil, time.Time{}, err
	}
	dup := make([]bool, len(ids))
	for i, st := range states {
		dup[i] = st == 0
	}
	return dup, epoch, nil
}

// Verify answers, when rows are shipped, whether batch wids[i] holds ids[i], claiming the ids nobody
// holds for their batch (reclaimed) and counting those: unless received more than a window ago, when
// the claim may have expired after the row was counted (the caller rebuilds their counters instead).
func (s *Store) Verify(ctx context.Context, tenant uuid.UUID, kind byte, ids []uuid.UUID, wids []uint64, unit Unit, counted Counted) (held, reclaimed []bool, epoch time.Time, err error) {
	states, epoch, err := s.run(ctx, tenant, kind, ids, wids, s.now().Add(-s.window), unit, counted)
	if err != nil {
		return nil, nil, time.Time{}, fmt.Errorf("verify %d claims for tenant %s: %w", len(ids), tenant, err)
	}
	if epoch, err = s.withFloor(ctx, epoch, 0); err != nil {
		return nil, nil, time.Time{}, err
	}
	held, reclaimed = make([]bool, len(ids)), make([]bool, len(ids))
	for i, st := range states {
		held[i], reclaimed[i] = st != 0, st == 2
	}
	return held, reclaimed, epoch, nil
}

// Epochs returns the tenants' epochs; a tenant without one is absent (the zero time never equals an
// epoch a claim recorded).
func (s *Store) Epochs(ctx context.Context, tenants []uuid.UUID) (map[uuid.UUID]time.Time, error) {
	// One MGET per tenant (both keys share its hash tag): epoch and began read together.
	cmds := make([]*redis.SliceCmd, len(tenants))
	_, err := s.rdb.Pipelined(ctx, func(p redis.Pipeliner) error {
		for i, t := range tenants {
			cmds[i] = p.MGet(ctx, s.epochKey(t), s.beganKey(t))
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("read claim epochs: %w", err)
	}
	// One look at the run ids for all of them, and one even for none: a loss of everything leaves
	// no epoch, and Loss must know of it.
	floor, err := s.restartFloor(ctx, 0)
	if err != nil {
		return nil, err
	}
	out := make(map[uuid.UUID]time.Time, len(tenants))
	for i, t := range tenants {
		vals := cmds[i].Val()
		sec, ok := vals[0].(string)
		if !ok {
			continue // no history yet
		}
		began, _ := vals[1].(string)
		epoch, err := epochOf(sec, began)
		if err != nil {
			return nil, err
		}
		out[t] = raised(epoch, floor)
	}
	return out, nil
}

// withFloor raises a tenant's epoch to the latest Redis restart noticed, looking again when the last
// look is older than maxAge (0: always — shipping does, so a restart is noticed before rows ship).
func (s *Store) withFloor(ctx context.Context, epoch time.Time, maxAge time.Duration) (time.Time, error) {
	floor, err := s.restartFloor(ctx, maxAge)
	if err != nil {
		return time.Time{}, err
	}
	return raised(epoch, floor), nil
}

// raised is an epoch under a restart floor: the floor and clock.MaxSkew more, if the epoch is
// earlier. The epoch is the clock of the process that began the history, the floor this one's: a
// history a process 3 s fast began just before a loss noticed here is earlier than its stamp says,
// and its verdicts must not stand (TestAnEpochStampedByAFastClockIsRaisedByALaterLoss).
func raised(epoch, floor time.Time) time.Time {
	if floor.IsZero() {
		return epoch
	}
	if f := floor.Add(clock.MaxSkew); f.After(epoch) {
		return f
	}
	return epoch
}

// restartScript records the run ids of the Redis servers (KEYS[1], a hash: server -> run id) and
// returns the floor: the latest time a loss of claims was noticed, as unix seconds (KEYS[2], which
// older releases read and write) and unix nanoseconds (KEYS[3]; the floor's instant when the two
// agree), and the hash's generation. What raises it:
//
//   - a server known before seen with another run id: it restarted or failed over, and may be back
//     with fewer keys than it had (an RDB snapshot, a replica behind its master) while old epochs
//     survived, so claims made before then prove nothing. A master never seen before in a cluster
//     that had masters raises it too (a failover moves a shard to another address);
//   - a generation other than the one the caller saw: the hash was created anew, so Redis lost
//     everything (a restart without persistence, FLUSHALL) — whichever process looked first after.
//     Once per generation ('~raised'): the other processes that saw the old one take that floor;
//   - a cluster master's marker ('~mark <key>', see markerKey) other than the one recorded: that
//     master alone lost its keys; or a server's previous replication id ('~promoted <server>',
//     see serverState) other than the one recorded: it was made a master again (a failover back
//     to it) — but not a change to '-' (none). Such a field recorded for the first time is no loss
//     (nothing to compare it to: a release before it, a marker that could not be read until now).
//
// For a marker or a previous replication id, the value the field held before its current one
// ('~was <field>') is a look that read before the change and records after a newer look: it changes
// nothing. Written back, it was a second loss and the next look's current value a third
// (TestALookThatReadBeforeALossDoesNotRaiseItAgain). Those values never come back ('-' does, and
// changes nothing anyway). A run id does: a failover and a failback to a master that was not
// restarted (TestAFailbackToTheSameRunIDIsALoss), so a run id written back is still a loss.
//
// A raised floor is later than the one it replaces and than the caller's (which a wipe may have
// taken from Redis), by a microsecond if the clock says otherwise: two losses never share a floor,
// so histories on either side of the second stay apart. The reply also says when the generation was
// created ('~created', unix nanoseconds).
//
//	ARGV: now (unix seconds), now (unix nanoseconds), the caller's floor (unix seconds, unix
//	      nanoseconds), the generation the caller saw ('' if none), a generation for a hash created
//	      now, then (server, run id) pairs
var restartScript = redis.NewScript(`
local function instant(sec, ns)
  if string.sub(ns, 1, -10) ~= tostring(sec) then ns = string.format('%d000000000', sec) end
  return sec, ns
end
local function later(s1, n1, s2, n2)
  return s1 > s2 or (s1 == s2 and tonumber(n1) > tonumber(n2))
end
local floor, at = instant(tonumber(redis.call('GET', KEYS[2]) or '0'), redis.call('GET', KEYS[3]) or '')
local known = redis.call('EXISTS', KEYS[1]) == 1
local gen = redis.call('HGET', KEYS[1], '~generation')
if not gen then
  gen = ARGV[6]
  redis.call('HSET', KEYS[1], '~generation', gen, '~created', ARGV[2])
end
local raised = ARGV[5] ~= '' and ARGV[5] ~= gen and redis.call('HGET', KEYS[1], '~raised') ~= gen
for i = 7, #ARGV, 2 do
  local prev = redis.call('HGET', KEYS[1], ARGV[i])
  local watched = string.sub(ARGV[i], 1, 1) == '~'
  if prev ~= ARGV[i + 1] and not (watched and prev and redis.call('HGET', KEYS[1], '~was ' .. ARGV[i]) == ARGV[i + 1]) then
    if not watched or (prev and string.sub(ARGV[i + 1], 1, 1) ~= '-') then raised = raised or known end
    if watched and prev then redis.call('HSET', KEYS[1], '~was ' .. ARGV[i], prev) end
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
  end
end
if raised then
  local cs, cn = instant(tonumber(ARGV[3]), ARGV[4])
  if later(cs, cn, floor, at) then floor, at = cs, cn end
  local sec, ns = instant(tonumber(ARGV[1]), ARGV[2])
  if not later(sec, ns, floor, at) then
    local s, f = tonumber(string.sub(at, 1, -10)), tonumber(string.sub(at, -9)) + 1000
    if f >= 1000000000 then s, f = s + 1, f - 1000000000 end
    sec, ns = s, string.format('%d%09d', s, f)
  end
  floor, at = sec, ns
  redis.call('SET', KEYS[2], floor)
  redis.call('SET', KEYS[3], at)
  redis.call('HSET', KEYS[1], '~raised', gen)
end
return {tostring(floor), at, gen, redis.call('HGET', KEYS[1], '~created') or ''}
`)

func (s *Store) restartFloor(ctx context.Context, maxAge time.Duration) (time.Time, error) {
	s.mu.Lock()
	if maxAge > 0 && s.now().Sub(s.floorAt) < maxAge {
		defer s.mu.Unlock()
		return s.floor, nil
	}
	read, gen, mine := s.runIDsFn, s.gen, s.floor
	s.looks++
	look := s.looks
	s.mu.Unlock()
	ids, err := read(ctx)
	if err != nil {
		return time.Time{}, fmt.Errorf("read redis run ids: %w", err)
	}
	now := s.now()
	args := []any{now.Unix(), now.UnixNano(), mine.Unix(), mine.UnixNano(), gen, uuid.NewString()}
	if mine.IsZero() {
		args[2], args[3] = 0, ""
	}
	for server, id := range ids {
		args = append(args, server, id)
	}
	keys := []string{s.prefix + "dedup:{restarts}", s.prefix + "dedup:{restarts}:floor", s.prefix + "dedup:{restarts}:at"}
	res, err := restartScript.Run(ctx, s.rdb, keys, args...).StringSlice()
	// Seen once the answer is here: a loss the script found may have happened after now was read
	// (a retried or delayed call), and inserts resting on the lost claims begin before this.
	seen := s.now()
	s.mu.Lock()
	defer s.mu.Unlock()
	if err != nil {
		if _, cluster := s.rdb.(*redis.ClusterClient); !cluster {
			return time.Time{}, fmt.Errorf("record redis run ids: %w", err)
		}
		// The master holding {restarts} is down: every other master's tenants go on. A restart is
		// still noticed, from the run ids this process read before; floorAt stays, so the record is
		// tried again at the next look.
		if look > s.applied {
			s.applied = look
			if s.changed(ids) {
				s.raise(laterFloor(s.floor, now.UTC()), seen)
			}
			s.remember(ids)
		}
		return s.floor, nil
	}
	if len(res) != 4 {
		return time.Time{}, fmt.Errorf("record redis run ids: %d values in the reply, want 4", len(res))
	}
	// To the nanosecond: a restart noticed within the second a tenant's history began must still
	// rise above its epoch (TestARestartNoticedInTheHistorysFirstSecondVouchesForNothing).
	floor, err := epochOf(res[0], res[1])
	if err != nil {
		return time.Time{}, fmt.Errorf("restart floor: %w", err)
	}
	// A loss this process sees for itself — the record it saw was created anew, or a server's run id
	// changed — is one for this process even when the floor in Redis says otherwise: another process
	// may have raised it first to a time below this one's floor (a clock behind, the old floor wiped
	// with the rest).
	// Only the newest look compares and records (a look that read before another but answers after
	// it would bring back what that one replaced, and the next would take the difference for a loss);
	// an older one only takes a later floor.
	prevGen := s.gen
	newest := look > s.applied
	if newest {
		s.applied = look
		if (prevGen != "" && res[2] != prevGen) || s.changed(ids) {
			if now.After(floor) {
				floor = now.UTC()
			}
			floor = laterFloor(s.floor, floor)
		}
		s.gen = res[2]
		s.remember(ids)
	}
	if floor.Unix() > 0 && floor.After(s.floor) {
		s.raise(floor, seen)
	}
	// A process that saw no record before cannot tell a wipe from first use: a record created
	// recently may be a wipe's, with inserts of the lost histories still under way. It waits for
	// them (Loss) without raising epochs.
	if created, err := strconv.ParseInt(res[3], 10, 64); newest && prevGen == "" && err == nil {
		if at := time.Unix(0, created).UTC(); seen.Sub(at) < youngRecord && at.After(s.loss) {
			s.loss, s.lossSeen = at, seen
		}
	}
	s.floorAt = now
	return s.floor, nil
}

// remember adds ids to the run ids this process has seen. A master missing from ids did not answer
// this time (runIDs skips it): it stays with the id it had, or its answer next time would look like
// a master never seen before — a loss, for nothing.
func (s *Store) remember(ids map[string]string) {
	if s.seen == nil {
		s.seen = map[string]string{}
	}
	maps.Copy(s.seen, ids)
}

// youngRecord: a record of run ids created less than this before a process first saw it may be a
// wipe's (restartFloor).
const youngRecord = 10 * time.Minute

// changed reports whether ids show a loss against the run ids this process read last: a server's run
// id, a master's marker or a server's previous replication id changed (see restartScript), or a
// master it did not see before (a failover moves a shard to another address).
func (s *Store) changed(ids map[string]string) bool {
	if len(s.seen) == 0 {
		return false
	}
	for field, v := range ids {
		prev, ok := s.seen[field]
		if !strings.HasPrefix(field, "~") {
			if !ok || prev != v { // a run id: a new one, or a master not seen before
				return true
			}
		} else if ok && prev != v && !strings.HasPrefix(v, "-") { // a watched field (restartScript)
			return true
		}
	}
	return false
}

// raise sets the floor, a loss first learnt of at seen.
func (s *Store) raise(floor, seen time.Time) {
	s.floor, s.loss, s.lossSeen = floor, floor, seen
}

// laterFloor is a floor raised at now: later than the one it replaces (restartScript).
func laterFloor(floor, now time.Time) time.Time {
	if now.After(floor) {
		return now
	}
	return floor.Add(time.Microsecond)
}

// Loss returns the latest loss of claims this process knows of (a restart, a failover, everything
// lost while instances ran, or a record of run ids created recently when it first looked): when it
// happened at the latest — the floor raised then, or the record's creation — and when this process
// first learnt of it, by its own clock. Both are zero if none is known. Epochs looks before it
// answers.
func (s *Store) Loss() (at, seen time.Time) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.loss, s.lossSeen
}

// SetRunIDs replaces how the Redis servers' run ids are read (tests: a restart on demand).
func (s *Store) SetRunIDs(f func(ctx context.Context) (map[string]string, error)) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.runIDsFn = f
}

// runIDs reads the run id of every Redis server holding claims, and of each master of a cluster its
// marker.
func (s *Store) runIDs(ctx context.Context) (map[string]string, error) {
	ids := map[string]string{}
	if c, ok := s.rdb.(*redis.ClusterClient); ok {
		// A master that does not answer is left out: its tenants' claims fail on their own keys, and
		// its run id is read again when it is back (a new id then raises the floor). Failing here
		// stopped every tenant's claims and shipping while one master was down.
		var mu sync.Mutex
		var down []error
		_ = c.ForEachMaster(ctx, func(ctx context.Context, m *redis.Client) error {
			// Bounded: every shipment looks, and a dead master's dial backoff must not hold them all.
			// The marker has a budget of its own: a master slow to answer (125 ms a reply) used up
			// both in the first, and its marker was never read.
			ictx, cancel := context.WithTimeout(ctx, 250*time.Millisecond)
			defer cancel()
			addr, mine := m.Options().Addr, map[string]string{}
			id, err := serverState(ictx, m, "master "+addr, mine)
			if err != nil {
				mu.Lock()
				defer mu.Unlock()
				down = append(down, err)
				return nil
			}
			// Without its marker (not read this time) the master's run id still counts.
			mctx, cancel := context.WithTimeout(ctx, 250*time.Millisecond)
			defer cancel()
			if key, mark, err := s.marker(mctx, c, addr); err == nil {
				mine[markField+strings.TrimPrefix(key, s.prefix)] = mark
			}
			mine["master "+addr] = id
			mu.Lock()
			defer mu.Unlock()
			maps.Copy(ids, mine)
			return nil
		})
		if len(ids) == 0 && len(down) > 0 {
			return ids, errors.Join(down...)
		}
		return ids, nil
	}
	id, err := serverState(ctx, s.rdb, "server", ids)
	ids["server"] = id
	return ids, err
}

// Fields of the record of run ids beside the servers' run ids. A change of one is a loss, unless to a
// value beginning with "-"; its first record is none (restartScript).
const (
	markField     = "~mark "     // a cluster master's marker (markerKey)
	promotedField = "~promoted " // the replication id a server had before it was made a master (serverState)
)

// A cluster master's marker is a random value kept in a key of a slot it holds. FLUSHALL on one
// master keeps its run id and the record of run ids (on the master holding {restarts}), so only the
// marker, gone and made anew by the next look, shows that master's claims lost
// (TestAFlushOfOneClusterMasterIsALoss). A key rather than the flush count INFO commandstats keeps:
// CONFIG RESETSTAT resets that count, and a test can wipe its own marker without flushing a shared
// cluster. Keys deleted one by one are not a whole loss, and a marker does not stand for them.
var markScript = redis.NewScript(`
local v = redis.call('GET', KEYS[1])
if not v then
  v = ARGV[1]
  redis.call('SET', KEYS[1], v)
end
return v
`)

// marker reads the marker of the master at addr, making it if missing, and returns its key.
func (s *Store) marker(ctx context.Context, c *redis.ClusterClient, addr string) (key, mark string, err error) {
	if key, err = s.markerKey(ctx, c, addr); err != nil {
		return "", "", err
	}
	mark, err = markScript.Run(ctx, c, []string{key}, uuid.NewString()).Text()
	return key, mark, err
}

// markerKey is the first of dedup:{restarts:0}, dedup:{restarts:1}, ... whose slot the master at
// addr holds (by the client's slot map; remembered while that holds). Every process picks the same
// one; after a resharding it may be another, whose marker, new to the record, is no loss.
func (s *Store) markerKey(ctx context.Context, c *redis.ClusterClient, addr string) (string, error) {
	holds := func(key string) (bool, error) {
		m, err := c.MasterForKey(ctx, key)
		return err == nil && m.Options().Addr == addr, err
	}
	s.markMu.Lock()
	defer s.markMu.Unlock()
	if key, ok := s.markers[addr]; ok {
		if yes, err := holds(key); err != nil || yes {
			return key, err
		}
	}
	// ForEachMaster lists the masters that hold slots, so the search ends within a few keys; only a
	// slot map changing under it can make it find none (15–19 ms for the 65,536 keys here).
	for i := range 1 << 16 {
		key := s.prefix + "dedup:{restarts:" + strconv.Itoa(i) + "}"
		yes, err := holds(key)
		if err != nil {
			return "", err
		}
		if yes {
			if s.markers == nil {
				s.markers = map[string]string{}
			}
			s.markers[addr] = key
			return key, nil
		}
	}
	return "", fmt.Errorf("no key found in a slot of master %s (its slots moved while looking)", addr)
}

// serverState reads what shows a Redis server's loss of keys: its run id (a restart), and into
// watched (a field named for the server) whether it was made a master since: a failover back to a
// former master keeps that master's address and run id, while it may have missed what its replica
// took meanwhile. A server made a master keeps its previous replication id as master_replid2, which
// is zeros until then and again whenever it makes its replication backlog anew (a first replica, a
// backlog freed): so a new master_replid2 is a promotion, zeros are none (recorded as "-", a change
// to which is no loss). master_replid itself changes with the backlog alone (a replica attached for
// the first time in an hour, a `redis-cli --rdb` backup). Two INFO calls in one round trip: servers
// before 7.0 take one section per call.
func serverState(ctx context.Context, c redis.Cmdable, server string, watched map[string]string) (runID string, err error) {
	p := c.Pipeline()
	srv, repl := p.Info(ctx, "server"), p.Info(ctx, "replication")
	if _, err := p.Exec(ctx); err != nil && srv.Err() != nil {
		return "", err
	}
	if runID = infoField(srv.Val(), "run_id"); runID == "" {
		return "", fmt.Errorf("no run_id in INFO server")
	}
	if v := infoField(repl.Val(), "master_replid2"); v != "" {
		if strings.Trim(v, "0") == "" {
			v = "-"
		}
		watched[promotedField+server] = v
	}
	return runID, nil
}

func (s *Store) windowSeconds() int64 { return max(int64(s.window/time.Second), 1) }

// infoField is the value of name in an INFO answer, or "".
func infoField(info, name string) string {
	for _, line := range strings.Split(info, "\n") {
		if v, ok := strings.CutPrefix(strings.TrimSpace(line), name+":"); ok {
			return v
		}
	}
	return ""
}

// EvictionRisk reports a Redis configured to evict keys under memory pressure, and the keys it has
// evicted since it started: an evicted claim lets a duplicate through unnoticed (nothing else shows
// the loss). On a Redis Cluster every master is asked. The risk is "" when the policy is safe or
// CONFIG is refused (managed Redis services often refuse it: an answer); ok is false when Redis (or
// one master) did not answer at all, and nothing can be said. serve asks at start-up and every
// 30 s (a policy can be changed at run time), and reports it in /readiness.
func (s *Store) EvictionRisk(ctx context.Context) (risk string, ok bool) {
	if c, isCluster := s.rdb.(*redis.ClusterClient); isCluster {
		var mu sync.Mutex
		var risks []string
		err := c.ForEachMaster(ctx, func(ctx context.Context, m *redis.Client) error {
			r, ok := evictionRisk(ctx, m)
			if !ok {
				return fmt.Errorf("%s did not answer", m.Options().Addr)
			}
			if r != "" {
				mu.Lock()
				risks = append(risks, m.Options().Addr+": "+r)
				mu.Unlock()
			}
			return nil
		})
		if err != nil {
			return "", false
		}
		slices.Sort(risks)
		return strings.Join(risks, "; "), true
	}
	return evictionRisk(ctx, s.rdb)
}

func evictionRisk(ctx context.Context, c redis.Cmdable) (string, bool) {
	res, err := c.ConfigGet(ctx, "maxmemory-policy").Result()
	switch {
	case configRefused(err):
		return "", true // CONFIG renamed away or not permitted: the policy cannot be read
	case err != nil:
		return "", false // no answer (BUSY, a refused password, a timeout...): the last one stands
	}
	p := res["maxmemory-policy"]
	if p == "" || p == "noeviction" {
		return "", true
	}
	msg := "redis maxmemory-policy is " + p + ": under memory pressure it may evict dedup claims and let duplicates through; set it to noeviction"
	if n := infoField(c.Info(ctx, "stats").Val(), "evicted_keys"); n != "" && n != "0" {
		msg += " (it has evicted " + n + " keys since it started)"
	}
	return msg, true
}

// configRefused says err is Redis refusing CONFIG itself for good (renamed, or denied by ACL), an
// answer about what can be known; any other error reply — BUSY, LOADING, WRONGPASS, CLUSTERDOWN — is
// none (a review saw BUSY and WRONGPASS read as "no risk").
func configRefused(err error) bool {
	var reply redis.Error
	if !errors.As(err, &reply) {
		return false
	}
	msg := err.Error()
	return strings.HasPrefix(msg, "NOPERM") || strings.Contains(msg, "unknown command") || strings.Contains(msg, "unknown subcommand")
}

// toInt64 is an integer the claim script answered.
func toInt64(v any) (int64, error) {
	n, ok := v.(int64)
	if !ok {
		return 0, fmt.Errorf("want an integer, got %v (%T)", v, v)
	}
	return n, nil
}
