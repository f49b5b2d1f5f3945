package quota

import (
	"bytes"
	"context"
	"fmt"
	"maps"
	"slices"
	"time"

	"github.com/ClickHouse/clickhouse-go/v2"
	"github.com/google/uuid"

	"github.com/analyticsd/analyticsd/erasure"
)

// minuteCounts is what ClickHouse holds for one day: tenant -> metric -> received minute -> count.
type minuteCounts map[uuid.UUID]map[string]map[int64]int64

func (m minuteCounts) add(tenant uuid.UUID, metric string, min int64, n int64) {
	if m[tenant] == nil {
		m[tenant] = map[string]map[int64]int64{}
	}
	if m[tenant][metric] == nil {
		m[tenant][metric] = map[int64]int64{}
	}
	m[tenant][metric][min] += n
}

// clickhouseCounts reads, per tenant, daily metric and received minute, what ClickHouse holds for
// day d: mapped events by their received_at, increments by their ts (which is when they were
// received), plus the events user erasures took out (erasure.Ledger: an erasure keeps the counts).
// tenant uuid.Nil reads every tenant. Two GROUP BY queries over the day's partition, between two
// reads of the ledger: a round recorded or applied meanwhile (its delete may have run while
// ClickHouse counted) makes it read again.
func (s *Service) clickhouseCounts(ctx context.Context, tenant uuid.UUID, d time.Time) (minuteCounts, error) {
	for attempt := 1; ; attempt++ {
		var led erasure.Ledger
		if s.pg != nil {
			var err error
			if led, err = erasure.ReadLedger(ctx, s.pg, d, tenant); err != nil {
				return nil, err
			}
		}
		out, err := s.clickhouseCountsOnce(ctx, tenant, d, led)
		if err != nil || s.pg == nil {
			return out, err
		}
		same, err := led.Unchanged(ctx, s.pg)
		if err != nil {
			return nil, err
		}
		if same {
			for _, e := range led.Counts {
				if metric, ok := s.cfg.EventMetrics[e.Metric]; ok {
					out.add(e.Tenant, metric, e.Minute, e.N)
				}
			}
			return out, nil
		}
		if attempt == 5 {
			return nil, fmt.Errorf("erasures changed the raw events during five reads of %s", d.Format(time.DateOnly))
		}
	}
}

func (s *Service) clickhouseCountsOnce(ctx context.Context, tenant uuid.UUID, d time.Time, led erasure.Ledger) (minuteCounts, error) {
	out := minuteCounts{}
	events := make([]string, 0, len(s.cfg.EventMetrics))
	for ev := range s.cfg.EventMetrics {
		events = append(events, ev)
	}
	where, args := "ts >= ? AND ts < ?", []any{d, d.Add(24 * time.Hour)}
	if tenant != uuid.Nil {
		where, args = "tenant_id = ? AND "+where, append([]any{tenant}, args...)
	}
	if len(events) > 0 {
		q := "SELECT tenant_id, event, intDiv(toUInt32(received_at), 60) AS m, toInt64(count()) FROM " + s.db +
			".events WHERE " + where + " AND has(?, event)" + led.ExcludeEvents() + " GROUP BY tenant_id, event, m"
		ectx := ctx
		if set := led.Settings(q); set != nil { // max_query_size and the AST limits: 12 pending rounds of a day exceed both
			ectx = clickhouse.Context(ctx, clickhouse.WithSettings(set))
		}
		if err := s.addMinutes(ectx, out, func(ev string) string { return s.cfg.EventMetrics[ev] }, q, append(args, events)...); err != nil {
			return nil, fmt.Errorf("count mapped events per minute: %w", err)
		}
	}
	q := "SELECT tenant_id, metric, intDiv(toUInt32(ts), 60) AS m, toInt64(sum(n)) FROM " + s.db +
		".usage_increments WHERE " + where + " GROUP BY tenant_id, metric, m"
	if err := s.addMinutes(ctx, out, func(m string) string { return m }, q, args...); err != nil {
		return nil, fmt.Errorf("count usage increments per minute: %w", err)
	}
	return out, nil
}

// addMinutes adds the (tenant, name, minute, count) rows of a query to out, under metric(name).
func (s *Service) addMinutes(ctx context.Context, out minuteCounts, metric func(string) string, query string, args ...any) error {
	rows, err := s.ch.Query(ctx, query, args...)
	if err != nil {
		return err
	}
	defer rows.Close()
	for rows.Next() {
		var t uuid.UUID
		var name string
		var m uint32
		var n int64
		if err := rows.Scan(&t, &name, &m, &n); err != nil {
			return err
		}
		out.add(t, metric(name), int64(m), n)
	}
	return rows.Err()
}

