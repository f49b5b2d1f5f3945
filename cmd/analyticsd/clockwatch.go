package main

import (
	"context"
	"log/slog"
	"math"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/redis/go-redis/v9"

	"github.com/analyticsd/analyticsd/internal/clock"
)

// clockWatch measures this instance's clock against Redis' (the clock every instance reaches) and,
// while it is further off than exactly-once assumes (clock.Trouble), says so: in /readiness (a
// warning: the instance still serves), in the log, and always in sbh_analytics_clock_offset_seconds.
type clockWatch struct {
	ref     func(context.Context) (time.Time, error)
	gauge   prometheus.Gauge
	log     *slog.Logger
	warning atomic.Pointer[string]
}

// redisTime reads Redis' clock: on a Redis Cluster always the same master's (the one holding dedup's
// record of run ids), where a keyless TIME would go to any master, each with a clock of its own, and
// every instance would measure against another one each time.
func redisTime(rdb redis.UniversalClient) func(context.Context) (time.Time, error) {
	return func(ctx context.Context) (time.Time, error) {
		var c redis.Cmdable = rdb
		if cc, ok := rdb.(*redis.ClusterClient); ok {
			m, err := cc.MasterForKey(ctx, "dedup:{restarts}")
			if err != nil {
				return time.Time{}, err
			}
			c = m
		}
		return c.Time(ctx).Result()
	}
}

func newClockWatch(reg prometheus.Registerer, ref func(context.Context) (time.Time, error), log *slog.Logger) *clockWatch {
	w := &clockWatch{ref: ref, log: log, gauge: prometheus.NewGauge(prometheus.GaugeOpts{
		Name: "sbh_analytics_clock_offset_seconds",
		Help: "How far this instance's clock runs ahead of Redis' (TIME), measured every 30 s. Instances must be within 5 s of each other.",
	})}
	w.gauge.Set(math.NaN()) // not measured yet (Redis has not answered): not "in sync"
	reg.MustRegister(w.gauge)
	return w
}

// check measures once. Redis not answering leaves the last measurement standing.
func (w *clockWatch) check(ctx context.Context) {
	ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	offset, uncertainty, err := clock.Measure(ctx, w.ref)
	if err != nil {
		return
	}
	w.gauge.Set(offset.Seconds())
	msg := clock.Trouble(offset, uncertainty)
	if prev := w.warning.Swap(&msg); msg != "" && (prev == nil || *prev == "") {
		w.log.Warn(msg, "offset", offset, "uncertainty", uncertainty)
	} else if msg == "" && prev != nil && *prev != "" {
		w.log.Info("this instance's clock is back within the allowed difference from Redis'", "offset", offset)
	}
}

// run checks every interval until ctx ends.
func (w *clockWatch) run(ctx context.Context, every time.Duration) {
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			w.check(ctx)
		}
	}
}

// Warning is the latest measurement's trouble, or "".
func (w *clockWatch) Warning() string {
	if p := w.warning.Load(); p != nil {
		return *p
	}
	return ""
}
