package main

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/analyticsd/analyticsd/schema"
)

const (
	streamMain  = 0 // the data set
	streamWarm  = 1 // warm-up load (probe tenant)
	streamAck   = 2 // ack-latency load (probe tenant)
	streamFresh = 3 // ack-to-queryable probes (fresh tenant)
)

// generate fills events with events [from, from+len(events)) of stream, on every CPU.
func (b *bench) generate(events []Event, stream, from uint64) {
	workers := runtime.NumCPU()
	chunk := (len(events) + workers - 1) / workers
	var wg sync.WaitGroup
	for w := 0; w < workers; w++ {
		lo, hi := w*chunk, min((w+1)*chunk, len(events))
		if lo >= hi {
			break
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := lo; i < hi; i++ {
				b.gen.Fill(&events[i], stream, from+uint64(i))
			}
		}()
	}
	wg.Wait()
}

// encodeBatch renders events[idx] as one REST body (a JSON array).
func encodeBatch(events []Event, idx []int32) []byte {
	body := make([]byte, 0, len(idx)*330)
	body = append(body, '[')
	for j, i := range idx {
		if j > 0 {
			body = append(body, ',')
		}
		body = appendRESTEvent(body, &events[i])
	}
	return append(body, ']')
}

// prepareIngest generates the REST-ingested events and cuts them into per-tenant batches in stream
// order: a tenant's batch is sent once it holds --batch events (the last ones may be smaller).
func (b *bench) prepareIngest(ctx context.Context) error {
	start := time.Now()
	b.ingest = make([]Event, b.opt.restEvents)
	b.generate(b.ingest, streamMain, 0)
	open := make([][]int32, b.opt.tenants)
	for i := range b.ingest {
		t := b.ingest[i].Tenant
		open[t] = append(open[t], int32(i))
		if len(open[t]) == b.opt.batch {
			b.batches = append(b.batches, batch{tenant: t, idx: open[t]})
			open[t] = nil
		}
	}
	for t, idx := range open {
		if len(idx) > 0 {
			b.batches = append(b.batches, batch{tenant: t, idx: idx})
		}
	}
	_ = parallel(runtime.NumCPU(), len(b.batches), func(_, k int) error {
		b.batches[k].body = encodeBatch(b.ingest, b.batches[k].idx)
		return nil
	})
	heavy := 0
	for i := range b.ingest {
		if b.ingest[i].Tenant == 0 {
			heavy++
		}
	}
	logf("generated %d events in %d REST batches in %.1fs (busiest tenant: %d events)", len(b.ingest), len(b.batches), time.Since(start).Seconds(), heavy)
	return ctx.Err()
}

// createBaselineTables creates the ceiling's tables in ClickHouse (same columns and engine as
// analyticsd's events; a second copy also feeds the same kind of daily_usage materialized view) and
// the guide's Postgres analytics_events with its two indexes.
func (b *bench) createBaselineTables(ctx context.Context) error {
	db, l := b.name, b.layout
	// like copies a table of analyticsd's; on a cluster as analyticsd's are laid out: a replicated
	// local table on every shard and a Distributed table over it (the ceiling then pays for the
	// same replication and sharding as analyticsd's inserts do).
	like := func(name, of, engine, key string, args ...string) []string {
		if !l.Clustered() {
			return []string{"CREATE TABLE " + db + "." + name + " AS " + db + "." + of}
		}
		p := schema.Params{DB: db, Cluster: l.Cluster}
		return []string{"CREATE TABLE " + l.Local(name) + l.OnCluster() + " AS " + l.Local(of) + " ENGINE = " + p.Engine(name, engine, args...) + " " + key,
			strings.TrimSuffix(p.Distributed(name), ";")}
	}
	const eventsKey, usageKey = "PARTITION BY toYYYYMMDD(ts) ORDER BY (tenant_id, ts, id)", "PARTITION BY toYYYYMM(date) ORDER BY (tenant_id, metric, date)"
	var stmts []string
	stmts = append(stmts, like("raw_events", "events", "MergeTree", eventsKey)...)
	stmts = append(stmts, like("raw_events_mv", "events", "MergeTree", eventsKey)...)
	stmts = append(stmts, like("raw_daily_usage", "daily_usage", "SummingMergeTree", usageKey, "count")...)
	stmts = append(stmts, "CREATE MATERIALIZED VIEW "+db+".raw_daily_usage_mv"+l.OnCluster()+" TO "+l.Local("raw_daily_usage")+" AS "+
		"SELECT tenant_id, toDate(ts) AS date, event AS metric, toInt64(count()) AS count FROM "+l.Local("raw_events_mv")+" GROUP BY tenant_id, date, metric")
	for _, q := range stmts {
		if err := b.ch.Exec(ctx, q); err != nil {
			return fmt.Errorf("create ceiling table: %w", err)
		}
	}
	return b.createPGTable(ctx, "analytics_events")
}

