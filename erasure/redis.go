package erasure

import (
	"context"
	"fmt"

	"github.com/google/uuid"
	"github.com/redis/go-redis/v9"

	"github.com/analyticsd/analyticsd/internal/rediskeys"
)

// RedisKeys is the KeyDeleter of a tenant's erasure: every key under prefix that carries the tenant's
// hash tag {<tenant id>} — live quota counters, id claims, Idempotency-Key records, rate-limit
// buckets — on every master of a cluster.
func RedisKeys(rdb redis.UniversalClient, prefix string) KeyDeleter {
	return func(ctx context.Context, tenant uuid.UUID) (int, error) {
		deleted := 0
		err := rediskeys.Scan(ctx, rdb, prefix+"*{"+tenant.String()+"}*", func(key string) error {
			n, err := rdb.Del(ctx, key).Result()
			deleted += int(n)
			return err
		})
		if err != nil {
			return deleted, fmt.Errorf("delete redis keys of tenant %s: %w", tenant, err)
		}
		return deleted, nil
	}
}
