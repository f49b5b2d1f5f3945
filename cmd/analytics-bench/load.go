package main

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"os/exec"
	"strings"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"
)

// bulkLoad completes the query data set: events [rest-events, events) of the main stream go straight
// into analyticsd's events table with clickhouse-client (its materialized view fills daily_usage, as
// for ingested events) and into Postgres analytics_events with COPY, both at once. REST would take too
// long for 10M events on this machine; what REST costs is rest_ingest's figure, not this one's. When
// rest_ingest did not load its share (--only), the whole data set is loaded this way.
func (b *bench) bulkLoad(ctx context.Context, s *Scenario) error {
	from, to := b.opt.restEvents, b.opt.events
	if !b.restLoaded {
		from = 0
	}
	n := to - from
	s.set("events", float64(n))
	if n > 0 {
		start := time.Now()
		var chSecs, pgSecs float64
		var wg sync.WaitGroup
		errs := make([]error, 3)
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs[0] = b.bulkClickHouse(ctx, from, to)
			chSecs = time.Since(start).Seconds()
		}()
		// Postgres COPY is the slow one (one core per stream): two streams over halves of the range.
		mid := from + n/2
		var pgDone [2]float64
		for i, r := range [][2]int{{from, mid}, {mid, to}} {
			wg.Add(1)
			go func() {
				defer wg.Done()
				errs[1+i] = b.bulkPostgres(ctx, r[0], r[1])
				pgDone[i] = time.Since(start).Seconds()
			}()
		}
		wg.Wait()
		if err := errors.Join(errs...); err != nil {
			return err
		}
		pgSecs = max(pgDone[0], pgDone[1])
		s.set("clickhouse_seconds", chSecs)
		s.set("clickhouse_events_per_s", float64(n)/chSecs)
		s.set("postgres_copy_seconds", pgSecs)
		s.set("postgres_copy_events_per_s", float64(n)/pgSecs)
		s.note("ClickHouse (one clickhouse-client) and Postgres (two COPY streams) load concurrently, generating the events on the fly; these rates are not comparisons")
	}
	start := time.Now()
	if _, err := b.pg.Exec(ctx, "VACUUM ANALYZE analytics_events"); err != nil {
		return fmt.Errorf("vacuum analyze: %w", err)
	}
	s.set("postgres_vacuum_analyze_seconds", time.Since(start).Seconds())

	start = time.Now()
	settle := 3 * time.Minute
	if b.opt.quick {
		settle = 5 * time.Second
	}
	b.settle(ctx, settle)
	s.set("clickhouse_settle_seconds", time.Since(start).Seconds())
	// Reconcile every loaded day into Postgres, as the daily job would have: in production, usage for
	// days up to yesterday is read from analytics_daily_usage. (The scheduler's catch-up at start-up
	// reconciled recent days while they were still empty.)
	today := time.Now().UTC().Truncate(24 * time.Hour)
	start = time.Now()
	if _, err := cli(ctx, b.bin, b.childEnv(nil), "rollup", "--from", today.AddDate(0, 0, -31).Format(time.DateOnly),
		"--to", today.AddDate(0, 0, -1).Format(time.DateOnly)); err != nil {
		return err
	}
	s.set("rollup_31_days_seconds", time.Since(start).Seconds())
	parts, err := b.count(ctx, "SELECT count() FROM "+b.parts()+" WHERE database = ? AND table = ? AND active", b.name, b.layout.LocalName("events"))
	if err != nil {
		return err
	}
	s.set("clickhouse_active_parts", float64(parts))
	total, err := b.count(ctx, "SELECT count() FROM "+b.name+".events WHERE tenant_id != ? AND tenant_id != ?", b.probe.ID, b.fresh.ID)
	if err != nil {
		return err
	}
	if total != uint64(b.opt.events) {
		return fmt.Errorf("clickhouse events holds %d data-set rows, want %d", total, b.opt.events)
	}
	heavy, err := b.count(ctx, "SELECT count() FROM "+b.name+".events WHERE tenant_id = ?", b.tenants[0].ID)
	if err != nil {
		return err
	}
	b.res.Meta.HeavyTenantEv = int(heavy)
	s.set("heavy_tenant_events", float64(heavy))
	var pgRows int64
	if err := b.pg.QueryRow(ctx, "SELECT count(*) FROM analytics_events").Scan(&pgRows); err != nil {
		return err
	}
	if pgRows != int64(b.opt.events) {
		return fmt.Errorf("postgres analytics_events holds %d rows, want %d", pgRows, b.opt.events)
	}
	return nil
}

// chunks generates events [from, to) of the main stream chunk by chunk and hands each to fn.
func (b *bench) chunks(ctx context.Context, from, to int, fn func([]Event) error) error {
	const size = 50_000
	buf := make([]Event, size)
	for lo := from; lo < to; lo += size {
		if err := ctx.Err(); err != nil {
			return err
		}
		ev := buf[:min(size, to-lo)]
		b.generate(ev, streamMain, uint64(lo))
		if err := fn(ev); err != nil {
			return err
		}
	}
	return nil
}

func (b *bench) bulkClickHouse(ctx context.Context, from, to int) error {
	args := append(append([]string{}, b.chClient...), "--query", "INSERT INTO "+b.name+".events FORMAT JSONEachRow")
	cmd := exec.CommandContext(ctx, "clickhouse-client", args...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	stdin, err := cmd.StdinPipe()
	if err != nil {
		return err
	}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("start clickhouse-client: %w", err)
	}
	w := bufio.NewWriterSize(stdin, 1<<20)
	var row []byte
	genErr := b.chunks(ctx, from, to, func(ev []Event) error {
		for i := range ev {
			row = appendRawRow(row[:0], &ev[i], b.tenants[ev[i].Tenant].ID, ev[i].Ts)
			if _, err := w.Write(row); err != nil {
				return err
			}
		}
		return nil
	})
	if genErr == nil {
		genErr = w.Flush()
	}
	stdin.Close()
	if err := cmd.Wait(); err != nil {
		return fmt.Errorf("clickhouse-client bulk insert: %w: %s", err, strings.TrimSpace(stderr.String()))
	}
	return genErr
}

func (b *bench) bulkPostgres(ctx context.Context, from, to int) error {
	const size = 50_000
	buf := make([]Event, size)
	var cur []Event
	lo := from
	src := pgx.CopyFromFunc(func() ([]any, error) {
		if len(cur) == 0 {
			if lo >= to {
				return nil, nil
			}
			cur = buf[:min(size, to-lo)]
			b.generate(cur, streamMain, uint64(lo))
			lo += len(cur)
		}
		e := &cur[0]
		cur = cur[1:]
		return b.pgRow(e), nil
	})
	n, err := b.pg.CopyFrom(ctx, pgx.Identifier{"analytics_events"}, pgColumns, src)
	if err != nil {
		return fmt.Errorf("copy into analytics_events: %w", err)
	}
	if int(n) != to-from {
		return fmt.Errorf("copy into analytics_events: %d rows, want %d", n, to-from)
	}
	return nil
}
