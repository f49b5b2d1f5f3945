package ingest

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"github.com/ClickHouse/clickhouse-go/v2/lib/driver"
	"github.com/google/uuid"

	"github.com/analyticsd/analyticsd/ingest/spool"
	"github.com/analyticsd/analyticsd/internal/clock"
	"github.com/analyticsd/analyticsd/internal/excerpt"
	"github.com/analyticsd/analyticsd/retention"
)

// shipper moves a segment's rows into ClickHouse exactly once. For each chunk of rows it
//
//  1. drops duplicates: rows whose id another batch claimed (Claims), using what the request-time
//     claim found when that is still valid, and asking again (Verify) when it is not;
//  2. asks ClickHouse which rows it already has, for the rows that may be there: those of a segment
//     whose insert was tried before (a late or partial commit), and those whose claim cannot prove
//     them new (Redis lost its claims, or they expired). The check is bounded: one tenant, one day's
//     time range, a chunk's ids, sent as an external table;
//  3. inserts each UTC day on its own, so no insert ever spans more than one partition;
//  4. when ClickHouse refuses an insert outright (an exception that is not about the server's state),
//     splits it by tenant, then in halves, to find the rows it refuses; the rest goes in. Refused rows
//     are retried with the segment (parked meanwhile so it blocks nobody) and, once refused
//     QuarantineAfter times while other inserts succeed, written to the quarantine.
type shipper struct {
	ch      driver.Conn
	db      string
	claims  Claims
	cfg     WriterConfig
	metrics *Metrics
	log     *slog.Logger
	// quarantine is the spool's (nil in memory mode: refused rows are then retried forever).
	quarantine func(spool.QuarantineInfo, [][]byte) (spool.QuarantineInfo, error)
	// live is how shipping reaches the live counters, wired by NewService (nil: claims count
	// nothing). Swapped whole: a Service wired while the writer runs (tests build several on one
	// Writer) raced the claims reading the fields one by one.
	live atomic.Pointer[liveHooks]

	// lastSuccess is, per table (kind), when an insert last succeeded (unix nanoseconds): the
	// evidence that ClickHouse takes that table's rows and refuses only particular ones.
	lastSuccess [2]atomic.Int64
	queries     atomic.Uint64

	// history caches, per tenant and kind, whether ClickHouse holds rows received in the window
	// before the tenant's claim epoch (see complete).
	historyMu sync.Mutex
	history   map[historyKey]bool

	// floor caches cfg.Floor's answer, read at floorAt; floorAsked is when it was last asked.
	floorMu    sync.Mutex
	floor      time.Time
	floorAt    time.Time
	floorAsked time.Time

	// lossSettled is the instance up to which inserts were found done after the latest loss of
	// claims (awaitLoss), held across the wait.
	lossMu      sync.Mutex
	lossSettled time.Time
}

type historyKey struct {
	tenant uuid.UUID
	kind   Kind
	epoch  time.Time
}

func newShipper(ch driver.Conn, db string, claims Claims, cfg WriterConfig, m *Metrics, log *slog.Logger) *shipper {
	return &shipper{ch: ch, db: db, claims: claims, cfg: cfg, metrics: m, log: log}
}

// item is one row on its way to ClickHouse.
type item struct {
	b            *batch
	i            int   // index in b.events or b.incs
	day          int64 // the row's UTC day (unix days): its partition
	check        bool  // ask ClickHouse first: it may have the row already
	unsure       bool  // checked because its claim could not prove it new (not merely because of a retry)
	reclaimedNow bool  // its claim was missing and was made when shipping
	counted      bool  // the live counters counted it when it was accepted
	assumed      bool  // counted is assumed: whether its request-time claim ran is unknown
	epoch        time.Time
}

// ownCopy reports whether a stored copy of the row, received at `at`, can only be its own batch's
// earlier insert (replayed after a crash, retried after an ambiguous failure), which the batch's claim
// counted: nothing to take back. The batch holds the id in the tenant's current claim history, which
// began at it.epoch, and a copy received after the history's first seconds was claimed in that
// history — which only the holder can have done. Those seconds are the epoch's own and clock.MaxSkew
// more: the copy's received time is the receiving instance's clock, the epoch another process's. A
// copy received earlier may be another batch's, claimed in a history Redis lost and counted by it:
// this row's count is then the second one. (Before, every stored copy of an unsure row was taken
// back, and after a restart every row of a tenant younger than the window is unsure: a kill -9
// during an insert left the counter short until reconciliation.)
func (it item) ownCopy(at time.Time) bool {
	return !it.reclaimedNow && !it.epoch.IsZero() &&
		at.Truncate(time.Second).After(it.epoch.Truncate(time.Second).Add(clock.MaxSkew))
}

func (it item) event() *Row           { return &it.b.events[it.i] }
func (it item) increment() *Increment { return &it.b.incs[it.i] }

