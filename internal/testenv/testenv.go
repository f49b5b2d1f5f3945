// Package testenv gives integration tests real ClickHouse, Postgres and Redis, isolated per test.
//
// It reads CLICKHOUSE_DSN, POSTGRES_URL and REDIS_URL (printed by `deploy/local/stack.sh env`). When a
// variable is unset or its server unreachable the test is skipped — unless ANALYTICS_REQUIRE_SERVICES=1
// (set by `make test` and CI), where it fails instead, so a missing service can never turn CI green.
// Each test gets its own ClickHouse database, Postgres schema and Redis key prefix, removed in t.Cleanup,
// so tests on their own Env can run in parallel.
//
// Beside the servers: Eventually, the one way a test waits for something to become true, and
// Env.Insert, rows written straight into ClickHouse. Tenants, API keys, JWTs and a fiber app served on
// a real listener are in the sub-package fixture, which imports api, auth and tenant (this package
// imports none of them, so every package's internal tests can use it).
package testenv

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"os"
	"strconv"
	"testing"
	"time"

	"github.com/ClickHouse/clickhouse-go/v2"
	"github.com/ClickHouse/clickhouse-go/v2/lib/driver"
	"github.com/google/uuid"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/redis/go-redis/v9"

	"github.com/analyticsd/analyticsd/internal/rediskeys"
	"github.com/analyticsd/analyticsd/schema"
)

// Required reports whether missing services must fail tests rather than skip them.
func Required() bool { return os.Getenv("ANALYTICS_REQUIRE_SERVICES") == "1" }

func unavailable(t testing.TB, format string, args ...any) {
	t.Helper()
	msg := fmt.Sprintf(format, args...)
	if Required() {
		t.Fatalf("%s (ANALYTICS_REQUIRE_SERVICES=1: run `make test`, or `eval \"$(deploy/local/stack.sh env)\"` after `deploy/local/stack.sh up`)", msg)
	}
	t.Skipf("%s; skipping (set the stack's env to run it)", msg)
}

func env(t testing.TB, name string) string {
	t.Helper()
	v := os.Getenv(name)
	if v == "" {
		unavailable(t, "%s is not set", name)
	}
	return v
}

// Name returns a fresh identifier usable as a database, schema or key prefix: "t_" and 16 hex digits.
func Name() string {
	var b [8]byte
	_, _ = rand.Read(b[:])
	return "t_" + hex.EncodeToString(b[:])
}

func ctx(t testing.TB) context.Context {
	c, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return c
}

// Cluster is CLICKHOUSE_CLUSTER: set (by `deploy/local/cluster.sh env`), tests run on the cluster
// layout — databases and tables created ON CLUSTER, reads and inserts through Distributed tables.
func Cluster() string { return os.Getenv("CLICKHOUSE_CLUSTER") }

// Layout is where an Env's tables live (see schema.Layout).
func (e Env) Layout() schema.Layout {
	return schema.Layout{DB: e.DB, Cluster: e.Target.Cluster, Shards: schema.ShardsOf(e.Target.Cluster, e.Target.ClickHouseDSN)}
}

// Target is a set of servers an Env is made on: the environment's (FromEnv), or the single-server
// stack beside a cluster (SingleServer), for tests that compare the two.
type Target struct {
	ClickHouseDSN string
	Cluster       string
	RedisURL      string
	RedisCluster  bool
}

// FromEnv is the target of CLICKHOUSE_DSN, CLICKHOUSE_CLUSTER, REDIS_URL and REDIS_CLUSTER.
func FromEnv(t testing.TB) Target {
	t.Helper()
	return Target{ClickHouseDSN: ClickHouseDSN(t), Cluster: Cluster(), RedisURL: RedisURL(t), RedisCluster: RedisCluster()}
}

