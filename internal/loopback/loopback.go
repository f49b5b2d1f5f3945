// Package loopback picks loopback addresses for servers that the tests and the benchmark start as
// child processes: a child has to be told its address before it binds it, so the parent picks a port
// nothing listens on and lets it go.
//
// A port taken from the kernel's ephemeral range (listen on ":0", then close) is the obvious choice
// and a racy one: until the child binds it, or while a killed child is down before it restarts on the
// same address, the kernel may hand that port to any outgoing connection on the machine as its local
// port — the tests' own connections to ClickHouse, Postgres and Redis open by the hundred. CI failed
// that way once (the fault suite's instance: "bind: address already in use" on its operator port).
// Ports below the ephemeral range are never given to outgoing connections, so only another listener
// can take one, and Addr checks for that by binding it first.
package loopback

import (
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"strconv"
	"strings"
	"sync"
)

// window is how many ports below the ephemeral range Addr picks from: with Linux's default range
// (32768–60999) that is 30000–32767, clear of every port deploy/local uses (by default or in CI's
// alternate set, all below 30000).
const window = 2768

var (
	mu   sync.Mutex
	next int // offset into the window of the next port to try; random per process, so that
	// test binaries running side by side start far apart, then sequential, so that one process
	// never hands out a port twice before going round the whole window
)

func init() { next = rand.IntN(window) }

// Addr returns "127.0.0.1:port" for a port below the ephemeral range that nothing listens on now.
// Where the range leaves no room below it (it starts under 1024+window) it falls back to a port the
// kernel picks.
func Addr() (string, error) {
	low, ok := ephemeralLow()
	if !ok || low-window < 1024 {
		return kernelPicked()
	}
	mu.Lock()
	defer mu.Unlock()
	for range window {
		port := low - window + next
		next = (next + 1) % window
		ln, err := net.Listen("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(port)))
		if err != nil {
			continue // another listener holds it
		}
		addr := ln.Addr().String()
		ln.Close()
		return addr, nil
	}
	return "", fmt.Errorf("loopback: every port in %d–%d is taken", low-window, low-1)
}

// ephemeralLow reads the first port of the kernel's ephemeral range.
func ephemeralLow() (int, bool) {
	b, err := os.ReadFile("/proc/sys/net/ipv4/ip_local_port_range")
	if err != nil {
		return 0, false
	}
	f := strings.Fields(string(b))
	if len(f) != 2 {
		return 0, false
	}
	low, err := strconv.Atoi(f[0])
	return low, err == nil
}

func kernelPicked() (string, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", err
	}
	defer ln.Close()
	return ln.Addr().String(), nil
}
