package main

import (
	"context"
	"math"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/redis/go-redis/v9"

	"github.com/analyticsd/analyticsd/internal/clock"
)

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

// clockCheck measures this instance's clock against ref (Redis', the clock every instance reaches)
// for a watch: a warning while it is further off than exactly-once assumes (clock.Trouble), and
// always the offset in sbh_analytics_clock_offset_seconds. Redis not answering leaves the last
// measurement standing.
func clockCheck(reg prometheus.Registerer, ref func(context.Context) (time.Time, error)) func(context.Context) (string, bool) {
	gauge := prometheus.NewGauge(prometheus.GaugeOpts{
		Name: "sbh_analytics_clock_offset_seconds",
		Help: "How far this instance's clock runs ahead of Redis' (TIME), measured every 30 s. Instances must be within 5 s of each other.",
	})
	gauge.Set(math.NaN()) // not measured yet (Redis has not answered): not "in sync"
	reg.MustRegister(gauge)
	return func(ctx context.Context) (string, bool) {
		offset, uncertainty, err := clock.Measure(ctx, ref)
		if err != nil {
			return "", false
		}
		gauge.Set(offset.Seconds())
		return clock.Trouble(offset, uncertainty), true
	}
}
