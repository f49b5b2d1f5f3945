// Package rollup reconciles daily usage from ClickHouse into Postgres and enforces raw-event retention.
//
// ClickHouse daily_usage (fed by materialized views) is the live aggregate; Postgres
// analytics_daily_usage is the billed record. For one UTC date the Reconciler makes the Postgres rows
// equal the ClickHouse truth in one transaction, checking the aggregate against the raw events and
// increments — plus the events user erasures deleted (erasure.Ledger: an erasure keeps the counts) —
// while the day is inside retention and repairing the aggregate when they disagree. A tenant whose
// tenant erasure is open is left alone: neither repaired nor published (see Reconciler.erasing). The
// Scheduler runs it daily on one replica at a time; the Sweeper drops expired daily partitions on
// servers without TTL. It does not ingest, serve reads (package query) or own any DDL (package schema).
package rollup

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"sort"
	"time"

	"github.com/ClickHouse/clickhouse-go/v2"
	"github.com/ClickHouse/clickhouse-go/v2/lib/driver"
	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/analyticsd/analyticsd/audit"
	"github.com/analyticsd/analyticsd/erasure"
	"github.com/analyticsd/analyticsd/internal/chlimit"
	"github.com/analyticsd/analyticsd/internal/clock"
	"github.com/analyticsd/analyticsd/internal/excerpt"
	"github.com/analyticsd/analyticsd/internal/logger"
	"github.com/analyticsd/analyticsd/retention"
)

// Day returns t's UTC date, as midnight UTC.
func Day(t time.Time) time.Time {
	t = t.UTC()
	return time.Date(t.Year(), t.Month(), t.Day(), 0, 0, 0, 0, time.UTC)
}

// Scope selects the tenants a run reconciles: every tenant (the zero value), or one.
type Scope struct {
	// Tenant, when not uuid.Nil, limits the run to that tenant's rows, in ClickHouse and in Postgres.
	Tenant uuid.UUID
}

// AllTenants is the scope of scheduled and CLI runs.
func AllTenants() Scope { return Scope{} }

// OneTenant is the scope of a tenant admin's on-demand run.
func OneTenant(id uuid.UUID) Scope { return Scope{Tenant: id} }

// All reports whether s covers every tenant.
func (s Scope) All() bool { return s.Tenant == uuid.Nil }

func (s Scope) tenantArg() *uuid.UUID {
	if s.All() {
		return nil
	}
	return &s.Tenant
}

// Result is what one run reconciled.
type Result struct {
	Date string `json:"date"`
	// Tenants, Metrics and Rows describe the date as Postgres holds it after the run: distinct tenants,
	// distinct metric names, and (tenant, metric) rows.
	Tenants int `json:"tenants"`
	Metrics int `json:"metrics"`
	Rows    int `json:"rows"`
	// Changed counts the Postgres rows this run inserted, updated or deleted; a repeat run with nothing
	// new in ClickHouse changes none.
	Changed int64 `json:"changed"`
	// Repaired counts ClickHouse aggregate rows that disagreed with the raw data and were corrected.
	Repaired int `json:"repaired"`
	// RawChecked: the aggregate was verified against raw events and increments (the day is in retention).
	RawChecked bool `json:"raw_checked"`
	// SkippedTenants counts tenant ids ClickHouse has for the date but Postgres does not know.
	SkippedTenants int   `json:"skipped_tenants,omitempty"`
	DurationMS     int64 `json:"duration_ms"`
}

