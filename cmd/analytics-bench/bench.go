package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/ClickHouse/clickhouse-go/v2"
	"github.com/ClickHouse/clickhouse-go/v2/lib/driver"
	"github.com/google/uuid"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/redis/go-redis/v9"

	"github.com/analyticsd/analyticsd/internal/rediskeys"
	"github.com/analyticsd/analyticsd/schema"
)

// tenantInfo is one tenant created through the analyticsd CLI, with its all-scopes API key.
type tenantInfo struct {
	ID   uuid.UUID
	Slug string
	Key  string
}

// bench is one run: the services, the server under test, the workload and the results.
type bench struct {
	opt  options
	root string
	name string // bench_<unix>: ClickHouse database and Postgres schema
	tmp  string

	stack     map[string]string // CLICKHOUSE_DSN, POSTGRES_URL, REDIS_URL (and the cluster's) as found
	layout    schema.Layout     // the bench database on one server or the cluster
	chDSN     string            // pointed at the bench database
	pgURL     string            // with search_path = the bench schema
	chClient  []string          // clickhouse-client connection flags
	bin       string            // analyticsd
	chPID     int               // clickhouse-server, for CPU accounting (0 when not found)
	redisPID  int               // redis-server, likewise: ingest claims event ids there
	serverEnv map[string]string

	ch      driver.Conn
	pgAdmin *pgxpool.Pool
	pg      *pgxpool.Pool // bench schema
	rdb     redis.UniversalClient
	srv     *server
	http    *http.Client

	gen     *Generator
	base    time.Time // the generator's "now"
	tenants []tenantInfo
	probe   tenantInfo // warm-up and ack-latency load (not part of the query data set)
	fresh   tenantInfo // ack-to-queryable probes

	// ingest holds the REST-ingested events (the first restEvents of stream 0) and batches them.
	ingest  []Event
	batches []batch
	// maxRate is the sustained REST ingest rate, the basis of "half the max rate".
	maxRate float64
	// restLoaded: rest_ingest put the first rest-events into ClickHouse (REST) and Postgres (COPY).
	restLoaded bool

	pprof    *profiler // nil unless --pprof
	res      *Result
	cleanups []func(context.Context)
}

// batch is one REST request: events of one tenant.
type batch struct {
	tenant int
	idx    []int32 // into bench.ingest
	body   []byte
}

func run(ctx context.Context, o options) int {
	started := time.Now()
	b := &bench{opt: o, res: &Result{}}
	defer b.cleanup()
	err := b.setup(ctx)
	if err == nil {
		err = b.scenarios(ctx)
	}
	if err != nil {
		logf("analytics-bench: %v", err)
		if b.srv != nil {
			logf("analyticsd log tail:\n%s", b.srv.stderr.String())
		}
		return 1
	}
	b.res.Meta.Seconds = time.Since(started).Seconds()
	b.res.Meta.LoadAvgEnd, _ = loadAvg()
	b.res.evaluate()
	b.res.Complete = true
	for _, s := range b.res.Scenarios {
		if s.Error != "" {
			b.res.Complete = false
		}
	}
	out := o.out
	if out == "" {
		out = filepath.Join(b.root, "bench-results", started.UTC().Format("20060102T150405Z")+".json")
	}
	fmt.Println()
	b.res.printFigures(os.Stdout)
	fmt.Printf("\nanalytics-bench %s — %d events (%d via REST), seed %d, %s, %d CPUs, load %s → %s — %.0fs\n\n",
		started.UTC().Format("2006-01-02 15:04 UTC"), o.events, o.restEvents, o.seed, b.res.Meta.CPUModel, b.res.Meta.CPUs,
		b.res.Meta.LoadAvgStart, b.res.Meta.LoadAvgEnd, b.res.Meta.Seconds)
	b.res.printTargets(os.Stdout)
	if err := b.res.write(out); err != nil {
		logf("write %s: %v", out, err)
		return 1
	}
	fmt.Printf("\nresults: %s\n", out)
	if !b.res.Complete {
		logf("analytics-bench: some scenarios failed (see ERROR above)")
		return 1
	}
	return 0
}

