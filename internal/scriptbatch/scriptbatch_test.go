package scriptbatch

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/analyticsd/analyticsd/internal/testenv"
)

// add increments KEYS[1] by ARGV[1] and answers {ARGV[2], the new value}: each caller can check that
// it got its own reply, and the keys that the sum of the increments reached Redis once each.
var add = redis.NewScript(`
local v = redis.call('INCRBY', KEYS[1], ARGV[1])
return {tonumber(ARGV[2]), v}
`)

// fails answers an error of its own.
var fails = redis.NewScript(`return redis.error_reply('ERR refused by the script ' .. ARGV[1])`)

// gate holds the script sent with the key "<prefix>{held}" inside the client (a go-redis hook,
// before it is written), so that a batch is in flight for as long as a test needs; the test queues
// callers behind it and then opens the gate.
type gate struct {
	key  string
	open chan struct{}
}

func (g *gate) DialHook(next redis.DialHook) redis.DialHook { return next }
func (g *gate) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return next
}
func (g *gate) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		if a := cmd.Args(); len(a) > 3 && a[3] == g.key {
			<-g.open
		}
		return next(ctx, cmd)
	}
}

// hold starts a script that the gate holds in flight, and returns once it is; the returned
// function opens the gate and returns that script's error.
func hold(t *testing.T, rdb redis.UniversalClient, b *Batcher, prefix string) (release func() error) {
	t.Helper()
	g := &gate{key: prefix + "{held}", open: make(chan struct{})} // the other tests' keys share its slot
	rdb.AddHook(g)
	done := make(chan error, 1)
	go func() { done <- add.Run(context.Background(), b, []string{g.key}, 1, -1).Err() }()
	waitFor(t, b, func() bool { n, _ := b.Stats(); return n >= 1 })
	return func() error { close(g.open); return <-done }
}

// waitFor polls ok for up to 5 s.
func waitFor(t *testing.T, b *Batcher, ok func() bool) {
	t.Helper()
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(time.Millisecond) {
		done := ok()
		if done {
			return
		}
		if time.Now().After(deadline) {
			t.Fatal("timed out waiting for the batcher")
		}
	}
}

// queued is how many callers wait for a next batch, over all lanes.
func queued(b *Batcher) int {
	b.mu.Lock()
	defer b.mu.Unlock()
	n := 0
	for _, l := range b.lanes {
		l.mu.Lock()
		n += len(l.queue)
		l.mu.Unlock()
	}
	return n
}

// TestScriptsThatWaitGoInOneRoundTrip: while one batch is in flight, 60 callers queue; they must go
// out together in the next round trip (not in 60), each get its own reply, and each run exactly
// once. Their keys are seven, in the held script's slot (so, on Redis Cluster, in its lane).
func TestScriptsThatWaitGoInOneRoundTrip(t *testing.T) {
	rdb, prefix := testenv.Redis(t)
	ctx := context.Background()
	if err := add.Load(ctx, rdb).Err(); err != nil { // no NOSCRIPT fallback to count as a round trip
		t.Fatal(err)
	}
	b := New(rdb)
	release := hold(t, rdb, b, prefix)

	const callers = 60
	var wg sync.WaitGroup
	errs := make(chan error, callers)
	for i := 0; i < callers; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			key := prefix + "{held}k" + strconv.Itoa(i%7)
			got, err := add.Run(ctx, b, []string{key}, i+1, i).Int64Slice()
			switch {
			case err != nil:
				errs <- err
			case len(got) != 2 || got[0] != int64(i):
				errs <- fmt.Errorf("caller %d got the reply %v, which is not its own", i, got)
			}
		}()
	}
	waitFor(t, b, func() bool { return queued(b) == callers })
	if err := release(); err != nil {
		t.Fatalf("held script: %v", err)
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}

	// Each caller's increment landed once: key k holds the sum of i+1 over the callers with i%7 == k.
	for k := 0; k < 7; k++ {
		want := int64(0)
		for i := k; i < callers; i += 7 {
			want += int64(i + 1)
		}
		got, err := rdb.Get(ctx, prefix+"{held}k"+strconv.Itoa(k)).Int64()
		if err != nil || got != want {
			t.Errorf("key k%d = %d (%v), want %d: an increment ran twice or not at all", k, got, err, want)
		}
	}
	if trips, scripts := b.Stats(); trips != 2 || scripts != callers+1 {
		t.Errorf("%d round trips for %d scripts, want 2 for %d: the held one, then everything queued behind it", trips, scripts, callers+1)
	}
}

