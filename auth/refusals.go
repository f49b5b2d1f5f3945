package auth

import (
	"fmt"
	"net/netip"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// RefusalLimit bounds the credentials the registry is asked about and refuses, per client address and
// per instance.
//
// Anyone can send a made-up API key, and each new one costs a Postgres lookup (a refusal is cached
// for FreshFor, so only distinct tokens cost): without a bound, one client sending random keys turns
// every request into a query. Each address has a bucket of Burst lookups, refilled at PerMinute; a
// lookup takes one before it is made and gives it back unless the registry refused the credential, so
// keys that verify and lookups lost to an outage cost nothing. When the bucket is empty, a credential
// this process has not verified before is answered 429 without asking Postgres (a token refused
// before gets its refusal again, so a revoked key is told it is revoked, not to retry). Keys it has
// verified are still re-checked (their revocation must take effect), so a client whose address is
// limited keeps working with the keys it already uses. IPv6 addresses count per /64, the block one
// host gets.
//
// Addresses are many for an attacker with an IPv6 range (a /48 holds 65,536 /64s), so the instance as
// a whole has a bucket too, GlobalFactor times an address's: past it, every unknown credential waits,
// while verified keys go on working.
type RefusalLimit struct {
	PerMinute int // 0: no limit
	Burst     int
	// Limited, when set, counts the requests answered 429 by this limit.
	Limited prometheus.Counter
}

// DefaultRefusalLimit allows a burst of 30 refused credentials per address, then one a second: far
// above any client with a wrong key (its refusal is cached), far below a key-guessing loop.
func DefaultRefusalLimit() RefusalLimit { return RefusalLimit{PerMinute: 60, Burst: 30} }

// GlobalFactor sizes the instance's bucket against an address's: 100 addresses at their full rate
// (with the defaults, 100 refused lookups a second and a burst of 3,000 — each ~50 µs of Postgres).
const GlobalFactor = 100

type refusalBucket struct {
	tokens float64
	at     time.Time
}

// refill brings b up to now at rate per second, up to burst.
func (b *refusalBucket) refill(now time.Time, rate, burst float64) {
	if dt := now.Sub(b.at).Seconds(); dt > 0 {
		b.tokens = min(burst, b.tokens+dt*rate)
		b.at = now
	}
}

// take takes one token, or says how long until one is there.
func (b *refusalBucket) take(rate float64) (bool, time.Duration) {
	if b.tokens < 1 {
		return false, time.Duration((1 - b.tokens) / rate * float64(time.Second))
	}
	b.tokens--
	return true, 0
}

// errRefusalsLimited is the answer for an address (or an instance) whose bucket is empty.
type errRefusalsLimited struct{ wait time.Duration }

func (e errRefusalsLimited) Error() string {
	return fmt.Sprintf("too many refused credentials; retry in %s", e.wait)
}

// addrKey is the bucket an address counts in.
func addrKey(a netip.Addr) netip.Prefix {
	a = a.Unmap()
	bits := a.BitLen()
	if a.Is6() {
		bits = 64
	}
	p, _ := a.Prefix(bits) // an invalid address (no peer) is the zero Prefix: one shared bucket
	return p
}

// overflow is the bucket new addresses share while the map of addresses is full.
var overflow = netip.PrefixFrom(netip.IPv6Unspecified(), 0)

// takeLookup takes a lookup from from's bucket and from the instance's, or says how long until both
// have one. Call with a.mu held.
func (a *Authenticator) takeLookup(from netip.Prefix, now time.Time) (bool, time.Duration) {
	rate, burst := float64(a.Refusals.PerMinute)/60, float64(max(a.Refusals.Burst, 1))
	a.global.refill(now, rate*GlobalFactor, burst*GlobalFactor)
	b := a.bucket(from, now, rate, burst)
	if ok, wait := b.take(rate); !ok {
		return false, wait
	}
	if ok, wait := a.global.take(rate * GlobalFactor); !ok {
		b.tokens++
		return false, wait
	}
	return true, 0
}

// bucket is from's bucket, refilled to now. When the map of addresses is full, the buckets that are
// full again go (forgetting them changes nothing); while it stays full, new addresses share the
// overflow bucket. Emptying the whole map, as a first version did, refilled every bucket at once: an attacker
// with as many addresses as the map holds reset the bound at will (found by review).
func (a *Authenticator) bucket(from netip.Prefix, now time.Time, rate, burst float64) *refusalBucket {
	if b := a.lookups[from]; b != nil {
		b.refill(now, rate, burst)
		return b
	}
	if len(a.lookups) >= a.MaxCached && now.Sub(a.swept) >= time.Second {
		// At most once a second: the sweep walks the whole map under a.mu, and an attacker sending
		// new addresses while it is full must not make every lookup pay for one.
		a.swept = now
		for p, b := range a.lookups {
			if b.refill(now, rate, burst); b.tokens >= burst && p != overflow {
				delete(a.lookups, p)
			}
		}
	}
	if len(a.lookups) >= a.MaxCached {
		from = overflow
		if b := a.lookups[overflow]; b != nil {
			b.refill(now, rate, burst)
			return b
		}
	}
	b := &refusalBucket{tokens: burst, at: now}
	a.lookups[from] = b
	return b
}

// giveBack returns a lookup that was not refused. Call with a.mu held.
func (a *Authenticator) giveBack(from netip.Prefix) {
	burst := float64(max(a.Refusals.Burst, 1))
	if b := a.lookups[from]; b != nil {
		b.tokens = min(burst, b.tokens+1)
	} else if b := a.lookups[overflow]; b != nil {
		b.tokens = min(burst, b.tokens+1)
	}
	a.global.tokens = min(burst*GlobalFactor, a.global.tokens+1)
}
