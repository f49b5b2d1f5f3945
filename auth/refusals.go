package auth

import (
	"fmt"
	"net/netip"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// RefusalLimit bounds, per client address, the credentials the registry is asked about and refuses.
//
// Anyone can send a made-up API key, and each new one costs a Postgres lookup (a refusal is cached
// for FreshFor, so only distinct tokens cost): without a bound, one client sending random keys turns
// every request into a query. Each address has a bucket of Burst lookups, refilled at PerMinute; a
// lookup takes one before it is made and gives it back unless the registry refused the credential, so
// keys that verify and lookups lost to an outage cost nothing. When the bucket is empty, a credential
// this process has not verified before is answered 429 without asking Postgres. Keys it has verified
// are still re-checked (their revocation must take effect), so a client whose address is limited
// keeps working with the keys it already uses. IPv6 addresses count per /64, the block one host gets.
type RefusalLimit struct {
	PerMinute int // 0: no limit
	Burst     int
	// Limited, when set, counts the requests answered 429 by this limit.
	Limited prometheus.Counter
}

// DefaultRefusalLimit allows a burst of 30 refused credentials per address, then one a second: far
// above any client with a wrong key (its refusal is cached), far below a key-guessing loop.
func DefaultRefusalLimit() RefusalLimit { return RefusalLimit{PerMinute: 60, Burst: 30} }

type refusalBucket struct {
	tokens float64
	at     time.Time
}

// errRefusalsLimited is the answer for an address whose bucket is empty.
type errRefusalsLimited struct{ wait time.Duration }

func (e errRefusalsLimited) Error() string {
	return fmt.Sprintf("too many refused credentials from this address; retry in %s", e.wait)
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

// takeLookup takes a lookup from from's bucket, or says how long until one is there. Call with a.mu
// held.
func (a *Authenticator) takeLookup(from netip.Prefix, now time.Time) (bool, time.Duration) {
	lim := a.Refusals
	rate := float64(lim.PerMinute) / 60 // per second
	b := a.lookups[from]
	if b == nil {
		if len(a.lookups) >= a.MaxCached {
			clear(a.lookups)
		}
		b = &refusalBucket{tokens: float64(max(lim.Burst, 1)), at: now}
		a.lookups[from] = b
	}
	if dt := now.Sub(b.at).Seconds(); dt > 0 {
		b.tokens = min(float64(max(lim.Burst, 1)), b.tokens+dt*rate)
		b.at = now
	}
	if b.tokens < 1 {
		return false, time.Duration((1 - b.tokens) / rate * float64(time.Second))
	}
	b.tokens--
	return true, 0
}

// giveBack returns a lookup that was not refused. Call with a.mu held.
func (a *Authenticator) giveBack(from netip.Prefix) {
	if b := a.lookups[from]; b != nil {
		b.tokens = min(float64(max(a.Refusals.Burst, 1)), b.tokens+1)
	}
}
