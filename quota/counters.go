// Package quota owns the live per-tenant usage counters in Redis and, on top of them, quota limits:
// defaults, per-tenant overrides, checks and the atomic consume. ClickHouse stays the source of truth;
// Redis holds today's running counts for fast answers.
package quota

import (
	"context"
	"fmt"
	"time"

	"github.com/google/uuid"
	"github.com/redis/go-redis/v9"
)

// CounterTTL is how long a daily counter lives: long enough to answer for yesterday after midnight.
const CounterTTL = 48 * time.Hour

// Counters are the live daily counters in Redis.
type Counters struct {
	rdb    redis.UniversalClient
	prefix string // prepended to every key (tests isolate themselves with it)
}

// NewCounters returns Counters on rdb; prefix is usually "".
func NewCounters(rdb redis.UniversalClient, prefix string) *Counters {
	return &Counters{rdb: rdb, prefix: prefix}
}

// Key is the Redis key of a tenant's metric on a UTC day: quota:{<tenant>}:<metric>:<yyyymmdd>. The
// braces are a Redis Cluster hash tag, so all of one tenant's counters share a slot.
func (c *Counters) Key(tenant uuid.UUID, metric string, day time.Time) string {
	return fmt.Sprintf("%squota:{%s}:%s:%s", c.prefix, tenant, metric, day.UTC().Format("20060102"))
}

// Add increments the tenant's counters for day by deltas, in one pipeline, and (re)sets their expiry.
func (c *Counters) Add(ctx context.Context, tenant uuid.UUID, day time.Time, deltas map[string]int64) error {
	if len(deltas) == 0 {
		return nil
	}
	_, err := c.rdb.Pipelined(ctx, func(p redis.Pipeliner) error {
		for metric, n := range deltas {
			k := c.Key(tenant, metric, day)
			p.IncrBy(ctx, k, n)
			p.Expire(ctx, k, CounterTTL)
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("add usage counters for tenant %s: %w", tenant, err)
	}
	return nil
}

// Get reads one counter; a missing counter reads as 0 with ok=false.
func (c *Counters) Get(ctx context.Context, tenant uuid.UUID, metric string, day time.Time) (int64, bool, error) {
	n, err := c.rdb.Get(ctx, c.Key(tenant, metric, day)).Int64()
	if err == redis.Nil {
		return 0, false, nil
	}
	if err != nil {
		return 0, false, fmt.Errorf("read usage counter %s for tenant %s: %w", metric, tenant, err)
	}
	return n, true, nil
}