// TestOneScriptsErrorIsItsOwn: a script that fails in the middle of a batch fails only its caller.
func TestOneScriptsErrorIsItsOwn(t *testing.T) {
	rdb, prefix := testenv.Redis(t)
	ctx := context.Background()
	b := New(rdb)
	release := hold(t, rdb, b, prefix)

	var wg sync.WaitGroup
	results := make([]error, 9)
	for i := range results {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if i == 4 {
				results[i] = fails.Run(ctx, b, []string{prefix + "{held}f"}, i).Err()
				return
			}
			results[i] = add.Run(ctx, b, []string{prefix + "{held}ok"}, 1, i).Err()
		}()
	}
	waitFor(t, b, func() bool { return queued(b) == len(results) })
	if err := release(); err != nil {
		t.Fatalf("held script: %v", err)
	}
	wg.Wait()
	for i, err := range results {
		if i == 4 {
			if err == nil || err.Error() != "ERR refused by the script 4" {
				t.Errorf("the failing script's caller got %v, want its own error", err)
			}
			continue
		}
		if err != nil {
			t.Errorf("caller %d got %v: another script's error reached it", i, err)
		}
	}
	if got, _ := rdb.Get(ctx, prefix+"{held}ok").Int64(); got != 8 {
		t.Errorf("{held}ok = %d, want 8", got)
	}
}

// TestScriptsRunAfterScriptFlush: go-redis' Script.Run falls back from EVALSHA to EVAL on NOSCRIPT;
// through the batcher it must too, for every caller of a batch (a Redis restarted or flushed loses
// its script cache).
func TestScriptsRunAfterScriptFlush(t *testing.T) {
	rdb, prefix := testenv.Redis(t)
	ctx := context.Background()
	b := New(rdb)
	release := hold(t, rdb, b, prefix)
	if cc, ok := rdb.(*redis.ClusterClient); ok {
		if err := cc.ForEachMaster(ctx, func(ctx context.Context, c *redis.Client) error { return c.ScriptFlush(ctx).Err() }); err != nil {
			t.Fatal(err)
		}
	} else if err := rdb.ScriptFlush(ctx).Err(); err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	errs := make(chan error, 20)
	for i := 0; i < 20; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := add.Run(ctx, b, []string{prefix + "{held}n"}, 1, i).Err(); err != nil {
				errs <- err
			}
		}()
	}
	waitFor(t, b, func() bool { return queued(b) == 20 })
	if err := release(); err != nil {
		t.Fatalf("held script: %v", err)
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Errorf("after SCRIPT FLUSH: %v", err)
	}
	if got, _ := rdb.Get(ctx, prefix+"{held}n").Int64(); got != 20 {
		t.Errorf("{held}n = %d, want 20: each script runs once, by EVAL after its EVALSHA found nothing", got)
	}
}

// TestACallersCancellationFailsNoOneElse: the caller whose turn it is sends the others' scripts with
// its own; its context ending (here: before it sends) must not fail them.
func TestACallersCancellationFailsNoOneElse(t *testing.T) {
	rdb, prefix := testenv.Redis(t)
	b := New(rdb)
	release := hold(t, rdb, b, prefix)

	lead, cancel := context.WithCancel(context.Background())
	first := make(chan error, 1)
	go func() { first <- add.Run(lead, b, []string{prefix + "{held}c"}, 1, 0).Err() }()
	waitFor(t, b, func() bool { return queued(b) == 1 }) // first in the queue: it sends the next batch
	var wg sync.WaitGroup
	errs := make(chan error, 10)
	for i := 1; i <= 10; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := add.Run(context.Background(), b, []string{prefix + "{held}c"}, 1, i).Err(); err != nil {
				errs <- err
			}
		}()
	}
	waitFor(t, b, func() bool { return queued(b) == 11 })
	cancel()
	if err := release(); err != nil {
		t.Fatalf("held script: %v", err)
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Errorf("a caller failed with the sender's cancellation: %v", err)
	}
	<-first
	if got, _ := rdb.Get(context.Background(), prefix+"{held}c").Int64(); got < 10 {
		t.Errorf("{held}c = %d, want at least the 10 uncancelled increments", got)
	}
}