// reconcileTenant brings one tenant's counters for day d to ClickHouse's counts, every minute of
// every metric, and marks the day reconciled: what a read or consume does when Redis lost the day.
func (s *Service) reconcileTenant(ctx context.Context, tenant uuid.UUID, d time.Time) error {
	counts, err := s.clickhouseCounts(ctx, tenant, d)
	if err != nil {
		return err
	}
	now := s.now()
	values := map[string]int64{}
	for metric, base := range s.withQuotaMetrics(ctx, tenant, counts[tenant]) {
		res, err := s.counters.Reconcile(ctx, tenant, metric, d, now.Add(-SettleAfter), base)
		if err != nil {
			return err
		}
		values[metric] = res.After
	}
	s.catchUpAlerts(ctx, d, map[uuid.UUID]map[string]int64{tenant: values})
	return s.counters.MarkReconciled(ctx, tenant, d, now)
}

// withQuotaMetrics adds to a tenant's ClickHouse counts (metric -> minute -> count) every daily quota
// metric it lacks, with no counts: those counters are recomputed, and settled, from their live
// counts alone (a consume whose record never landed).
func (s *Service) withQuotaMetrics(ctx context.Context, tenant uuid.UUID, metrics map[string]map[int64]int64) map[string]map[int64]int64 {
	if metrics == nil {
		metrics = map[string]map[int64]int64{}
	}
	for m := range s.limits.For(ctx, tenant) {
		if _, ok := metrics[m]; !ok && IsDaily(m) {
			metrics[m] = nil
		}
	}
	return metrics
}

// reconciler runs the periodic reconciliation: every interval one instance (whichever takes the
// lock) reads ClickHouse's counts per tenant, metric and received minute for today and yesterday,
// and applies them. It remembers what it sent and sends only minutes that changed, except for a
// tenant-day Redis no longer marks reconciled and on every tenth round, when it sends everything
// (a Redis failover can lose any key).
type reconciler struct {
	s     *Service
	every time.Duration
	sent  map[sentKey]int64
	round int
	// values holds, during a day of a round, each counter's value after it was recomputed (for
	// catching up alerts).
	values map[uuid.UUID]map[string]int64
	// afterCheck, when set (tests), runs between a day's check for erasures and its writes.
	afterCheck func()
}

type sentKey struct {
	tenant uuid.UUID
	metric string
	day    int64
	minute int64
}

// ReconcileStats is what one round did.
type ReconcileStats struct {
	Ran      bool // false: another instance holds this round
	Counters int  // counters recomputed
	Minutes  int  // minute counts sent to Redis
	Changed  int  // counters whose value the round changed
}

// RunReconciler reconciles the live counters with ClickHouse every `every` until ctx ends.
func (s *Service) RunReconciler(ctx context.Context, every time.Duration) {
	r := &reconciler{s: s, every: every, sent: map[sentKey]int64{}}
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		start := time.Now()
		st, err := r.run(ctx)
		s.metrics.reconcileSeconds.Observe(time.Since(start).Seconds())
		if err != nil {
			s.log.Warn("quota counters not reconciled with clickhouse this round", "err", err)
			continue
		}
		if st.Changed > 0 {
			s.metrics.reconcileChanged.Add(float64(st.Changed))
			s.log.Info("quota counters reconciled with clickhouse", "counters", st.Counters, "changed", st.Changed, "minutes", st.Minutes)
		}
	}
}

// ReconcileOnce runs one full round now, whether or not another instance is running one (rounds
// are idempotent: the lock only saves work).
func (s *Service) ReconcileOnce(ctx context.Context) (ReconcileStats, error) {
	r := &reconciler{s: s, sent: map[sentKey]int64{}}
	return r.run(ctx)
}

