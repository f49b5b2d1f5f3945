package dedup

import (
	"context"
	"testing"

	"github.com/google/uuid"
	"github.com/redis/go-redis/v9"

	"github.com/analyticsd/analyticsd/internal/testenv"
)

// BenchmarkLuaVariants prices what a claim does in Redis, per id of a 500-id call: passing the keys
// alone, SET NX with and without an expiry (a key per id), HSETNX into one hash, and the two-bucket
// hash lookup the claims use.
func BenchmarkLuaVariants(b *testing.B) {
	rdb, prefix := testenv.Redis(b)
	scripts := map[string]string{
		"noop-keys":  `return #KEYS`,
		"set-nx-ex":  `for i = 1, #KEYS do redis.call('SET', KEYS[i], ARGV[1], 'NX', 'EX', 3600) end return 1`,
		"set-nx":     `for i = 1, #KEYS do redis.call('SET', KEYS[i], ARGV[1], 'NX') end return 1`,
		"hsetnx-one": `for i = 2, #KEYS do redis.call('HSETNX', KEYS[1], KEYS[i], ARGV[1]) end return 1`,
	}
	buckets := redis.NewScript(`
local out = {}
for i = 2, #ARGV do
  local id = ARGV[i]
  local v = redis.call('HGET', KEYS[2], id)
  if not v then
    if redis.call('HSETNX', KEYS[1], id, ARGV[1]) == 1 then v = ARGV[1] else v = redis.call('HGET', KEYS[1], id) end
  end
  out[i - 1] = (v == ARGV[1]) and 1 or 0
end
redis.call('EXPIRE', KEYS[1], 172800)
return out`)
	b.Run("two-buckets-binary-ids", func(b *testing.B) {
		cpu := redisCPU(b, rdb)
		cur, prev := prefix+"dedup:{t}:e:1", prefix+"dedup:{t}:e:0"
		for n := 0; n < b.N; n++ {
			args := []any{"12345678"}
			for i := 0; i < 500; i++ {
				id := uuid.New()
				args = append(args, string(id[:]))
			}
			if err := buckets.Run(context.Background(), rdb, []string{cur, prev}, args...).Err(); err != nil {
				b.Fatal(err)
			}
		}
		b.ReportMetric((redisCPU(b, rdb)-cpu)*1e6/float64(b.N*500), "redis-µs/id")
		b.ReportMetric(float64(rdb.MemoryUsage(context.Background(), cur).Val())/float64(rdb.HLen(context.Background(), cur).Val()), "bytes/id")
	})
	for name, src := range scripts {
		b.Run(name, func(b *testing.B) {
			sc := redis.NewScript(src)
			keys := make([]string, 501)
			cpu := redisCPU(b, rdb)
			for n := 0; n < b.N; n++ {
				keys[0] = prefix + "h{t}:" + uuid.NewString()
				for i := 1; i < len(keys); i++ {
					keys[i] = prefix + "dedup:{0f1c2d3e-4a5b-4c6d-8e7f-a0b1c2d3e4f5}:e:" + uuid.NewString()
				}
				if err := sc.Run(context.Background(), rdb, keys, "1234567890123").Err(); err != nil {
					b.Fatal(err)
				}
			}
			b.ReportMetric((redisCPU(b, rdb)-cpu)*1e6/float64(b.N*500), "redis-µs/id")
		})
	}
}

// BenchmarkBulkInsert prices the insert alone, per id of a 500-id call into one growing key: HSET of
// id → 8-byte batch id (what claims store) against SADD of the id (a set holds no value).
func BenchmarkBulkInsert(b *testing.B) {
	rdb, prefix := testenv.Redis(b)
	for _, v := range []struct{ name, src string }{
		{"hset-500", `redis.call('HSET', KEYS[1], unpack(ARGV)) return 1`},
		{"sadd-500", `redis.call('SADD', KEYS[1], unpack(ARGV)) return 1`},
		{"smismember+sadd-500", `redis.call('SMISMEMBER', KEYS[1], unpack(ARGV)) redis.call('SADD', KEYS[1], unpack(ARGV)) return 1`},
		{"hmget+hset-500", `local f = {} for i = 1, #ARGV, 2 do f[#f + 1] = ARGV[i] end redis.call('HMGET', KEYS[1], unpack(f)) redis.call('HSET', KEYS[1], unpack(ARGV)) return 1`},
	} {
		b.Run(v.name, func(b *testing.B) {
			sc := redis.NewScript(v.src)
			key := prefix + "bulk{t}:" + uuid.NewString()
			hash := v.name[0] == 'h'
			cpu := redisCPU(b, rdb)
			for n := 0; n < b.N; n++ {
				args := make([]any, 0, 1000)
				for i := 0; i < 500; i++ {
					id := uuid.New()
					args = append(args, string(id[:]))
					if hash {
						args = append(args, "12345678")
					}
				}
				if err := sc.Run(context.Background(), rdb, []string{key}, args...).Err(); err != nil {
					b.Fatal(err)
				}
			}
			b.ReportMetric((redisCPU(b, rdb)-cpu)*1e6/float64(b.N*500), "redis-µs/id")
			b.ReportMetric(float64(rdb.MemoryUsage(context.Background(), key, 0).Val())/float64(b.N*500), "bytes/id")
			rdb.Unlink(context.Background(), key)
		})
	}
}
