package main

import (
	"context"
	"fmt"
	"net"
	"time"

	"github.com/ClickHouse/clickhouse-go/v2"
	"github.com/ClickHouse/clickhouse-go/v2/lib/driver"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/redis/go-redis/v9"

	"github.com/analyticsd/analyticsd/schema"
)

// openClickHouse opens a native-protocol pool. Its default database stays "default" because the
// analytics database may not exist yet (migrate creates it); every query names its tables in full.
// The pool connects lazily, so serve starts (and reports not-ready) while ClickHouse is down.
func openClickHouse(cfg Config) (driver.Conn, error) {
	opts, err := clickhouse.ParseDSN(cfg.ClickHouseDSN)
	if err != nil {
		return nil, fmt.Errorf("parse CLICKHOUSE_DSN: %w", err)
	}
	opts.Auth.Database = "default"
	if opts.DialTimeout == 0 || opts.DialTimeout > 5*time.Second {
		opts.DialTimeout = 5 * time.Second
	}
	if opts.MaxOpenConns < 16 {
		opts.MaxOpenConns = 16
	}
	for k, v := range cfg.Layout().ConnSettings() {
		if opts.Settings == nil {
			opts.Settings = clickhouse.Settings{}
		}
		opts.Settings[k] = v
	}
	conn, err := clickhouse.Open(opts)
	if err != nil {
		return nil, fmt.Errorf("open clickhouse: %w", err)
	}
	if cfg.ClickHouseCluster == "" {
		return conn, nil
	}
	// Settings that depend on the server's version are known only once it answers: ask briefly, and
	// reopen with them (a cluster down at start-up keeps the version-independent ones).
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	if conn.Ping(ctx) != nil {
		return conn, nil
	}
	v, err := schema.ServerVersion(conn)
	if err != nil || !schema.SkipUnusedShards(v) {
		return conn, nil
	}
	conn.Close()
	for k, val := range cfg.Layout().ConnSettingsFor(v) {
		opts.Settings[k] = val
	}
	if conn, err = clickhouse.Open(opts); err != nil {
		return nil, fmt.Errorf("open clickhouse: %w", err)
	}
	return conn, nil
}

func openPostgres(ctx context.Context, cfg Config) (*pgxpool.Pool, error) {
	pc, err := pgxpool.ParseConfig(cfg.PostgresURL)
	if err != nil {
		return nil, fmt.Errorf("parse POSTGRES_URL: %w", err)
	}
	pc.ConnConfig.ConnectTimeout = 5 * time.Second
	pool, err := pgxpool.NewWithConfig(ctx, pc)
	if err != nil {
		return nil, fmt.Errorf("open postgres: %w", err)
	}
	return pool, nil
}

// openRedis opens one Redis, or Redis Cluster with REDIS_CLUSTER (every script keeps its keys in one
// slot through the {tenant} hash tags, so both run the same code).
func openRedis(cfg Config) (redis.UniversalClient, error) {
	const timeout = 2 * time.Second
	if cfg.RedisCluster {
		opts, err := redis.ParseClusterURL(cfg.RedisURL)
		if err != nil {
			return nil, fmt.Errorf("parse REDIS_URL (REDIS_CLUSTER): %w", err)
		}
		opts.DialTimeout, opts.ReadTimeout, opts.WriteTimeout = timeout, timeout, timeout
		return redis.NewClusterClient(opts), nil
	}
	opts, err := redis.ParseURL(cfg.RedisURL)
	if err != nil {
		return nil, fmt.Errorf("parse REDIS_URL: %w", err)
	}
	opts.DialTimeout, opts.ReadTimeout, opts.WriteTimeout = timeout, timeout, timeout
	return redis.NewClient(opts), nil
}

// listen opens the API's socket and, unless ANALYTICS_METRICS_ADDR is off (ops is then nil), the
// operator listener's: both or neither.
func listen(cfg Config) (api, ops net.Listener, err error) {
	if api, err = net.Listen("tcp", cfg.Addr); err != nil {
		return nil, nil, fmt.Errorf("listen on %s: %w", cfg.Addr, err)
	}
	if cfg.MetricsAddr == "" {
		return api, nil, nil
	}
	if ops, err = net.Listen("tcp", cfg.MetricsAddr); err != nil {
		api.Close()
		return nil, nil, fmt.Errorf("listen on %s (ANALYTICS_METRICS_ADDR): %w", cfg.MetricsAddr, err)
	}
	return api, ops, nil
}

// openStores opens ClickHouse and Postgres for the one-shot admin commands; close releases both.
func openStores(ctx context.Context, cfg Config) (ch driver.Conn, pg *pgxpool.Pool, close func(), err error) {
	if ch, err = openClickHouse(cfg); err != nil {
		return nil, nil, nil, err
	}
	if pg, err = openPostgres(ctx, cfg); err != nil {
		ch.Close()
		return nil, nil, nil, err
	}
	return ch, pg, func() { pg.Close(); ch.Close() }, nil
}