func (it item) key(kind Kind) rowKey {
	if kind == KindEvent {
		r := it.event()
		return rowKey{kind, r.TenantID, r.ID}
	}
	in := it.increment()
	return rowKey{kind, in.TenantID, in.ID}
}

func (it item) tenant(kind Kind) uuid.UUID { return it.key(kind).tenant }

func (it item) ts(kind Kind) time.Time {
	if kind == KindEvent {
		return it.event().Ts
	}
	return it.increment().Ts
}

// received is when the row was accepted (increments are stamped when they are accepted).
func (it item) received(kind Kind) time.Time {
	if kind == KindEvent {
		return it.event().ReceivedAt
	}
	return it.increment().Ts
}

func day(t time.Time) time.Time { return t.UTC().Truncate(24 * time.Hour) }

// shipChunk ships the rows of bs, returning how many were inserted. It returns errRefused when rows
// ClickHouse refuses are left for a later attempt; any other error means the chunk must be retried.
func (sh *shipper) shipChunk(s *segment, bs []*batch, attempted bool) (int, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*sh.cfg.InsertTimeout)
	defer cancel()
	kinds := [2]Kind{KindEvent, KindIncrement}
	sp := &shipment{budget: isolationBudget}
	items, err := sh.resolve(ctx, bs, attempted, sp)
	if err != nil {
		return 0, err
	}
	if len(s.quarantined) > 0 {
		// Rows this process already moved to the quarantine stay there when the segment is retried.
		for k, kind := range kinds {
			items[k] = slices.DeleteFunc(items[k], func(it item) bool { return s.quarantined[it.key(kind)] })
		}
	}
	inserted := 0
	waited := !attempted
	refused := false
	for k, kind := range kinds {
		// Rows go in in the order they came, which is the order their strings sit in memory: sorted
		// by day, copying them into the insert's columns missed the cache and cost three times as
		// much. Only the rows ClickHouse must be asked about first are handled day by day.
		ready := items[k]
		if slices.ContainsFunc(ready, func(it item) bool { return it.check }) {
			var left bool
			if ready, left, err = sh.settleChecks(ctx, s, kind, ready, &waited); err != nil {
				return inserted, err
			}
			refused = refused || left
		}
		if distinctDays(ready) > maxDaysPerInsert {
			ready = byDay(ready) // split into inserts of at most maxDaysPerInsert days below
		}
		// Days go in together, up to maxDaysPerInsert a statement: one INSERT per day made the
		// daily_usage view write one small part per day and segment, and ClickHouse's CPU per event
		// rose from 20 to 23-32 µs merging them (BENCHMARKS.md). A refused insert is split by day
		// first (insertIsolating), so no insert is ever refused for spanning days.
		for len(ready) > 0 {
			n := len(ready)
			if distinctDays(ready) > maxDaysPerInsert {
				n = daysPrefix(ready, maxDaysPerInsert)
			}
			ins, bad, err := sh.insertIsolating(ctx, s, kind, ready[:n], sp)
			ready = ready[n:]
			inserted += ins
			if err != nil {
				return inserted, err
			}
			if len(bad) > 0 {
				left, err := sh.handleRefused(s, kind, bad)
				if err != nil {
					return inserted, err
				}
				refused = refused || left
			}
		}
	}
	sh.metrics.RowsWritten.Add(float64(inserted))
	if refused {
		return inserted, errRefused
	}
	return inserted, nil
}

