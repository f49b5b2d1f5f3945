package api

import (
	"bytes"
	"fmt"
	"net/netip"
	"strings"

	"github.com/gofiber/fiber/v2"
)

// Proxies are the load balancers and reverse proxies whose X-Forwarded-For analyticsd believes
// (ANALYTICS_TRUSTED_PROXIES). The zero value trusts none: the client is the connection's peer.
type Proxies []netip.Prefix

// ParseProxies reads a comma-separated list of addresses and CIDR prefixes ("10.0.0.0/8, ::1").
func ParseProxies(s string) (Proxies, error) {
	var out Proxies
	for _, f := range strings.Split(s, ",") {
		f = strings.TrimSpace(f)
		if f == "" {
			continue
		}
		if p, err := netip.ParsePrefix(f); err == nil {
			out = append(out, p.Masked())
			continue
		}
		a, err := netip.ParseAddr(f)
		if err != nil {
			return nil, fmt.Errorf("%q is neither an address nor a CIDR prefix", f)
		}
		a = a.Unmap()
		out = append(out, netip.PrefixFrom(a, a.BitLen()))
	}
	return out, nil
}

func (ps Proxies) trusted(a netip.Addr) bool {
	a = a.Unmap()
	for _, p := range ps {
		if p.Contains(a) {
			return true
		}
	}
	return false
}

// ClientAddr is the address a request came from: the connection's peer, or, when the peer is a
// trusted proxy, the right-most address of X-Forwarded-For that is not one — each proxy appends the
// address it was reached from, so everything left of the last untrusted hop was written by the client
// and proves nothing (a limit keyed on the left-most entry is one the client chooses). An entry that
// is not an address ends the walk at the hop that wrote it.
func ClientAddr(c *fiber.Ctx, ps Proxies) netip.Addr {
	peer, _ := netip.AddrFromSlice(c.Context().RemoteIP())
	peer = peer.Unmap()
	if len(ps) == 0 || !ps.trusted(peer) {
		return peer
	}
	client := peer
	headers := c.Request().Header.PeekAll(fiber.HeaderXForwardedFor)
	// From the right, one hop at a time, stopping at the first untrusted one: a client can send a
	// header of thousands of hops, and splitting it all cost more than the lookup being bounded.
	for i := len(headers) - 1; i >= 0; i-- {
		list := headers[i]
		for len(list) > 0 {
			hop := list
			if j := bytes.LastIndexByte(list, ','); j >= 0 {
				hop, list = list[j+1:], list[:j]
			} else {
				list = nil
			}
			a, ok := hopAddr(string(bytes.TrimSpace(hop)))
			if !ok {
				return client
			}
			client = a.Unmap()
			if !ps.trusted(client) {
				return client
			}
		}
	}
	return client
}

// hopAddr reads one X-Forwarded-For entry: an address, or an address with a port ("203.0.113.7:4711",
// "[2001:db8::1]:4711"), which some proxies write.
func hopAddr(s string) (netip.Addr, bool) {
	if a, err := netip.ParseAddr(s); err == nil {
		return a, true
	}
	if ap, err := netip.ParseAddrPort(s); err == nil {
		return ap.Addr(), true
	}
	return netip.Addr{}, false
}
