package main

import (
	"context"
	"fmt"
	"math"
	"net/http"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/valyala/fasthttp"
)

// quotaConsume: POST /quotas/api_requests_daily/consume over --connections keep-alive connections,
// spread over every tenant's key, against (d) the same number of goroutines running go-redis INCR.
// Limits are raised so nothing is refused; what is measured is the cost of an atomic check-and-spend:
// the closed-loop rate, the CPU analyticsd and Redis spend per consume, and then an open loop at half
// that rate whose latencies count from when each consume was due (like ack_latency).
func (b *bench) quotaConsume(ctx context.Context, s *Scenario) error {
	b.quiet(ctx, s)
	dur := b.opt.loadDuration
	warm := max(dur/10, 300*time.Millisecond)
	s.set("connections", float64(b.opt.connections))
	s.set("seconds", dur.Seconds())

	// The load generator shares the two cores with analyticsd and Redis, so it must cost little per
	// request, like (d)'s go-redis does: net/http spent ~90 µs of CPU per consume, fasthttp's client
	// a fraction of that. One client, 16 connections, keep-alive, like the other scenarios.
	client := &fasthttp.Client{MaxConnsPerHost: b.opt.connections, MaxConnWaitTimeout: time.Minute, ReadTimeout: time.Minute, WriteTimeout: time.Minute}
	url := b.srv.base + "/api/analytics/quotas/api_requests_daily/consume?n=1"
	apiOp := func(w, i int) error {
		t := b.tenants[(w+i*b.opt.connections)%len(b.tenants)]
		req, resp := fasthttp.AcquireRequest(), fasthttp.AcquireResponse()
		defer fasthttp.ReleaseRequest(req)
		defer fasthttp.ReleaseResponse(resp)
		req.SetRequestURI(url)
		req.Header.SetMethod(http.MethodPost)
		req.Header.Set("Authorization", "Bearer "+t.Key)
		if err := client.Do(req, resp); err != nil {
			return err
		}
		if resp.StatusCode() != http.StatusOK {
			return fmt.Errorf("consume: %d %s", resp.StatusCode(), trim(resp.Body()))
		}
		return nil
	}
	if _, _, err := b.closedLoop(ctx, warm, apiOp); err != nil {
		return err
	}
	var ops int64
	var lat []time.Duration
	m := meterCPU(b.srv.pid(), b.redisPID, os.Getpid())
	busy := machineBusy()
	err := b.pprof.cpu(ctx, s, "quota_consume", func() error {
		var err error
		ops, lat, err = b.closedLoop(ctx, dur, apiOp)
		return err
	})
	if err != nil {
		return err
	}
	if used := m.used(); len(used) == 3 && ops > 0 {
		s.set("analyticsd_cpu_us_per_consume", usPer(used[0], int(ops)))
		s.set("redis_cpu_us_per_consume", usPer(used[1], int(ops)))
		s.set("loadgen_cpu_us_per_consume", usPer(used[2], int(ops)))
	}
	s.set("machine_busy_cores", busy())
	s.set("api_ops_per_s", float64(ops)/dur.Seconds())
	s.lat("api", Summarize(lat))

	// Open loop at half the closed loop's rate (or --quota-open-rate).
	rate := float64(ops) / dur.Seconds() / 2
	if b.opt.quotaOpenRate > 0 {
		rate = b.opt.quotaOpenRate
	}
	n := max(int(rate*dur.Seconds()), 10)
	interval := time.Duration(float64(time.Second) / rate)
	s.set("open_target_ops_per_s", rate)
	jobs := make(chan time.Time, n)
	var rec Recorder
	var failed atomic.Pointer[error]
	var wg sync.WaitGroup
	var next atomic.Int64
	start := time.Now().Add(20 * time.Millisecond)
	// Where the slow consumes fall: the 100 ms windows (by when each was due) that hold one over
	// 5 ms. A few windows holding all of them is a stall (a GC, an fsync held up by the disk, a burst
	// of other work on the two cores); many is a cost every consume pays.
	var slowMu sync.Mutex
	slowWindows := map[int64]int{}
	m = meterCPU(b.srv.pid(), b.redisPID, os.Getpid())
	busy = machineBusy()
	r0, w0, ioErr := procSyscalls(b.srv.pid())
	err = b.pprof.cpu(ctx, s, "quota_consume_open", func() error {
		for w := 0; w < 64; w++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for due := range jobs {
					if err := apiOp(0, int(next.Add(1))); err != nil {
						failed.CompareAndSwap(nil, &err)
						continue
					}
					l := time.Since(due)
					rec.Add(l)
					if l > 5*time.Millisecond {
						slowMu.Lock()
						slowWindows[int64(due.Sub(start)/(100*time.Millisecond))]++
						slowMu.Unlock()
					}
				}
			}()
		}
		for k := 0; k < n; k++ {
			due := start.Add(time.Duration(k) * interval)
			if d := time.Until(due); d > 0 {
				time.Sleep(d)
			}
			jobs <- due
		}
		close(jobs)
		wg.Wait()
		if e := failed.Load(); e != nil {
			return fmt.Errorf("open-loop consume: %w", *e)
		}
		return nil
	})
	if err != nil {
		return err
	}
	s.set("open_achieved_ops_per_s", float64(n)/time.Since(start).Seconds())
	if used := m.used(); len(used) == 3 {
		s.set("open_analyticsd_cpu_us_per_consume", usPer(used[0], n))
		s.set("open_redis_cpu_us_per_consume", usPer(used[1], n))
		s.set("open_loadgen_cpu_us_per_consume", usPer(used[2], n))
	}
	s.set("open_machine_busy_cores", busy())
	if r1, w1, err := procSyscalls(b.srv.pid()); err == nil && ioErr == nil {
		s.set("open_analyticsd_read_syscalls_per_consume", float64(r1-r0)/float64(n))
		s.set("open_analyticsd_write_syscalls_per_consume", float64(w1-w0)/float64(n))
	}
	slow := 0
	for _, c := range slowWindows {
		slow += c
	}
	s.set("open_over_5ms", float64(slow))
	s.set("open_over_5ms_windows_100ms", float64(len(slowWindows)))
	s.set("open_windows_100ms", math.Ceil(float64(n)*interval.Seconds()*10))
	s.lat("open", Summarize(rec.Samples()))

	redisOp := func(w, i int) error {
		t := b.tenants[(w+i*b.opt.connections)%len(b.tenants)]
		return b.rdb.Incr(ctx, b.name+":incr:"+t.ID.String()).Err()
	}
	if _, _, err := b.closedLoop(ctx, warm, redisOp); err != nil {
		return err
	}
	ops, lat, err = b.closedLoop(ctx, dur, redisOp)
	if err != nil {
		return err
	}
	s.set("d_ops_per_s", float64(ops)/dur.Seconds())
	s.lat("d", Summarize(lat))
	s.set("ratio_vs_d", ratio(s.Figures["api_ops_per_s"], s.Figures["d_ops_per_s"]))
	return nil
}