// Reconciler makes Postgres analytics_daily_usage equal ClickHouse's truth for a date.
type Reconciler struct {
	ch            driver.Conn
	db            string
	pg            *pgxpool.Pool
	audit         *audit.Log
	log           *slog.Logger
	retentionDays int
	floor         *retention.Floor
	now           func() time.Time
	m             *reconcileMetrics

	// SettleDelay is how long a run waits before reading a disagreement between aggregate and raw data a
	// second time. An insert lands in events a moment before the materialized view adds it to
	// daily_usage, so a disagreement seen once may be an insert in flight; only a difference that is
	// the same in both reads is repaired. Default 2 s.
	SettleDelay time.Duration
	// QueryTimeout bounds each ClickHouse query (max_execution_time). Default 60 s.
	QueryTimeout time.Duration
	// Gate, when set, must pass before a run reads or writes anything: serve's checks of a
	// ClickHouse that was unreachable at start-up (a server outside UTC counts days wrongly).
	Gate func(context.Context) error
}

// NewReconciler returns a Reconciler over ClickHouse database db and Postgres pg. retentionDays is
// RETENTION_DAYS (raw data older than that is not checked); reg may be nil; now defaults to time.Now.
func NewReconciler(ch driver.Conn, db string, pg *pgxpool.Pool, auditLog *audit.Log, reg prometheus.Registerer,
	log *slog.Logger, retentionDays int, now func() time.Time) *Reconciler {
	log = logger.Or(log)
	if now == nil {
		now = clock.Now
	}
	return &Reconciler{ch: ch, db: db, pg: pg, audit: auditLog, log: log, retentionDays: retentionDays, now: now,
		floor: retention.NewFloor(pg, db), m: newReconcileMetrics(reg), SettleDelay: 2 * time.Second, QueryTimeout: 60 * time.Second}
}

// RunDate reconciles date's UTC day for scope. trigger names who asked, for rollup_runs and the audit
// log: "scheduler", "cli", "apikey:<prefix>", "jwt:<sub>".
//
// The run is recorded in rollup_runs ('running', then 'ok' or 'failed'), audited as "rollup.run" and
// counted in sbh_analytics_rollup_runs_total. Runs of the same date are serialized across processes
// (a Postgres transaction lock), so two runs never repair the same disagreement twice.
func (r *Reconciler) RunDate(ctx context.Context, date time.Time, scope Scope, trigger string) (Result, error) {
	return r.run(ctx, Day(date), scope, trigger, nil)
}

func (r *Reconciler) run(ctx context.Context, day time.Time, scope Scope, trigger string, slot *time.Time) (Result, error) {
	start := time.Now()
	res := Result{Date: day.Format(time.DateOnly)}
	if r.Gate != nil {
		if err := r.Gate(ctx); err != nil {
			return res, fmt.Errorf("rollup of %s: %w", res.Date, err)
		}
	}
	log := r.log.With("date", res.Date, "trigger", trigger)
	if !scope.All() {
		log = log.With("tenant", scope.Tenant)
	}
	var runID int64
	err := r.pg.QueryRow(ctx, "INSERT INTO rollup_runs (date, status, trigger, tenant_id, scheduled_for) "+
		"VALUES ($1::date, 'running', $2, $3, $4) RETURNING id", res.Date, trigger, scope.tenantArg(), slot).Scan(&runID)
	var tr truth
	if err != nil {
		err = fmt.Errorf("rollup %s: record run start: %w", res.Date, err)
	} else {
		tr, err = r.reconcile(ctx, log, day, scope, runID, &res)
	}
	elapsed := time.Since(start)
	res.DurationMS = elapsed.Milliseconds()
	r.m.duration.Observe(elapsed.Seconds())

	status := "ok"
	if err != nil {
		status = "failed"
		if runID != 0 {
			// A fresh context: the run must not stay 'running' because ctx was cancelled.
			fctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
			if _, uerr := r.pg.Exec(fctx, "UPDATE rollup_runs SET status = 'failed', finished_at = now(), error = $2 WHERE id = $1",
				runID, excerpt.Of(err.Error(), 2000)); uerr != nil {
				log.Error("rollup: record failed run", "run", runID, "err", uerr)
			}
			cancel()
		}
		log.Error("rollup failed", "run", runID, "took", elapsed, "err", err)
	} else {
		log.Info("rollup done", "run", runID, "tenants", res.Tenants, "metrics", res.Metrics, "rows", res.Rows,
			"changed", res.Changed, "repaired", res.Repaired, "raw_checked", res.RawChecked, "took", elapsed)
	}
	r.m.runs.WithLabelValues(status).Inc()
	r.record(ctx, log, scope, trigger, runID, status, res, tr, err)
	return res, err
}