// TestASlowMasterHoldsUpOnlyItsOwnScripts (Redis Cluster): batches are per master, so while a batch
// bound for one master is held, scripts for the others go and return; one batch for every master
// would make a slow or failing-over master every tenant's wait.
func TestASlowMasterHoldsUpOnlyItsOwnScripts(t *testing.T) {
	if !testenv.RedisCluster() {
		t.Skip("needs Redis Cluster: `make test-cluster` runs it")
	}
	rdb, prefix := testenv.Redis(t)
	cc := rdb.(*redis.ClusterClient)
	ctx := context.Background()
	b := New(rdb)
	heldMaster, err := cc.MasterForKey(ctx, prefix+"{held}")
	if err != nil {
		t.Fatal(err)
	}
	// A key on another master.
	other := ""
	for i := 0; i < 1000 && other == ""; i++ {
		k := prefix + "{o" + strconv.Itoa(i) + "}"
		if m, err := cc.MasterForKey(ctx, k); err == nil && m.Options().Addr != heldMaster.Options().Addr {
			other = k
		}
	}
	if other == "" {
		t.Fatal("no key found on a second master")
	}
	release := hold(t, rdb, b, prefix)
	done := make(chan error, 1)
	go func() { done <- add.Run(ctx, b, []string{other}, 1, 0).Err() }()
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("script on the other master: %v", err)
		}
	case <-time.After(3 * time.Second):
		t.Error("a script for another master waited for the held master's batch")
		defer func() { <-done }()
	}
	if err := release(); err != nil {
		t.Fatalf("held script: %v", err)
	}
}

// incrOr: ARGV[1] 'fail' answers TRYAGAIN (an error go-redis retries), 'slow' holds Redis for ARGV[2]
// microseconds, anything else INCRs KEYS[1].
var incrOr = redis.NewScript(`
if ARGV[1] == 'fail' then return redis.error_reply('TRYAGAIN refused for the test') end
if ARGV[1] == 'slow' then
  local t = redis.call('TIME'); local start = tonumber(t[1]) * 1000000 + tonumber(t[2])
  repeat t = redis.call('TIME') until tonumber(t[1]) * 1000000 + tonumber(t[2]) - start > tonumber(ARGV[2])
  return 0
end
return redis.call('INCR', KEYS[1])
`)

// result is a script's reply and error.
type result struct {
	v   int64
	err error
}

// startIncr runs incrOr's INCR of key through b in the background; its result comes on the channel.
func startIncr(ctx context.Context, b *Batcher, key string) <-chan result {
	out := make(chan result, 1)
	go func() {
		v, err := incrOr.Run(ctx, b, []string{key}, "incr").Int64()
		out <- result{v, err}
	}()
	return out
}

// TestARetryableErrorRerunsNoOtherScript: go-redis resends a whole pipeline when its first command
// gets a retryable error (here TRYAGAIN); the scripts after it, already run, ran again — an INCR
// answered 4 for one call. A batch is never resent: the refused script goes again alone (and is
// refused again, four times, as it would be alone), the other runs once.
func TestARetryableErrorRerunsNoOtherScript(t *testing.T) {
	rdb, prefix := testenv.Redis(t)
	ctx := context.Background()
	if err := incrOr.Load(ctx, rdb).Err(); err != nil {
		t.Fatal(err)
	}
	b := New(rdb)
	release := hold(t, rdb, b, prefix)
	refused := make(chan error, 1)
	go func() { refused <- incrOr.Run(ctx, b, []string{prefix + "{held}f"}, "fail").Err() }()
	waitFor(t, b, func() bool { return queued(b) == 1 })
	counted := startIncr(ctx, b, prefix+"{held}i")
	waitFor(t, b, func() bool { return queued(b) == 2 })
	if err := release(); err != nil {
		t.Fatal(err)
	}
	if err := <-refused; err == nil || !strings.HasPrefix(err.Error(), "TRYAGAIN") {
		t.Errorf("the refused script's caller got %v, want its TRYAGAIN", err)
	}
	r := <-counted
	got, _ := rdb.Get(ctx, prefix+"{held}i").Int64()
	if r.err != nil || r.v != 1 || got != 1 {
		t.Errorf("the INCR script answered %d (%v) and the key holds %d: want it run once, answered 1", r.v, r.err, got)
	}
}