// clickhouseInsert pipes a JSONEachRow file into clickhouse-client and returns how long it took and
// the CPU time the client and the server used for it.
func (b *bench) clickhouseInsert(ctx context.Context, table, file string) (wall, clientCPU, serverCPU time.Duration, err error) {
	f, err := os.Open(file)
	if err != nil {
		return 0, 0, 0, err
	}
	defer f.Close()
	args := append(append([]string{}, b.chClient...), "--query", "INSERT INTO "+b.name+"."+table+" FORMAT JSONEachRow")
	cmd := exec.CommandContext(ctx, "clickhouse-client", args...)
	var stderr bytes.Buffer
	cmd.Stdin, cmd.Stderr = f, &stderr
	m := meterCPU(b.chPID)
	start := time.Now()
	if err := cmd.Run(); err != nil {
		return 0, 0, 0, fmt.Errorf("clickhouse-client insert into %s: %w: %s", table, err, strings.TrimSpace(stderr.String()))
	}
	wall = time.Since(start)
	return wall, cmd.ProcessState.UserTime() + cmd.ProcessState.SystemTime(), sum(m.used()), nil
}

func sum(d []time.Duration) time.Duration {
	var t time.Duration
	for _, x := range d {
		t += x
	}
	return t
}

func usPer(d time.Duration, n int) float64 { return ratio(float64(d.Microseconds()), float64(n)) }

// clientStartup is what a clickhouse-client run costs before any data moves (process start,
// connect, a trivial query): the fastest of three. It is taken off the ceiling's and the CSV
// baseline's times, so those baselines are the server's speed, not the CLI's start-up.
func (b *bench) clientStartup(ctx context.Context) (wall, cpu time.Duration, err error) {
	for i := 0; i < 3; i++ {
		args := append(append([]string{}, b.chClient...), "--query", "SELECT 1")
		cmd := exec.CommandContext(ctx, "clickhouse-client", args...)
		start := time.Now()
		if out, err := cmd.CombinedOutput(); err != nil {
			return 0, 0, fmt.Errorf("clickhouse-client: %w: %s", err, out)
		}
		if d := time.Since(start); wall == 0 || d < wall {
			wall = d
		}
		if c := cmd.ProcessState.UserTime() + cmd.ProcessState.SystemTime(); cpu == 0 || c < cpu {
			cpu = c
		}
	}
	return wall, cpu, nil
}

func (b *bench) count(ctx context.Context, q string, args ...any) (uint64, error) {
	var n uint64
	err := b.ch.QueryRow(ctx, q, args...).Scan(&n)
	return n, err
}