// SingleServer is the single-server stack's ClickHouse and Redis while the environment names the
// cluster: SINGLE_CLICKHOUSE_DSN and SINGLE_REDIS_URL (`make test-cluster` sets them from
// `deploy/local/stack.sh env`).
func SingleServer(t testing.TB) Target {
	t.Helper()
	return Target{ClickHouseDSN: env(t, "SINGLE_CLICKHOUSE_DSN"), RedisURL: env(t, "SINGLE_REDIS_URL")}
}

// ClickHouseDSN returns CLICKHOUSE_DSN, skipping or failing the test when it is unset.
func ClickHouseDSN(t testing.TB) string { t.Helper(); return env(t, "CLICKHOUSE_DSN") }

// ClickHouse connects to the test server and creates an empty database for this test only.
// The connection's default database stays "default"; analyticsd qualifies every table name.
func ClickHouse(t testing.TB) (driver.Conn, string) {
	t.Helper()
	return clickHouseAt(t, ClickHouseDSN(t), Cluster())
}

func clickHouseAt(t testing.TB, dsn, cluster string) (driver.Conn, string) {
	t.Helper()
	opts, err := clickhouse.ParseDSN(dsn)
	if err != nil {
		t.Fatalf("parse CLICKHOUSE_DSN: %v", err)
	}
	opts.Auth.Database = "default"
	onCluster := ""
	if c := cluster; c != "" {
		onCluster = " ON CLUSTER " + c
		opts.Settings = schema.Layout{Cluster: c}.ConnSettings() // as analyticsd's own connection
	}
	conn, err := clickhouse.Open(opts)
	if err == nil {
		err = conn.Ping(ctx(t))
	}
	if err != nil {
		unavailable(t, "clickhouse unreachable: %v", err)
	}
	if onCluster != "" {
		// A DDL that a server's distributed-DDL worker never runs (18.16's stops for good on some
		// ZooKeeper errors) then fails with ClickHouse's own count of unfinished hosts, inside the
		// test's 30-s context, rather than as a bare "i/o timeout". The value is encoded for the
		// server's revision (schema.DDLTaskTimeout: 18.16 would read a plain 25 as -13, "forever"),
		// so the connection is opened again with it.
		for k, v := range schema.DDLTaskTimeout(conn, 25*time.Second) {
			opts.Settings[k] = v
		}
		_ = conn.Close()
		if conn, err = clickhouse.Open(opts); err != nil {
			t.Fatalf("reopen clickhouse: %v", err)
		}
	}
	db := Name()
	if err := conn.Exec(ctx(t), "CREATE DATABASE "+db+onCluster); err != nil {
		t.Fatalf("create clickhouse database %s: %v", db, err)
	}
	t.Cleanup(func() {
		c, cancel := context.WithTimeout(context.Background(), 60*time.Second)
		defer cancel()
		err := conn.Exec(c, "DROP DATABASE IF EXISTS "+db+onCluster)
		for try := 0; err != nil && onCluster != "" && try < 5; try++ {
			// 18.16 on a cluster: a replica still fetching or merging a part when the drop runs
			// fails it with "Directory not empty"; a moment later it goes through.
			time.Sleep(500 * time.Millisecond)
			err = conn.Exec(c, "DROP DATABASE IF EXISTS "+db+onCluster)
		}
		if err != nil {
			t.Errorf("drop clickhouse database %s: %v", db, err)
		}
		_ = conn.Close()
	})
	return conn, db
}

// PostgresURL returns POSTGRES_URL, skipping or failing the test when it is unset.
func PostgresURL(t testing.TB) string { t.Helper(); return env(t, "POSTGRES_URL") }