// impatient returns the test's Redis client and key prefix, and a second client on one Redis with a
// 300 ms read timeout and go-redis' default retries (as serve runs it); it skips on Redis Cluster.
func impatient(t *testing.T) (base redis.UniversalClient, prefix string, rdb *redis.Client) {
	t.Helper()
	if testenv.RedisCluster() {
		t.Skip("one Redis: the test sets its own client's read timeout")
	}
	base, prefix = testenv.Redis(t)
	opts, err := redis.ParseURL(testenv.RedisURL(t))
	if err != nil {
		t.Fatal(err)
	}
	opts.ReadTimeout = 300 * time.Millisecond
	rdb = redis.NewClient(opts)
	t.Cleanup(func() { rdb.Close() })
	return base, prefix, rdb
}

// TestATimeoutRerunsNoAnsweredScript: a read timeout in the middle of a batch made go-redis resend
// the whole pipeline, running again (four times in all) scripts whose replies it had read. Now
// every script of the batch runs at most once; go-redis reports the timeout to each of its callers,
// as it would to a script sent alone whose reply did not come.
func TestATimeoutRerunsNoAnsweredScript(t *testing.T) {
	base, prefix, rdb := impatient(t)
	ctx := context.Background()
	if err := incrOr.Load(ctx, rdb).Err(); err != nil {
		t.Fatal(err)
	}
	b := New(rdb)
	release := hold(t, rdb, b, prefix)
	counted := startIncr(ctx, b, prefix+"{held}i")
	waitFor(t, b, func() bool { return queued(b) == 1 })
	slow := make(chan error, 1)
	go func() { slow <- incrOr.Run(ctx, b, []string{prefix + "{held}s"}, "slow", 400000).Err() }()
	waitFor(t, b, func() bool { return queued(b) == 2 })
	if err := release(); err != nil {
		t.Fatal(err)
	}
	r := <-counted
	if err := <-slow; !timedOut(err) {
		t.Errorf("the slow script's caller got %v, want its read timeout", err)
	}
	time.Sleep(500 * time.Millisecond) // a resent slow script would still be running
	got, _ := base.Get(ctx, prefix+"{held}i").Int64()
	if got != 1 || (r.err == nil && r.v != 1) || (r.err != nil && !timedOut(r.err)) {
		t.Errorf("the INCR script answered %d (%v) and the key holds %d: want it run once, answered 1 or the timeout", r.v, r.err, got)
	}
}

// TestAHungRedisFailsTheQueueAtOnce: against a Redis that accepts connections and never answers,
// 2,048 callers at once. Batched, they drained one MaxBatch per timed-out round trip (p50 8.7 s, max
// 17.4 s with 100 ms timeouts, where each alone failed within 0.9 s); now the callers queued behind a
// timed-out batch fail with it.
func TestAHungRedisFailsTheQueueAtOnce(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() { _, _ = io.Copy(io.Discard, c) }()
		}
	}()
	rdb := redis.NewClient(&redis.Options{Addr: ln.Addr().String(), Protocol: 2, DisableIdentity: true,
		DialTimeout: 100 * time.Millisecond, ReadTimeout: 100 * time.Millisecond, WriteTimeout: 100 * time.Millisecond,
		PoolTimeout: 150 * time.Millisecond, PoolSize: 20})
	defer rdb.Close()
	b := New(rdb)
	const callers = 2048
	slowest := make(chan time.Duration, callers)
	var wg sync.WaitGroup
	for i := 0; i < callers; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			t0 := time.Now()
			if err := incrOr.Run(context.Background(), b, []string{"k"}, "incr").Err(); err == nil {
				t.Error("a script against a Redis that never answers succeeded")
			}
			slowest <- time.Since(t0)
		}()
	}
	wg.Wait()
	close(slowest)
	var max time.Duration
	for d := range slowest {
		max = maxDuration(max, d)
	}
	// Alone, each fails within its own retries (~1 s here); a queue draining MaxBatch per timeout
	// would take 16 timed-out round trips and more.
	if max > 3*time.Second {
		t.Errorf("the slowest caller waited %v against a hung Redis: queued callers wait for batch after batch", max)
	}
}