// resolve drops the duplicates among bs and says, for each remaining row, whether ClickHouse must be
// asked for it first. Rows are returned per kind: events, then increments.
func (sh *shipper) resolve(ctx context.Context, bs []*batch, attempted bool, sp *shipment) ([2][]item, error) {
	var out [2][]item
	kinds := [2]Kind{KindEvent, KindIncrement}
	rows := func(b *batch, k int) int {
		if k == 0 {
			return len(b.events)
		}
		return len(b.incs)
	}
	var total [2]int
	for _, b := range bs {
		total[0], total[1] = total[0]+len(b.events), total[1]+len(b.incs)
	}
	out[0], out[1] = make([]item, 0, total[0]), make([]item, 0, total[1])
	newItem := func(b *batch, k, i int) item {
		it := item{b: b, i: i}
		it.day = it.ts(kinds[k]).Unix() / 86400
		return it
	}
	// unclaimed passes a batch's rows on as they are: without claims, ClickHouse is asked only when
	// an earlier insert of them may have happened (or their history is unknown).
	unclaimed := func(b *batch) {
		for k := range kinds {
			for i := 0; i < rows(b, k); i++ {
				it := newItem(b, k, i)
				it.check = attempted || b.checkAll
				out[k] = append(out[k], it)
			}
		}
	}
	if sh.claims == nil {
		for _, b := range bs {
			unclaimed(b)
		}
		return out, nil
	}
	window := sh.claims.Window()
	// The request-time verdicts stand only while the tenant's claim history is the one they were
	// made in: a new epoch means Redis lost the claims since, and another copy may have claimed anew.
	var tenants []uuid.UUID
	seen := map[uuid.UUID]bool{}
	for _, b := range bs {
		if _, _, _, ok := b.claim.get(); !ok {
			continue
		}
		for k, kind := range kinds {
			for i := 0; i < rows(b, k); i++ {
				if t := (item{b: b, i: i}).tenant(kind); !seen[t] {
					seen[t] = true
					tenants = append(tenants, t)
				}
			}
		}
	}
	// The shipment keeps the histories its rows are judged in (those verified below join them).
	epochs := map[uuid.UUID]time.Time{}
	if len(tenants) > 0 {
		var err error
		if epochs, err = sh.claims.Epochs(ctx, tenants); err != nil {
			return out, fmt.Errorf("check claims before shipping: %w", err)
		}
	}
	sp.epochs = epochs
	type group struct {
		tenant uuid.UUID
		kind   Kind
	}
	verify := map[group][]item{}
	dups := 0
	for _, b := range bs {
		if b.minted {
			// Server-made ids: no copy can exist but one an earlier insert of these very rows
			// stored, which only an attempted insert can have done.
			unclaimed(b)
			continue
		}
		evDup, incDup, epoch, settled := b.claim.get()
		for k, kind := range kinds {
			dup := evDup
			if k == 1 {
				dup = incDup
			}
			for i := 0; i < rows(b, k); i++ {
				it := newItem(b, k, i)
				t := it.tenant(kind)
				if settled && len(dup) == rows(b, k) && epochs[t].Equal(epoch) {
					if dup[i] {
						dups++
						continue
					}
					it.counted = true // by the request-time claim
					it.epoch = epoch
					it.unsure = !trusted(epoch, it.received(kind), window)
					it.check = attempted || b.checkAll || it.unsure
					out[k] = append(out[k], it)
					continue
				}
				// Whether a claim counted it is unknown here (a segment left by a crashed process, a
				// claim whose answer was lost): take it as counted, so that if it turns out not to be
				// stored after all its counters are rebuilt — a rebuild is always safe, an overcount not.
				it.counted = !settled || (i < len(dup) && !dup[i])
				it.assumed = !settled
				verify[group{t, kind}] = append(verify[group{t, kind}], it)
			}
		}
	}
	for g, its := range verify {
		for len(its) > 0 {
			n := min(len(its), 5000)
			part := its[:n]
			its = its[n:]
			ids, wids := make([]uuid.UUID, n), make([]uint64, n)
			for i, it := range part {
				ids[i], wids[i] = it.key(g.kind).id, it.b.wid
			}
			now := clock.Now()
			unit := func(i int) (string, int64, time.Time, time.Time) { return sh.unit(g.kind, part[i].b, part[i].i, now) }
			held, reclaimed, epoch, err := sh.claims.Verify(ctx, g.tenant, g.kind, ids, wids, unit, sh.countedFor(g.tenant))
			if err != nil {
				return out, fmt.Errorf("verify claims before shipping: %w", err)
			}
			if e, ok := sp.epochs[g.tenant]; ok && !e.Equal(epoch) {
				// Redis lost claims since the epochs were read: verdicts judged against them are void.
				return out, historyChanged(g.tenant)
			}
			sp.epochs[g.tenant] = epoch
			k := 0
			if g.kind == KindIncrement {
				k = 1
			}
			for i, it := range part {
				switch {
				case !held[i]:
					dups++
					// Held by another batch. A claim counts only the ids it takes, and within a
					// window of the row's receipt an id this batch took would still be its own: so a
					// count that was only assumed was never made, and taking it back left the counter
					// short (a retry sent to another instance while this one could not reach Redis).
					if it.counted && !(it.assumed && now.Sub(it.received(g.kind)) < window) {
						sh.uncount(g.kind, it)
					}
					continue
				case reclaimed[i]:
					it.unsure, it.check, it.reclaimedNow = true, true, true
					// Counted now, by Verify — unless received more than a window ago: then it may have
					// been counted when first claimed, and its counters are rebuilt instead.
					it.counted = now.Sub(it.received(g.kind)) < window
					if !it.counted {
						sh.uncount(g.kind, it)
					}
				default:
					it.epoch = epoch
					it.unsure = !trusted(epoch, it.received(g.kind), window)
					it.check = attempted || it.b.checkAll || it.unsure
				}
				out[k] = append(out[k], it)
			}
		}
	}
	if dups > 0 {
		sh.metrics.Duplicates.WithLabelValues("ship").Add(float64(dups))
	}
	// Rows whose claims prove nothing are about to be judged by what ClickHouse holds: after a loss of
	// claims, not before the inserts of the lost histories that may still be under way are done.
	for k := range kinds {
		if slices.ContainsFunc(out[k], func(it item) bool { return it.unsure }) {
			if err := sh.awaitLoss(ctx); err != nil {
				return out, err
			}
			break
		}
	}
	// A claim history younger than the window proves nothing only if ClickHouse holds rows of the
	// tenant that were received before it began (within the window): rows whose claims Redis may
	// have lost. A tenant new to analyticsd, or idle for a window, has none, and its claims stand.
	for k, kind := range kinds {
		for i := range out[k] {
			it := &out[k][i]
			if !it.unsure || it.reclaimedNow {
				continue
			}
			complete, err := sh.complete(ctx, kind, it.tenant(kind), it.epoch)
			if err != nil {
				return out, err
			}
			if complete {
				it.unsure = false
				it.check = attempted || it.b.checkAll
			}
		}
	}
	return out, nil
}

