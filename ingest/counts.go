package ingest

import (
	"context"
	"log/slog"
	"sync"
	"time"

	"github.com/google/uuid"
)

// Counter receives live usage deltas (metric → n) for a tenant on a UTC day, for rows received in the
// second `received`. *quota.Service implements it over Redis. Ingest never waits on it and never
// fails because of it. The received second lets the counter tell rows it must count live from rows
// its rebuild from ClickHouse already covers.
//
// A delta that cannot be delivered (Redis down, a timeout, a full queue) is not retried — a retry
// after an ambiguous failure could count it twice. Instead the tenant's counters for that day are
// Forgotten as soon as Redis answers again, so the day is rebuilt from ClickHouse, which has every row.
//
// With Claims (deduplication on), rows are counted by the claim that proves them new, in the same
// Redis step, and Add is not used; Counted then hears what was added, for alerts.
type Counter interface {
	Add(ctx context.Context, tenant uuid.UUID, day, received time.Time, deltas map[string]int64) error
	// Forget drops a tenant's live counters for a day (at least those of metrics), so that the next
	// use rebuilds them from ClickHouse.
	Forget(ctx context.Context, tenant uuid.UUID, day time.Time, metrics []string) error
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
	received time.Time // the second the rows were received
}

// liveCounts folds usage deltas over a short window and sends them to the Counter in one call per
// tenant and day, off the request path: Redis being slow or down costs ingest nothing.
type liveCounts struct {
	counter Counter
	in      chan map[countKey]map[string]int64

	mu     sync.Mutex
	missed map[tenantDay]map[string]bool // counters that missed a delta: Forget them, then they rebuild
	// closing orders add against close: an add that comes after close (a server-made event stored
	// during shutdown) is recorded as missed instead of being sent on the closed channel.
	closing sync.RWMutex
	closed  bool
	metrics *Metrics
	log     *slog.Logger
	every   time.Duration
	done    chan struct{}
}

func newLiveCounts(c Counter, m *Metrics, log *slog.Logger, every time.Duration) *liveCounts {
	if every <= 0 {
		every = 100 * time.Millisecond
	}
	return &liveCounts{counter: c, in: make(chan map[countKey]map[string]int64, 4096), metrics: m, log: log,
		every: every, done: make(chan struct{})}
}

type tenantDay struct {
	tenant uuid.UUID
	day    time.Time
}

// add queues deltas; when the queue is full (the Counter is stuck) they are dropped, counted as
// errors and their tenant-days marked missed, so those counters are rebuilt from ClickHouse.
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
	if sent {
		return
	}
	if !closed {
		l.metrics.CounterErrors.Inc()
	}
	for k, deltas := range d {
		miss(l, tenantDay{k.tenant, k.day}, deltas)
	}
}

// miss records that the counters of a tenant and day did not get deltas of these metrics (the keys
// of metrics: a delta map, or a set put back after a failed Forget). After close, when nobody would
// forget them later (a duplicate found by the shutdown's last flush), they are forgotten at once.
func miss[V any](l *liveCounts, td tenantDay, metrics map[string]V) {
	l.closing.RLock()
	closed := l.closed
	l.closing.RUnlock()
	if closed {
		set := make([]string, 0, len(metrics))
		for m := range metrics {
			set = append(set, m)
		}
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		if err := l.counter.Forget(ctx, td.tenant, td.day, set); err != nil {
			l.log.Warn("live quota counters not reset during shutdown; they are rebuilt when next reset", "tenant", td.tenant, "err", err)
		}
		return
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.missed == nil {
		l.missed = map[tenantDay]map[string]bool{}
	}
	if l.missed[td] == nil {
		l.missed[td] = map[string]bool{}
	}
	for m := range metrics {
		l.missed[td][m] = true
	}
}

// forgetMissed asks the Counter to drop every tenant-day that missed a delta. At the first failure
// (Redis is most likely still away) it stops and keeps the rest listed for the next round.
func (l *liveCounts) forgetMissed() {
	l.mu.Lock()
	missed := l.missed
	l.missed = nil
	l.mu.Unlock()
	failed := false
	for td, set := range missed {
		metrics := make([]string, 0, len(set))
		for m := range set {
			metrics = append(metrics, m)
		}
		if !failed {
			ctx, cancel := context.WithTimeout(context.Background(), time.Second)
			err := l.counter.Forget(ctx, td.tenant, td.day, metrics)
			cancel()
			if err == nil {
				l.log.Info("live quota counters missed an update; dropped them to be rebuilt from ClickHouse",
					"tenant", td.tenant, "day", td.day.Format("2006-01-02"))
				continue
			}
			failed = true
		}
		miss(l, td, set)
	}
}

func (l *liveCounts) run() {
	defer close(l.done)
	pending := map[countKey]map[string]int64{}
	tick := time.NewTicker(l.every)
	defer tick.Stop()
	var lastLog time.Time
	flush := func() {
		l.forgetMissed()
		for k, deltas := range pending {
			ctx, cancel := context.WithTimeout(context.Background(), time.Second)
			err := l.counter.Add(ctx, k.tenant, k.day, k.received, deltas)
			cancel()
			if err != nil {
				l.metrics.CounterErrors.Inc()
				miss(l, tenantDay{k.tenant, k.day}, deltas)
				if time.Since(lastLog) > 10*time.Second {
					lastLog = time.Now()
					l.log.Warn("live quota counters not updated; ingest continues and counters self-heal from ClickHouse", "err", err)
				}
			}
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
