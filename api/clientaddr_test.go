package api

import (
	"net"
	"net/netip"
	"testing"

	"github.com/gofiber/fiber/v2"
	"github.com/valyala/fasthttp"
)

// ClientAddr believes X-Forwarded-For only from trusted proxies, and then only right of the last
// hop that is not one: everything to its left is the client's own writing.
func TestClientAddr(t *testing.T) {
	proxies, err := ParseProxies(" 10.0.0.0/8, 192.168.1.1 ,fd00::/8")
	if err != nil {
		t.Fatal(err)
	}
	app := fiber.New()
	cases := []struct {
		name    string
		peer    string
		xff     []string
		proxies Proxies
		want    string
	}{
		{"no proxies: the peer, whatever the header says", "203.0.113.5", []string{"198.51.100.1"}, nil, "203.0.113.5"},
		{"an untrusted peer's header is ignored", "203.0.113.5", []string{"198.51.100.1"}, proxies, "203.0.113.5"},
		{"a trusted peer names the client", "10.1.2.3", []string{"198.51.100.1"}, proxies, "198.51.100.1"},
		{"the left-most entries are the client's to choose", "10.1.2.3", []string{"1.1.1.1, 2.2.2.2, 198.51.100.1"}, proxies, "198.51.100.1"},
		{"trusted hops are skipped from the right", "10.1.2.3", []string{"1.1.1.1, 198.51.100.1, 192.168.1.1, 10.9.9.9"}, proxies, "198.51.100.1"},
		{"several headers read as one list", "10.1.2.3", []string{"1.1.1.1, 198.51.100.1", "10.0.0.7"}, proxies, "198.51.100.1"},
		{"a hop with a port", "10.1.2.3", []string{"198.51.100.1:4711"}, proxies, "198.51.100.1"},
		{"an IPv6 hop with a port", "10.1.2.3", []string{"[2001:db8::1]:4711"}, proxies, "2001:db8::1"},
		{"garbage ends the walk at the hop that wrote it", "10.1.2.3", []string{"198.51.100.1, not-an-ip, 10.0.0.8"}, proxies, "10.0.0.8"},
		{"no header from a trusted peer: the peer", "10.1.2.3", nil, proxies, "10.1.2.3"},
		{"only trusted hops: the left-most of them", "10.1.2.3", []string{"10.0.0.1, 10.0.0.2"}, proxies, "10.0.0.1"},
		{"an IPv4-mapped peer is trusted as IPv4", "::ffff:10.1.2.3", []string{"198.51.100.1"}, proxies, "198.51.100.1"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			var fc fasthttp.RequestCtx
			var req fasthttp.Request
			for _, h := range tc.xff {
				req.Header.Add("X-Forwarded-For", h)
			}
			fc.Init(&req, &net.TCPAddr{IP: net.ParseIP(tc.peer), Port: 5555}, nil)
			c := app.AcquireCtx(&fc)
			defer app.ReleaseCtx(c)
			if got := ClientAddr(c, tc.proxies); got != netip.MustParseAddr(tc.want) {
				t.Errorf("got %v, want %s", got, tc.want)
			}
		})
	}
}

func TestParseProxiesRefusesWhatIsNotAnAddress(t *testing.T) {
	for _, s := range []string{"10.0.0.0/33", "proxy.internal", "10.0.0.1-10.0.0.9"} {
		if _, err := ParseProxies(s); err == nil {
			t.Errorf("ParseProxies(%q): no error", s)
		}
	}
	if ps, err := ParseProxies(""); err != nil || len(ps) != 0 {
		t.Errorf(`ParseProxies(""): %v, %v; want none`, ps, err)
	}
}
