// Package scriptbatch runs Lua scripts that callers start at the same time as one Redis pipeline:
// one write and one read system call, and one request for Redis to read and parse, for a whole batch
// instead of one each. A Batcher is a redis.Scripter, so go-redis' Script.Run (EVALSHA, then EVAL on
// NOSCRIPT) works through it unchanged; every other command stays with the client it wraps.
//
// Batching is natural, never timed. A caller that finds no batch in flight sends its script at
// once, alone, from its own goroutine: no hand-off to another goroutine, no wait. Callers that come
// while a batch is in flight queue, and when it returns the first of them sends the next batch: its
// own script and every one queued by then. A quiet server therefore pays a mutex per script, and a
// busy one sends as many scripts per round trip as arrived during the last one. Measured on the
// quota consume (BENCHMARKS.md, "Fourth round"): at 16 connections a round trip carried ~4–5
// consumes, and Redis spent 15–30 % less CPU per consume.
//
// Each script keeps the atomicity Redis gives it alone: the scripts of a batch run one after another,
// each whole, in arrival order, and one script's error is its own. No script is sent twice unless it
// provably did not run: go-redis would resend a whole pipeline (or a lone command) after a lost
// connection, a read timeout or a retryable error, running again scripts it had sent — whose
// replies, in a pipeline, it may already have read. So go-redis resends nothing of ours; the scripts
// Redis refused before running them (TRYAGAIN during a resharding, LOADING, CLUSTERDOWN, MASTERDOWN),
// or that never left because no connection could be made, go again together, up to three times after
// a short backoff, as go-redis would retry one command. A connection lost or timed out mid-batch is
// an error for the scripts whose replies had not arrived; each of them ran once or not at all, as a
// script sent alone whose reply is lost. And when a round trip got no answer in time (Redis hangs),
// the scripts queued behind it fail at once, unsent, rather than each waiting for a batch of its own
// to time out.
//
// On Redis Cluster the batches are per master (a lane each, by the script's first key), so a master
// that is slow or failing over holds up only the scripts bound for it, as without batching; each
// batch still goes through the cluster client, which follows MOVED and ASK when slots move.
package scriptbatch

import (
	"context"
	"errors"
	"fmt"
	"net"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/redis/go-redis/v9"
)

// MaxBatch caps the scripts of one pipeline (a longer queue goes out over several round trips).
const MaxBatch = 128

// lanesKept: past this many lanes (masters ever seen), idle ones are dropped when a new one is made.
const lanesKept = 64

// Batcher runs scripts through a client, batched. Use New.
type Batcher struct {
	rdb     redis.UniversalClient
	cluster *redis.ClusterClient // rdb, when it is a cluster client: lanes per master

	single *lane // one Redis: its only lane, found without a lock (lanes holds it too, as "")

	mu    sync.Mutex
	lanes map[string]*lane // by master address (on a cluster)

	trips, scripts atomic.Uint64 // Stats
}

// lane batches the scripts bound for one server.
type lane struct {
	mu      sync.Mutex
	sending bool    // a batch is in flight: new callers queue
	queue   []*call // the next batch's scripts, in arrival order
}

type call struct {
	cmd *redis.Cmd
	// turn gets true when this caller is to send the next batch (its own script first), false when
	// another caller sent its script and the reply is in cmd.
	turn chan bool
}

// New returns a Batcher over rdb: one Redis, or a Redis Cluster, whose pipeline sends each script to
// its first key's master (the scripts keep their keys in one slot through a hash tag).
func New(rdb redis.UniversalClient) *Batcher {
	cc, _ := rdb.(*redis.ClusterClient)
	b := &Batcher{rdb: rdb, cluster: cc, lanes: map[string]*lane{}}
	if cc == nil {
		b.single = &lane{}
		b.lanes[""] = b.single
	}
	return b
}

var _ redis.Scripter = (*Batcher)(nil)

// Eval runs EVAL, batched.
func (b *Batcher) Eval(ctx context.Context, script string, keys []string, args ...any) *redis.Cmd {
	return b.run(ctx, "eval", script, keys, args)
}

// EvalSha runs EVALSHA, batched.
func (b *Batcher) EvalSha(ctx context.Context, sha1 string, keys []string, args ...any) *redis.Cmd {
	return b.run(ctx, "evalsha", sha1, keys, args)
}

// EvalRO runs EVAL_RO, batched.
func (b *Batcher) EvalRO(ctx context.Context, script string, keys []string, args ...any) *redis.Cmd {
	return b.run(ctx, "eval_ro", script, keys, args)
}