func (b *bench) onCleanup(f func(context.Context)) { b.cleanups = append(b.cleanups, f) }

// cleanup undoes setup in reverse order, on success and failure alike.
func (b *bench) cleanup() {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	for i := len(b.cleanups) - 1; i >= 0; i-- {
		b.cleanups[i](ctx)
	}
}

func (b *bench) setup(ctx context.Context) error {
	var err error
	if b.root, err = moduleRoot(); err != nil {
		return err
	}
	now := time.Now()
	b.name = fmt.Sprintf("bench_%d", now.Unix())
	b.base = now.UTC().Truncate(time.Second)
	o := b.opt
	host, model, mem := machine()
	b.res.Meta = Meta{Started: now.UTC(), Command: strings.Join(os.Args, " "), Host: host, CPUs: runtime.NumCPU(), CPUModel: model,
		MemGiB: mem, GoVersion: runtime.Version(), Seed: o.seed, Events: o.events, RESTEvents: o.restEvents, Quick: o.quick,
		Tenants: o.tenants, Database: b.name}
	b.res.Meta.LoadAvgStart, _ = loadAvg()
	if out, err := exec.Command("git", "-C", b.root, "describe", "--always", "--dirty").Output(); err == nil {
		b.res.Meta.GitRevision = strings.TrimSpace(string(out))
	}

	if b.stack, err = stackEnv(ctx, b.root, o.reuseStack, logf); err != nil {
		return err
	}
	if b.chClient, err = clientArgs(b.stack["CLICKHOUSE_DSN"]); err != nil {
		return err
	}
	if b.tmp, err = os.MkdirTemp("", "analytics-bench-"); err != nil {
		return err
	}
	b.onCleanup(func(context.Context) {
		if !b.opt.keep {
			os.RemoveAll(b.tmp)
		}
	})

	var overlay string
	if o.pprofDir != "" {
		if overlay, err = pprofOverlay(b.root, b.tmp); err != nil {
			return err
		}
	}
	logf("building ./cmd/analyticsd")
	if b.bin, err = buildAnalyticsd(ctx, b.root, b.tmp, overlay); err != nil {
		return err
	}

	// Services, each removed again at the end.
	chOpts, err := clickhouse.ParseDSN(b.stack["CLICKHOUSE_DSN"])
	if err != nil {
		return fmt.Errorf("parse CLICKHOUSE_DSN: %w", err)
	}
	chOpts.Auth.Database = "default"
	chOpts.MaxOpenConns = 8
	b.layout = schema.Layout{DB: b.name, Cluster: b.stack["CLICKHOUSE_CLUSTER"]}
	chOpts.Settings = b.layout.ConnSettings()
	if b.layout.Clustered() {
		// clickhouse-client's baselines insert into the same Distributed tables, as synchronously.
		b.chClient = append(b.chClient, "--insert_distributed_sync=1")
	}
	if b.ch, err = clickhouse.Open(chOpts); err != nil {
		return fmt.Errorf("open clickhouse: %w", err)
	}
	b.onCleanup(func(context.Context) { b.ch.Close() })
	if err := b.ch.Ping(ctx); err != nil {
		return fmt.Errorf("clickhouse: %w", err)
	}
	if b.pgAdmin, err = pgxpool.New(ctx, b.stack["POSTGRES_URL"]); err != nil {
		return fmt.Errorf("open postgres: %w", err)
	}
	b.onCleanup(func(context.Context) { b.pgAdmin.Close() })
	redisAddr := ""
	if b.stack["REDIS_CLUSTER"] == "1" || b.stack["REDIS_CLUSTER"] == "true" {
		cOpts, err := redis.ParseClusterURL(b.stack["REDIS_URL"])
		if err != nil {
			return fmt.Errorf("parse REDIS_URL: %w", err)
		}
		cOpts.PoolSize = 32
		b.rdb, redisAddr = redis.NewClusterClient(cOpts), cOpts.Addrs[0]
	} else {
		rOpts, err := redis.ParseURL(b.stack["REDIS_URL"])
		if err != nil {
			return fmt.Errorf("parse REDIS_URL: %w", err)
		}
		rOpts.PoolSize = 32
		b.rdb, redisAddr = redis.NewClient(rOpts), rOpts.Addr
	}
	b.onCleanup(func(context.Context) { b.rdb.Close() })
	if err := b.rdb.Ping(ctx).Err(); err != nil {
		return fmt.Errorf("redis: %w", err)
	}
	b.versions(ctx)
	if u, err := url.Parse(b.stack["CLICKHOUSE_DSN"]); err == nil {
		if port, err := strconv.Atoi(u.Port()); err == nil {
			b.chPID = listeningPID(port)
		}
	}
	if b.chPID == 0 {
		logf("clickhouse-server's process not found; CPU-per-event figures will leave out the server")
	}
	if _, port, err := net.SplitHostPort(redisAddr); err == nil {
		if p, err := strconv.Atoi(port); err == nil {
			b.redisPID = listeningPID(p)
		}
	}

	// Two runs started in the same second (CI) must not share a database: take the next free name.
	for i := 1; ; i++ {
		err := b.ch.Exec(ctx, "CREATE DATABASE "+b.name+b.layout.OnCluster())
		if err == nil {
			break
		}
		if !strings.Contains(err.Error(), "already exists") || i == 20 {
			return fmt.Errorf("create clickhouse database %s: %w", b.name, err)
		}
		b.name = fmt.Sprintf("bench_%d", now.Unix()+int64(i))
		b.layout.DB = b.name
	}
	b.res.Meta.Database = b.name
	if b.chDSN, err = withDatabase(b.stack["CLICKHOUSE_DSN"], b.name); err != nil {
		return err
	}
	if b.pgURL, err = withSearchPath(b.stack["POSTGRES_URL"], b.name); err != nil {
		return err
	}
	b.onCleanup(func(ctx context.Context) {
		if b.opt.keep {
			logf("kept clickhouse database %s", b.name)
			return
		}
		if err := b.ch.Exec(ctx, "DROP DATABASE IF EXISTS "+b.name+b.layout.OnCluster()); err != nil {
			logf("drop clickhouse database %s: %v", b.name, err)
		}
	})
	if _, err := b.pgAdmin.Exec(ctx, "CREATE SCHEMA "+b.name); err != nil {
		return fmt.Errorf("create postgres schema %s: %w", b.name, err)
	}
	b.onCleanup(func(ctx context.Context) {
		if b.opt.keep {
			logf("kept postgres schema %s", b.name)
			return
		}
		if _, err := b.pgAdmin.Exec(ctx, "DROP SCHEMA IF EXISTS "+b.name+" CASCADE"); err != nil {
			logf("drop postgres schema %s: %v", b.name, err)
		}
	})
	pgCfg, err := pgxpool.ParseConfig(b.pgURL)
	if err != nil {
		return err
	}
	pgCfg.MaxConns = int32(max(b.opt.connections, 4))
	if b.pg, err = pgxpool.NewWithConfig(ctx, pgCfg); err != nil {
		return fmt.Errorf("open postgres bench schema: %w", err)
	}
	b.onCleanup(func(context.Context) { b.pg.Close() })
	b.onCleanup(b.cleanRedis)

	// analyticsd: migrate, tenants and keys through its own CLI, then serve.
	env := b.childEnv(nil)
	logf("analyticsd migrate (clickhouse %s, postgres schema %s)", b.name, b.name)
	if _, err := cli(ctx, b.bin, env, "migrate"); err != nil {
		return err
	}
	if err := b.createTenants(ctx, env); err != nil {
		return err
	}
	b.gen = NewGenerator(o.seed, b.base.Unix(), o.tenants)
	b.res.Meta.TenantShares = []float64{}
	for k := 0; k < min(5, o.tenants); k++ {
		b.res.Meta.TenantShares = append(b.res.Meta.TenantShares, b.gen.TenantShare(k))
	}

	spool := filepath.Join(b.tmp, "spool")
	addr, err := freeAddr()
	if err != nil {
		return err
	}
	b.serverEnv = map[string]string{
		"ANALYTICS_ADDR":            addr,
		"ANALYTICS_METRICS_ADDR":    "off",
		"ANALYTICS_SPOOL_DIR":       spool,
		"LOG_LEVEL":                 "warn",
		"ANALYTICS_MAX_EXPORT_ROWS": fmt.Sprint(o.exportRows),
		// Quota consume is measured for throughput, so no bench tenant may hit a limit.
		"QUOTA_DEFAULTS": `{"api_requests_daily":1000000000000,"builds_daily":1000000000000,"emails_daily":1000000000000,"webhooks_daily":1000000000000}`,
	}
	for _, kv := range o.serverEnv {
		k, v, ok := strings.Cut(kv, "=")
		if !ok {
			return fmt.Errorf("--server-env %q: want KEY=VALUE", kv)
		}
		b.serverEnv[k] = v
	}
	b.res.Meta.ServerEnv = map[string]string{}
	for k, v := range b.serverEnv {
		if k != "ANALYTICS_ADDR" && k != "ANALYTICS_SPOOL_DIR" {
			b.res.Meta.ServerEnv[k] = v
		}
	}
	b.http = &http.Client{Timeout: 10 * time.Minute, Transport: &http.Transport{
		MaxIdleConns: 256, MaxIdleConnsPerHost: 128, IdleConnTimeout: 90 * time.Second, DisableCompression: true,
	}}
	if o.pprofDir != "" {
		if b.pprof, err = b.pprofSetup(); err != nil {
			return err
		}
		b.serverEnv["BENCH_PPROF_ADDR"] = b.pprof.addr
	}
	logf("starting analyticsd serve on %s", addr)
	if b.srv, err = startServer(ctx, b.bin, []string{"serve"}, b.childEnv(b.serverEnv), addr); err != nil {
		return err
	}
	b.onCleanup(func(context.Context) { b.srv.stop(60 * time.Second) })
	return nil
}

