// Command analytics-bench measures analyticsd side by side with the baselines a user would pick
// instead, on one deterministic generated workload, in one run: REST ingest against raw
// clickhouse-client inserts (the ceiling) and the guide's Postgres design (docs/contract.md); ack latency and time to
// queryable; event pages, KPIs and usage against the same SQL sent straight to ClickHouse and the
// same reads on Postgres; CSV export against clickhouse-client; quota consume against a go-redis
// INCR loop; and storage per event. Ratios are the headline because absolute times on a shared
// 2-core machine are noisy. It prints tables and writes every raw figure to a JSON file.
//
// It owns nothing of analyticsd: it builds and runs the real binary (migrate, tenant, apikey, serve)
// against a fresh ClickHouse database and Postgres schema, and drops both at the end.
//
//	analytics-bench                 # full run (see BENCHMARKS.md for its size and duration)
//	analytics-bench --quick         # CI: ~20k events, every scenario end to end, < 60 s, no speed checks
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"
)

type options struct {
	events         int // events in the query data set (ClickHouse and Postgres)
	restEvents     int // of which this many go through REST ingest (and the ceiling and COPY baselines)
	pgInsertEvents int // events for the per-request multi-row INSERT baseline
	quick          bool
	out            string
	seed           uint64
	reuseStack     bool
	keep           bool
	tenants        int
	exportRows     int
	iterations     int           // samples per read scenario
	loadDuration   time.Duration // ack latency, quota
	quotaOpenRate  float64       // consumes/s of quota_consume's open loop; 0: half the closed loop's
	freshDuration  time.Duration
	slowBudget     time.Duration // time cap of each slow read series (Postgres, single-query ClickHouse)
	serverEnv      multiFlag
	pprofDir       string // profile analyticsd (CPU, allocations) per scenario into this directory
	connections    int
	batch          int
	only           string // comma-separated scenario names (debugging)
}

type multiFlag []string

func (m *multiFlag) String() string     { return strings.Join(*m, ",") }
func (m *multiFlag) Set(v string) error { *m = append(*m, v); return nil }

func main() {
	var o options
	fs := flag.NewFlagSet("analytics-bench", flag.ExitOnError)
	fs.IntVar(&o.events, "events", 5_000_000, "events in the query data set: the REST-ingested ones plus the rest loaded straight into ClickHouse and Postgres")
	fs.IntVar(&o.restEvents, "rest-events", 1_000_000, "events sent through REST ingest, raw clickhouse-client (a) and Postgres COPY (b); capped at --events")
	fs.IntVar(&o.pgInsertEvents, "pg-insert-events", 250_000, "events for the Postgres per-request 500-row INSERT baseline")
	fs.BoolVar(&o.quick, "quick", false, "CI mode: ~20k events, few iterations; proves every scenario runs, asserts nothing about speed")
	fs.StringVar(&o.out, "out", "", "JSON result file (default bench-results/<UTC timestamp>.json in the checkout)")
	fs.Uint64Var(&o.seed, "seed", 1, "workload seed: the same seed gives the same events")
	fs.BoolVar(&o.reuseStack, "reuse-stack", true, "use CLICKHOUSE_DSN, POSTGRES_URL and REDIS_URL when all are set; otherwise (or when false) run deploy/local/stack.sh up")
	fs.BoolVar(&o.keep, "keep", false, "keep the bench database, schema and server's spool after the run (debugging)")
	fs.IntVar(&o.tenants, "tenants", 50, "tenants (Zipf-like share of traffic)")
	fs.IntVar(&o.exportRows, "export-rows", 1_000_000, "CSV export cap (ANALYTICS_MAX_EXPORT_ROWS for the server)")
	fs.IntVar(&o.iterations, "iterations", 200, "samples per read scenario")
	fs.DurationVar(&o.loadDuration, "load-duration", 10*time.Second, "length of the ack-latency and quota load phases")
	fs.Float64Var(&o.quotaOpenRate, "quota-open-rate", 0, "consumes per second of quota_consume's open loop (0: half the closed loop's rate); a fixed rate compares runs whose closed loops differ with the machine's load")
	fs.DurationVar(&o.freshDuration, "fresh-duration", 10*time.Second, "length of the ack-to-queryable probe")
	fs.DurationVar(&o.slowBudget, "slow-budget", 10*time.Second, "time cap of each slow read series (Postgres, single-query ClickHouse): slow queries get fewer samples")
	fs.Var(&o.serverEnv, "server-env", "KEY=VALUE for analyticsd serve (repeatable), e.g. INGEST_DURABILITY=buffered")
	fs.StringVar(&o.pprofDir, "pprof", "", "build analyticsd with a profiling hook (go build -overlay; the checkout is untouched) and write CPU and allocation profiles of the server per scenario into this directory, plus an execution trace of ack_latency and each of its requests' latency (ack_latency.trace, ack_latency.csv)")
	fs.IntVar(&o.connections, "connections", 16, "keep-alive connections for REST ingest and quota load")
	fs.IntVar(&o.batch, "batch", 500, "events per REST ingest request")
	fs.StringVar(&o.only, "only", "", "run only these scenarios (comma-separated; setup and bulk_load, which loads the data set, always run)")
	_ = fs.Parse(os.Args[1:])
	if o.quick {
		set := map[string]bool{}
		fs.Visit(func(f *flag.Flag) { set[f.Name] = true })
		def := func(name string, apply func()) {
			if !set[name] {
				apply()
			}
		}
		def("events", func() { o.events = 20_000 })
		def("rest-events", func() { o.restEvents = 20_000 })
		def("pg-insert-events", func() { o.pgInsertEvents = 5_000 })
		def("iterations", func() { o.iterations = 5 })
		def("load-duration", func() { o.loadDuration = 2 * time.Second })
		def("fresh-duration", func() { o.freshDuration = 2 * time.Second })
		def("slow-budget", func() { o.slowBudget = 2 * time.Second })
		def("tenants", func() { o.tenants = 10 })
	}
	o.restEvents = min(o.restEvents, o.events)
	o.pgInsertEvents = min(o.pgInsertEvents, o.restEvents)
	if o.events < 1000 || o.tenants < 2 || o.batch < 1 || o.connections < 1 {
		fmt.Fprintln(os.Stderr, "analytics-bench: --events must be ≥ 1000, --tenants ≥ 2, --batch and --connections ≥ 1")
		os.Exit(2)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := run(ctx, o)
	stop()
	os.Exit(code)
}

func logf(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "%s  %s\n", time.Now().UTC().Format("15:04:05.000"), fmt.Sprintf(format, args...))
}