// record writes the run's audit entry. Failing to audit is logged, not returned: by then the
// reconciled rows are committed, and rollup_runs holds the run either way.
func (r *Reconciler) record(ctx context.Context, log *slog.Logger, scope Scope, trigger string, runID int64, status string, res Result, tr truth, runErr error) {
	if r.audit == nil || runID == 0 {
		return
	}
	meta := map[string]any{
		"run_id": runID, "status": status, "scope": "all", "rows": res.Rows, "changed": res.Changed,
		"tenants": res.Tenants, "metrics": res.Metrics, "raw_checked": res.RawChecked,
		"repaired": res.Repaired, "skipped_tenants": res.SkippedTenants, "duration_ms": res.DurationMS,
	}
	if !scope.All() {
		meta["scope"] = "tenant"
	}
	if len(tr.repairs) > 0 {
		shown := tr.repairs
		if len(shown) > 100 {
			shown = shown[:100]
		}
		meta["repairs"] = shown
	}
	if tr.unsettled > 0 {
		meta["unsettled"] = tr.unsettled
	}
	if len(tr.held) > 0 {
		meta["held_tenants"] = tr.held
	}
	if runErr != nil {
		meta["error"] = excerpt.Of(runErr.Error(), 500)
	}
	actx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
	defer cancel()
	if err := r.audit.Record(actx, audit.Entry{TenantID: scope.Tenant, Actor: trigger, Action: "rollup.run", Target: res.Date, Meta: meta}); err != nil {
		log.Error("rollup: audit run", "run", runID, "err", err)
	}
}

type key struct {
	tenant uuid.UUID
	metric string
}

// repair is one aggregate row that disagreed with the raw data.
type repair struct {
	Tenant    uuid.UUID `json:"tenant"`
	Metric    string    `json:"metric"`
	Aggregate int64     `json:"aggregate"`
	Raw       int64     `json:"raw"`
}

// truth is what ClickHouse says date's counts are.
type truth struct {
	counts     map[key]int64 // non-zero counts only: a zero is no row
	rawChecked bool
	repairs    []repair
	unsettled  int // differences that changed between the two reads: left for the next run
	// held are the tenants with an open tenant erasure: their counts and repairs are dropped (hold).
	held []uuid.UUID
}

// hold drops the counts and repairs of tenants from tr and records them as held.
func (tr *truth) hold(tenants []uuid.UUID) {
	if len(tenants) == 0 {
		return
	}
	tr.held = tenants
	drop := make(map[uuid.UUID]bool, len(tenants))
	for _, id := range tenants {
		drop[id] = true
	}
	for k := range tr.counts {
		if drop[k.tenant] {
			delete(tr.counts, k)
		}
	}
	kept := tr.repairs[:0]
	for _, rp := range tr.repairs {
		if !drop[rp.Tenant] {
			kept = append(kept, rp)
		}
	}
	tr.repairs = kept
}

