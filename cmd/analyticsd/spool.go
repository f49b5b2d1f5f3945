package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"text/tabwriter"
	"time"

	"github.com/ClickHouse/clickhouse-go/v2/lib/driver"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/analyticsd/analyticsd/dedup"
	"github.com/analyticsd/analyticsd/ingest"
	"github.com/analyticsd/analyticsd/ingest/spool"
	"github.com/analyticsd/analyticsd/internal/clock"
	"github.com/analyticsd/analyticsd/quota"
	"github.com/analyticsd/analyticsd/retention"
)

// spoolCmd lets an operator see what waits in a spool and ship what a server cannot: a retired
// instance's spool (drain) and rows fixed after being quarantined (requeue).
func spoolCmd(ctx context.Context, cfg Config, log *slog.Logger, args []string, stdout io.Writer) error {
	if len(args) == 0 {
		return fmt.Errorf("spool: want status, inspect, drain or requeue: %w", errUsage)
	}
	dir := cfg.Writer.Dir
	asJSON := false
	dirFlag := func(fs *flag.FlagSet) {
		fs.StringVar(&dir, "dir", dir, "spool directory (default ANALYTICS_SPOOL_DIR)")
		fs.BoolVar(&asJSON, "json", false, "print JSON")
	}
	switch args[0] {
	case "status":
		if err := flags("spool status", args[1:], dirFlag); err != nil {
			return err
		}
		if err := spoolDirExists(dir); err != nil {
			return err
		}
		rep, err := ingest.InspectSpool(dir, nil, nil)
		if err != nil {
			return err
		}
		if asJSON {
			return json.NewEncoder(stdout).Encode(rep)
		}
		printStatus(stdout, rep)
		return nil
	case "inspect":
		only := map[uint64]bool{}
		rows := false
		if err := flags("spool inspect", args[1:], func(fs *flag.FlagSet) {
			dirFlag(fs)
			fs.BoolVar(&rows, "rows", false, "print the rows themselves, one JSON object per line")
			fs.Func("segment", "only this segment (its seq; repeatable)", func(s string) error {
				n, err := strconv.ParseUint(s, 10, 64)
				only[n] = true
				return err
			})
		}); err != nil {
			return err
		}
		if err := spoolDirExists(dir); err != nil {
			return err
		}
		var visit ingest.RowVisitor
		enc := json.NewEncoder(stdout)
		if rows {
			visit = func(seq uint64, ev *ingest.Row, inc *ingest.Increment) {
				if ev != nil {
					enc.Encode(map[string]any{"segment": seq, "kind": "event", "tenant_id": ev.TenantID, "id": ev.ID, "ts": ev.Ts,
						"received_at": ev.ReceivedAt, "event": ev.Event, "source": ev.Source, "user_id": ev.UserID,
						"props": json.RawMessage(ev.Props), "ip": ev.IP, "request_id": ev.RequestID})
					return
				}
				enc.Encode(map[string]any{"segment": seq, "kind": "increment", "tenant_id": inc.TenantID, "id": inc.ID, "ts": inc.Ts,
					"metric": inc.Metric, "n": inc.N})
			}
		}
		rep, err := ingest.InspectSpool(dir, only, visit)
		if err != nil || rows {
			return err
		}
		if asJSON {
			if len(only) > 0 {
				rep.Segments = slices.DeleteFunc(rep.Segments, func(g ingest.SegmentSummary) bool { return !only[g.Seq] })
			}
			return enc.Encode(rep)
		}
		printSegments(stdout, rep, only)
		return nil
	case "drain":
		timeout := 10 * time.Minute
		if err := flags("spool drain", args[1:], func(fs *flag.FlagSet) {
			dirFlag(fs)
			fs.DurationVar(&timeout, "timeout", timeout, "give up after this long (what is left stays in the spool)")
		}); err != nil {
			return err
		}
		// Drain would otherwise create a mistyped directory and report it drained.
		if err := spoolDirExists(dir); err != nil {
			return err
		}
		return withShipping(ctx, cfg, func(ship shipping) error {
			wc := cfg.Writer
			// The guard is the floor and the table's TTL (ship.floor), not this shell's RETENTION_DAYS:
			// one below the TTL quarantined rows of days still kept.
			wc.Dir, wc.Owner, wc.Floor, wc.RetentionDays = dir, "analyticsd spool drain", ship.floor, 0
			dctx, cancel := context.WithTimeout(ctx, timeout)
			defer cancel()
			res, err := ingest.Drain(dctx, wc, ship.ch, cfg.ClickHouseDB, ship.claims, log)
			if err != nil {
				return err
			}
			if asJSON {
				if err := json.NewEncoder(stdout).Encode(res); err != nil {
					return err
				}
			}
			// Not drained is a failure whatever the format: a script's `drain && rm -rf` must not
			// delete what is left.
			if !res.Drained {
				return fmt.Errorf("spool %s not drained within %s: %d segments (%d bytes) left; last error: %s",
					dir, timeout, res.PendingSegments, res.SpoolBytes, res.LastError)
			}
			if !asJSON {
				fmt.Fprintf(stdout, "spool %s drained: every segment is in clickhouse; quarantine: %d files, %d rows\n",
					dir, res.QuarantinedFiles, res.QuarantinedRows)
			}
			// Damaged bytes are acknowledged rows the disk (or a copy) lost: drained, but not whole.
			if res.DamagedStretches > 0 {
				return fmt.Errorf("spool %s: %d damaged stretches (not torn writes) were kept apart in %s; "+
					"rows in them may be lost: see `analyticsd spool status --dir %s`", dir, res.DamagedStretches, spool.DamagedDir(dir), dir)
			}
			return nil
		})
	case "requeue":
		var files []string
		all, includeExpired := false, false
		if err := flags("spool requeue", args[1:], func(fs *flag.FlagSet) {
			dirFlag(fs)
			fs.BoolVar(&all, "all", false, "every quarantine file")
			fs.Func("file", "a quarantine file, as `spool status` lists it (repeatable)", func(s string) error {
				files = append(files, s)
				return nil
			})
			fs.BoolVar(&includeExpired, "include-expired", false,
				"insert rows whose day left the retention window too (only for rows known never to have reached clickhouse)")
		}); err != nil {
			return err
		}
		if all == (len(files) > 0) {
			return fmt.Errorf("spool requeue: give --all or --file NAME: %w", errUsage)
		}
		if err := spoolDirExists(dir); err != nil {
			return err
		}
		if all {
			list, err := spool.ListQuarantine(dir)
			if err != nil {
				return err
			}
			for _, q := range list {
				files = append(files, q.Name)
			}
		}
		return withShipping(ctx, cfg, func(ship shipping) error {
			o := ingest.RequeueOptions{Floor: ship.floor, Shards: cfg.Writer.Shards, Log: log}
			if includeExpired {
				o.Floor = nil
			}
			var errs []error
			type outcome struct {
				ingest.RequeueResult
				Removed bool   `json:"removed"`
				Error   string `json:"error,omitempty"`
			}
			outcomes := []outcome{}
			for _, name := range files {
				res, err := ingest.Requeue(ctx, dir, name, ship.ch, cfg.ClickHouseDB, ship.claims, o)
				if err != nil {
					errs = append(errs, err)
					outcomes = append(outcomes, outcome{RequeueResult: res, Error: err.Error()})
					continue
				}
				outcomes = append(outcomes, outcome{RequeueResult: res, Removed: true})
				if !asJSON {
					fmt.Fprintf(stdout, "%s: %d rows, %d inserted, the rest were already stored; file removed\n", res.File, res.Rows, res.Inserted)
				}
			}
			if asJSON {
				if err := json.NewEncoder(stdout).Encode(outcomes); err != nil {
					errs = append(errs, err)
				}
			} else if len(files) == 0 {
				fmt.Fprintln(stdout, "the quarantine is empty")
			}
			return errors.Join(errs...)
		})
	}
	return fmt.Errorf("spool: unknown subcommand %q: %w", args[0], errUsage)
}