// settle waits (up to max) until ClickHouse runs no merges in the bench database, so one
// measurement does not pay for the previous one's background work.
func (b *bench) settle(ctx context.Context, max time.Duration) {
	deadline := time.Now().Add(max)
	quiet := 0
	for time.Now().Before(deadline) && ctx.Err() == nil {
		n, err := b.count(ctx, "SELECT count() FROM system.merges WHERE database = ?", b.name)
		if err != nil {
			return
		}
		if n == 0 {
			quiet++
			if quiet >= 3 {
				return
			}
		} else {
			quiet = 0
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// quiet lets the machine finish what the previous scenario left behind before a latency scenario
// starts, so the figures are this scenario's own: ClickHouse's merges (a 1M-event REST round over 31
// daily partitions leaves ~30 s of them), then the kernel's write-back of everything written so far
// (sync): the Postgres baselines leave hundreds of MB dirty, and writing them back mid-scenario stalls
// the spool's fsyncs. (At 1M REST events, ack p99 was 63–107 ms in three runs without the sync and
// 30–82 ms in three with it: it removes one source of noise, not all of it.)
func (b *bench) quiet(ctx context.Context, s *Scenario) {
	t := time.Now()
	b.settle(ctx, b.settleTime())
	syscall.Sync()
	s.set("settled_seconds", time.Since(t).Seconds())
	load, _ := loadAvg()
	s.note("started after %.1fs without ClickHouse merges; load average then: %s", time.Since(t).Seconds(), load)
}

func (b *bench) settleTime() time.Duration {
	if b.opt.quick {
		return 500 * time.Millisecond
	}
	return 30 * time.Second
}

// postBatch sends one ingest request and checks every event was accepted.
func (b *bench) postBatch(ctx context.Context, key string, body []byte, want int) error {
	r, err := b.do(ctx, http.MethodPost, "/api/analytics/events", key, body, "application/json")
	if err != nil {
		return err
	}
	if r.status != http.StatusAccepted {
		return fmt.Errorf("POST /api/analytics/events: %d %s", r.status, trim(r.body))
	}
	var res struct {
		Accepted int `json:"accepted"`
	}
	if err := decodeData(r.body, &res); err != nil {
		return err
	}
	if res.Accepted != want {
		return fmt.Errorf("POST /api/analytics/events: accepted %d of %d: %s", res.Accepted, want, trim(r.body))
	}
	return nil
}

// warmUp fills the server's key cache for every tenant and runs a little ingest through the probe
// tenant so connections, buffers and the spool are warm before anything is measured.
func (b *bench) warmUp(ctx context.Context) error {
	for _, t := range append(append([]tenantInfo{}, b.tenants...), b.probe, b.fresh) {
		if _, err := b.get(ctx, "/api/analytics/quotas/builds_daily", t.Key); err != nil {
			return fmt.Errorf("warm-up: %w", err)
		}
	}
	n := 20
	if b.opt.quick {
		n = 4
	}
	events := make([]Event, n*b.opt.batch)
	b.generate(events, streamWarm, 0)
	var wg sync.WaitGroup
	errs := make(chan error, n)
	sem := make(chan struct{}, b.opt.connections)
	for k := 0; k < n; k++ {
		idx := make([]int32, b.opt.batch)
		for j := range idx {
			idx[j] = int32(k*b.opt.batch + j)
		}
		body := encodeBatch(events, idx)
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			if err := b.postBatch(ctx, b.probe.Key, body, len(idx)); err != nil {
				errs <- err
			}
		}()
	}
	wg.Wait()
	close(errs)
	return <-errs
}

// restIngest: the REST load (batches over keep-alive connections) against (a) the same events
// inserted by clickhouse-client (and, once, into a copy with a materialized view like analyticsd's)
// and (b) the guide's Postgres table loaded by COPY, and once by 500-row INSERTs. The ingest set is
// cut into rounds, each measured (a) → REST → (b) COPY on its own events, so a machine whose load
// drifts during the run (a shared one) skews all three alike; the headline ratios are of the totals.
func (b *bench) restIngest(ctx context.Context, s *Scenario) error {
	n := len(b.ingest)
	rounds := 2
	if b.opt.quick || len(b.batches) < 4 {
		rounds = 1
	}
	s.set("events", float64(n))
	s.set("requests", float64(len(b.batches)))
	s.set("batch_events", float64(b.opt.batch))
	s.set("connections", float64(b.opt.connections))
	s.set("rounds", float64(rounds))
	startup, startupCPU, err := b.clientStartup(ctx)
	if err != nil {
		return err
	}
	s.set("a_client_startup_seconds", startup.Seconds())
	if err := b.warmUp(ctx); err != nil {
		return err
	}

	var aTime, aCPU, aServer, restTime, ackTime, bTime, bCPU time.Duration
	var restAnalyticsd, restServer, restRedis time.Duration
	var rec Recorder
	for r := 0; r < rounds; r++ {
		batches := b.batches[r*len(b.batches)/rounds : (r+1)*len(b.batches)/rounds]
		var events []Event
		for _, bt := range batches {
			for _, i := range bt.idx {
				events = append(events, b.ingest[i])
			}
		}
		nr := len(events)
		file, size, err := b.writeRaw(events)
		if err != nil {
			return err
		}
		defer os.Remove(file)
		s.set("a_json_bytes", s.Figures["a_json_bytes"]+float64(size))

		// (a) the ceiling.
		b.settle(ctx, b.settleTime())
		d, cCPU, sCPU, err := b.clickhouseInsert(ctx, "raw_events", file)
		if err != nil {
			return err
		}
		d -= startup
		cCPU = max(cCPU-startupCPU, 0)
		aTime, aCPU, aServer = aTime+d, aCPU+cCPU+sCPU, aServer+sCPU
		s.set(fmt.Sprintf("round%d_a_events_per_s", r+1), float64(nr)/d.Seconds())
		if r == 0 {
			b.settle(ctx, b.settleTime())
			d, cCPU, sCPU, err := b.clickhouseInsert(ctx, "raw_events_mv", file)
			if err != nil {
				return err
			}
			d -= startup
			s.set("a_mv_events_per_s", float64(nr)/d.Seconds())
			s.set("a_mv_cpu_us_per_event", usPer(max(cCPU-startupCPU, 0)+sCPU, nr))
		}

		// REST.
		b.settle(ctx, b.settleTime())
		acked, stored, used, err := b.restRound(ctx, s, batches, nr, &rec, r)
		if err != nil {
			return err
		}
		restTime, ackTime = restTime+stored, ackTime+acked
		if len(used) >= 2 {
			restAnalyticsd, restServer = restAnalyticsd+used[0], restServer+used[1]
		}
		if len(used) == 3 {
			restRedis += used[2]
		}
		s.set(fmt.Sprintf("round%d_events_per_s", r+1), float64(nr)/stored.Seconds())
		s.set(fmt.Sprintf("round%d_ratio_vs_a", r+1), ratio(s.Figures[fmt.Sprintf("round%d_events_per_s", r+1)], s.Figures[fmt.Sprintf("round%d_a_events_per_s", r+1)]))

		// (b) COPY into the guide's table.
		b.settle(ctx, b.settleTime())
		d, pCPU, err := b.pgCopy(ctx, "analytics_events", events)
		if err != nil {
			return err
		}
		bTime, bCPU = bTime+d, bCPU+pCPU
		s.set(fmt.Sprintf("round%d_b_copy_events_per_s", r+1), float64(nr)/d.Seconds())
	}
	if got, err := b.count(ctx, "SELECT count() FROM "+b.name+".raw_events"); err != nil || got != uint64(n) {
		return fmt.Errorf("(a) raw_events holds %d rows, want %d (%v)", got, n, err)
	}
	b.restLoaded = true

	s.set("a_seconds", aTime.Seconds())
	s.set("a_events_per_s", float64(n)/aTime.Seconds())
	s.set("a_server_cpu_us_per_event", usPer(aServer, n))
	s.set("a_cpu_us_per_event", usPer(aCPU, n))
	s.set("ack_seconds", ackTime.Seconds())
	s.set("ack_events_per_s", float64(n)/ackTime.Seconds())
	s.set("stored_seconds", restTime.Seconds())
	s.set("events_per_s", float64(n)/restTime.Seconds())
	if restAnalyticsd > 0 {
		s.set("rest_analyticsd_cpu_us_per_event", usPer(restAnalyticsd, n))
		s.set("rest_server_cpu_us_per_event", usPer(restServer, n))
		s.set("rest_cpu_us_per_event", usPer(restAnalyticsd+restServer+restRedis, n))
		s.set("rest_redis_cpu_us_per_event", usPer(restRedis, n))
	}
	s.lat("request", Summarize(rec.Samples()))
	b.maxRate = float64(n) / restTime.Seconds()
	s.set("b_copy_seconds", bTime.Seconds())
	s.set("b_copy_events_per_s", float64(n)/bTime.Seconds())
	s.set("b_copy_backend_cpu_us_per_event", usPer(bCPU, n))
	s.note("events_per_s is end to end: from the first request until every event is queryable in ClickHouse (ack_events_per_s counts only until the last 202)")
	s.note("CPU figures: analyticsd and clickhouse-server processes (REST), clickhouse-client and clickhouse-server ((a)), the Postgres backend ((b)), from /proc")

	// (b) per-request multi-row INSERTs, into a twin table dropped afterwards.
	b.settle(ctx, b.settleTime())
	if err := b.createPGTable(ctx, "analytics_events_insert"); err != nil {
		return err
	}
	nIns := b.opt.pgInsertEvents
	d, err := b.pgInsert(ctx, "analytics_events_insert", nIns)
	if err != nil {
		return err
	}
	if _, err := b.pg.Exec(ctx, "DROP TABLE analytics_events_insert"); err != nil {
		return err
	}
	s.set("b_insert_events", float64(nIns))
	s.set("b_insert_seconds", d.Seconds())
	s.set("b_insert_events_per_s", float64(nIns)/d.Seconds())

	s.set("ratio_vs_a", ratio(s.Figures["events_per_s"], s.Figures["a_events_per_s"]))
	s.set("ratio_vs_a_mv", ratio(s.Figures["events_per_s"], s.Figures["a_mv_events_per_s"]))
	s.set("ack_ratio_vs_a", ratio(s.Figures["ack_events_per_s"], s.Figures["a_events_per_s"]))
	s.set("ratio_vs_b_copy", ratio(s.Figures["events_per_s"], s.Figures["b_copy_events_per_s"]))
	s.set("ratio_vs_b_insert", ratio(s.Figures["events_per_s"], s.Figures["b_insert_events_per_s"]))
	// CPU per event is what a shared machine distorts least: the same ratios in CPU terms.
	s.set("cpu_ratio_vs_a", ratio(s.Figures["a_cpu_us_per_event"], s.Figures["rest_cpu_us_per_event"]))
	s.set("cpu_ratio_vs_b_copy", ratio(s.Figures["b_copy_backend_cpu_us_per_event"], s.Figures["rest_cpu_us_per_event"]))
	return nil
}

// writeRaw writes events as the ceiling's JSONEachRow file.
func (b *bench) writeRaw(events []Event) (string, int64, error) {
	f, err := os.CreateTemp(b.tmp, "ingest-*.jsonl")
	if err != nil {
		return "", 0, err
	}
	w := bufio.NewWriterSize(f, 4<<20)
	recv := time.Now().Unix()
	var row []byte
	var size int64
	for i := range events {
		row = appendRawRow(row[:0], &events[i], b.tenants[events[i].Tenant].ID, recv)
		size += int64(len(row))
		if _, err := w.Write(row); err != nil {
			f.Close()
			return "", 0, err
		}
	}
	if err := w.Flush(); err != nil {
		f.Close()
		return "", 0, err
	}
	return f.Name(), size, f.Close()
}

// restRound sends batches over --connections connections and waits until ClickHouse holds every
// event; it returns the time to the last 202, the time until all are queryable, and the CPU analyticsd
// and clickhouse-server used meanwhile.
func (b *bench) restRound(ctx context.Context, s *Scenario, batches []batch, n int, rec *Recorder, round int) (acked, stored time.Duration, used []time.Duration, err error) {
	before, err := b.count(ctx, "SELECT count() FROM "+b.name+".events")
	if err != nil {
		return 0, 0, nil, err
	}
	m := meterCPU(b.srv.pid(), b.chPID, b.redisPID)
	var prof *profiler
	if round == 0 {
		prof = b.pprof // the first round is profiled
	}
	err = prof.cpu(ctx, s, "rest_ingest", func() error {
		start := time.Now()
		err := parallel(b.opt.connections, len(batches), func(_, k int) error {
			bt := &batches[k]
			t := time.Now()
			if err := b.postBatch(ctx, b.tenants[bt.tenant].Key, bt.body, len(bt.idx)); err != nil {
				return err
			}
			rec.Add(time.Since(t))
			return nil
		})
		acked = time.Since(start)
		if err != nil {
			return err
		}
		want := before + uint64(n)
		for {
			got, err := b.count(ctx, "SELECT count() FROM "+b.name+".events")
			if err != nil {
				return err
			}
			if got >= want {
				break
			}
			if time.Since(start) > 15*time.Minute {
				return fmt.Errorf("only %d of %d REST events reached ClickHouse after 15 minutes", got-before, n)
			}
			time.Sleep(50 * time.Millisecond)
		}
		stored = time.Since(start)
		return nil
	})
	return acked, stored, m.used(), err
}

// ackLatency: open-loop load at half the sustained REST rate; each request's latency counts from
// when it was due, so a server that falls behind shows it (no coordinated omission).
func (b *bench) ackLatency(ctx context.Context, s *Scenario) error {
	b.quiet(ctx, s)
	rate := b.maxRate / 2
	if rate == 0 {
		rate = 10_000
		s.note("rest_ingest did not measure a max rate; using %d events/s", int(rate))
	}
	interval := time.Duration(float64(b.opt.batch) / rate * float64(time.Second))
	nReq := max(int(b.opt.loadDuration/interval), 10)
	events := make([]Event, nReq*b.opt.batch)
	b.generate(events, streamAck, 0)
	bodies := make([][]byte, nReq)
	for k := range bodies {
		idx := make([]int32, b.opt.batch)
		for j := range idx {
			idx[j] = int32(k*b.opt.batch + j)
		}
		bodies[k] = encodeBatch(events, idx)
	}
	events = nil
	s.set("target_events_per_s", rate)
	s.set("requests", float64(nReq))

	type job struct {
		k   int
		due time.Time
	}
	var rec Recorder
	slow := make([]time.Duration, nReq) // each request's latency, for the trace's timeline
	var elapsed time.Duration
	var errCount atomic.Int64
	var firstErr atomic.Pointer[error]
	terr := b.pprof.trace(ctx, s, "ack_latency", func() error {
		jobs := make(chan job, nReq)
		var wg sync.WaitGroup
		for w := 0; w < 64; w++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for j := range jobs {
					if err := b.postBatch(ctx, b.probe.Key, bodies[j.k], b.opt.batch); err != nil {
						errCount.Add(1)
						firstErr.CompareAndSwap(nil, &err)
						continue
					}
					slow[j.k] = time.Since(j.due)
					rec.Add(slow[j.k])
				}
			}()
		}
		start := time.Now().Add(20 * time.Millisecond)
		for k := 0; k < nReq; k++ {
			due := start.Add(time.Duration(k) * interval)
			if d := time.Until(due); d > 0 {
				time.Sleep(d)
			}
			jobs <- job{k, due}
		}
		close(jobs)
		wg.Wait()
		elapsed = time.Since(start)
		if b.pprof != nil {
			var out strings.Builder
			for k, d := range slow {
				fmt.Fprintf(&out, "%.1f,%.2f\n", float64(time.Duration(k)*interval)/1e6, float64(d)/1e6)
			}
			file := filepath.Join(b.pprof.dir, "ack_latency.csv")
			s.note("each request's due time and latency (ms since the first one was due): %s", file)
			return os.WriteFile(file, []byte(out.String()), 0o644)
		}
		return nil
	})
	if terr != nil {
		return terr
	}
	s.set("achieved_events_per_s", float64(nReq*b.opt.batch)/elapsed.Seconds())
	s.set("errors", float64(errCount.Load()))
	s.lat("ack", Summarize(rec.Samples()))
	if e := firstErr.Load(); e != nil {
		return fmt.Errorf("%d of %d requests failed; first: %w", errCount.Load(), nReq, *e)
	}
	return nil
}

