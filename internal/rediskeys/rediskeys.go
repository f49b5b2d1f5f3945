// Package rediskeys walks the keys matching a pattern on every server that holds keys: the one
// Redis, or every master of a Redis Cluster. SCAN reads one server's keyspace, so on a cluster a
// single SCAN sees about a third of the keys of three masters; everything that lists keys by
// pattern (the reconciler's round, a tenant's erasure, tests, the bench) goes through here.
package rediskeys

import (
	"context"
	"sync"

	"github.com/redis/go-redis/v9"
)

// Scan calls fn with each key matching pattern, on each server in turn, never concurrently. It stops
// at the first error, fn's or Redis'.
func Scan(ctx context.Context, rdb redis.UniversalClient, pattern string, fn func(key string) error) error {
	nodes := []redis.Cmdable{rdb}
	if cc, ok := rdb.(*redis.ClusterClient); ok {
		var mu sync.Mutex
		nodes = nil
		// ForEachMaster runs its function on every master at once: only collect them here.
		if err := cc.ForEachMaster(ctx, func(_ context.Context, m *redis.Client) error {
			mu.Lock()
			defer mu.Unlock()
			nodes = append(nodes, m)
			return nil
		}); err != nil {
			return err
		}
	}
	for _, node := range nodes {
		iter := node.Scan(ctx, 0, pattern, 1000).Iterator()
		for iter.Next(ctx) {
			if err := fn(iter.Val()); err != nil {
				return err
			}
		}
		if err := iter.Err(); err != nil {
			return err
		}
	}
	return nil
}
