package loopback

import (
	"net"
	"strconv"
	"testing"
)

// The ports Addr hands out lie below the kernel's ephemeral range (where no outgoing connection can
// take one before the child binds it), are free, and are not handed out twice by one process.
// Before this package the tests listened on ":0" and closed: a port inside the range, which this
// test refuses.
func TestAddrIsFreeAndBelowTheEphemeralRange(t *testing.T) {
	low, ok := ephemeralLow()
	if !ok {
		t.Skip("no /proc/sys/net/ipv4/ip_local_port_range: Addr falls back to a kernel-picked port")
	}
	if low-window < 1024 {
		t.Skipf("the ephemeral range starts at %d: no room below it", low)
	}
	seen := map[string]bool{}
	for range 50 {
		addr, err := Addr()
		if err != nil {
			t.Fatal(err)
		}
		_, p, _ := net.SplitHostPort(addr)
		port, _ := strconv.Atoi(p)
		if port < low-window || port >= low {
			t.Fatalf("Addr gave %s; want a port in %d–%d, below the ephemeral range", addr, low-window, low-1)
		}
		if seen[addr] {
			t.Fatalf("Addr gave %s twice", addr)
		}
		seen[addr] = true
		ln, err := net.Listen("tcp", addr)
		if err != nil {
			t.Fatalf("the port Addr gave cannot be bound: %v", err)
		}
		ln.Close()
	}
}

// A port some listener holds is skipped.
func TestAddrSkipsAHeldPort(t *testing.T) {
	low, ok := ephemeralLow()
	if !ok || low-window < 1024 {
		t.Skip("no room below the ephemeral range")
	}
	mu.Lock()
	held := low - window + next
	mu.Unlock()
	ln, err := net.Listen("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(held)))
	if err != nil {
		t.Skipf("port %d is already taken by something else: %v", held, err)
	}
	defer ln.Close()
	addr, err := Addr()
	if err != nil {
		t.Fatal(err)
	}
	if addr == ln.Addr().String() {
		t.Fatalf("Addr gave %s, which a listener holds", addr)
	}
}
