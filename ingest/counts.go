package ingest

import (
	"context"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/google/uuid"
)

// Counter receives live usage deltas (metric → n) for a tenant on a UTC day, for rows received at
// `received`; a negative n takes a live count back (a row counted but not stored after all).
// *quota.Service implements it over Redis. Ingest never waits on it and never fails because of it.
//
// A delta that cannot be delivered (Redis down, a timeout, a full queue) is not retried — a retry
// after an ambiguous failure could count it twice. It need not be: the counters are reconciled with
// ClickHouse per received minute (quota.Counters), which brings a count that missed rows up to what
// was stored, and settles a count that was not taken back down to it.
//
// With Claims (deduplication on), rows are counted by the claim that proves them new, in the same
// Redis step, and Add only takes counts back; Counted then hears what a claim added, for alerts.
type Counter interface {
	Add(ctx context.Context, tenant uuid.UUID, day, received time.Time, deltas map[string]int64) error
	// Counted is told that a claim added by to a tenant's counter of metric for day, which is now value.
	Counted(ctx context.Context, tenant uuid.UUID, day time.Time, metric string, by, value int64)
}

// DefaultEventMetrics maps events to the daily quota metrics they count toward.
func DefaultEventMetrics() map[string]string {
	return map[string]string{
		"apikey.request":             "api_requests_daily",
		"builder.generate.completed": "builds_daily",
		"email.sent":                 "emails_daily",
		"webhook.delivered":          "webhooks_daily",
		"webhook.failed":             "webhooks_daily",
	}
}

type countKey struct {
	tenant   uuid.UUID
	day      time.Time
	received time.Time // when the rows were received (the counters count per received minute)
}

// liveCounts folds usage deltas over a short window and sends them to the Counter in one call per
// tenant, day and received second, off the request path: Redis being slow or down costs ingest
// nothing.
type liveCounts struct {
	counter Counter
	in      chan map[countKey]map[string]int64
	// closing orders add against close: an add that comes after close (a take-back for a duplicate
	// found by the shutdown's last flush) is applied at once instead of being sent on the closed
	// channel.
	closing sync.RWMutex
	closed  bool
	metrics *Metrics
	log     *slog.Logger
	every   time.Duration
	done    chan struct{}
	// lastWarn is when addNow last logged a failure (unix ns): at most one warning per 10 s.
	lastWarn atomic.Int64
	// failedAt is when addNow's last send failed (unix ns).
	failedAt atomic.Int64
}

func newLiveCounts(c Counter, m *Metrics, log *slog.Logger, every time.Duration) *liveCounts {
	if every <= 0 {
		every = 100 * time.Millisecond
	}
	return &liveCounts{counter: c, in: make(chan map[countKey]map[string]int64, 4096), metrics: m, log: log,
		every: every, done: make(chan struct{})}
}

// add queues deltas; when the queue is full (the Counter is stuck) they are dropped and counted as
// errors: reconciliation with ClickHouse makes up for them. After close they are applied at once.
func (l *liveCounts) add(d map[countKey]map[string]int64) {
	if l == nil || len(d) == 0 {
		return
	}
	l.closing.RLock()
	closed, sent := l.closed, false
	if !closed {
		select {
		case l.in <- d:
			sent = true
		default:
		}
	}
	l.closing.RUnlock()
	switch {
	case sent:
	case closed:
		if err := l.send(d); err != nil {
			l.log.Warn("live quota counts not taken back during shutdown; reconciliation settles them", "err", err)
		}
	default:
		l.metrics.CounterErrors.Inc()
	}
}

// addNow gives the Counter d at once, on the caller's goroutine, for rows no claim counts (server-made
// ids, or no deduplication): the request is answered only after, so a consume anywhere that follows
// the answer sees them. (Through add they reached Redis up to `every` later, and a consume sent
// right after a 202 for 190 builds passed a limit of 200 at 16, ending at 206.) Its failure costs
// the request nothing: the rows are counted when reconciliation reads them from ClickHouse.
//
// Within a second of a failed send the deltas go through add instead: while Redis is down, requests
// do not each wait for the client's dial retries.
func (l *liveCounts) addNow(d map[countKey]map[string]int64) {
	if l == nil || len(d) == 0 {
		return
	}
	if time.Since(time.Unix(0, l.failedAt.Load())) < time.Second {
		l.add(d)
		return
	}
	if err := l.send(d); err != nil {
		l.failedAt.Store(time.Now().UnixNano())
		if last := l.lastWarn.Load(); time.Since(time.Unix(0, last)) > 10*time.Second && l.lastWarn.CompareAndSwap(last, time.Now().UnixNano()) {
			l.log.Warn("live quota counters not updated; ingest continues and reconciliation with clickhouse catches them up", "err", err)
		}
	}
}

// send gives the Counter every tenant-day's deltas, one call each, counting failures; it returns the
// last error.
func (l *liveCounts) send(d map[countKey]map[string]int64) error {
	var last error
	for k, deltas := range d {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		if err := l.counter.Add(ctx, k.tenant, k.day, k.received, deltas); err != nil {
			l.metrics.CounterErrors.Inc()
			last = err
		}
		cancel()
	}
	return last
}

func (l *liveCounts) run() {
	defer close(l.done)
	pending := map[countKey]map[string]int64{}
	tick := time.NewTicker(l.every)
	defer tick.Stop()
	var lastLog time.Time
	flush := func() {
		if err := l.send(pending); err != nil && time.Since(lastLog) > 10*time.Second {
			lastLog = time.Now()
			l.log.Warn("live quota counters not updated; ingest continues and reconciliation with clickhouse catches them up", "err", err)
		}
		clear(pending)
	}
	for {
		select {
		case d, ok := <-l.in:
			if !ok {
				flush()
				return
			}
			for k, deltas := range d {
				p := pending[k]
				if p == nil {
					p = map[string]int64{}
					pending[k] = p
				}
				for m, n := range deltas {
					p[m] += n
				}
			}
		case <-tick.C:
			flush()
		}
	}
}

func (l *liveCounts) close() {
	if l == nil {
		return
	}
	l.closing.Lock()
	if !l.closed {
		l.closed = true
		close(l.in)
	}
	l.closing.Unlock()
	<-l.done
}