// complete reports whether a tenant's claim history that began at epoch covers everything
// ClickHouse holds of it: no row of the kind was received in the window up to epoch (and
// clock.MaxSkew beyond). Asked once per tenant, kind and epoch.
func (sh *shipper) complete(ctx context.Context, kind Kind, tenant uuid.UUID, epoch time.Time) (bool, error) {
	k := historyKey{tenant, kind, epoch}
	// Held across the query: the first flusher to ship a tenant's rows under an epoch asks before
	// any of them is inserted, and the other waits for its answer. Asked later, the question would
	// see this process's own new rows (received in the epoch's second) and take them for old ones,
	// checking every row of the tenant for a window — which is what a second instance, or this one
	// after a restart, does when it first ships a young tenant's rows. (Sharing the first answer
	// through Redis was tried and withdrawn: a late commit of the lost history, or a history lost in
	// its own first second, would then have bound every instance to a wrong "complete".)
	sh.historyMu.Lock()
	defer sh.historyMu.Unlock()
	if v, ok := sh.history[k]; ok {
		return v, nil
	}
	// Up to clock.MaxSkew past the epoch's second: a row is stamped by the clock of the instance that
	// received it, the epoch by another's, so a row received (and claimed) before Redis lost its
	// claims may carry a later stamp — the tenant's first row, stored by an instance 2 s fast, was
	// missed and its retry stored again (TestAFirstRowStampedByAFastClockIsFoundAfterARedisLoss).
	// The cost: rows another instance stored in the history's first seconds make this answer "not
	// complete" too. (The bounds are whole seconds: a time.Time with nanoseconds is sent as
	// DateTime64, which 18.16 does not have.)
	q := "SELECT count() FROM " + sh.db + ".events WHERE tenant_id = ? AND received_at >= ? AND received_at <= ?"
	if kind == KindIncrement {
		q = "SELECT count() FROM " + sh.db + ".usage_increments WHERE tenant_id = ? AND ts >= ? AND ts <= ?"
	}
	var n uint64
	second := epoch.Truncate(time.Second)
	if err := sh.ch.QueryRow(ctx, q, tenant, second.Add(-sh.claims.Window()), second.Add(clock.MaxSkew)).Scan(&n); err != nil {
		return false, fmt.Errorf("check what clickhouse holds from before tenant %s's claims: %w", tenant, err)
	}
	if sh.history == nil || len(sh.history) > 100_000 {
		sh.history = map[historyKey]bool{}
	}
	sh.history[k] = n == 0
	return n == 0, nil
}

// liveHooks are the live counters' side of shipping.
type liveHooks struct {
	// uncounted is told of rows the live counters counted that were not stored after all (a
	// duplicate found at ship time, or quarantined): their counts are taken back.
	uncounted func(tenant uuid.UUID, day, received time.Time, metric string, n int64)
	// eventMetrics maps events to the daily metrics the live counters count them toward, and counted
	// is told what a claim added (alerts).
	eventMetrics map[string]string
	counted      func(tenant uuid.UUID, day time.Time, metric string, by, value int64)
}

// unit is what row i of b (of a kind) adds to the live counters when claimed at now: its metric, the
// amount, its UTC day, when it was received. Only today and yesterday have live counters.
func (sh *shipper) unit(kind Kind, b *batch, i int, now time.Time) (string, int64, time.Time, time.Time) {
	live := sh.live.Load()
	if live == nil || live.eventMetrics == nil || b.uncounted {
		return "", 0, time.Time{}, time.Time{}
	}
	var metric string
	var n int64
	var ts, received time.Time
	if kind == KindEvent {
		r := &b.events[i]
		metric, n, ts, received = live.eventMetrics[r.Event], 1, r.Ts, r.ReceivedAt
	} else {
		in := &b.incs[i]
		metric, n, ts, received = in.Metric, in.N, in.Ts, in.Ts
	}
	d, today := day(ts), day(now)
	if metric == "" || d.After(today) || d.Before(today.AddDate(0, 0, -1)) {
		return "", 0, time.Time{}, time.Time{}
	}
	return metric, n, d, received
}