// reconcile does the work of one run inside one Postgres transaction.
func (r *Reconciler) reconcile(ctx context.Context, log *slog.Logger, day time.Time, scope Scope, runID int64, res *Result) (truth, error) {
	date := day.Format(time.DateOnly)
	tx, err := r.pg.Begin(ctx)
	if err != nil {
		return truth{}, fmt.Errorf("rollup %s: begin: %w", date, err)
	}
	defer func() { _ = tx.Rollback(context.WithoutCancel(ctx)) }()
	// One run per date at a time, in every process: repairs must not be applied twice.
	if _, err := tx.Exec(ctx, "SELECT pg_advisory_xact_lock(hashtext($1))", "analyticsd.rollup.date."+r.db+"."+date); err != nil {
		return truth{}, fmt.Errorf("rollup %s: take date lock: %w", date, err)
	}
	tr, err := r.truth(ctx, log, day, scope)
	if err != nil {
		return tr, err
	}
	// After the ClickHouse reads, before the repairs are written: see erasing.
	held, err := r.erasing(ctx, tx, scope)
	if err != nil {
		return truth{}, fmt.Errorf("rollup %s: %w", date, err)
	}
	if len(held) > 0 {
		log.Info("rollup: leaving tenants with an open tenant erasure alone", "tenants", held)
	}
	tr.hold(held)
	if err := r.writeRepairs(ctx, day, tr.repairs); err != nil {
		return truth{}, err
	}
	logRepairs(log, tr.repairs)
	r.m.repairs.Add(float64(len(tr.repairs)))
	res.RawChecked, res.Repaired = tr.rawChecked, len(tr.repairs)
	if err := r.publish(ctx, tx, log, day, scope, runID, tr, res); err != nil {
		return tr, err
	}
	if _, err := tx.Exec(ctx, "UPDATE rollup_runs SET status = 'ok', finished_at = now(), rows = $2 WHERE id = $1", runID, res.Rows); err != nil {
		return tr, fmt.Errorf("rollup %s: record run: %w", date, err)
	}
	if err := tx.Commit(ctx); err != nil {
		return tr, fmt.Errorf("rollup %s: commit: %w", date, err)
	}
	return tr, nil
}

// rawCheckable reports whether day's raw events and increments are all still stored: the day is on or
// after the retention floor (days before it lost rows to an earlier, shorter window) and after the
// cutoff (the day exactly RETENTION_DAYS old is not: a table TTL drops its parts over the course of
// today). A day that is not is never repaired from what is left of its raw data.
func (r *Reconciler) rawCheckable(ctx context.Context, day time.Time) (bool, error) {
	var floor time.Time
	if r.floor != nil {
		var err error
		if floor, err = r.floor.Get(ctx); err != nil {
			return false, err
		}
	}
	w := retention.Window{Days: r.retentionDays}
	return !day.Before(w.CompleteFrom(floor, r.now())), nil
}

// truth reads day's counts. Inside retention the aggregate is compared with the raw data; a difference
// that persists across two reads SettleDelay apart is repaired in daily_usage by inserting the
// difference (SummingMergeTree adds it up), and the raw counts are the truth either way.
func (r *Reconciler) truth(ctx context.Context, log *slog.Logger, day time.Time, scope Scope) (truth, error) {
	raw, err := r.rawCheckable(ctx, day)
	if err != nil {
		return truth{}, fmt.Errorf("rollup %s: %w", day.Format(time.DateOnly), err)
	}
	agg, rawCounts, err := r.read(ctx, day, scope, raw)
	if err != nil {
		return truth{}, err
	}
	if !raw {
		return truth{counts: nonZero(agg)}, nil
	}
	first := differences(agg, rawCounts)
	if len(first) == 0 {
		return truth{counts: nonZero(rawCounts), rawChecked: true}, nil
	}
	log.Info("rollup: daily_usage differs from raw data; reading again before repairing", "rows", len(first), "wait", r.SettleDelay)
	select {
	case <-ctx.Done():
		return truth{}, fmt.Errorf("rollup %s: %w", day.Format(time.DateOnly), ctx.Err())
	case <-time.After(r.SettleDelay):
	}
	if agg, rawCounts, err = r.read(ctx, day, scope, true); err != nil {
		return truth{}, err
	}
	tr := truth{counts: nonZero(rawCounts), rawChecked: true}
	for k, d := range differences(agg, rawCounts) {
		if first[k] != d {
			tr.unsettled++
			continue
		}
		tr.repairs = append(tr.repairs, repair{Tenant: k.tenant, Metric: k.metric, Aggregate: agg[k], Raw: rawCounts[k]})
	}
	sort.Slice(tr.repairs, func(i, j int) bool {
		a, b := tr.repairs[i], tr.repairs[j]
		if a.Tenant != b.Tenant {
			return a.Tenant.String() < b.Tenant.String()
		}
		return a.Metric < b.Metric
	})
	if tr.unsettled > 0 {
		log.Warn("rollup: daily_usage differences still changing (inserts in flight); publishing raw counts, the next run repairs what remains",
			"rows", tr.unsettled)
	}
	return tr, nil
}

