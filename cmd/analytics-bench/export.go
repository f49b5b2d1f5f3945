package main

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net/http"
	"os/exec"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/analyticsd/analyticsd/query"
)

// lineCounter counts bytes and newlines written to it.
type lineCounter struct{ bytes, lines int64 }

func (c *lineCounter) Write(p []byte) (int, error) {
	c.bytes += int64(len(p))
	c.lines += int64(bytes.Count(p, []byte{'\n'}))
	return len(p), nil
}

// restartServer replaces the running analyticsd with a fresh process (same env and port), so a
// memory figure starts from a clean baseline rather than whatever ingest left behind.
func (b *bench) restartServer(ctx context.Context) error {
	b.srv.stop(60 * time.Second)
	b.http.CloseIdleConnections()
	srv, err := startServer(ctx, b.bin, []string{"serve"}, b.childEnv(b.serverEnv), b.serverEnv["ANALYTICS_ADDR"])
	if err != nil {
		return err
	}
	b.srv = srv
	return nil
}

type exportRun struct {
	rows    int64
	bytes   int64
	seconds float64
	rssKiB  [2]int64 // before, peak
}

// exportAPI downloads the tenant's CSV export (default range) while sampling analyticsd's VmRSS.
func (b *bench) exportAPI(ctx context.Context, key, query string) (exportRun, error) {
	var run exportRun
	pid := b.srv.pid()
	before, err := rssKiB(pid)
	if err != nil {
		return run, err
	}
	peakKiB := before // written by the sampler only, read after finish
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			if v, err := rssKiB(pid); err == nil && v > peakKiB {
				peakKiB = v
			}
			select {
			case <-stop:
				return
			case <-time.After(10 * time.Millisecond):
			}
		}
	}()
	finish := sync.OnceFunc(func() { close(stop); wg.Wait() })
	defer finish()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, b.srv.base+"/api/analytics/export.csv"+query, nil)
	if err != nil {
		return run, err
	}
	req.Header.Set("Authorization", "Bearer "+key)
	start := time.Now()
	resp, err := b.http.Do(req)
	if err != nil {
		return run, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		body, _ := io.ReadAll(resp.Body)
		return run, fmt.Errorf("GET export.csv: %d %s", resp.StatusCode, trim(body))
	}
	var c lineCounter
	if _, err := io.Copy(&c, resp.Body); err != nil {
		return run, err
	}
	run.seconds = time.Since(start).Seconds()
	finish()
	run.rssKiB = [2]int64{before, peakKiB}
	run.rows, run.bytes = c.lines-1, c.bytes // minus the header
	return run, nil
}

// exportClient runs the same query through clickhouse-client FORMAT CSV.
func (b *bench) exportClient(ctx context.Context, sql string) (exportRun, error) {
	var run exportRun
	args := append(append([]string{}, b.chClient...), "--query", sql+" FORMAT CSV")
	cmd := exec.CommandContext(ctx, "clickhouse-client", args...)
	var c lineCounter
	var stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &c, &stderr
	start := time.Now()
	if err := cmd.Run(); err != nil {
		return run, fmt.Errorf("clickhouse-client export: %w: %s", err, strings.TrimSpace(stderr.String()))
	}
	run.seconds = time.Since(start).Seconds()
	run.rows, run.bytes = c.lines, c.bytes
	return run, nil
}

// exportPG is the guide's table exported with COPY ... TO STDOUT (CSV).
func (b *bench) exportPG(ctx context.Context, sql string) (exportRun, error) {
	var run exportRun
	conn, err := b.pg.Acquire(ctx)
	if err != nil {
		return run, err
	}
	defer conn.Release()
	var c lineCounter
	start := time.Now()
	if _, err := conn.Conn().PgConn().CopyTo(ctx, &c, "COPY ("+sql+") TO STDOUT WITH (FORMAT csv, HEADER)"); err != nil {
		return run, fmt.Errorf("postgres export: %w", err)
	}
	run.seconds = time.Since(start).Seconds()
	run.rows, run.bytes = c.lines-1, c.bytes
	return run, nil
}

func median(v []float64) float64 {
	if len(v) == 0 {
		return 0
	}
	s := slices.Clone(v)
	slices.Sort(s)
	return s[(len(s)-1)/2]
}