// spoolDirExists refuses a spool directory that is not there: a mistyped --dir must not read as an
// empty spool (status, requeue) or be created and reported drained (drain).
func spoolDirExists(dir string) error {
	fi, err := os.Stat(dir)
	if err != nil {
		return fmt.Errorf("spool directory %s: %w (check --dir or ANALYTICS_SPOOL_DIR)", dir, err)
	}
	if !fi.IsDir() {
		return fmt.Errorf("spool directory %s is not a directory (check --dir or ANALYTICS_SPOOL_DIR)", dir)
	}
	return nil
}

type shipping struct {
	ch     driver.Conn
	claims ingest.Claims
	// floor is the first day retention has not dropped: the later of the floor in Postgres and the
	// cutoff of the window in force.
	floor func(context.Context) (time.Time, error)
}

// withShipping opens what shipping rows needs — ClickHouse, Postgres for the retention floor, and
// Redis for the claims, as serve has them — and closes it afterwards.
func withShipping(ctx context.Context, cfg Config, fn func(shipping) error) error {
	ch, err := openClickHouse(cfg)
	if err != nil {
		return err
	}
	defer ch.Close()
	floor, closeFloor := retentionGuard(cfg, ch)
	defer closeFloor()
	var claims ingest.Claims
	if cfg.DedupWindow > 0 {
		rdb, err := openRedis(cfg)
		if err != nil {
			return err
		}
		defer rdb.Close()
		if err := rdb.Ping(ctx).Err(); err != nil {
			return fmt.Errorf("redis (needed to verify event ids before shipping; INGEST_DEDUP_WINDOW=0 ships without): %w", err)
		}
		claims = dedup.NewStore(rdb, "", cfg.DedupWindow, counting(quota.NewCounters(rdb, "")))
	}
	return fn(shipping{ch: ch, claims: claims, floor: floor})
}

