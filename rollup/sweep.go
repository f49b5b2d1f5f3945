package rollup

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"regexp"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/ClickHouse/clickhouse-go/v2"
	"github.com/ClickHouse/clickhouse-go/v2/lib/driver"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/analyticsd/analyticsd/audit"
	"github.com/analyticsd/analyticsd/internal/clock"
	"github.com/analyticsd/analyticsd/internal/excerpt"
	"github.com/analyticsd/analyticsd/internal/logger"
	"github.com/analyticsd/analyticsd/retention"
	"github.com/analyticsd/analyticsd/schema"
)

// partitionRe is a toYYYYMMDD(ts) partition id: the only thing the sweeper ever puts into SQL text.
var partitionRe = regexp.MustCompile(`^[0-9]{8}$`)

// SweepResult says what one sweep did.
type SweepResult struct {
	// TTL: the server drops expired parts itself; the sweeper did nothing.
	TTL bool `json:"ttl,omitempty"`
	// Skipped: another replica holds the sweeper's lock.
	Skipped bool `json:"skipped,omitempty"`
	// Cutoff is the oldest day kept (today - RETENTION_DAYS).
	Cutoff string `json:"cutoff"`
	// Dropped lists the dropped partitions (YYYYMMDD) per table.
	Dropped map[string][]string `json:"dropped"`
	// Queued lists, per table, dropped partitions that a replica which was down has still to drop:
	// the drop waits in the cluster's DDL queue and runs when the replica is back (a subset of Dropped).
	Queued map[string][]string `json:"queued,omitempty"`
}

// Sweeper enforces RETENTION_DAYS on ClickHouse servers without table TTL (the version gate's
// Features.TTL): it drops whole daily partitions of events and usage_increments older than the window.
// A partition whose day is today - RETENTION_DAYS or later stays. Aggregates (daily_usage, Postgres)
// are never touched. On servers with TTL it does nothing: the tables' TTL does the work.
type Sweeper struct {
	ch            driver.Conn
	db            string
	layout        schema.Layout
	pg            *pgxpool.Pool
	audit         *audit.Log
	log           *slog.Logger
	retentionDays int
	now           func() time.Time
	m             *sweepMetrics
	// features reads the server's version gate; tests replace it.
	features func() (schema.Features, error)
	// raiseFloor records the first day whose raw data is complete (retention.Floor); tests replace it.
	raiseFloor func(ctx context.Context, d time.Time) error

	// DDLWait bounds how long a drop ON CLUSTER waits for every replica (distributed_ddl_task_timeout,
	// default 30 s; the server's own default is 180 s). A replica that is down does not make the
	// sweep fail: its drop stays queued and runs when it returns (SweepResult.Queued). On servers
	// whose drops go to each shard directly (schema.Layout.AlterLocal), a replica down is skipped and
	// takes the drop from its shard's replication log when it returns (also SweepResult.Queued).
	DDLWait time.Duration

	d       *daily
	ttlOnce sync.Once
}

// NewSweeper returns a Sweeper; it does nothing until Sweep or Start. reg may be nil; now defaults to
// time.Now. The events table's definition is read at each sweep, so a server that is down at start-up is fine.
func NewSweeper(ch driver.Conn, layout schema.Layout, pg *pgxpool.Pool, auditLog *audit.Log, reg prometheus.Registerer,
	log *slog.Logger, retentionDays int, now func() time.Time) *Sweeper {
	log = logger.Or(log)
	if now == nil {
		now = clock.Now
	}
	db := layout.DB
	s := &Sweeper{ch: ch, db: db, layout: layout, pg: pg, audit: auditLog, log: log, retentionDays: retentionDays, now: now, m: newSweepMetrics(reg),
		raiseFloor: retention.NewFloor(pg, db).Raise, DDLWait: 30 * time.Second}
	// Whether the tables expire rows themselves is read from their definition, not from the server
	// version: tables created before an upgrade to a TTL-capable server still have no TTL clause,
	// and the sweeper must keep enforcing retention for them.
	s.features = func() (schema.Features, error) {
		var n uint64
		err := ch.QueryRow(context.Background(), "SELECT count() FROM system.tables WHERE database = ? AND name = ? AND positionCaseInsensitive(create_table_query, ' TTL ') > 0",
			db, layout.LocalName("events")).Scan(&n)
		if err != nil {
			return schema.Features{}, fmt.Errorf("read the events table definition: %w", err)
		}
		return schema.Features{TTL: n > 0}, nil
	}
	// Daily shortly after UTC midnight, when the oldest day leaves the window; retried after a failure
	// from 5 minutes up to 2 hours apart.
	s.d = newDaily("retention sweep", 5*time.Minute, 5*time.Minute, 2*time.Hour, now, log, func(ctx context.Context, _ time.Time) (string, error) {
		res, err := s.Sweep(ctx)
		switch {
		case err != nil:
			return "", err
		case res.TTL:
			return "idle", nil
		case res.Skipped:
			return "skipped", nil
		}
		return "ok", nil
	})
	return s
}

// Start sweeps now and then daily at 00:05 UTC, until Stop or ctx ends.
func (s *Sweeper) Start(ctx context.Context) { s.d.start(ctx) }

// Stop ends the schedule and waits for a sweep in progress to stop.
func (s *Sweeper) Stop() { s.d.stop() }

// Status reports the last sweep and the next one.
func (s *Sweeper) Status() Status { return s.d.Status() }

// Cutoff is the oldest UTC day kept: today - RETENTION_DAYS.
func (s *Sweeper) Cutoff() time.Time { return s.window().Cutoff(s.now()) }

