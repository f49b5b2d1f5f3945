package ingest

import (
	"context"
	"log/slog"
	"time"

	"github.com/google/uuid"
)

// Counter receives live usage deltas (metric → n) for a tenant on a UTC day, for rows received in the
// second `received`. *quota.Service implements it over Redis. Ingest never waits on it and never
// fails because of it. The received second lets the counter tell rows it must count live from rows
// its rebuild from ClickHouse already covers.
type Counter interface {
	Add(ctx context.Context, tenant uuid.UUID, day, received time.Time, deltas map[string]int64) error
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

// add queues deltas; when the queue is full (the Counter is stuck) they are dropped and counted:
// live counters are rebuilt from ClickHouse, the source of truth.
func (l *liveCounts) add(d map[countKey]map[string]int64) {
	if l == nil || len(d) == 0 {
		return
	}
	select {
	case l.in <- d:
	default:
		l.metrics.CounterErrors.Inc()
	}
}

func (l *liveCounts) run() {
	defer close(l.done)
	pending := map[countKey]map[string]int64{}
	tick := time.NewTicker(l.every)
	defer tick.Stop()
	var lastLog time.Time
	flush := func() {
		for k, deltas := range pending {
			ctx, cancel := context.WithTimeout(context.Background(), time.Second)
			err := l.counter.Add(ctx, k.tenant, k.day, k.received, deltas)
			cancel()
			if err != nil {
				l.metrics.CounterErrors.Inc()
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
	close(l.in)
	<-l.done
}
