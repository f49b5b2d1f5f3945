// Package client sends events, usage and quota calls from Go application code to an analyticsd
// server. It is a module of its own (github.com/analyticsd/analyticsd/client) that imports only the
// standard library, so using it adds none of the server's dependencies to your build.
//
// It covers the four calls of the analytics guide, for the tenant of one API key:
//
//   - [Client.Track] queues an event; a background goroutine batches, gzips and sends the queue to
//     POST /api/analytics/events. It needs the events:write scope.
//   - [Client.IncrementUsage] adds n to a usage metric (POST /api/analytics/usage, events:write).
//   - [Client.CheckQuota] reads one quota (GET /api/analytics/quotas/{metric}, analytics:read).
//   - [Client.Consume] checks and spends a quota atomically (POST …/quotas/{metric}/consume,
//     events:write); a refusal is an error that matches [ErrQuotaExceeded].
//
// The last three are synchronous: they return the server's answer, retried as below within ctx.
//
// # Guarantees
//
// Track never blocks and does no I/O. When it returns nil it has taken the event, and from then on
// the event ends in exactly one of two ways: the server acknowledges it (a 2xx, after which the
// server stores it exactly once), or the client gives up on it and passes it, with the reason, to
// [Config.OnFailure], counts it in [Stats] and [Metrics], and logs it. Nothing is lost silently.
//
// Overflow policy: at most [Config.QueueSize] events wait in the queue (plus one batch of at most
// [Config.BatchSize] being sent). When the queue is full, Track refuses the new event — it drops the
// newest and keeps every event already taken — and returns [ErrQueueFull]; the drop is counted in
// [Stats].Dropped and [Metrics].EventsDropped and logged (at most once per 10 s, with the count).
//
// Exactly once: every event carries an id, a random UUIDv4 unless the caller set one, and every batch
// an Idempotency-Key; a retry sends the same key and the same bytes. The server stores an event id at
// most once per tenant within its dedup window (INGEST_DEDUP_WINDOW, 24 h by default), so a retry after
// a timeout or a lost answer never stores an event twice. If you re-send events handed to
// OnFailure, keep their ids and the server drops the ones it had stored after all. A server run with
// INGEST_DEDUP_WINDOW=0 checks no ids: it then stores at least once, not exactly once.
//
// Retries: network errors, timeouts, 408, 429 (except a consume's quota_exceeded), 5xx, and 409
// idempotency_key_in_use (an earlier attempt of the same request is still running on the server) are
// retried with exponential backoff and jitter — [Config.MinBackoff] doubling up to
// [Config.MaxBackoff] — and never sooner than the Retry-After the server sent (up to a minute), up
// to [Config.MaxAttempts] attempts. Every other answer is final: it is not retried and is surfaced as
// an [*APIError] (through OnFailure for Track) — a 3xx too, since a redirected POST is not delivered.
// Two answers to a batch of several events send it again in halves: a 413 (the server takes fewer
// events or bytes per request than BatchSize or MaxBatchBytes allow) and a 400 invalid_body (one
// event the server cannot read, e.g. props with half a UTF-16 surrogate pair, fails its whole
// request), so only the event at fault is given up on. A batch is acknowledged only by a 2xx whose
// answer accounts for each of its events (stored, duplicate or rejected). A batch the server was
// handling when it crashed gets 409 until the server's pending record of its key expires (one
// minute), then its stored answer.
//
// [Client.Flush] returns once every event taken before it was called has been acknowledged or given
// up on, and says if any was given up on. [Client.Close] stops taking events (Track then returns
// [ErrClosed]) and sends everything it took; if its ctx ends first, the events not yet acknowledged
// are handed to OnFailure and Close says how many.
//
// # Boundaries
//
// The queue is memory only: events not yet sent are lost if the process dies (a crash, kill -9)
// before Close. Call Close on shutdown, with a deadline. Batches are sent one at a time, in the order
// Track took their events. The client does not read events, usage or exports; use the HTTP API
// (api/openapi.json). Event fields are validated by the server; an event it rejects is reported
// through OnFailure with a [*RejectedError] naming the reason, while the rest of its batch is stored.
// A server with ANALYTICS_ENABLED=false acknowledges events without storing them; the client logs a
// warning for each such batch.
package client

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// Defaults of Config's zero values.
const (
	DefaultQueueSize     = 10000
	DefaultBatchSize     = 500
	DefaultMaxBatchBytes = 1 << 20
	DefaultFlushInterval = time.Second
	DefaultTimeout       = 10 * time.Second
	DefaultMaxAttempts   = 15
	DefaultMinBackoff    = 100 * time.Millisecond
	DefaultMaxBackoff    = 30 * time.Second
)

