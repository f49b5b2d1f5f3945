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
//	dedup:{T}:e:<id>       the batch id holding event id <id>, expiring after the window
//	dedup:{T}:i:<id>       the same for increment ids
//	idem:{T}:<sha256>      an Idempotency-Key's request fingerprint and first response
package dedup

import (
	"context"
	"fmt"
	"strconv"
	"time"

	"github.com/google/uuid"
	"github.com/redis/go-redis/v9"
)

// Store is the claims and idempotency registry in Redis.
type Store struct {
	rdb    redis.UniversalClient
	prefix string // prepended to every key (tests isolate themselves with it)
	window time.Duration
	now    func() time.Time
}

// NewStore returns a Store keeping ids and idempotent responses for window.
func NewStore(rdb redis.UniversalClient, prefix string, window time.Duration) *Store {
	return &Store{rdb: rdb, prefix: prefix, window: window, now: time.Now}
}

// Window is how long an id or an Idempotency-Key is remembered.
func (s *Store) Window() time.Duration { return s.window }

func (s *Store) epochKey(tenant uuid.UUID) string {
	return fmt.Sprintf("%sdedup:{%s}:epoch", s.prefix, tenant)
}

// idKey is the claim of an id of a kind ('e' events, 'i' increments).
func (s *Store) idKey(tenant uuid.UUID, kind byte, id uuid.UUID) string {
	return fmt.Sprintf("%sdedup:{%s}:%c:%s", s.prefix, tenant, kind, id)
}

// claimScript claims KEYS[2..] for batch ARGV[1] (SET NX with the window as expiry) and reports per
// id 1 when the batch holds it (new, or already its own) and 0 when another batch does. The first
// element is the tenant's epoch (KEYS[1]), started at ARGV[3] when missing.
var claimScript = redis.NewScript(`
local epoch = redis.call('GET', KEYS[1])
if not epoch then
  epoch = ARGV[3]
  redis.call('SET', KEYS[1], epoch)
end
local out = {tonumber(epoch)}
for i = 2, #KEYS do
  if redis.call('SET', KEYS[i], ARGV[1], 'NX', 'EX', ARGV[2]) then
    out[i] = 1
  elseif redis.call('GET', KEYS[i]) == ARGV[1] then
    out[i] = 1
  else
    out[i] = 0
  end
end
return out
`)

// Claim records, for a batch whose rows are durable, that batch wid holds ids of a kind; dup[i]
// reports that another batch held ids[i] already. The epoch is when the tenant's claims began.
func (s *Store) Claim(ctx context.Context, tenant uuid.UUID, kind byte, wid uint64, ids []uuid.UUID) ([]bool, time.Time, error) {
	keys := make([]string, 0, len(ids)+1)
	keys = append(keys, s.epochKey(tenant))
	for _, id := range ids {
		keys = append(keys, s.idKey(tenant, kind, id))
	}
	res, err := claimScript.Run(ctx, s.rdb, keys, strconv.FormatUint(wid, 10), s.windowSeconds(), s.now().Unix()).Int64Slice()
	if err != nil {
		return nil, time.Time{}, fmt.Errorf("claim %d ids for tenant %s: %w", len(ids), tenant, err)
	}
	dup := make([]bool, len(ids))
	for i := range ids {
		dup[i] = res[i+1] == 0
	}
	return dup, time.Unix(res[0], 0).UTC(), nil
}

// verifyScript answers per id (KEYS[2..]) whether batch ARGV[2+i] holds it: 1 yes, 0 another batch
// does, 2 nobody did and it now does (the claim expired or was lost). The first element is the epoch.
var verifyScript = redis.NewScript(`
local epoch = redis.call('GET', KEYS[1])
if not epoch then
  epoch = ARGV[2]
  redis.call('SET', KEYS[1], epoch)
end
local out = {tonumber(epoch)}
for i = 2, #KEYS do
  local w = ARGV[i + 1]
  local v = redis.call('GET', KEYS[i])
  if v == w then
    out[i] = 1
  elseif not v then
    redis.call('SET', KEYS[i], w, 'EX', ARGV[1])
    out[i] = 2
  else
    out[i] = 0
  end
end
return out
`)

// Verify answers, when rows are shipped, whether batch wids[i] holds ids[i], claiming the ids nobody
// holds for their batch (reclaimed).
func (s *Store) Verify(ctx context.Context, tenant uuid.UUID, kind byte, ids []uuid.UUID, wids []uint64) (held, reclaimed []bool, epoch time.Time, err error) {
	keys := make([]string, 0, len(ids)+1)
	keys = append(keys, s.epochKey(tenant))
	args := make([]any, 0, len(ids)+2)
	args = append(args, s.windowSeconds(), s.now().Unix())
	for i, id := range ids {
		keys = append(keys, s.idKey(tenant, kind, id))
		args = append(args, strconv.FormatUint(wids[i], 10))
	}
	res, err := verifyScript.Run(ctx, s.rdb, keys, args...).Int64Slice()
	if err != nil {
		return nil, nil, time.Time{}, fmt.Errorf("verify %d claims for tenant %s: %w", len(ids), tenant, err)
	}
	held, reclaimed = make([]bool, len(ids)), make([]bool, len(ids))
	for i := range ids {
		held[i], reclaimed[i] = res[i+1] != 0, res[i+1] == 2
	}
	return held, reclaimed, time.Unix(res[0], 0).UTC(), nil
}

// Epochs returns the tenants' epochs; a tenant without one is absent (the zero time never equals an
// epoch a claim recorded).
func (s *Store) Epochs(ctx context.Context, tenants []uuid.UUID) (map[uuid.UUID]time.Time, error) {
	cmds := make([]*redis.StringCmd, len(tenants))
	_, err := s.rdb.Pipelined(ctx, func(p redis.Pipeliner) error {
		for i, t := range tenants {
			cmds[i] = p.Get(ctx, s.epochKey(t))
		}
		return nil
	})
	if err != nil && err != redis.Nil {
		return nil, fmt.Errorf("read claim epochs: %w", err)
	}
	out := make(map[uuid.UUID]time.Time, len(tenants))
	for i, t := range tenants {
		n, err := cmds[i].Int64()
		switch {
		case err == nil:
			out[t] = time.Unix(n, 0).UTC()
		case err != redis.Nil:
			return nil, fmt.Errorf("read claim epochs: %w", err)
		}
	}
	return out, nil
}

func (s *Store) windowSeconds() int64 { return max(int64(s.window/time.Second), 1) }

// EvictionRisk reports a Redis configured to evict keys under memory pressure: an evicted claim lets a
// duplicate through unnoticed (the epoch does not change). It returns "" when the policy is safe or
// cannot be read (managed Redis services often refuse CONFIG).
func (s *Store) EvictionRisk(ctx context.Context) string {
	res, err := s.rdb.ConfigGet(ctx, "maxmemory-policy").Result()
	if err != nil {
		return ""
	}
	if p := res["maxmemory-policy"]; p != "" && p != "noeviction" {
		return "redis maxmemory-policy is " + p + ": under memory pressure it may evict dedup claims and let duplicates through; set it to noeviction"
	}
	return ""
}