func logRepairs(log *slog.Logger, repairs []repair) {
	for i, rp := range repairs {
		if i == 20 {
			log.Warn("rollup: more repairs not logged", "total", len(repairs))
			break
		}
		log.Warn("rollup: repaired daily_usage", "tenant", rp.Tenant, "metric", rp.Metric, "aggregate", rp.Aggregate, "raw", rp.Raw)
	}
}

// erasing returns the tenants (within scope) with an open tenant erasure: a job of kind 'tenant',
// queued or running. The run leaves them alone — no repair of their daily_usage, no billed row
// upserted or deleted — until the job is done (then they have nothing left) or failed (then the
// next run reconciles them as usual).
//
// Why: a tenant erasure deletes the tenant's ClickHouse rows first (events, increments, daily_usage)
// and its Postgres rows last (analytics_daily_usage, erased_usage). A repair is an insert into
// daily_usage; one computed before the delete mutation and inserted after it survives the job. Between
// the two steps the raw side is not even empty: the ledger of earlier user erasures (erased_usage)
// still adds its counts, so a run there saw an aggregate of 0 against the ledger's 5 and wrote the 5
// back for the erased tenant. Billed rows upserted while the job's Postgres step runs could likewise
// commit after its DELETE. Holding the whole tenant is simpler than telling safe repairs from unsafe
// ones, and costs nothing: a tenant being erased has no usage to bill.
//
// The check is made after the run's ClickHouse reads and just before its repair insert and its
// Postgres transaction's commit, so a job that is open when its delete could overlap the run is seen.
// It is not a lock: a job submitted between this check and the end of the repair insert is not seen.
// Before its ClickHouse delete such a job has to be taken by a runner (the queue is looked at every
// 4 × erasure Poll, 2 s by default), be acknowledged by every live instance and count the tenant's
// rows — several Postgres and ClickHouse round trips against the one insert left to this run; its
// Postgres step comes only after that delete is applied on every replica.
func (r *Reconciler) erasing(ctx context.Context, tx pgx.Tx, scope Scope) ([]uuid.UUID, error) {
	open, err := erasure.TenantsErasing(ctx, tx)
	if err != nil || scope.All() {
		return open, err
	}
	if slices.Contains(open, scope.Tenant) {
		return []uuid.UUID{scope.Tenant}, nil
	}
	return nil, nil
}