// countedFor passes what a claim of tenant's rows added to the live counters on to the Service.
func (sh *shipper) countedFor(tenant uuid.UUID) Counted {
	live := sh.live.Load()
	if live == nil || live.counted == nil {
		return nil
	}
	return func(d time.Time, metric string, by, value int64) { live.counted(tenant, d, metric, by, value) }
}

// uncount takes a row's live count back: the counters counted it, but it is not stored.
func (sh *shipper) uncount(kind Kind, it item) {
	live := sh.live.Load()
	if live == nil || live.uncounted == nil {
		return
	}
	metric, n := "", int64(1)
	if kind == KindEvent {
		metric = live.eventMetrics[it.event().Event]
	} else {
		metric, n = it.increment().Metric, it.increment().N
	}
	if metric == "" {
		return
	}
	live.uncounted(it.tenant(kind), day(it.ts(kind)), it.received(kind), metric, n)
}

// withoutStored drops the rows of its (one kind, one day) that need a check and ClickHouse already has.
func (sh *shipper) withoutStored(ctx context.Context, kind Kind, its []item) ([]item, error) {
	byTenant := map[uuid.UUID][]int{}
	for i, it := range its {
		if it.check {
			t := it.tenant(kind)
			byTenant[t] = append(byTenant[t], i)
		}
	}
	drop := map[int]bool{}
	for tenant, idx := range byTenant {
		for len(idx) > 0 {
			n := min(len(idx), 50_000)
			part := idx[:n]
			idx = idx[n:]
			ids := make([]uuid.UUID, n)
			lo, hi := sh.searchRange(kind, its[part[0]])
			for j, i := range part {
				ids[j] = its[i].key(kind).id
				l, h := sh.searchRange(kind, its[i])
				lo, hi = minTime(lo, l), maxTime(hi, h)
			}
			have, err := sh.stored(ctx, kind, tenant, lo, hi, ids)
			if err != nil {
				return nil, err
			}
			sh.metrics.CheckedRows.Add(float64(n))
			for _, i := range part {
				if at, ok := have[its[i].key(kind).id]; ok {
					drop[i] = true
					if its[i].counted && its[i].unsure && !its[i].ownCopy(at) {
						// Counted live as new, but an earlier copy was stored (and counted) before.
						sh.uncount(kind, its[i])
					}
				}
			}
		}
	}
	if len(drop) == 0 {
		return its, nil
	}
	sh.metrics.Duplicates.WithLabelValues("clickhouse").Add(float64(len(drop)))
	out := make([]item, 0, len(its)-len(drop))
	for i, it := range its {
		if !drop[i] {
			out = append(out, it)
		}
	}
	return out, nil
}

// isolationBudget is how many inserts one attempt at a chunk may spend finding the rows ClickHouse
// refuses. Halving finds one bad row among 50,000 in ~32 inserts; a chunk refused whole would take
// two inserts per row (minutes, for a large one, blocking its flusher). Parts still refused when the
// budget is spent wait for the next attempt — the rows shipped meanwhile are found stored then.
const isolationBudget = 64

// maxDaysPerInsert bounds the days (partitions) one INSERT spans: half the server's default
// max_partitions_per_insert_block (100), which refuses an insert block spanning more.
const maxDaysPerInsert = 50

// settleChecks deals, day by day, with the rows of its that must be asked about first: on a day
// retention may have dropped they are quarantined (left reports that they could not be, in memory
// mode: their segment is retried); otherwise ClickHouse says which it has. It returns its without the
// rows stored already or set aside, in their order.
func (sh *shipper) settleChecks(ctx context.Context, s *segment, kind Kind, its []item, waited *bool) ([]item, bool, error) {
	var checks []item
	for _, it := range its {
		if it.check {
			checks = append(checks, it)
		}
	}
	drop := map[rowKey]bool{}
	left := false
	checks = byDay(checks)
	for len(checks) > 0 {
		n := daysPrefix(checks, 1)
		day := checks[:n:n]
		checks = checks[n:]
		gone, err := sh.expired(ctx, time.Unix(day[0].day*86400, 0).UTC())
		if err != nil {
			return nil, left, err
		}
		if gone != "" {
			// Rows that may already be stored, on a day retention may have dropped since: a check
			// could not see them, and inserting them again would count them twice in daily_usage
			// (kept forever). They are kept aside for an operator instead.
			err := sh.quarantineRows(s, kind, day, "may already have been stored before "+gone+
				", where ClickHouse can no longer be asked", nil)
			switch {
			case errors.Is(err, errRefused):
				left = true // no quarantine here (memory mode): kept for a retry; the other days go on
			case err != nil:
				return nil, left, err
			}
			for _, it := range day {
				drop[it.key(kind)] = true
			}
			continue
		}
		if !*waited {
			// A timed-out insert of this segment may still be running on the server and commit after
			// we look: make sure none is before checking.
			if err := sh.awaitAttempts(ctx, s.id); err != nil {
				return nil, left, err
			}
			*waited = true
		}
		kept, err := sh.withoutStored(ctx, kind, day)
		if err != nil {
			return nil, left, err
		}
		if len(kept) < len(day) {
			stay := make(map[rowKey]bool, len(kept))
			for _, it := range kept {
				stay[it.key(kind)] = true
			}
			for _, it := range day {
				if !stay[it.key(kind)] {
					drop[it.key(kind)] = true
				}
			}
		}
	}
	if len(drop) == 0 {
		return its, left, nil
	}
	return slices.DeleteFunc(its, func(it item) bool { return it.check && drop[it.key(kind)] }), left, nil
}