// maxBatchSize is the server's default cap on events per request (INGEST_MAX_EVENTS).
const maxBatchSize = 10000

// Config configures a Client. Endpoint and APIKey are required; every other zero value means the
// default named on the field.
type Config struct {
	// Endpoint is the server's base URL, e.g. "http://localhost:8080".
	Endpoint string
	// APIKey is the tenant's API key: events:write for Track, IncrementUsage and Consume,
	// analytics:read for CheckQuota.
	APIKey string
	// TenantSlug, when set, is sent as X-Tenant-Slug; the server then checks that it names the key's
	// tenant (403 otherwise).
	TenantSlug string
	// HTTPClient sends the requests; default a new http.Client. Timeout bounds each attempt instead
	// of the client's own Timeout. Redirects are never followed (a copy of it is used, with its own
	// CheckRedirect): a 3xx is a final error naming the Location to set as Endpoint.
	HTTPClient *http.Client
	// Timeout bounds one attempt of one request (default 10 s).
	Timeout time.Duration

	// QueueSize is how many events may wait to be sent (default 10000); beyond it Track drops the
	// new event and returns ErrQueueFull.
	QueueSize int
	// BatchSize is the most events sent in one request (default 500, at most 10000).
	BatchSize int
	// MaxBatchBytes caps a request's JSON before compression (default 1 MiB; the server takes 10 MiB).
	// A single event larger than it is still sent, alone.
	MaxBatchBytes int
	// FlushInterval is the longest an event waits for its batch to fill (default 1 s).
	FlushInterval time.Duration
	// DisableGzip sends request bodies uncompressed.
	DisableGzip bool

	// MaxAttempts bounds the attempts of one batch or call, the first included (default 15: about
	// three minutes of retrying with the default backoff, enough to outlast a server restart); a
	// negative value retries until the call's ctx (for Track's batches: Close's ctx) ends.
	MaxAttempts int
	// MinBackoff is the first retry's delay (default 100 ms); each retry doubles it, up to
	// MaxBackoff (default 30 s). Each delay is jittered between half and all of its value, and is
	// never shorter than the server's Retry-After, up to one minute (or MaxBackoff if longer): a
	// longer Retry-After (a maintenance page's hour) waits that long, so MaxAttempts still bounds
	// how long a batch is retried before it is handed to OnFailure.
	MinBackoff, MaxBackoff time.Duration

	// Logger receives one record per retry, failed batch and burst of drops (default slog.Default()).
	Logger *slog.Logger
	// Metrics, when set, is told what happens to events and batches; Stats has the same counts.
	Metrics Metrics
	// OnFailure, when set, receives every event the client took and then gave up on, with the reason.
	// It runs on the sending goroutine: keep it short.
	OnFailure func(Failure)
}

// Metrics receives counts from a Client, e.g. to feed Prometheus counters. Its methods are called
// from the sending goroutine (EventsDropped from Track's) and must be safe for concurrent use.
type Metrics interface {
	// EventsSent counts events the server acknowledged (stored now, or found already stored).
	EventsSent(n int)
	// BatchRetried counts a failed attempt that will be retried; events is the batch's size
	// (1 for the synchronous calls).
	BatchRetried(events int)
	// EventsDropped counts events Track refused because the queue was full.
	EventsDropped(n int)
	// BatchFailed counts a batch that lost events after Track took them: refused as a whole, given
	// up on, or partly rejected; events is how many were not stored.
	BatchFailed(events int)
}

// Stats are a Client's counts since New.
type Stats struct {
	Tracked       uint64 // events Track took
	Sent          uint64 // events the server acknowledged
	Retried       uint64 // attempts retried (batches and synchronous calls)
	Dropped       uint64 // events Track refused: queue full
	FailedBatches uint64 // batches that lost events after they were taken
	FailedEvents  uint64 // events given up on (each passed to OnFailure)
	Queued        int    // events waiting in the queue now
}