// truthQuery returns the ClickHouse query for day's aggregate counts and, when raw is set, the raw
// counts beside them, in one query so all three tables are read at (nearly) the same moment.
// excludeEvents is ANDed to the events' predicate: the erasure ledger's rows still being deleted.
// Columns: tenant_id, metric, aggregate[, raw].
func truthQuery(db string, day time.Time, scope Scope, raw bool, excludeEvents string) (string, []any) {
	var pred string
	var args []any
	if !scope.All() {
		pred = "tenant_id = ? AND "
	}
	tenantArgs := func() {
		if !scope.All() {
			args = append(args, scope.Tenant)
		}
	}
	// Date columns compare with toDate('YYYY-MM-DD'): a time.Time bound against a Date compares as DateTime.
	agg := "SELECT tenant_id, metric, sum(count) AS c FROM " + db + ".daily_usage WHERE " + pred +
		"date = toDate(?) GROUP BY tenant_id, metric"
	tenantArgs()
	args = append(args, day.Format(time.DateOnly))
	if !raw {
		return agg, args
	}
	end := day.Add(24 * time.Hour)
	q := "SELECT tenant_id, metric, sumIf(c, src = 0) AS aggregate, sumIf(c, src = 1) AS raw FROM (" +
		"SELECT tenant_id, metric, toUInt8(0) AS src, sum(count) AS c FROM " + db + ".daily_usage WHERE " + pred +
		"date = toDate(?) GROUP BY tenant_id, metric " +
		"UNION ALL SELECT tenant_id, event AS metric, toUInt8(1) AS src, toInt64(count()) AS c FROM " + db + ".events WHERE " + pred +
		"ts >= ? AND ts < ?" + excludeEvents + " GROUP BY tenant_id, metric " +
		"UNION ALL SELECT tenant_id, metric, toUInt8(1) AS src, sum(n) AS c FROM " + db + ".usage_increments WHERE " + pred +
		"ts >= ? AND ts < ? GROUP BY tenant_id, metric" +
		") GROUP BY tenant_id, metric"
	tenantArgs()
	args = append(args, day, end)
	tenantArgs()
	args = append(args, day, end)
	return q, args
}

// read reads day's aggregate counts and, when raw is set, its raw counts: events and increments
// plus what user erasures took out of the events (erasure.Ledger), so that an erasure, which keeps
// the aggregates, is no difference to repair. The ledger is read before and after the ClickHouse
// query; a round recorded or applied in between (its delete may have run while ClickHouse counted)
// makes it read both again.
func (r *Reconciler) read(ctx context.Context, day time.Time, scope Scope, raw bool) (agg, rawCounts map[key]int64, err error) {
	if !raw || r.pg == nil {
		return r.readOnce(ctx, day, scope, raw, erasure.Ledger{})
	}
	for attempt := 1; ; attempt++ {
		led, err := erasure.ReadLedger(ctx, r.pg, day, scope.Tenant)
		if err != nil {
			return nil, nil, fmt.Errorf("rollup %s: %w", day.Format(time.DateOnly), err)
		}
		if agg, rawCounts, err = r.readOnce(ctx, day, scope, raw, led); err != nil {
			return nil, nil, err
		}
		same, err := led.Unchanged(ctx, r.pg)
		if err != nil {
			return nil, nil, fmt.Errorf("rollup %s: %w", day.Format(time.DateOnly), err)
		}
		if same {
			for _, e := range led.Counts {
				rawCounts[key{e.Tenant, e.Metric}] += e.N
			}
			return agg, rawCounts, nil
		}
		if attempt == 5 {
			return nil, nil, fmt.Errorf("rollup %s: erasures changed the raw events during five reads; run again", day.Format(time.DateOnly))
		}
	}
}

func (r *Reconciler) readOnce(ctx context.Context, day time.Time, scope Scope, raw bool, led erasure.Ledger) (agg, rawCounts map[key]int64, err error) {
	q, args := truthQuery(r.db, day, scope, raw, led.ExcludeEvents())
	// The pending erasure rounds' ids make q long: max_query_size and the AST limits for it (the
	// ledger's, as every reader of it uses).
	extra := led.Settings(q)
	rows, err := r.ch.Query(chlimit.Context(ctx, r.QueryTimeout, extra), q, args...)
	if err != nil {
		return nil, nil, fmt.Errorf("rollup %s: read clickhouse: %w", day.Format(time.DateOnly), err)
	}
	defer rows.Close()
	agg, rawCounts = map[key]int64{}, map[key]int64{}
	for rows.Next() {
		var k key
		var a, w int64
		dest := []any{&k.tenant, &k.metric, &a}
		if raw {
			dest = append(dest, &w)
		}
		if err := rows.Scan(dest...); err != nil {
			return nil, nil, fmt.Errorf("rollup %s: scan clickhouse: %w", day.Format(time.DateOnly), err)
		}
		agg[k] = a
		if raw {
			rawCounts[k] = w
		}
	}
	if err := rows.Err(); err != nil {
		return nil, nil, fmt.Errorf("rollup %s: read clickhouse: %w", day.Format(time.DateOnly), err)
	}
	return agg, rawCounts, nil
}