func maxDuration(a, b time.Duration) time.Duration {
	if a > b {
		return a
	}
	return b
}

// fakeRedis is a RESP2 server that answers each command with reply(args); a nil reply answers
// nothing (the command hangs). It makes the failures a real Redis cannot be made to produce on demand.
func fakeRedis(t *testing.T, reply func(args []string) []byte) *redis.Client {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				r := bufio.NewReader(c)
				for {
					var n int
					if _, err := fmt.Fscanf(r, "*%d\r\n", &n); err != nil {
						return
					}
					args := make([]string, n)
					for i := range args {
						var size int
						if _, err := fmt.Fscanf(r, "$%d\r\n", &size); err != nil {
							return
						}
						buf := make([]byte, size+2)
						if _, err := io.ReadFull(r, buf); err != nil {
							return
						}
						args[i] = string(buf[:size])
					}
					if strings.EqualFold(args[0], "hello") { // go-redis asks; a RESP2 server does not know it
						_, _ = c.Write([]byte("-ERR unknown command 'hello'\r\n"))
						continue
					}
					if out := reply(args); out != nil {
						_, _ = c.Write(out)
					}
				}
			}()
		}
	}()
	rdb := redis.NewClient(&redis.Options{Addr: ln.Addr().String(), Protocol: 2, DisableIdentity: true,
		ReadTimeout: 300 * time.Millisecond, WriteTimeout: 300 * time.Millisecond})
	t.Cleanup(func() { rdb.Close() })
	return rdb
}

// TestAScriptAloneIsNotRerunAfterATimeout: a script sent alone (no batch in flight: a quiet server's
// every consume) went through go-redis' retries, which resend a command after a read timeout, so
// one that had run but answered late ran again: four INCRs for one call.
func TestAScriptAloneIsNotRerunAfterATimeout(t *testing.T) {
	base, prefix, rdb := impatient(t)
	ctx := context.Background()
	late := redis.NewScript(`
local v = redis.call('INCR', KEYS[1])
local t = redis.call('TIME'); local start = tonumber(t[1]) * 1000000 + tonumber(t[2])
repeat t = redis.call('TIME') until tonumber(t[1]) * 1000000 + tonumber(t[2]) - start > 400000
return v`)
	if err := late.Load(ctx, rdb).Err(); err != nil {
		t.Fatal(err)
	}
	err := late.Run(ctx, New(rdb), []string{prefix + "{lone}"}).Err()
	if !timedOut(err) {
		t.Errorf("the late script's caller got %v, want the read timeout", err)
	}
	time.Sleep(500 * time.Millisecond) // a resent script would still be running
	if got, _ := base.Get(ctx, prefix+"{lone}").Int64(); got != 1 {
		t.Errorf("the script ran %d times for one call", got)
	}
}

// TestAnAnsweredScriptKeepsItsAnswer: a batch whose first script is answered and whose second never
// is. go-redis put the round trip's timeout on the answered one too, so its caller was told it
// failed — a consume that was counted, and that a client would retry.
func TestAnAnsweredScriptKeepsItsAnswer(t *testing.T) {
	rdb := fakeRedis(t, func(args []string) []byte {
		switch args[len(args)-1] {
		case "hang":
			return nil
		case "incr":
			return []byte(":1\r\n")
		}
		return []byte(":0\r\n")
	})
	ctx := context.Background()
	b := New(rdb)
	release := hold(t, rdb, b, "p:")
	counted := startIncr(ctx, b, "p:{held}i")
	waitFor(t, b, func() bool { return queued(b) == 1 })
	hung := make(chan error, 1)
	go func() { hung <- incrOr.Run(ctx, b, []string{"p:{held}h"}, "hang").Err() }()
	waitFor(t, b, func() bool { return queued(b) == 2 })
	if err := release(); err != nil {
		t.Fatal(err)
	}
	if r := <-counted; r.err != nil || r.v != 1 {
		t.Errorf("the answered script's caller got %d, %v; want its answer 1", r.v, r.err)
	}
	if err := <-hung; !timedOut(err) {
		t.Errorf("the unanswered script's caller got %v, want the timeout", err)
	}
}