// EvalShaRO runs EVALSHA_RO, batched.
func (b *Batcher) EvalShaRO(ctx context.Context, sha1 string, keys []string, args ...any) *redis.Cmd {
	return b.run(ctx, "evalsha_ro", sha1, keys, args)
}

// ScriptExists is the client's own, unbatched.
func (b *Batcher) ScriptExists(ctx context.Context, hashes ...string) *redis.BoolSliceCmd {
	return b.rdb.ScriptExists(ctx, hashes...)
}

// ScriptLoad is the client's own, unbatched.
func (b *Batcher) ScriptLoad(ctx context.Context, script string) *redis.StringCmd {
	return b.rdb.ScriptLoad(ctx, script)
}

// Stats returns the round trips sent and the scripts they carried, since New.
func (b *Batcher) Stats() (trips, scripts uint64) { return b.trips.Load(), b.scripts.Load() }

// run sends one script, in this caller's batch or another's, and returns its reply. The arguments
// are sent as they are (go-redis writes strings, numbers and []byte; no slice or map flattening).
func (b *Batcher) run(ctx context.Context, name, payload string, keys []string, args []any) *redis.Cmd {
	a := make([]any, 0, 3+len(keys)+len(args))
	a = append(a, name, payload, len(keys))
	for _, k := range keys {
		a = append(a, k)
	}
	cmd := redis.NewCmd(ctx, append(a, args...)...)
	if len(keys) > 0 {
		cmd.SetFirstKeyPos(3) // a cluster pipeline routes the script by its first key
	}
	c := &call{cmd: cmd}

	l := b.lane(ctx, keys)
	l.mu.Lock()
	if l.sending {
		c.turn = make(chan bool, 1)
		l.queue = append(l.queue, c)
		l.mu.Unlock()
		if !l.await(ctx, c) {
			return cmd
		}
		l.mu.Lock() // this caller's turn: it sends everything queued until now
	}
	l.sending = true
	n := min(len(l.queue), MaxBatch-1)
	batch := append(append(make([]*call, 0, 1+n), c), l.queue[:n]...)
	clear(l.queue[:n])
	l.queue = l.queue[n:]
	l.mu.Unlock()

	// handOff runs even if the send panics (no caller may wait forever), and then fails the queue.
	hung := errPanicked
	defer func() { l.handOff(batch, hung) }()
	hung = b.send(ctx, batch)
	return cmd
}

var errPanicked = errors.New("scriptbatch: sending the batch panicked")

// await waits for a queued caller's turn (true: it sends the next batch; false: its reply is in its
// command). A caller whose context ends while it is still in the queue leaves it, unsent, with the
// context's error, as a script alone would fail to get a connection; once a batch took its script,
// or it was given the turn, it waits for that round trip like the rest (its script may be running).
// A call is in the queue exactly until someone takes it, under the lane's lock, to signal its turn.
func (l *lane) await(ctx context.Context, c *call) bool {
	select {
	case t := <-c.turn:
		return t
	case <-ctx.Done():
	}
	l.mu.Lock()
	if i := slices.Index(l.queue, c); i >= 0 {
		l.queue = slices.Delete(l.queue, i, i+1)
		l.mu.Unlock()
		c.cmd.SetErr(fmt.Errorf("not sent: %w", ctx.Err()))
		return false
	}
	l.mu.Unlock()
	return <-c.turn
}