// distinctDays counts the days its span (up to maxDaysPerInsert+1: enough to know whether one insert
// may take them all).
func distinctDays(its []item) int {
	seen := map[int64]bool{}
	for _, it := range its {
		if seen[it.day] {
			continue
		}
		if seen[it.day] = true; len(seen) > maxDaysPerInsert {
			break
		}
	}
	return len(seen)
}

// byDay returns its grouped by day, days ascending, each day's rows in their order: placed by
// counting, in one pass (a stable sort of 50,000 64-byte items spent 3% of ingest CPU in rotations).
func byDay(its []item) []item {
	count := map[int64]int{}
	for _, it := range its {
		count[it.day]++
	}
	if len(count) <= 1 {
		return its
	}
	days := make([]int64, 0, len(count))
	for d := range count {
		days = append(days, d)
	}
	slices.Sort(days)
	next := make(map[int64]int, len(days))
	at := 0
	for _, d := range days {
		next[d] = at
		at += count[d]
	}
	out := make([]item, len(its))
	for _, it := range its {
		out[next[it.day]] = it
		next[it.day]++
	}
	return out
}

// daysPrefix is how many of its (sorted by day) span at most max days.
func daysPrefix(its []item, max int) int {
	days := 0
	for i, it := range its {
		if i == 0 || it.day != its[i-1].day {
			if days++; days > max {
				return i
			}
		}
	}
	return len(its)
}

// errNotTried: a part left for the next attempt once the isolation budget was spent.
var errNotTried = errors.New("not tried yet: this attempt's isolation budget is spent")

// kindIndex is a kind's index in per-table arrays (events 0, increments 1).
func kindIndex(kind Kind) int {
	if kind == KindIncrement {
		return 1
	}
	return 0
}

// searchRange is where in time ClickHouse may hold an earlier copy of it. A copy from an earlier
// attempt at this very row has its ts. A copy sent earlier by the client has the same ts when the
// client set it; or its own arrival time, within the window before this one arrived, when the server
// set it; or — when the client sent an age, as Segment's sentAt does — this ts moved back by the
// time between the tries, again within the window. A row that cannot be proven new is looked for in
// all of them. (Increments are always stamped on arrival.)
func (sh *shipper) searchRange(kind Kind, it item) (lo, hi time.Time) {
	ts := it.ts(kind)
	if !it.unsure || sh.claims == nil {
		return ts, ts
	}
	received := it.received(kind)
	return minTime(ts, received).Add(-sh.claims.Window()), maxTime(ts, received)
}

// insertIsolating inserts its (one kind, one day). When ClickHouse refuses the insert outright it
// splits it — by tenant, then in halves — and inserts the parts, returning the rows it still refuses
// (isolated one by one, or whole parts once the budget is spent). A failure that is not a refusal
// (the network, a timeout, the server's state) aborts with that error: the chunk is retried whole.
func (sh *shipper) insertIsolating(ctx context.Context, s *segment, kind Kind, its []item, sp *shipment) (int, []refusal, error) {
	if len(its) == 0 {
		return 0, nil, nil
	}
	now := time.Now()
	ok := &sh.lastSuccess[kindIndex(kind)]
	unresolved := func(err error) []refusal {
		out := make([]refusal, len(its))
		for i, it := range its {
			out[i] = refusal{it: it, err: err, at: now, okBefore: ok.Load()}
		}
		return out
	}
	if sp.budget <= 0 {
		return 0, unresolved(errNotTried), nil
	}
	sp.budget--
	err := sh.insert(ctx, s, kind, its, sp)
	if err == nil {
		ok.Store(time.Now().UnixNano())
		return len(its), nil, nil
	}
	if ctx.Err() != nil && len(its) > 1 {
		// The attempt's time ran out while isolating: what is left waits for the next attempt,
		// parked, instead of holding a flusher.
		return 0, unresolved(err), nil
	}
	multiDay := daysPrefix(its, 1) < len(its)
	if !refusedRows(err) && !(multiDay && tooManyPartitions(err)) {
		return 0, nil, err
	}
	if len(its) == 1 {
		r := unresolved(err)
		r[0].isolated = true
		return 0, r, nil
	}
	// A refused insert may still have written some rows (a materialized view failing after the table
	// took the block): never insert what is already there — once the server is done with it.
	if err := sh.awaitAttempts(ctx, s.id); err != nil {
		return 0, nil, err
	}
	for i := range its {
		its[i].check = true
	}
	its, cerr := sh.withoutStored(ctx, kind, its)
	if cerr != nil {
		return 0, nil, cerr
	}
	var parts [][]item
	byTenant := map[uuid.UUID][]item{}
	for _, it := range its {
		byTenant[it.tenant(kind)] = append(byTenant[it.tenant(kind)], it)
	}
	switch {
	case daysPrefix(its, 1) < len(its): // by day first
		its = byDay(its)
		for len(its) > 0 {
			n := daysPrefix(its, 1)
			parts, its = append(parts, its[:n]), its[n:]
		}
	case len(byTenant) > 1:
		for _, p := range byTenant {
			parts = append(parts, p)
		}
	case len(its) > 0:
		parts = [][]item{its[:len(its)/2], its[len(its)/2:]}
	}
	total := 0
	var bad []refusal
	for _, p := range parts {
		n, b, err := sh.insertIsolating(ctx, s, kind, p, sp)
		total += n
		bad = append(bad, b...)
		if err != nil {
			return total, bad, err
		}
	}
	return total, bad, nil
}