// Failure is a set of events the client took and then gave up on.
type Failure struct {
	// Events are the events as tracked, ID and Ts filled in: re-sending them with these ids stores
	// none twice. They are decoded from what Track encoded, so they are the caller's values at Track
	// time and share nothing with the caller's maps (numbers in Props are json.Number).
	Events []Event
	// Err says why: an *APIError (the server refused the batch), a *RejectedError (the server
	// rejected this event and stored the rest of its batch), or the last transport error or status
	// when attempts ran out or Close's ctx ended.
	Err error
}

// ErrQueueFull is returned by Track when the queue holds Config.QueueSize events: the new event is
// dropped and counted.
var ErrQueueFull = errors.New("analyticsd client: queue full, event dropped")

// ErrClosed is returned by Track after Close began.
var ErrClosed = errors.New("analyticsd client: closed")

// ErrUndelivered is wrapped by Flush and Close when events they waited for were given up on.
var ErrUndelivered = errors.New("events not delivered")

// Client sends to one analyticsd server with one API key. It is safe for concurrent use. Create it
// with New and end it with Close.
type Client struct {
	cfg  Config
	base string
	hc   *http.Client
	log  *slog.Logger
	// maxRetryAfter caps the wait a Retry-After asks for: max(MaxBackoff, 1 minute).
	maxRetryAfter time.Duration
	metrics       Metrics

	mu     sync.Mutex // orders Track's sequence numbers with the queue, and guards closed
	closed bool
	seq    uint64 // last sequence number given to an event

	queue   chan item
	kick    chan struct{} // Flush: send what is queued now
	closing chan struct{} // closed by Close: drain and stop
	ctx     context.Context
	abort   context.CancelFunc // Close's ctx ended: stop retrying
	done    chan struct{}      // the sender has stopped

	prog progress

	tracked, sent, retried, dropped, failedBatches, failedEvents atomic.Uint64
	lastDropLog                                                  atomic.Int64 // unix nanos
	dropsSinceLog                                                atomic.Int64
}

// item is one event in the queue: its JSON, and its name and id for the log. OnFailure's Event is
// decoded from raw (see event), so the queue holds no reference to the caller's Props.
type item struct {
	seq      uint64
	name, id string
	raw      []byte
}

// New checks cfg, fills its defaults and starts the sending goroutine.
func New(cfg Config) (*Client, error) {
	var errs []error
	u, err := url.Parse(cfg.Endpoint)
	if cfg.Endpoint == "" || err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		errs = append(errs, fmt.Errorf("Endpoint %q must be an http or https URL such as http://localhost:8080", cfg.Endpoint))
	}
	if cfg.APIKey == "" {
		errs = append(errs, errors.New("APIKey is required (analyticsd apikey create --tenant <slug> --scopes events:write,analytics:read)"))
	}
	if cfg.BatchSize < 0 || cfg.BatchSize > maxBatchSize {
		errs = append(errs, fmt.Errorf("BatchSize %d must be from 1 to %d", cfg.BatchSize, maxBatchSize))
	}
	for _, f := range []struct {
		name string
		v    int64
	}{{"QueueSize", int64(cfg.QueueSize)}, {"MaxBatchBytes", int64(cfg.MaxBatchBytes)}, {"FlushInterval", int64(cfg.FlushInterval)},
		{"Timeout", int64(cfg.Timeout)}, {"MinBackoff", int64(cfg.MinBackoff)}, {"MaxBackoff", int64(cfg.MaxBackoff)}} {
		if f.v < 0 {
			errs = append(errs, fmt.Errorf("%s must not be negative", f.name))
		}
	}
	if err := errors.Join(errs...); err != nil {
		return nil, fmt.Errorf("analyticsd client: %w", err)
	}
	def := func(v *int, d int) {
		if *v == 0 {
			*v = d
		}
	}
	defDur := func(v *time.Duration, d time.Duration) {
		if *v == 0 {
			*v = d
		}
	}
	def(&cfg.QueueSize, DefaultQueueSize)
	def(&cfg.BatchSize, DefaultBatchSize)
	def(&cfg.MaxBatchBytes, DefaultMaxBatchBytes)
	def(&cfg.MaxAttempts, DefaultMaxAttempts)
	defDur(&cfg.FlushInterval, DefaultFlushInterval)
	defDur(&cfg.Timeout, DefaultTimeout)
	defDur(&cfg.MinBackoff, DefaultMinBackoff)
	defDur(&cfg.MaxBackoff, DefaultMaxBackoff)
	cfg.MaxBackoff = max(cfg.MaxBackoff, cfg.MinBackoff)
	// A copy of the caller's http.Client that follows no redirect: Go turns a redirected POST into a
	// GET, whose 200 would read as an acknowledgement of events that were never stored. A 3xx is a
	// final error naming where the server points (set Endpoint to it).
	hc := &http.Client{}
	if cfg.HTTPClient != nil {
		*hc = *cfg.HTTPClient
		hc.Timeout = 0 // cfg.Timeout bounds each attempt (a context per attempt), as documented
	}
	hc.CheckRedirect = func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	ctx, abort := context.WithCancel(context.Background())
	c := &Client{
		cfg:           cfg,
		base:          strings.TrimRight(cfg.Endpoint, "/"),
		hc:            hc,
		maxRetryAfter: max(cfg.MaxBackoff, time.Minute),
		log:           cfg.Logger.With("component", "analyticsd-client"),
		metrics:       cfg.Metrics,
		queue:         make(chan item, cfg.QueueSize),
		kick:          make(chan struct{}, 1),
		closing:       make(chan struct{}),
		ctx:           ctx,
		abort:         abort,
		done:          make(chan struct{}),
		prog:          progress{changed: make(chan struct{})},
	}
	go c.run()
	return c, nil
}