// childEnv is the environment of an analyticsd process: PATH and HOME, the bench's service URLs, extra.
func (b *bench) childEnv(extra map[string]string) []string {
	env := []string{"PATH=" + os.Getenv("PATH"), "HOME=" + os.Getenv("HOME"),
		"CLICKHOUSE_DSN=" + b.chDSN, "POSTGRES_URL=" + b.pgURL, "REDIS_URL=" + b.stack["REDIS_URL"],
		"CLICKHOUSE_CLUSTER=" + b.stack["CLICKHOUSE_CLUSTER"], "REDIS_CLUSTER=" + strconv.FormatBool(b.stack["REDIS_CLUSTER"] == "1" || b.stack["REDIS_CLUSTER"] == "true")}
	for k, v := range extra {
		env = append(env, k+"="+v)
	}
	return env
}

func (b *bench) createTenants(ctx context.Context, env []string) error {
	logf("creating %d tenants and their API keys with the analyticsd CLI", b.opt.tenants+2)
	all := make([]tenantInfo, b.opt.tenants+2)
	for i := range all {
		switch i {
		case b.opt.tenants:
			all[i].Slug = "bench-probe"
		case b.opt.tenants + 1:
			all[i].Slug = "bench-fresh"
		default:
			all[i].Slug = fmt.Sprintf("bench-t%02d", i+1)
		}
	}
	var wg sync.WaitGroup
	errs := make([]error, len(all))
	sem := make(chan struct{}, 8)
	for i := range all {
		wg.Add(1)
		go func(t *tenantInfo, errp *error) {
			defer wg.Done()
			sem <- struct{}{}
			defer func() { <-sem }()
			id, err := cli(ctx, b.bin, env, "tenant", "create", "--slug", t.Slug)
			if err != nil {
				*errp = err
				return
			}
			if t.ID, err = uuid.Parse(id); err != nil {
				*errp = fmt.Errorf("tenant create printed %q, not a tenant id", id)
				return
			}
			t.Key, *errp = cli(ctx, b.bin, env, "apikey", "create", "--tenant", t.Slug, "--scopes", "events:write,analytics:read,analytics:admin", "--name", "bench")
		}(&all[i], &errs[i])
	}
	wg.Wait()
	for _, err := range errs {
		if err != nil {
			return err
		}
	}
	b.tenants, b.probe, b.fresh = all[:b.opt.tenants], all[b.opt.tenants], all[b.opt.tenants+1]
	return nil
}

