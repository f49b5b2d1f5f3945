package testenv

import (
	"context"
	"fmt"
	"io"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
)

// Proxy forwards TCP connections from a loopback port to a real server, and can be cut and restored,
// so a test can make one dependency unreachable without stopping the shared server other tests use.
type Proxy struct {
	Addr   string // where clients connect
	target string

	mu    sync.Mutex
	down  bool
	delay time.Duration
	conns map[net.Conn]struct{}
	ln    net.Listener
}

// NewProxy starts a proxy to target ("host:port"), closed when the test ends.
func NewProxy(t testing.TB, target string) *Proxy {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("proxy listen: %v", err)
	}
	p := &Proxy{Addr: ln.Addr().String(), target: target, conns: map[net.Conn]struct{}{}, ln: ln}
	go p.accept()
	t.Cleanup(func() { ln.Close(); p.SetDown(true) })
	return p
}

func (p *Proxy) accept() {
	for {
		c, err := p.ln.Accept()
		if err != nil {
			return
		}
		p.mu.Lock()
		if p.down {
			p.mu.Unlock()
			c.Close()
			continue
		}
		p.mu.Unlock()
		go p.pipe(c)
	}
}

func (p *Proxy) pipe(c net.Conn) {
	up, err := net.Dial("tcp", p.target)
	if err != nil {
		c.Close()
		return
	}
	p.mu.Lock()
	if p.down {
		p.mu.Unlock()
		c.Close()
		up.Close()
		return
	}
	p.conns[c], p.conns[up] = struct{}{}, struct{}{}
	p.mu.Unlock()
	done := make(chan struct{}, 2)
	go func() { p.copy(up, c); done <- struct{}{} }()
	go func() { p.copy(c, up); done <- struct{}{} }()
	<-done
	c.Close()
	up.Close()
	p.mu.Lock()
	delete(p.conns, c)
	delete(p.conns, up)
	p.mu.Unlock()
}

// copy forwards src to dst, holding each chunk for the current delay (a slow network or server).
func (p *Proxy) copy(dst io.Writer, src io.Reader) {
	buf := make([]byte, 32<<10)
	for {
		n, err := src.Read(buf)
		if n > 0 {
			p.mu.Lock()
			d := p.delay
			p.mu.Unlock()
			if d > 0 {
				time.Sleep(d)
			}
			if _, werr := dst.Write(buf[:n]); werr != nil {
				return
			}
		}
		if err != nil {
			return
		}
	}
}

// SetDelay makes every forwarded chunk wait d (0: none).
func (p *Proxy) SetDelay(d time.Duration) {
	p.mu.Lock()
	p.delay = d
	p.mu.Unlock()
}

// SetDown cuts every open connection and refuses new ones (true), or lets them through again (false).
func (p *Proxy) SetDown(down bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.down = down
	if down {
		for c := range p.conns {
			c.Close()
		}
	}
}

// Switch cuts and restores a client's connections from the client's side: every connection it dials
// goes through Dial, so it works for clients that find their servers' addresses themselves (a Redis
// Cluster client follows the cluster's own addresses, which a Proxy in front of one node cannot cover).
type Switch struct {
	mu    sync.Mutex
	down  bool
	conns map[net.Conn]struct{}
}

// Dial connects to addr unless the switch is down; the connection is cut when it goes down.
func (s *Switch) Dial(ctx context.Context, network, addr string) (net.Conn, error) {
	s.mu.Lock()
	down := s.down
	s.mu.Unlock()
	if down {
		return nil, fmt.Errorf("dial %s: cut by the test", addr)
	}
	c, err := (&net.Dialer{Timeout: 200 * time.Millisecond}).DialContext(ctx, network, addr)
	if err != nil {
		return nil, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.down {
		c.Close()
		return nil, fmt.Errorf("dial %s: cut by the test", addr)
	}
	if s.conns == nil {
		s.conns = map[net.Conn]struct{}{}
	}
	s.conns[c] = struct{}{}
	return c, nil
}

// SetDown cuts every connection and refuses new ones (true), or lets them through again (false).
func (s *Switch) SetDown(down bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.down = down
	if down {
		for c := range s.conns {
			c.Close()
		}
		clear(s.conns)
	}
}

// CuttableRedis returns a client of the test Redis (a cluster client with REDIS_CLUSTER=1) whose
// connections go through a Switch, with short timeouts and no retries: a test makes Redis unreachable
// for this client only, without stopping the server other tests share.
func CuttableRedis(t testing.TB) (redis.UniversalClient, *Switch) {
	t.Helper()
	sw := &Switch{}
	const timeout = 200 * time.Millisecond
	var rdb redis.UniversalClient
	if RedisCluster() {
		opts, err := redis.ParseClusterURL(RedisURL(t))
		if err != nil {
			t.Fatalf("parse REDIS_URL: %v", err)
		}
		opts.Dialer, opts.DialTimeout, opts.ReadTimeout, opts.MaxRetries = sw.Dial, timeout, timeout, -1
		rdb = redis.NewClusterClient(opts)
	} else {
		opts, err := redis.ParseURL(RedisURL(t))
		if err != nil {
			t.Fatalf("parse REDIS_URL: %v", err)
		}
		opts.Dialer, opts.DialTimeout, opts.ReadTimeout, opts.MaxRetries = sw.Dial, timeout, timeout, -1
		rdb = redis.NewClient(opts)
	}
	t.Cleanup(func() { rdb.Close() })
	return rdb, sw
}