// parallel runs fn for every k in [0, n) on `workers` goroutines, each taking the next k as it
// finishes the last; after the first error no new k starts, and that error is returned.
func parallel(workers, n int, fn func(worker, k int) error) error {
	var next atomic.Int64
	var failed atomic.Pointer[error]
	var wg sync.WaitGroup
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for failed.Load() == nil {
				k := int(next.Add(1) - 1)
				if k >= n {
					return
				}
				if err := fn(w, k); err != nil {
					failed.CompareAndSwap(nil, &err)
					return
				}
			}
		}()
	}
	wg.Wait()
	if e := failed.Load(); e != nil {
		return *e
	}
	return nil
}

// closedLoop runs op from --connections goroutines, back to back, for dur; it returns how many
// completed and their latencies, or the first error.
func (b *bench) closedLoop(ctx context.Context, dur time.Duration, op func(worker, i int) error) (int64, []time.Duration, error) {
	var total atomic.Int64
	var failed atomic.Pointer[error]
	lats := make([][]time.Duration, b.opt.connections)
	end := time.Now().Add(dur)
	var wg sync.WaitGroup
	for w := 0; w < b.opt.connections; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; time.Now().Before(end) && failed.Load() == nil && ctx.Err() == nil; i++ {
				t := time.Now()
				if err := op(w, i); err != nil {
					failed.CompareAndSwap(nil, &err)
					return
				}
				lats[w] = append(lats[w], time.Since(t))
				total.Add(1)
			}
		}()
	}
	wg.Wait()
	if e := failed.Load(); e != nil {
		return 0, nil, *e
	}
	var all []time.Duration
	for _, l := range lats {
		all = append(all, l...)
	}
	return total.Load(), all, ctx.Err()
}