// exportCSV: up to --export-rows rows of the busiest tenant (the cap raised to that) through the API,
// against clickhouse-client FORMAT CSV of the same query; analyticsd's RSS is sampled throughout.
func (b *bench) exportCSV(ctx context.Context, s *Scenario) error {
	t := b.tenants[0]
	if err := b.restartServer(ctx); err != nil {
		return err
	}
	r, err := query.ParseRange("", "", time.Now())
	if err != nil {
		return err
	}
	inRange, err := b.count(ctx, "SELECT count() FROM "+b.name+".events WHERE tenant_id = ? AND ts >= ? AND ts < ?", t.ID, r.From, r.To)
	if err != nil {
		return err
	}
	want := min(int64(inRange), int64(b.opt.exportRows))
	s.set("cap", float64(b.opt.exportRows))
	s.set("rows_expected", float64(want))
	from, to := sqlLiteralRange(r)
	cols := "id, ts, event, source, user_id, ip, request_id, props"
	chSQL := fmt.Sprintf("SELECT %s FROM %s.events WHERE tenant_id = toUUID(%s) AND ts >= %s AND ts < %s ORDER BY ts DESC, id DESC LIMIT %d",
		cols, b.name, quoteCH(t.ID.String()), from, to, b.opt.exportRows)

	startup, _, err := b.clientStartup(ctx)
	if err != nil {
		return err
	}
	s.set("client_startup_seconds", startup.Seconds())
	// Warm-up: a small export (the last hour).
	hour := "?from=" + time.Now().Add(-time.Hour).UTC().Format(time.RFC3339)
	if _, err := b.exportAPI(ctx, t.Key, hour); err != nil {
		return err
	}
	runs := 3
	if b.opt.quick {
		runs = 1
	}
	var apiRates, chRates []float64
	var growth, peak, before float64
	err = b.pprof.cpu(ctx, s, "export_csv", func() error {
		for i := 0; i < runs; i++ {
			a, err := b.exportAPI(ctx, t.Key, "")
			if err != nil {
				return err
			}
			if a.rows != want {
				return fmt.Errorf("export returned %d rows, want %d", a.rows, want)
			}
			c, err := b.exportClient(ctx, chSQL)
			if err != nil {
				return err
			}
			if c.rows != want {
				return fmt.Errorf("clickhouse-client returned %d rows, want %d", c.rows, want)
			}
			apiRates = append(apiRates, float64(a.rows)/a.seconds)
			chRates = append(chRates, float64(c.rows)/c.seconds)
			if g := float64(a.rssKiB[1]-a.rssKiB[0]) / 1024; g > growth || i == 0 {
				growth = g
			}
			peak = max(peak, float64(a.rssKiB[1])/1024)
			if i == 0 {
				before = float64(a.rssKiB[0]) / 1024
			}
			s.set("api_bytes", float64(a.bytes))
			s.set("client_bytes", float64(c.bytes))
		}
		return nil
	})
	if err != nil {
		return err
	}
	s.set("api_rows_per_s", median(apiRates))
	s.set("client_rows_per_s", median(chRates))
	s.set("ratio_vs_client", ratio(median(apiRates), median(chRates)))
	s.set("rss_before_mib", before)
	s.set("rss_peak_mib", peak)
	s.set("rss_growth_mib", max(growth, 0.001))
	s.note("median of %d runs each, alternating; the client's start-up (client_startup_seconds) is taken off its time; RSS growth is the largest peak-minus-start of any run, on a freshly restarted server", runs)

	pgSQL := fmt.Sprintf("SELECT %s FROM analytics_events WHERE tenant_id = '%s' AND ts >= to_timestamp(%d) AND ts < to_timestamp(%d) ORDER BY ts DESC, id DESC LIMIT %d",
		cols, t.ID, r.From.Unix(), r.To.Unix(), b.opt.exportRows)
	p, err := b.exportPG(ctx, pgSQL)
	if err != nil {
		return err
	}
	s.set("b_rows_per_s", float64(p.rows)/p.seconds)
	s.set("api_over_b", ratio(median(apiRates), float64(p.rows)/p.seconds))
	return nil
}