// cleanRedis deletes the keys this run left: analyticsd's quota counters, event-id claims and
// Idempotency-Keys of the bench tenants (a 1M-event run claims 1M ids, ~120 MB kept for the dedup
// window otherwise), and the direct INCR baseline's keys. (Rate-limit buckets expire by themselves
// within seconds.)
func (b *bench) cleanRedis(ctx context.Context) {
	patterns := []string{b.name + ":*"}
	for _, t := range append(append([]tenantInfo{}, b.tenants...), b.probe, b.fresh) {
		if t.ID != uuid.Nil {
			id := t.ID.String()
			patterns = append(patterns, "quota:{"+id+"}*", "dedup:{"+id+"}*", "idem:{"+id+"}*")
		}
	}
	n := 0
	for _, p := range patterns {
		var keys []string // collected first: deleting while a SCAN walks the keyspace may skip keys
		_ = rediskeys.Scan(ctx, b.rdb, p, func(key string) error { keys = append(keys, key); return nil })
		n += len(keys)
		for _, k := range keys { // one by one: a multi-key DEL spans slots on a cluster
			_ = b.rdb.Del(ctx, k).Err()
		}
	}
	if n > 0 {
		logf("deleted %d redis keys", n)
	}
}

func (b *bench) versions(ctx context.Context) {
	if v, err := b.ch.ServerVersion(); err == nil {
		b.res.Meta.ClickHouse = v.String()
	}
	var pgv string
	if err := b.pgAdmin.QueryRow(ctx, "SHOW server_version").Scan(&pgv); err == nil {
		b.res.Meta.Postgres = pgv
	}
	if info, err := b.rdb.Info(ctx, "server").Result(); err == nil {
		for _, line := range strings.Split(info, "\n") {
			if v, ok := strings.CutPrefix(strings.TrimSpace(line), "redis_version:"); ok {
				b.res.Meta.Redis = v
			}
		}
	}
}