// storage: bytes per event of ClickHouse's events table (compressed, active parts) against the
// guide's Postgres table with its indexes and TOAST (pg_total_relation_size), on the same data set.
func (b *bench) storage(ctx context.Context, s *Scenario) error {
	b.settle(ctx, b.settleTime())
	var rows, comp, uncomp uint64
	var parts uint64
	q := "SELECT sum(rows), sum(data_compressed_bytes), sum(data_uncompressed_bytes), count() FROM " + b.parts() + " WHERE database = ? AND table = ? AND active"
	if err := b.ch.QueryRow(ctx, q, b.name, b.layout.LocalName("events")).Scan(&rows, &comp, &uncomp, &parts); err != nil {
		return fmt.Errorf("clickhouse parts: %w", err)
	}
	s.set("ch_rows", float64(rows))
	s.set("ch_compressed_bytes", float64(comp))
	s.set("ch_uncompressed_bytes", float64(uncomp))
	s.set("ch_active_parts", float64(parts))
	s.set("ch_bytes_per_event", ratio(float64(comp), float64(rows)))
	// Per column: which ones the bytes go to (what a codec or a type change could win).
	cols, err := b.ch.Query(ctx, "SELECT name, data_compressed_bytes, data_uncompressed_bytes FROM system.columns WHERE database = ? AND table = 'events'", b.name)
	if err != nil {
		return fmt.Errorf("clickhouse columns: %w", err)
	}
	for cols.Next() {
		var name string
		var c, u uint64
		if err := cols.Scan(&name, &c, &u); err != nil {
			cols.Close()
			return err
		}
		s.set("ch_col_"+name+"_bytes_per_event", ratio(float64(c), float64(rows)))
		s.set("ch_col_"+name+"_compression_ratio", ratio(float64(u), float64(c)))
	}
	cols.Close()
	var rawRows, rawComp, rawUncomp, rawParts uint64
	if err := b.ch.QueryRow(ctx, q, b.name, b.layout.LocalName("raw_events")).Scan(&rawRows, &rawComp, &rawUncomp, &rawParts); err == nil && rawRows > 0 {
		s.set("ch_raw_events_bytes_per_event", ratio(float64(rawComp), float64(rawRows)))
	}
	var total, heap, idx int64
	var pgRows int64
	if err := b.pg.QueryRow(ctx, "SELECT pg_total_relation_size('analytics_events'), pg_relation_size('analytics_events'), pg_indexes_size('analytics_events'), (SELECT count(*) FROM analytics_events)").
		Scan(&total, &heap, &idx, &pgRows); err != nil {
		return fmt.Errorf("postgres sizes: %w", err)
	}
	s.set("pg_rows", float64(pgRows))
	s.set("pg_total_bytes", float64(total))
	s.set("pg_heap_bytes", float64(heap))
	s.set("pg_index_bytes", float64(idx))
	s.set("pg_bytes_per_event", ratio(float64(total), float64(pgRows)))
	s.set("b_over_ch", ratio(s.Figures["pg_bytes_per_event"], s.Figures["ch_bytes_per_event"]))
	s.note("ClickHouse rows include the warm-up, latency and quota probes of the side tenants; bytes/event divides by each store's own row count")
	return nil
}
