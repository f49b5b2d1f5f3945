package erasure

import (
	"context"
	"fmt"
	"strings"

	"github.com/google/uuid"
	"github.com/redis/go-redis/v9"

	"github.com/analyticsd/analyticsd/internal/rediskeys"
)

// RedisKeys is the KeyDeleter of a tenant's erasure: every key under prefix whose hash tag is
// {<tenant id>} — live quota counters, id claims, Idempotency-Key records, rate-limit buckets — on
// every master of a cluster. The hash tag is a key's first {...}, as Redis Cluster reads it; the same
// id in braces later in a key (a JWT subject inside another tenant's rate-limit key) does not make it
// the tenant's.
func RedisKeys(rdb redis.UniversalClient, prefix string) KeyDeleter {
	return func(ctx context.Context, tenant uuid.UUID) (int, error) {
		deleted := 0
		tag := tenant.String()
		err := rediskeys.Scan(ctx, rdb, prefix+"*{"+tag+"}*", func(key string) error {
			if hashTag(strings.TrimPrefix(key, prefix)) != tag {
				return nil
			}
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

// hashTag is the part of key between its first '{' and the first '}' after it ("" when there is none
// or it is empty, as in Redis Cluster's key hashing).
func hashTag(key string) string {
	open := strings.IndexByte(key, '{')
	if open < 0 {
		return ""
	}
	n := strings.IndexByte(key[open+1:], '}')
	if n <= 0 {
		return ""
	}
	return key[open+1 : open+1+n]
}