// warm is how many untimed calls precede a timed series.
func (b *bench) warm() int {
	if b.opt.quick {
		return 1
	}
	return 5
}

// selected reports whether a scenario should run (--only).
func (b *bench) selected(name string) bool {
	if b.opt.only == "" {
		return true
	}
	for _, n := range strings.Split(b.opt.only, ",") {
		if strings.TrimSpace(n) == name {
			return true
		}
	}
	return false
}

// scenario runs fn as one named scenario; an error is recorded and the run goes on. bulk_load, which
// completes the data set the reads need, always runs.
func (b *bench) scenario(ctx context.Context, name string, fn func(context.Context, *Scenario) error) {
	if (!b.selected(name) && name != "bulk_load") || ctx.Err() != nil {
		return
	}
	s := &Scenario{Name: name, Figures: map[string]float64{}, Latency: map[string]Summary{}}
	b.res.Scenarios = append(b.res.Scenarios, s)
	logf("── %s", name)
	start := time.Now()
	err := fn(ctx, s)
	s.Seconds = time.Since(start).Seconds()
	_, s.LoadAvg = loadAvg()
	if err != nil {
		s.Error = err.Error()
		logf("%s failed after %.1fs: %v", name, s.Seconds, err)
		return
	}
	logf("%s done in %.1fs", name, s.Seconds)
}

