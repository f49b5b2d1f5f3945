package testenv

import (
	"context"
	"net"
	"os"
	"os/exec"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/analyticsd/analyticsd/internal/loopback"
)

// PrivateRedis starts a Redis of the test's own, for what the shared one must not do (evict keys,
// change roles or configuration), with extra server arguments; it returns a client and the
// server's address. Without redis-server the test is skipped, or fails under Required.
func PrivateRedis(t testing.TB, args ...string) (*redis.Client, string) {
	t.Helper()
	bin, err := exec.LookPath("redis-server")
	if err != nil {
		bin = "/usr/bin/redis-server"
	}
	if _, err := os.Stat(bin); err != nil {
		if Required() {
			t.Fatalf("redis-server not found: %v", err)
		}
		t.Skip("redis-server not installed")
	}
	addr, err := loopback.Addr()
	if err != nil {
		t.Fatal(err)
	}
	host, port, _ := net.SplitHostPort(addr)
	srv := exec.Command(bin, append([]string{"--bind", host, "--port", port, "--save", "", "--appendonly", "no", "--dir", t.TempDir()}, args...)...)
	if err := srv.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = srv.Process.Kill(); _ = srv.Wait() })
	rdb := redis.NewClient(&redis.Options{Addr: addr})
	t.Cleanup(func() { rdb.Close() })
	Eventually(t, 10*time.Second, func() error { return rdb.Ping(context.Background()).Err() })
	return rdb, addr
}