// TestRefusedScriptsGoAgainTogether: a Redis loading its data set answers LOADING to everything.
// Each refused script of a batch was sent again alone, one after another with go-redis' backoff,
// before anyone was answered: 64 callers, the slowest after 6.5 s where one alone fails in ~0.15 s.
func TestRefusedScriptsGoAgainTogether(t *testing.T) {
	rdb := fakeRedis(t, func([]string) []byte { return []byte("-LOADING Redis is loading the dataset in memory\r\n") })
	ctx := context.Background()
	b := New(rdb)
	const callers = 64
	var wg sync.WaitGroup
	slowest := make(chan time.Duration, callers)
	start := make(chan struct{})
	for i := 0; i < callers; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			t0 := time.Now()
			if err := incrOr.Run(ctx, b, []string{"k"}, "incr").Err(); err == nil || !strings.HasPrefix(err.Error(), "LOADING") {
				t.Errorf("got %v, want LOADING", err)
			}
			slowest <- time.Since(t0)
		}()
	}
	close(start)
	wg.Wait()
	close(slowest)
	var max time.Duration
	for d := range slowest {
		max = maxDuration(max, d)
	}
	if max > time.Second {
		t.Errorf("the slowest of %d refused callers waited %v: refused scripts are sent again one by one", callers, max)
	}
}

// TestAQueuedCallerLeavesWhenItsContextEnds: a caller queued behind a batch in flight used to wait
// for that round trip whatever its own deadline (up to the client's read timeout). Now it leaves the
// queue when its context ends, unsent: its script never runs, and the callers queued with it still do.
func TestAQueuedCallerLeavesWhenItsContextEnds(t *testing.T) {
	rdb, prefix := testenv.Redis(t)
	ctx := context.Background()
	if err := incrOr.Load(ctx, rdb).Err(); err != nil {
		t.Fatal(err)
	}
	b := New(rdb)
	release := hold(t, rdb, b, prefix)
	before := startIncr(ctx, b, prefix+"{held}stays")
	waitFor(t, b, func() bool { return queued(b) == 1 })
	short, cancel := context.WithCancel(ctx)
	defer cancel()
	leaves := startIncr(short, b, prefix+"{held}leaves")
	waitFor(t, b, func() bool { return queued(b) == 2 })
	after := startIncr(ctx, b, prefix+"{held}stays")
	waitFor(t, b, func() bool { return queued(b) == 3 })

	cancel()
	select {
	case r := <-leaves:
		if !errors.Is(r.err, context.Canceled) {
			t.Errorf("the caller whose context ended: %v, want its cancellation", r.err)
		}
	case <-time.After(3 * time.Second):
		t.Fatal("a queued caller whose context ended still waits for the batch in flight")
	}
	if n := queued(b); n != 2 {
		t.Errorf("%d callers queued after one left, want 2", n)
	}
	if err := release(); err != nil {
		t.Fatalf("held script: %v", err)
	}
	for _, r := range []<-chan result{before, after} {
		if got := <-r; got.err != nil {
			t.Errorf("a caller queued beside the one that left: %v", got.err)
		}
	}
	if got, err := rdb.Get(ctx, prefix+"{held}stays").Int64(); err != nil || got != 2 {
		t.Errorf("{held}stays = %d (%v), want 2: both callers' scripts ran once", got, err)
	}
	if n, err := rdb.Exists(ctx, prefix+"{held}leaves").Result(); err != nil || n != 0 {
		t.Errorf("the script of the caller that left ran (%d, %v)", n, err)
	}
}