func (r *reconciler) run(ctx context.Context) (ReconcileStats, error) {
	var st ReconcileStats
	if r.every > 0 {
		ok, err := r.s.counters.rdb.SetNX(ctx, r.s.counters.prefix+"quota:reconcile:lock", 1, max(r.every-100*time.Millisecond, 100*time.Millisecond)).Result()
		if err != nil || !ok {
			return st, err
		}
		// A round goes on past one tenant's error, so a Redis that answers nothing (every command
		// waiting out its timeout) must not hold it for longer than the interval.
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, max(r.every, 10*time.Second))
		defer cancel()
	}
	st.Ran = true
	r.round++
	full := r.round%10 == 1
	if full {
		clear(r.sent)
	}
	now := r.s.now()
	today := now.UTC().Truncate(24 * time.Hour)
	began, err := r.s.pgNow(ctx)
	if err != nil {
		return st, err
	}
	r.s.catchUpLevelAlerts(ctx) // Postgres only: before the ClickHouse reads a round may fail on
	var first error
	failed, tried := 0, 0
	for _, d := range []time.Time{today.Add(-24 * time.Hour), today} {
		counts, err := r.s.clickhouseCounts(ctx, uuid.Nil, d)
		if err != nil {
			return st, err
		}
		if full {
			// Tenants with live counts but no stored row this day (a consume whose record never
			// landed) are not in ClickHouse's answer; Redis knows them by their reconciled mark.
			marked, err := r.s.counters.ReconciledTenants(ctx, d)
			if err != nil {
				return st, err
			}
			for _, t := range marked {
				if counts[t] == nil {
					counts[t] = map[string]map[int64]int64{}
				}
			}
		}
		// After the ClickHouse reads: a tenant erasure whose delete may have run since the round
		// began may have deleted rows these counts still hold (and removed the keys they would go to).
		erasing, err := r.s.erasing(ctx, began)
		if err != nil {
			return st, err
		}
		for _, t := range erasing {
			delete(counts, t)
		}
		if r.afterCheck != nil {
			r.afterCheck()
		}
		// One tenant's failure (a key Redis refuses) does not stop the others'.
		written := map[uuid.UUID][]string{}
		r.values = map[uuid.UUID]map[string]int64{}
		for _, tenant := range slices.SortedFunc(maps.Keys(counts), func(a, b uuid.UUID) int { return bytes.Compare(a[:], b[:]) }) {
			tried++
			metrics, err := r.tenant(ctx, &st, tenant, counts[tenant], d, now, full)
			written[tenant] = metrics
			if err != nil {
				failed++
				if first == nil {
					first = err
				}
			}
		}
		// An erasure can also begin after that check and delete the tenant's rows and keys before
		// the writes above: take back what was written for any tenant that now shows one.
		again, err := r.s.erasing(ctx, began)
		if err != nil {
			return st, err
		}
		for _, t := range again {
			delete(r.values, t)
			if metrics, ok := written[t]; ok {
				if err := r.s.counters.Forget(ctx, t, d, metrics); err != nil && first == nil {
					first = err
				}
			}
		}
		r.s.catchUpAlerts(ctx, d, r.values)
	}
	if first != nil {
		return st, fmt.Errorf("%d of %d tenant-days' counters not reconciled; first: %w", failed, tried, first)
	}
	return st, nil
}

// erasing lists the tenants a round that began at `began` (Postgres' clock) must not write back:
// those whose tenant erasure is past its acknowledgements (its delete may be running) or ended since.
func (s *Service) erasing(ctx context.Context, began time.Time) ([]uuid.UUID, error) {
	if s.pg == nil {
		return nil, nil
	}
	return erasure.TenantsDeleting(ctx, s.pg, began)
}

// tenant reconciles one tenant's counters of day d with its ClickHouse counts and marks the day; it
// returns the metrics whose counters it wrote (or began to).
func (r *reconciler) tenant(ctx context.Context, st *ReconcileStats, tenant uuid.UUID, metrics map[string]map[int64]int64, d, now time.Time, full bool) ([]string, error) {
	_, at, err := r.s.counters.Read(ctx, tenant, d, nil)
	if err != nil {
		return nil, err
	}
	var written []string
	for metric, base := range r.s.withQuotaMetrics(ctx, tenant, metrics) {
		written = append(written, metric)
		if err := r.apply(ctx, st, tenant, metric, d, now, base, full || at.IsZero()); err != nil {
			return written, err
		}
	}
	return written, r.s.counters.MarkReconciled(ctx, tenant, d, now)
}

// pgNow is Postgres' clock (zero without Postgres): erasure jobs record their times by it.
func (s *Service) pgNow(ctx context.Context) (time.Time, error) {
	var t time.Time
	if s.pg == nil {
		return t, nil
	}
	if err := s.pg.QueryRow(ctx, "SELECT now()").Scan(&t); err != nil {
		return t, fmt.Errorf("read postgres' clock: %w", err)
	}
	return t, nil
}

// apply sends one counter's ClickHouse counts — the minutes that changed since the last round, or
// all of them — and recomputes it. When Redis turns out to have lost the counter's ClickHouse hash
// since (a flush or failover after the round began), it sends all of them at once.
func (r *reconciler) apply(ctx context.Context, st *ReconcileStats, tenant uuid.UUID, metric string, d, now time.Time, base map[int64]int64, all bool) error {
	for {
		send := map[int64]int64{}
		for m, n := range base {
			if k := (sentKey{tenant, metric, d.Unix(), m}); all || r.sent[k] != n {
				send[m] = n
			}
		}
		res, err := r.s.counters.Reconcile(ctx, tenant, metric, d, now.Add(-SettleAfter), send)
		if err != nil {
			return err
		}
		if !res.HadBase && !all && len(base) > len(send) {
			all = true
			continue
		}
		for m, n := range send {
			r.sent[sentKey{tenant, metric, d.Unix(), m}] = n
		}
		if r.values != nil {
			if r.values[tenant] == nil {
				r.values[tenant] = map[string]int64{}
			}
			r.values[tenant][metric] = res.After
		}
		st.Counters++
		st.Minutes += len(send)
		if res.Before != res.After {
			st.Changed++
		}
		return nil
	}
}