// retentionGuard returns the first day retention has not dropped, for rows which may be stored
// already: the later of the floor in Postgres (the sweeper raises it) and, where the events table
// has a TTL, its cutoff — never this command's RETENTION_DAYS alone. (Before, drain and requeue took
// the variable as set in their shell: unset, 90 days against a table keeping 30, and rows of days
// the table had dropped were inserted a second time and counted again in daily_usage.) It is read
// when a row needs it: ClickHouse may be down when the command starts, and Postgres is opened only
// then. close closes what it opened.
func retentionGuard(cfg Config, ch driver.Conn) (floor func(context.Context) (time.Time, error), close func()) {
	var (
		mu sync.Mutex
		pg *pgxpool.Pool
	)
	floor = func(ctx context.Context) (time.Time, error) {
		days, ttl, err := retention.TableTTL(ctx, ch, cfg.ClickHouseDB, cfg.Layout().LocalName("events"))
		if err != nil {
			return time.Time{}, err
		}
		mu.Lock()
		if pg == nil {
			if pg, err = openPostgres(ctx, cfg); err != nil {
				mu.Unlock()
				return time.Time{}, fmt.Errorf("postgres (needed to read the retention floor): %w", err)
			}
		}
		mu.Unlock()
		f, err := retention.NewFloor(pg, cfg.ClickHouseDB).Get(ctx)
		if err != nil {
			return time.Time{}, err
		}
		if cut := (retention.Window{Days: days}).Cutoff(clock.Now()); ttl && cut.After(f) {
			f = cut
		}
		return f, nil
	}
	return floor, func() {
		mu.Lock()
		defer mu.Unlock()
		if pg != nil {
			pg.Close()
		}
	}
}

func printStatus(w io.Writer, rep ingest.SpoolReport) {
	holder := "no process holds it"
	switch {
	case rep.HolderError != "":
		holder = "whether a process holds it is unknown (" + rep.HolderError + ")"
	case rep.Holder != nil:
		holder = "held by " + rep.Holder.String()
	}
	fmt.Fprintf(w, "spool %s: %s\n", rep.Dir, holder)
	inflight := 0
	var oldest time.Time
	for _, s := range rep.Segments {
		if s.State == "in_flight" {
			inflight++
		}
		if !s.Received.IsZero() && (oldest.IsZero() || s.Received.Before(oldest)) {
			oldest = s.Received
		}
	}
	fmt.Fprintf(w, "waiting: %d segments (%d in flight), %d bytes, %d events, %d increments", len(rep.Segments), inflight, rep.Bytes, rep.Events, rep.Increments)
	if !oldest.IsZero() {
		fmt.Fprintf(w, "; oldest accepted %s (%s ago)", oldest.Format(time.RFC3339), time.Since(oldest).Round(time.Second))
	}
	fmt.Fprintln(w)
	for _, s := range rep.Segments {
		for _, at := range s.DamagedAt {
			fmt.Fprintf(w, "segment %d: DAMAGED at byte %d (not a torn write; kept apart when shipped)\n", s.Seq, at)
		}
	}
	if len(rep.Damaged) > 0 {
		fmt.Fprintf(w, "damaged: %d stretches of segments kept apart in %s (rows in them may be lost; inspect, then delete them):\n",
			len(rep.Damaged), spool.DamagedDir(rep.Dir))
		for _, d := range rep.Damaged {
			fmt.Fprintf(w, "  %s  %d bytes, %s\n", d.Name, d.Bytes, d.At.Format(time.RFC3339))
		}
	}
	rows := 0
	for _, q := range rep.Quarantine {
		rows += q.Rows()
	}
	fmt.Fprintf(w, "quarantine: %d files, %d rows\n", len(rep.Quarantine), rows)
	for _, q := range rep.Quarantine {
		fmt.Fprintf(w, "  %s  %d events, %d increments, tenants %s\n    %s: %s\n", q.Name, q.Events, q.Increments,
			strings.Join(q.Tenants, ","), q.Reason, q.Error)
	}
	if len(rep.Quarantine) > 0 {
		fmt.Fprintln(w, "fix the cause, then: analyticsd spool requeue --all")
	}
}

func printSegments(w io.Writer, rep ingest.SpoolReport, only map[uint64]bool) {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "SEQ\tSTATE\tBYTES\tRECORDS\tEVENTS\tINCREMENTS\tTENANTS\tFIRST TS\tLAST TS\tNOTE")
	for _, s := range rep.Segments {
		if len(only) > 0 && !only[s.Seq] {
			continue
		}
		note := s.Error
		if s.TornTail {
			note = strings.TrimSpace(note + " torn tail (an unacknowledged write, ignored)")
		}
		for _, at := range s.DamagedAt {
			note = strings.TrimSpace(fmt.Sprintf("%s DAMAGED at byte %d (kept apart when shipped)", note, at))
		}
		fmt.Fprintf(tw, "%d\t%s\t%d\t%d\t%d\t%d\t%d\t%s\t%s\t%s\n", s.Seq, s.State, s.Bytes, s.Records, s.Events, s.Increments, s.Tenants,
			fmtTime(s.FirstTs), fmtTime(s.LastTs), note)
	}
	tw.Flush()
}

func fmtTime(t time.Time) string {
	if t.IsZero() {
		return "-"
	}
	return t.UTC().Format(time.RFC3339)
}