// refusal is a row ClickHouse refused: when, the last successful insert into its table before that,
// and whether it was refused on its own (isolated) or within a part not yet split up.
type refusal struct {
	it       item
	err      error
	at       time.Time
	okBefore int64 // lastSuccess of the row's table when it was refused (unix nanoseconds)
	isolated bool
}

// handleRefused records each refused row's history and quarantines the rows refused
// QuarantineAfter times, provided ClickHouse took some other insert after a row was first refused
// and before it refused it again: then the trouble is the row, not the server (a refusal of
// everything, or one that ends while the rows are being retried, quarantines nothing). It reports
// whether refused rows are left for a later try.
func (sh *shipper) handleRefused(s *segment, kind Kind, bad []refusal) (bool, error) {
	if s.bad == nil {
		s.bad = map[rowKey]*badRow{}
	}
	var quarantine []refusal
	left := false
	for _, r := range bad {
		if !r.isolated {
			left = true // inside a part not yet split up: no verdict on this row yet
			continue
		}
		k := r.it.key(kind)
		h := s.bad[k]
		if h == nil {
			h = &badRow{firstFail: r.at}
			s.bad[k] = h
		}
		h.attempts++
		h.err = r.err.Error()
		if r.okBefore > h.firstFail.UnixNano() {
			h.sawSuccess = true
		}
		if sh.quarantine != nil && h.attempts >= sh.cfg.QuarantineAfter && h.sawSuccess {
			quarantine = append(quarantine, r)
			continue
		}
		left = true
	}
	if len(quarantine) > 0 {
		its := make([]item, len(quarantine))
		for i, r := range quarantine {
			its[i] = r.it
		}
		h := s.bad[quarantine[0].it.key(kind)]
		reason := fmt.Sprintf("refused by clickhouse %d times while other inserts succeeded", h.attempts)
		if err := sh.quarantineRows(s, kind, its, reason, quarantine[0].err); err != nil {
			return true, err
		}
	}
	if left {
		sh.log.Warn("clickhouse refuses rows; retrying them later, the rest of the segment is shipped",
			"segment", s.id, "rows", len(bad), "err", bad[0].err)
	}
	return left, nil
}

// expired says why day d's partition may have been dropped by the sweeper or the table's TTL — it is
// older than the retention window (today - RetentionDays), or than the retention floor — or "" when
// it is kept. (Before, the floor was not read: with the window raised from 30 to 90 days, a replayed
// row of day -40, stored once before its partition was dropped, was checked, not found, and counted
// a second time in daily_usage.) Only rows that must be checked ask, so the floor is read from
// Postgres at most once a minute; while it cannot be read the last one read stands, and before any
// was read the attempt fails, retried later.
func (sh *shipper) expired(ctx context.Context, d time.Time) (string, error) {
	now := clock.Now()
	if sh.cfg.RetentionDays > 0 && (retention.Window{Days: sh.cfg.RetentionDays}).Expired(d, now) {
		return fmt.Sprintf("its day left the %d-day retention window", sh.cfg.RetentionDays), nil
	}
	if sh.cfg.Floor == nil {
		return "", nil
	}
	sh.floorMu.Lock()
	defer sh.floorMu.Unlock()
	if sh.floorAt.IsZero() || now.Sub(sh.floorAsked) > time.Minute {
		sh.floorAsked = now
		f, err := sh.cfg.Floor(ctx)
		switch {
		case err == nil:
			sh.floor, sh.floorAt = f, now
		case sh.floorAt.IsZero():
			return "", fmt.Errorf("read the retention floor before checking rows of %s: %w", d.Format(time.DateOnly), err)
		default:
			// The floor only moves when retention drops a day, at most daily: the last one read
			// stands while Postgres is away (asked again a minute later).
			sh.log.Warn("retention floor not read; using the last one read", "floor", sh.floor.Format(time.DateOnly),
				"read_at", sh.floorAt, "err", err)
		}
	}
	if d.Before(sh.floor) {
		return "retention dropped its day (raw rows are complete from " + sh.floor.Format(time.DateOnly) + " on)", nil
	}
	return "", nil
}