// Track queues e to be sent and returns at once. The event is sent with a random UUIDv4 as its id
// when e.ID is empty (set e.ID, e.g. to NewID(), to know it) and with the time of the call when e.Ts
// is zero. Track encodes e before returning, so later changes to e.Props are not sent. It returns
// ErrQueueFull when the queue is full (the event is dropped and counted), ErrClosed after Close, or an
// error naming a field it cannot send; nil means the event is taken (see the package documentation
// for what happens to it then).
func (c *Client) Track(e Event) error {
	raw, err := e.prepare(time.Now)
	if err != nil {
		return err
	}
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return ErrClosed
	}
	select {
	case c.queue <- item{seq: c.seq + 1, name: e.Event, id: e.ID, raw: raw}:
		c.seq++
		c.mu.Unlock()
		c.tracked.Add(1)
		return nil
	default:
		c.mu.Unlock()
	}
	// The hooks run outside the lock: a slow one slows this caller only.
	c.dropped.Add(1)
	if c.metrics != nil {
		c.metrics.EventsDropped(1)
	}
	c.logDrop()
	return ErrQueueFull
}

// logDrop logs dropped events at most once per 10 s, with how many were dropped since the last line.
func (c *Client) logDrop() {
	n := c.dropsSinceLog.Add(1)
	now := time.Now().UnixNano()
	last := c.lastDropLog.Load()
	if now-last < int64(10*time.Second) || !c.lastDropLog.CompareAndSwap(last, now) {
		return
	}
	c.dropsSinceLog.Add(-n)
	c.log.Warn("queue full: events dropped; send less, raise QueueSize, or find out why sending is slow",
		"dropped", n, "queue_size", c.cfg.QueueSize, "dropped_total", c.dropped.Load())
}

// Stats returns the client's counts so far.
func (c *Client) Stats() Stats {
	return Stats{
		Tracked:       c.tracked.Load(),
		Sent:          c.sent.Load(),
		Retried:       c.retried.Load(),
		Dropped:       c.dropped.Load(),
		FailedBatches: c.failedBatches.Load(),
		FailedEvents:  c.failedEvents.Load(),
		Queued:        len(c.queue),
	}
}

// Flush sends every event taken before the call and waits until each is acknowledged or given up on.
// It returns an error wrapping ErrUndelivered if any of them was given up on (each was passed to
// OnFailure), or ctx's error if ctx ends first — the events then stay queued and keep being sent.
func (c *Client) Flush(ctx context.Context) error {
	c.mu.Lock()
	target := c.seq
	c.mu.Unlock()
	from := c.prog.begin()
	defer c.prog.end()
	select {
	case c.kick <- struct{}{}:
	default: // a kick is pending already
	}
	failed, pending, err := c.prog.wait(ctx, from, target)
	switch {
	case err != nil:
		return fmt.Errorf("analyticsd client: flush: %d events not acknowledged yet, still queued: %w", pending, err)
	case failed > 0:
		return fmt.Errorf("analyticsd client: flush: %d events given up on (passed to OnFailure): %w", failed, ErrUndelivered)
	}
	return nil
}

