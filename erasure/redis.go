package erasure

import (
	"context"
	"fmt"

	"github.com/google/uuid"
	"github.com/redis/go-redis/v9"
)

// RedisKeys is the KeyDeleter of a tenant's erasure: every key under prefix that carries the tenant's
// hash tag {<tenant id>} — live quota counters, id claims, Idempotency-Key records, rate-limit
// buckets — on every master of a cluster.
func RedisKeys(rdb redis.UniversalClient, prefix string) KeyDeleter {
	return func(ctx context.Context, tenant uuid.UUID) (int, error) {
		match := prefix + "*{" + tenant.String() + "}*"
		deleted := 0
		del := func(ctx context.Context, node redis.Cmdable) error {
			iter := node.Scan(ctx, 0, match, 1000).Iterator()
			for iter.Next(ctx) {
				n, err := rdb.Del(ctx, iter.Val()).Result()
				if err != nil {
					return err
				}
				deleted += int(n)
			}
			return iter.Err()
		}
		var err error
		if cc, ok := rdb.(*redis.ClusterClient); ok {
			// One master at a time: deleted is not shared between goroutines.
			var masters []*redis.Client
			err = cc.ForEachMaster(ctx, func(_ context.Context, m *redis.Client) error { masters = append(masters, m); return nil })
			for _, m := range masters {
				if err == nil {
					err = del(ctx, m)
				}
			}
		} else {
			err = del(ctx, rdb)
		}
		if err != nil {
			return deleted, fmt.Errorf("delete redis keys of tenant %s: %w", tenant, err)
		}
		return deleted, nil
	}
}