// Postgres creates a schema for this test and returns a pool whose connections use it as search_path,
// plus the schema's name (to hand to a subprocess, e.g. via PGOPTIONS or the URL's search_path).
func Postgres(t testing.TB) (*pgxpool.Pool, string) {
	t.Helper()
	url := PostgresURL(t)
	admin, err := pgxpool.New(ctx(t), url)
	if err == nil {
		err = admin.Ping(ctx(t))
	}
	if err != nil {
		unavailable(t, "postgres unreachable: %v", err)
	}
	name := Name()
	if _, err := admin.Exec(ctx(t), "CREATE SCHEMA "+name); err != nil {
		t.Fatalf("create postgres schema %s: %v", name, err)
	}
	cfg, err := pgxpool.ParseConfig(url)
	if err != nil {
		t.Fatalf("parse POSTGRES_URL: %v", err)
	}
	cfg.ConnConfig.RuntimeParams["search_path"] = name
	pool, err := pgxpool.NewWithConfig(ctx(t), cfg)
	if err != nil {
		t.Fatalf("open postgres pool: %v", err)
	}
	t.Cleanup(func() {
		pool.Close()
		c, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		if _, err := admin.Exec(c, "DROP SCHEMA IF EXISTS "+name+" CASCADE"); err != nil {
			t.Errorf("drop postgres schema %s: %v", name, err)
		}
		admin.Close()
	})
	return pool, name
}

// RedisURL returns REDIS_URL, skipping or failing the test when it is unset.
func RedisURL(t testing.TB) string { t.Helper(); return env(t, "REDIS_URL") }

// RedisCluster reports whether REDIS_URL names Redis Cluster nodes (REDIS_CLUSTER=1, as
// `deploy/local/cluster.sh env` prints).
func RedisCluster() bool { return os.Getenv("REDIS_CLUSTER") == "1" }

// Redis returns a client (a cluster client with REDIS_CLUSTER=1) and a key prefix for this test;
// keys under the prefix are deleted afterwards.
func Redis(t testing.TB) (redis.UniversalClient, string) {
	t.Helper()
	return redisAt(t, RedisURL(t), RedisCluster())
}

func redisAt(t testing.TB, url string, cluster bool) (redis.UniversalClient, string) {
	t.Helper()
	var client redis.UniversalClient
	if cluster {
		opts, err := redis.ParseClusterURL(url)
		if err != nil {
			t.Fatalf("parse REDIS_URL (REDIS_CLUSTER=1): %v", err)
		}
		client = redis.NewClusterClient(opts)
	} else {
		opts, err := redis.ParseURL(url)
		if err != nil {
			t.Fatalf("parse REDIS_URL: %v", err)
		}
		client = redis.NewClient(opts)
	}
	if err := client.Ping(ctx(t)).Err(); err != nil {
		unavailable(t, "redis unreachable: %v", err)
	}
	prefix := Name() + ":"
	t.Cleanup(func() {
		c, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		DelKeys(c, client, prefix+"*")
		_ = client.Close()
	})
	return client, prefix
}

// Keys lists the keys matching pattern on every server: KEYS on a cluster client asks one node, which
// holds a third of the keys on three masters.
func Keys(ctx context.Context, rdb redis.UniversalClient, pattern string) ([]string, error) {
	var out []string
	err := rediskeys.Scan(ctx, rdb, pattern, func(key string) error { out = append(out, key); return nil })
	return out, err
}

// DelKeys deletes the keys matching pattern on every server, one by one (a multi-key DEL spans slots
// on a cluster), and returns how many it found.
func DelKeys(ctx context.Context, rdb redis.UniversalClient, pattern string) int {
	keys, _ := Keys(ctx, rdb, pattern)
	for _, k := range keys {
		rdb.Del(ctx, k)
	}
	return len(keys)
}

// Env is a migrated, isolated set of all three services.
type Env struct {
	CH       driver.Conn
	DB       string // ClickHouse database
	PG       *pgxpool.Pool
	PGSchema string
	Redis    redis.UniversalClient
	Prefix   string // Redis key prefix
	Schema   schema.Result
	Target   Target // the servers it is on
}

// Migrated returns an Env with every migration applied.
func Migrated(t testing.TB) Env {
	t.Helper()
	return MigratedAt(t, FromEnv(t))
}