// Close stops taking events (Track returns ErrClosed from now on), sends every event it took and
// stops the sending goroutine. If ctx ends first, the batch being sent is abandoned and every event
// not acknowledged is passed to OnFailure; Close then returns an error wrapping ErrUndelivered and
// ctx's error. Closing again waits for the first Close to finish.
func (c *Client) Close(ctx context.Context) error {
	c.mu.Lock()
	target := c.seq
	first := !c.closed
	if first {
		c.closed = true
		close(c.closing)
	}
	c.mu.Unlock()
	from := c.prog.begin()
	defer c.prog.end()
	select {
	case <-c.done:
	case <-ctx.Done():
		c.abort()
		<-c.done // quick now: every attempt and backoff watches the aborted context
	}
	c.abort()
	failed, _, _ := c.prog.wait(context.Background(), from, target)
	if failed > 0 {
		if ctx.Err() != nil {
			return fmt.Errorf("analyticsd client: close: %d events given up on (passed to OnFailure): %w", failed, errors.Join(ErrUndelivered, ctx.Err()))
		}
		return fmt.Errorf("analyticsd client: close: %d events given up on (passed to OnFailure): %w", failed, ErrUndelivered)
	}
	return nil
}

// run is the sending goroutine: it gathers queued events into batches and sends one batch at a time.
func (c *Client) run() {
	defer close(c.done)
	var (
		batch   []item
		size    int
		timer   = time.NewTimer(time.Hour)
		waiting bool // timer runs for the current batch
	)
	timer.Stop()
	send := func() {
		if waiting {
			timer.Stop()
			waiting = false
		}
		if len(batch) > 0 {
			c.sendBatch(batch)
			batch, size = nil, 0
		}
	}
	add := func(it item) {
		if len(batch) > 0 && size+len(it.raw)+1 > c.cfg.MaxBatchBytes {
			send()
		}
		batch = append(batch, it)
		size += len(it.raw) + 1
		if len(batch) >= c.cfg.BatchSize {
			send()
			return
		}
		if !waiting {
			timer.Reset(c.cfg.FlushInterval)
			waiting = true
		}
	}
	drain := func() {
		for {
			select {
			case it := <-c.queue:
				add(it)
			default:
				send()
				return
			}
		}
	}
	for {
		select {
		case it := <-c.queue:
			add(it)
		case <-timer.C:
			waiting = false
			send()
		case <-c.kick:
			drain()
		case <-c.closing:
			// Track refuses events once closing is closed, so the queue only shrinks now.
			drain()
			return
		}
	}
}

// progress tracks which events are finished (acknowledged or given up on), for Flush and Close.
// The sender finishes events in sequence order, so "every event up to done" says it all; the
// sequence numbers of events given up on are kept, as runs, while a Flush or Close waits.
type progress struct {
	mu      sync.Mutex
	done    uint64
	failed  [][2]uint64 // ascending, disjoint runs [lo, hi] of failed sequence numbers
	waiters int
	changed chan struct{} // closed and replaced whenever done moves
}

func (p *progress) begin() uint64 {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.waiters++
	return p.done
}

func (p *progress) end() {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.waiters--
	if p.waiters == 0 {
		p.failed = nil
	}
}

// finish records that every event up to seq is finished, those in failed given up on.
func (p *progress) finish(seq uint64, failed []uint64) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.waiters > 0 {
		for _, s := range failed {
			if n := len(p.failed); n > 0 && p.failed[n-1][1]+1 == s {
				p.failed[n-1][1] = s
			} else {
				p.failed = append(p.failed, [2]uint64{s, s})
			}
		}
	}
	p.done = max(p.done, seq)
	close(p.changed)
	p.changed = make(chan struct{})
}

// wait waits until every event up to target is finished and counts those after from given up on;
// if ctx ends first it says how many are still pending.
func (p *progress) wait(ctx context.Context, from, target uint64) (failed, pending uint64, err error) {
	for {
		p.mu.Lock()
		if p.done >= target {
			for _, r := range p.failed {
				lo, hi := max(r[0], from+1), min(r[1], target)
				if lo <= hi {
					failed += hi - lo + 1
				}
			}
			p.mu.Unlock()
			return failed, 0, nil
		}
		ch, done := p.changed, p.done
		p.mu.Unlock()
		select {
		case <-ch:
		case <-ctx.Done():
			return 0, target - done, ctx.Err()
		}
	}
}