// freshness: single events at a moderate rate; each one's time from its 202 until a ClickHouse query
// by its id finds it.
func (b *bench) freshness(ctx context.Context, s *Scenario) error {
	b.quiet(ctx, s)
	const rate = 20 // events/s
	n := max(int(b.opt.freshDuration.Seconds()*rate), 10)
	s.set("probes", float64(n))
	s.set("rate_per_s", rate)

	var mu sync.Mutex
	acked := map[string]time.Time{}
	visible := map[string]time.Duration{}
	stopPoll := make(chan struct{})
	pollDone := make(chan error, 1)
	go func() {
		q := "SELECT toString(id) FROM " + b.name + ".events WHERE tenant_id = ? AND has(?, toString(id))"
		for {
			mu.Lock()
			pending := make([]string, 0, len(acked))
			for id := range acked {
				if _, ok := visible[id]; !ok {
					pending = append(pending, id)
				}
			}
			mu.Unlock()
			if len(pending) > 0 {
				t := time.Now()
				rows, err := b.ch.Query(ctx, q, b.fresh.ID, pending)
				if err != nil {
					pollDone <- err
					return
				}
				mu.Lock()
				for rows.Next() {
					var id string
					if err := rows.Scan(&id); err == nil {
						if _, ok := visible[id]; !ok {
							visible[id] = t.Sub(acked[id])
						}
					}
				}
				mu.Unlock()
				rows.Close()
			}
			select {
			case <-stopPoll:
				pollDone <- nil
				return
			case <-time.After(20 * time.Millisecond):
			}
		}
	}()

	var wg sync.WaitGroup
	var firstErr atomic.Pointer[error]
	start := time.Now()
	for k := 0; k < n; k++ {
		if d := time.Until(start.Add(time.Duration(k) * time.Second / rate)); d > 0 {
			time.Sleep(d)
		}
		var e Event
		b.gen.Fill(&e, streamFresh, uint64(k))
		e.Ts = time.Now().Unix() // live events: now
		body := appendRESTEvent(nil, &e)
		id := e.ID.String()
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := b.postBatch(ctx, b.fresh.Key, body, 1); err != nil {
				firstErr.CompareAndSwap(nil, &err)
				return
			}
			t := time.Now()
			mu.Lock()
			acked[id] = t
			mu.Unlock()
		}()
	}
	wg.Wait()
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		mu.Lock()
		done := len(visible) == len(acked)
		mu.Unlock()
		if done {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	close(stopPoll)
	if err := <-pollDone; err != nil {
		return fmt.Errorf("poll clickhouse: %w", err)
	}
	if e := firstErr.Load(); e != nil {
		return *e
	}
	mu.Lock()
	defer mu.Unlock()
	lat := make([]time.Duration, 0, len(visible))
	for _, d := range visible {
		lat = append(lat, max(d, 0))
	}
	s.lat("visible", Summarize(lat))
	s.set("not_visible_after_30s", float64(len(acked)-len(visible)))
	s.note("resolution: ClickHouse is polled by id every 20 ms; the server flushes batches every INGEST_FLUSH_INTERVAL (default 1s)")
	if len(visible) < len(acked) {
		return fmt.Errorf("%d of %d acknowledged probes not queryable after 30s", len(acked)-len(visible), len(acked))
	}
	return nil
}