func (s *Sweeper) window() retention.Window { return retention.Window{Days: s.retentionDays} }

// Sweep drops expired partitions once, under a Postgres advisory lock (a replica that does not get it
// skips). Each drop is counted; a sweep that dropped anything is audited as "retention.sweep".
func (s *Sweeper) Sweep(ctx context.Context) (SweepResult, error) {
	cutoff := s.Cutoff()
	res := SweepResult{Cutoff: cutoff.Format(time.DateOnly), Dropped: map[string][]string{}, Queued: map[string][]string{}}
	f, err := s.features()
	if err != nil {
		s.m.failed.Inc()
		return res, fmt.Errorf("retention sweep: %w", err)
	}
	// Whatever drops the days before the cutoff — this sweep, or the tables' TTL — the raw data of
	// those days is incomplete from now on: say so before dropping anything.
	if err := s.raiseFloor(ctx, s.window().CompleteFrom(time.Time{}, s.now())); err != nil {
		s.m.failed.Inc()
		return res, fmt.Errorf("retention sweep: %w", err)
	}
	if f.TTL {
		s.ttlOnce.Do(func() {
			s.log.Info("retention sweeper idle: the server supports TTL, the events tables expire rows themselves",
				"retention_days", s.retentionDays)
		})
		res.TTL = true
		return res, nil
	}
	unlock, ok, err := tryLock(ctx, s.pg, "analyticsd.retention."+s.db)
	if err != nil {
		s.m.failed.Inc()
		return res, fmt.Errorf("retention sweep: %w", err)
	}
	if !ok {
		res.Skipped = true
		return res, nil
	}
	defer unlock()
	var sweepErr error
	for _, table := range schema.Retained {
		if err := s.sweepTable(ctx, table.Name, cutoff, &res); err != nil {
			sweepErr = err
			break
		}
	}
	dropped := 0
	for _, ps := range res.Dropped {
		dropped += len(ps)
	}
	if dropped > 0 && s.audit != nil {
		meta := map[string]any{"dropped": res.Dropped, "cutoff": res.Cutoff, "retention_days": s.retentionDays}
		if len(res.Queued) > 0 {
			meta["queued"] = res.Queued
		}
		if sweepErr != nil {
			meta["error"] = excerpt.Of(sweepErr.Error(), 500)
		}
		actx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
		if err := s.audit.Record(actx, audit.Entry{Actor: "retention", Action: "retention.sweep", Target: s.db, Meta: meta}); err != nil {
			s.log.Error("retention sweep: audit", "err", err)
		}
		cancel()
	}
	if sweepErr != nil {
		s.m.failed.Inc()
		return res, sweepErr
	}
	s.log.Info("retention sweep done", "cutoff", res.Cutoff, "dropped", dropped)
	return res, nil
}

// queuedOnCluster reports whether err is an ON CLUSTER statement's wait running out while the hosts
// that have not run it yet will (they are down): code 159, "…going to execute the query in background".
func queuedOnCluster(err error) bool {
	var ex *clickhouse.Exception
	return errors.As(err, &ex) && ex.Code == 159 && strings.Contains(ex.Message, "in background")
}

func (s *Sweeper) sweepTable(ctx context.Context, table string, cutoff time.Time, res *SweepResult) error {
	// On a cluster the parts are on the shards: cluster() asks one replica of each (replicas hold the
	// same parts), and the drop below runs ON CLUSTER, on every replica.
	parts := "system.parts"
	if s.layout.Clustered() {
		parts = "cluster('" + s.layout.Cluster + "', system, parts)"
	}
	rows, err := s.ch.Query(ctx, "SELECT DISTINCT partition FROM "+parts+" WHERE database = ? AND table = ? AND active", s.db, s.layout.LocalName(table))
	if err != nil {
		return fmt.Errorf("retention sweep: list partitions of %s.%s: %w", s.db, table, err)
	}
	var ids []string
	for rows.Next() {
		var p string
		if err := rows.Scan(&p); err != nil {
			rows.Close()
			return fmt.Errorf("retention sweep: list partitions of %s.%s: %w", s.db, table, err)
		}
		ids = append(ids, p)
	}
	rows.Close()
	if err := rows.Err(); err != nil {
		return fmt.Errorf("retention sweep: list partitions of %s.%s: %w", s.db, table, err)
	}
	sort.Strings(ids)
	for _, p := range ids {
		day, err := time.Parse("20060102", p)
		if !partitionRe.MatchString(p) || err != nil {
			s.log.Warn("retention sweep: partition is not a YYYYMMDD day; leaving it", "table", table, "partition", p)
			continue
		}
		if !day.Before(cutoff) {
			continue
		}
		dctx := ctx
		if s.layout.Clustered() && s.DDLWait > 0 {
			dctx = clickhouse.Context(ctx, clickhouse.WithSettings(schema.DDLTaskTimeout(s.ch, s.DDLWait)))
		}
		down, err := s.layout.AlterLocal(dctx, s.ch, table, "DROP PARTITION "+p)
		if err != nil && !queuedOnCluster(err) {
			return fmt.Errorf("retention sweep: drop partition %s of %s.%s: %w", p, s.db, table, err)
		}
		if err != nil || len(down) > 0 {
			res.Queued[table] = append(res.Queued[table], p)
			s.log.Warn("retention sweep: a replica is down; the partition is dropped on the others and queued for it", "table", table, "partition", p, "down", down, "err", err)
		}
		res.Dropped[table] = append(res.Dropped[table], p)
		s.m.dropped.WithLabelValues(table).Inc()
		s.log.Info("retention sweep: dropped partition", "table", table, "partition", p)
	}
	return nil
}