// differences returns raw - aggregate for every key where they differ.
func differences(agg, raw map[key]int64) map[key]int64 {
	out := map[key]int64{}
	for k, a := range agg {
		if d := raw[k] - a; d != 0 {
			out[k] = d
		}
	}
	for k, w := range raw {
		if _, ok := agg[k]; !ok && w != 0 {
			out[k] = w
		}
	}
	return out
}

func nonZero(m map[key]int64) map[key]int64 {
	out := make(map[key]int64, len(m))
	for k, v := range m {
		if v != 0 {
			out[k] = v
		}
	}
	return out
}

// writeRepairs inserts, per repaired row, the difference raw - aggregate into daily_usage. Without
// insert_deduplicate=0 a cluster's replicated daily_usage would drop a repair equal to one of its
// last 100 blocks — two equal corrections (+1 for the same tenant, day and metric, a day apart) are
// two corrections, not a replay; one server never drops them, so the layouts would disagree.
func (r *Reconciler) writeRepairs(ctx context.Context, day time.Time, repairs []repair) error {
	if len(repairs) == 0 {
		return nil
	}
	ctx = clickhouse.Context(ctx, clickhouse.WithSettings(clickhouse.Settings{"insert_deduplicate": 0}))
	batch, err := r.ch.PrepareBatch(ctx, "INSERT INTO "+r.db+".daily_usage (tenant_id, date, metric, count)")
	if err != nil {
		return fmt.Errorf("rollup %s: repair daily_usage: prepare: %w", day.Format(time.DateOnly), err)
	}
	n := len(repairs)
	tenants, dates, metrics, counts := make([]uuid.UUID, n), make([]time.Time, n), make([]string, n), make([]int64, n)
	for i, rp := range repairs {
		tenants[i], dates[i], metrics[i], counts[i] = rp.Tenant, day, rp.Metric, rp.Raw-rp.Aggregate
	}
	for i, col := range []any{tenants, dates, metrics, counts} {
		if err := batch.Column(i).Append(col); err != nil {
			return errors.Join(fmt.Errorf("rollup %s: repair daily_usage: column %d: %w", day.Format(time.DateOnly), i, err), batch.Abort())
		}
	}
	if err := batch.Send(); err != nil {
		return fmt.Errorf("rollup %s: repair %d daily_usage rows: %w", day.Format(time.DateOnly), n, err)
	}
	return nil
}

// rowMeta is analytics_daily_usage.meta as the rollup writes it.
type rowMeta struct {
	Source       string `json:"source"`
	ReconciledAt string `json:"reconciled_at"`
	RunID        int64  `json:"run_id"`
	RawChecked   bool   `json:"raw_checked"`
	RepairedFrom *int64 `json:"repaired_from,omitempty"`
}