// lane returns the lane of the server that holds keys[0]: the one lane of one Redis; on a cluster
// the master's that the client's slot map names (stale during a resharding: then a batch holds
// scripts for two masters, which the cluster client still routes right).
func (b *Batcher) lane(ctx context.Context, keys []string) *lane {
	if b.single != nil {
		return b.single
	}
	addr := ""
	if len(keys) > 0 {
		if m, err := b.cluster.MasterForKey(ctx, keys[0]); err == nil {
			addr = m.Options().Addr
		}
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	l := b.lanes[addr]
	if l == nil {
		if len(b.lanes) >= lanesKept { // masters come and go (new addresses): forget idle lanes
			for a, o := range b.lanes {
				o.mu.Lock()
				if !o.sending && len(o.queue) == 0 {
					delete(b.lanes, a)
				}
				o.mu.Unlock()
			}
		}
		l = &lane{}
		b.lanes[addr] = l
	}
	return l
}

// handOff passes the turn to the first queued caller, or ends sending, and then wakes the callers
// whose scripts were in batch (batch[0] is the caller itself). After a batch that got no answer in
// time (hung: the round trip's error) every queued caller fails at once, unsent: the next batch would
// most likely wait as long, and the queue would drain one MaxBatch per timeout while new callers
// keep joining it.
func (l *lane) handOff(batch []*call, hung error) {
	l.mu.Lock()
	var next *call
	var failed []*call
	switch {
	case hung != nil && len(l.queue) > 0:
		failed, l.queue = l.queue, nil
		l.sending = false
	case len(l.queue) > 0:
		next = l.queue[0]
		l.queue[0] = nil // the array keeps no reference to a call that left it
		l.queue = l.queue[1:]
	default:
		l.queue = nil
		l.sending = false
	}
	l.mu.Unlock()
	if next != nil {
		next.turn <- true
	}
	for _, o := range batch[1:] {
		o.turn <- false
	}
	for _, o := range failed {
		o.cmd.SetErr(fmt.Errorf("not sent: the Redis round trip before it got no answer in time (%w)", hung))
		o.turn <- false
	}
}

// resends is how many more times scripts that provably did not run (refused, or never written) are
// sent, all of them together, after a backoff of 8 ms, 16 ms, 32 ms: what go-redis does for one
// command (MaxRetries 3), for a whole batch at once.
const resends = 3

// send sends the batch — as one pipeline, or a lone script as a plain command, either way never
// resent by go-redis — and then, together, the scripts Redis refused before running them, up to
// resends times. Each command gets its own reply or error. It returns the error of a round trip that
// got no answer in time (Redis hangs), nil otherwise.
func (b *Batcher) send(ctx context.Context, batch []*call) (hung error) {
	defer func() {
		if r := recover(); r != nil {
			for _, c := range batch {
				c.cmd.SetErr(fmt.Errorf("%w: %v", errPanicked, r))
			}
			panic(r)
		}
	}()
	// The round trip carries other callers' scripts: this caller's cancellation must not fail them.
	// Each is bounded by the client's read and write timeouts, as a script sent alone is.
	ctx = context.WithoutCancel(ctx)
	todo := batch
	for round := 0; ; round++ {
		b.trips.Add(1)
		b.scripts.Add(uint64(len(todo)))
		if len(todo) == 1 {
			_ = b.rdb.Process(ctx, once{todo[0].cmd})
		} else {
			pipe := b.rdb.Pipeline()
			for _, c := range todo {
				_ = pipe.Process(ctx, once{c.cmd})
			}
			_, _ = pipe.Exec(ctx)
		}
		var again []*call
		for _, c := range todo {
			err := c.cmd.Err()
			var re redis.Error
			switch {
			case err == nil:
			case refusedUnrun(err):
				again = append(again, c)
			case errors.As(err, &re): // the script's own answer
			case c.cmd.Val() != nil:
				// Answered before the round trip failed: go-redis puts the round trip's error on
				// every command without one, but a reply is set only when it was read whole.
				c.cmd.SetErr(nil)
			case timedOut(err):
				if hung == nil {
					hung = err
				}
			case neverSent(err):
				again = append(again, c)
			}
		}
		if hung != nil || len(again) == 0 || round == resends {
			return hung
		}
		time.Sleep(time.Duration(8<<round) * time.Millisecond)
		for _, c := range again {
			c.cmd.SetErr(nil)
		}
		todo = again
	}
}

// once is a batched command: go-redis must never resend its pipeline (see the package comment).
type once struct{ *redis.Cmd }

// NoRetry tells go-redis not to resend the pipeline holding it.
func (once) NoRetry() bool { return true }

// refusedUnrun reports a Redis error that refuses a command before it runs, which go-redis retries
// for a command sent alone. (So a batched script must never answer such an error itself after
// writing: it would run again. Errors raised inside a script start with ERR.)
func refusedUnrun(err error) bool {
	var re redis.Error
	if err == nil || !errors.As(err, &re) {
		return false
	}
	for _, p := range [...]string{"TRYAGAIN", "LOADING", "CLUSTERDOWN", "MASTERDOWN"} {
		if redis.HasErrorPrefix(err, p) {
			return true
		}
	}
	return false
}

// timedOut reports an error of a round trip that got no answer in time, or no connection to send on.
func timedOut(err error) bool {
	var ne net.Error
	return err != nil && (errors.Is(err, context.DeadlineExceeded) || errors.Is(err, redis.ErrPoolTimeout) ||
		errors.As(err, &ne) && ne.Timeout())
}

// neverSent reports a failure to connect: nothing was written.
func neverSent(err error) bool {
	var oe *net.OpError
	return errors.As(err, &oe) && oe.Op == "dial"
}