// scenarios runs everything in an order that keeps each comparison fair: ingest figures on an empty
// database, reads after the whole data set is loaded and merged.
func (b *bench) scenarios(ctx context.Context) error {
	if err := b.prepareIngest(ctx); err != nil {
		return err
	}
	if err := b.createBaselineTables(ctx); err != nil {
		return err
	}
	b.scenario(ctx, "rest_ingest", b.restIngest)
	b.scenario(ctx, "ack_latency", b.ackLatency)
	b.scenario(ctx, "freshness", b.freshness)
	b.scenario(ctx, "quota_consume", b.quotaConsume)
	b.ingest, b.batches = nil, nil // the rest streams; free the ingest set
	runtime.GC()
	b.scenario(ctx, "bulk_load", b.bulkLoad)
	b.scenario(ctx, "events_page", b.eventsPage)
	b.scenario(ctx, "kpis", b.kpis)
	b.scenario(ctx, "usage_90d", b.usage90d)
	b.scenario(ctx, "export_csv", b.exportCSV)
	b.scenario(ctx, "storage", b.storage)
	return ctx.Err()
}

// --- HTTP helpers

type apiResponse struct {
	status int
	body   []byte
}

func (b *bench) do(ctx context.Context, method, path, key string, body []byte, contentType string) (apiResponse, error) {
	var rd io.Reader
	if body != nil {
		rd = bytes.NewReader(body)
	}
	req, err := http.NewRequestWithContext(ctx, method, b.srv.base+path, rd)
	if err != nil {
		return apiResponse{}, err
	}
	req.Header.Set("Authorization", "Bearer "+key)
	if contentType != "" {
		req.Header.Set("Content-Type", contentType)
	}
	resp, err := b.http.Do(req)
	if err != nil {
		return apiResponse{}, err
	}
	defer resp.Body.Close()
	rb, err := io.ReadAll(resp.Body)
	if err != nil {
		return apiResponse{}, err
	}
	return apiResponse{status: resp.StatusCode, body: rb}, nil
}

// get issues a read and insists on 200.
func (b *bench) get(ctx context.Context, path, key string) ([]byte, error) {
	r, err := b.do(ctx, http.MethodGet, path, key, nil, "")
	if err != nil {
		return nil, err
	}
	if r.status != http.StatusOK {
		return nil, fmt.Errorf("GET %s: %d %s", path, r.status, trim(r.body))
	}
	return r.body, nil
}

func trim(b []byte) string {
	if len(b) > 300 {
		return string(b[:300]) + "…"
	}
	return string(b)
}

// decodeData unmarshals the "data" of a {"success":true,"data":...} envelope.
func decodeData(body []byte, into any) error {
	var env struct {
		Success bool            `json:"success"`
		Data    json.RawMessage `json:"data"`
	}
	if err := json.Unmarshal(body, &env); err != nil {
		return fmt.Errorf("response is not JSON: %v: %s", err, trim(body))
	}
	if !env.Success {
		return fmt.Errorf("response is not a success: %s", trim(body))
	}
	return json.Unmarshal(env.Data, into)
}

// timeSeries runs fn up to n times (after warm warm-up calls) or until budget is spent, whichever
// comes first, at least min(3, n) times, and returns the latencies.
func timeSeries(ctx context.Context, n, warm int, budget time.Duration, fn func(context.Context) error) ([]time.Duration, error) {
	for i := 0; i < warm; i++ {
		if err := fn(ctx); err != nil {
			return nil, err
		}
	}
	out := make([]time.Duration, 0, n)
	start := time.Now()
	for i := 0; i < n; i++ {
		if ctx.Err() != nil {
			return out, ctx.Err()
		}
		t := time.Now()
		if err := fn(ctx); err != nil {
			return out, err
		}
		out = append(out, time.Since(t))
		if budget > 0 && time.Since(start) > budget && len(out) >= min(3, n) {
			break
		}
	}
	return out, nil
}

// parts is system.parts of the server, or of one replica of every shard on a cluster.
func (b *bench) parts() string {
	if b.layout.Clustered() {
		return "cluster('" + b.layout.Cluster + "', system, parts)"
	}
	return "system.parts"
}
