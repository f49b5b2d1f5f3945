package auth

import (
	"net/netip"
	"testing"
	"time"
)

// One host of IPv6 gets a /64: its addresses share one bucket, so rotating through them buys nothing.
func TestAddrKeyGroupsIPv6By64(t *testing.T) {
	same := [][2]string{{"2001:db8:1:2::1", "2001:db8:1:2:ffff::9"}, {"::ffff:203.0.113.5", "203.0.113.5"}}
	for _, p := range same {
		if a, b := addrKey(netip.MustParseAddr(p[0])), addrKey(netip.MustParseAddr(p[1])); a != b {
			t.Errorf("%s and %s: buckets %v and %v, want one", p[0], p[1], a, b)
		}
	}
	apart := [][2]string{{"2001:db8:1:2::1", "2001:db8:1:3::1"}, {"203.0.113.5", "203.0.113.6"}}
	for _, p := range apart {
		if a, b := addrKey(netip.MustParseAddr(p[0])), addrKey(netip.MustParseAddr(p[1])); a == b {
			t.Errorf("%s and %s share bucket %v, want two", p[0], p[1], a)
		}
	}
}

// The bucket refills at PerMinute up to Burst, and says how long until the next lookup.
func TestRefusalBucketRefills(t *testing.T) {
	a := &Authenticator{Refusals: RefusalLimit{PerMinute: 60, Burst: 3}, MaxCached: 10, lookups: map[netip.Prefix]*refusalBucket{}}
	from := addrKey(netip.MustParseAddr("203.0.113.5"))
	t0 := time.Date(2026, 12, 1, 0, 0, 0, 0, time.UTC)
	for i := range 3 {
		if ok, _ := a.takeLookup(from, t0); !ok {
			t.Fatalf("lookup %d of a burst of 3 refused", i)
		}
	}
	if ok, wait := a.takeLookup(from, t0.Add(250*time.Millisecond)); ok || wait != 750*time.Millisecond {
		t.Errorf("fourth lookup 250 ms later: %v, wait %v; want refused, 750ms", ok, wait)
	}
	if ok, _ := a.takeLookup(from, t0.Add(time.Second)); !ok {
		t.Error("a lookup a second later (60 a minute) refused")
	}
	if ok, _ := a.takeLookup(from, t0.Add(time.Hour)); !ok {
		t.Error("a lookup an hour later refused")
	}
	for i := range 2 { // an hour refills the burst, not more
		if ok, _ := a.takeLookup(from, t0.Add(time.Hour)); !ok {
			t.Errorf("lookup %d after an hour refused", i)
		}
	}
	if ok, _ := a.takeLookup(from, t0.Add(time.Hour)); ok {
		t.Error("an hour's refill held more than the burst")
	}
}