// publish makes day's rows in Postgres (within scope) equal tr: upserts rows whose count changed (or
// whose aggregate was repaired this run, to record it), deletes rows ClickHouse no longer has, and
// skips tenants Postgres does not know. The rows of tr.held tenants are left as they are.
func (r *Reconciler) publish(ctx context.Context, tx pgx.Tx, log *slog.Logger, day time.Time, scope Scope, runID int64, tr truth, res *Result) error {
	date := day.Format(time.DateOnly)
	seen := map[uuid.UUID]bool{}
	var ids []string
	for k := range tr.counts {
		if !seen[k.tenant] {
			seen[k.tenant] = true
			ids = append(ids, k.tenant.String())
		}
	}
	known := map[uuid.UUID]bool{}
	if len(ids) > 0 {
		rows, err := tx.Query(ctx, "SELECT id FROM tenants WHERE id = ANY($1::text[]::uuid[])", ids)
		if err != nil {
			return fmt.Errorf("rollup %s: read tenants: %w", date, err)
		}
		found, err := pgx.CollectRows(rows, pgx.RowTo[uuid.UUID])
		if err != nil {
			return fmt.Errorf("rollup %s: read tenants: %w", date, err)
		}
		for _, id := range found {
			known[id] = true
		}
	}
	if unknown := len(seen) - len(known); unknown > 0 {
		res.SkippedTenants = unknown
		var sample []string
		for id := range seen {
			if !known[id] && len(sample) < 5 {
				sample = append(sample, id.String())
			}
		}
		sort.Strings(sample)
		log.Warn("rollup: skipping ClickHouse tenants unknown to Postgres", "count", unknown, "sample", sample)
	}

	repaired := map[key]int64{}
	for _, rp := range tr.repairs {
		repaired[key{rp.Tenant, rp.Metric}] = rp.Aggregate
	}
	reconciledAt := r.now().UTC().Format(time.RFC3339)
	var tenants, metrics, metas []string
	var counts []int64
	names := map[string]bool{}
	perTenant := map[uuid.UUID]bool{}
	for k, c := range tr.counts {
		if !known[k.tenant] {
			continue
		}
		m := rowMeta{Source: "clickhouse", ReconciledAt: reconciledAt, RunID: runID, RawChecked: tr.rawChecked}
		if from, ok := repaired[k]; ok {
			m.RepairedFrom = &from
		}
		b, err := json.Marshal(m)
		if err != nil {
			return fmt.Errorf("rollup %s: encode meta: %w", date, err)
		}
		tenants, metrics, counts, metas = append(tenants, k.tenant.String()), append(metrics, k.metric), append(counts, c), append(metas, string(b))
		names[k.metric] = true
		perTenant[k.tenant] = true
	}
	res.Rows, res.Metrics, res.Tenants = len(tenants), len(names), len(perTenant)

	if len(tenants) > 0 {
		tag, err := tx.Exec(ctx, `INSERT INTO analytics_daily_usage AS u (tenant_id, date, metric, count, meta)
SELECT t.tenant_id::uuid, $1::date, t.metric, t.count, t.meta::jsonb
FROM unnest($2::text[], $3::text[], $4::bigint[], $5::text[]) AS t (tenant_id, metric, count, meta)
ON CONFLICT (tenant_id, date, metric) DO UPDATE SET count = EXCLUDED.count, meta = EXCLUDED.meta
WHERE u.count IS DISTINCT FROM EXCLUDED.count OR EXCLUDED.meta ? 'repaired_from'`, date, tenants, metrics, counts, metas)
		if err != nil {
			return fmt.Errorf("rollup %s: upsert analytics_daily_usage: %w", date, err)
		}
		res.Changed += tag.RowsAffected()
	}
	del := `DELETE FROM analytics_daily_usage AS u WHERE u.date = $1::date
AND NOT EXISTS (SELECT 1 FROM unnest($2::text[], $3::text[]) AS t (tenant_id, metric) WHERE t.tenant_id::uuid = u.tenant_id AND t.metric = u.metric)`
	args := []any{date, tenants, metrics}
	if !scope.All() {
		args = append(args, scope.Tenant)
		del += fmt.Sprintf(" AND u.tenant_id = $%d", len(args))
	}
	if len(tr.held) > 0 {
		args = append(args, tr.held)
		del += fmt.Sprintf(" AND u.tenant_id <> ALL($%d::uuid[])", len(args))
	}
	tag, err := tx.Exec(ctx, del, args...)
	if err != nil {
		return fmt.Errorf("rollup %s: delete stale analytics_daily_usage rows: %w", date, err)
	}
	res.Changed += tag.RowsAffected()
	return nil
}