// MigratedAt is Migrated on the servers of tg (Postgres is always POSTGRES_URL's).
func MigratedAt(t testing.TB, tg Target) Env {
	t.Helper()
	e := Env{Target: tg}
	e.CH, e.DB = clickHouseAt(t, tg.ClickHouseDSN, tg.Cluster)
	e.PG, e.PGSchema = Postgres(t)
	e.Redis, e.Prefix = redisAt(t, tg.RedisURL, tg.RedisCluster)
	m := schema.Migrator{CH: e.CH, PG: e.PG, DB: e.DB, Cluster: tg.Cluster, RetentionDays: 90}
	res, err := m.Run(ctx(t))
	if err != nil {
		t.Fatalf("migrate test env: %v", err)
	}
	e.Schema = res
	return e
}

// Insert writes rows straight into the ClickHouse table e.DB.table, each row's values in the order of
// columns (an INSERT's column list): data for a test to read without going through ingest.
func (e Env) Insert(t testing.TB, table, columns string, rows ...[]any) {
	t.Helper()
	b, err := e.CH.PrepareBatch(ctx(t), "INSERT INTO "+e.DB+"."+table+" ("+columns+")")
	if err != nil {
		t.Fatalf("insert into %s: %v", table, err)
	}
	for _, r := range rows {
		if err := b.Append(r...); err != nil {
			t.Fatalf("insert into %s: %v", table, err)
		}
	}
	if err := b.Send(); err != nil {
		t.Fatalf("insert into %s: %v", table, err)
	}
}

// BenchEvents is ANALYTICS_BENCH_EVENTS, how many events a store-level benchmark loads (e.g.
// 10000000); the benchmark is skipped when it is unset.
func BenchEvents(b *testing.B) int {
	b.Helper()
	n, _ := strconv.Atoi(os.Getenv("ANALYTICS_BENCH_EVENTS"))
	if n <= 0 {
		b.Skip("set ANALYTICS_BENCH_EVENTS to the number of events to load")
	}
	return n
}

// LoadEvents inserts n generated events into e's events table in blocks of 500,000 rows, and logs
// how long it took; row(i) is event i's tenant, time, name and user (props, ip fixed).
func (e Env) LoadEvents(t testing.TB, n int, row func(i int) (tenant uuid.UUID, ts time.Time, event, user string)) {
	t.Helper()
	start := time.Now()
	const chunk = 500_000
	for done := 0; done < n; done += chunk {
		batch, err := e.CH.PrepareBatch(context.Background(), "INSERT INTO "+e.DB+".events (tenant_id, ts, id, received_at, event, source, user_id, props, ip, request_id)")
		if err != nil {
			t.Fatal(err)
		}
		for i := done; i < done+chunk && i < n; i++ {
			tenant, ts, event, user := row(i)
			if err := batch.Append(tenant, ts, uuid.New(), ts, event, "app", user, `{"plan":"pro"}`, "10.0.0.1", ""); err != nil {
				t.Fatal(err)
			}
		}
		if err := batch.Send(); err != nil {
			t.Fatal(err)
		}
	}
	t.Logf("loaded %d events in %s", n, time.Since(start).Round(time.Second))
}

// DDLQueueTasks counts the tasks in the local cluster's distributed-DDL queue (its ZooKeeper path,
// /clickhouse/task_queue/ddl, deploy/local/clickhouse/cluster.xml.tmpl) whose statement contains s;
// 0 on one server. The queue keeps its newest 1,000 tasks, so a test asks right after its own.
func (e Env) DDLQueueTasks(t testing.TB, s string) int {
	t.Helper()
	if e.Target.Cluster == "" {
		return 0
	}
	var n uint64
	if err := e.CH.QueryRow(ctx(t), "SELECT count() FROM system.zookeeper WHERE path = '/clickhouse/task_queue/ddl' AND position(value, ?) > 0", s).Scan(&n); err != nil {
		t.Fatalf("read the distributed-DDL queue: %v", err)
	}
	return int(n)
}