// quarantineRows writes its (one kind) to the quarantine, durably, before they leave the segment.
// Without a quarantine (memory mode) they cannot be set aside: errRefused keeps them for a retry.
func (sh *shipper) quarantineRows(s *segment, kind Kind, its []item, reason string, cause error) error {
	if len(its) == 0 {
		return nil
	}
	if sh.quarantine == nil {
		return errRefused
	}
	byBatch := map[*batch][]item{}
	var order []*batch
	tenants := map[string]bool{}
	for _, it := range its {
		if byBatch[it.b] == nil {
			order = append(order, it.b)
		}
		byBatch[it.b] = append(byBatch[it.b], it)
		tenants[it.tenant(kind).String()] = true
	}
	info := spool.QuarantineInfo{Segment: s.id, Reason: reason}
	if s.file != nil && s.file.Format < recordFormat {
		// Batches of an older segment keep their ids, whose flag bits are random there: written as
		// format 2, they are read back without flags.
		info.Format = 2
	}
	if cause != nil {
		info.Error = excerpt.Of(cause.Error(), 1000)
	}
	if h := s.bad[its[0].key(kind)]; h != nil {
		info.Attempts = h.attempts
	}
	for t := range tenants {
		info.Tenants = append(info.Tenants, t)
	}
	sort.Strings(info.Tenants)
	var recs [][]byte
	for _, b := range order {
		var events []Row
		var incs []Increment
		for _, it := range byBatch[b] {
			if kind == KindEvent {
				events = append(events, *it.event())
			} else {
				incs = append(incs, *it.increment())
			}
		}
		info.Events += len(events)
		info.Increments += len(incs)
		rec := appendRecord(nil, b.wid, events, incs)
		recs = append(recs, rec[spool.FrameOverhead:]) // the spool frames each record itself
	}
	info, err := sh.quarantine(info, recs)
	if err != nil {
		return fmt.Errorf("quarantine rows: %w", err)
	}
	if s.quarantined == nil {
		s.quarantined = map[rowKey]bool{}
	}
	for _, it := range its {
		delete(s.bad, it.key(kind))
		s.quarantined[it.key(kind)] = true
		if it.counted {
			sh.uncount(kind, it)
		}
	}
	sh.metrics.Quarantined.Add(float64(len(its)))
	sh.log.Error("rows moved to the spool's quarantine; see `analyticsd spool status`, fix the cause, then `analyticsd spool requeue`",
		"file", info.Name, "rows", len(its), "tenants", info.Tenants, "reason", reason, "err", info.Error)
	return nil
}

// tooManyPartitions reports the server refusing an insert block that spans more partitions than
// max_partitions_per_insert_block allows (code 252, which also means "too many parts": merges are
// behind — told apart by the caller, who knows whether the insert spanned several days).
func tooManyPartitions(err error) bool {
	var ex *clickhouseException
	return errors.As(err, &ex) && ex.Code == 252
}

// refusedRows reports whether err is ClickHouse refusing the rows themselves, as opposed to the
// network, a timeout, or a state of the server that no split can get around (out of disk, read-only,
// too many parts, a missing table): those are retried whole, and never quarantine anything.
func refusedRows(err error) bool {
	var ex *clickhouseException
	if !errors.As(err, &ex) {
		return false
	}
	switch ex.Code {
	case 3, 32, // unexpected end of data: the connection broke
		16, 47, 60, 81, // a missing column, identifier, table or database: the schema, not the rows
		159, 209, 210, // timeouts and network errors reported by the server
		164, 242, // read-only
		202, 203, // too many simultaneous queries, no free connection
		225, 999, // ZooKeeper / Keeper unavailable
		236, 394, // aborted, cancelled (our own KILL QUERY)
		241,      // memory limit: the server's state
		243,      // not enough space
		252,      // too many parts: merges are behind (and one insert never spans more than one day)
		279,      // a cluster with every replica of a shard down (ALL_CONNECTION_TRIES_FAILED)
		319,      // unknown status of insert
		425,      // system error
		497, 516: // access denied, authentication failed
		return false
	}
	return true
}

func minTime(a, b time.Time) time.Time {
	if b.Before(a) {
		return b
	}
	return a
}

func maxTime(a, b time.Time) time.Time {
	if b.After(a) {
		return b
	}
	return a
}
