package ingest

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"sort"
	"sync/atomic"
	"time"

	"github.com/ClickHouse/clickhouse-go/v2/lib/driver"
	"github.com/google/uuid"

	"github.com/analyticsd/analyticsd/ingest/spool"
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
	// uncounted is told of tenant-days whose live counters counted a row that was not stored after
	// all (a duplicate found at ship time, or quarantined): their counters are rebuilt.
	uncounted func(tenant uuid.UUID, day time.Time)
	// eventMetrics maps events to the daily metrics the live counters count them toward, and counted
	// is told what a claim added (alerts); both set by the Service (nil: claims count nothing).
	eventMetrics map[string]string
	counted      func(tenant uuid.UUID, day time.Time, metric string, by, value int64)

	lastSuccess atomic.Int64 // unix nanoseconds of the last successful insert
	queries     atomic.Uint64
}

func newShipper(ch driver.Conn, db string, claims Claims, cfg WriterConfig, m *Metrics, log *slog.Logger) *shipper {
	return &shipper{ch: ch, db: db, claims: claims, cfg: cfg, metrics: m, log: log}
}

// item is one row on its way to ClickHouse.
type item struct {
	b       *batch
	i       int  // index in b.events or b.incs
	check   bool // ask ClickHouse first: it may have the row already
	unsure  bool // checked because its claim could not prove it new (not merely because of a retry)
	counted bool // the live counters counted it when it was accepted
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
	items, err := sh.resolve(ctx, bs, attempted)
	if err != nil {
		return 0, err
	}
	inserted := 0
	waited := !attempted
	refused := false
	for k, kind := range kinds {
		byDay := map[time.Time][]item{}
		for _, it := range items[k] {
			d := day(it.ts(kind))
			byDay[d] = append(byDay[d], it)
		}
		days := make([]time.Time, 0, len(byDay))
		for d := range byDay {
			days = append(days, d)
		}
		sort.Slice(days, func(i, j int) bool { return days[i].Before(days[j]) })
		for _, d := range days {
			its := byDay[d]
			if sh.expired(d) && slices.ContainsFunc(its, func(it item) bool { return it.check }) {
				// Rows that may already be stored, on a day retention may have dropped since: a check
				// could not see them, and inserting them again would count them twice in daily_usage
				// (kept forever). They are kept aside for an operator instead.
				var unsure []item
				its = slices.DeleteFunc(its, func(it item) bool {
					if it.check {
						unsure = append(unsure, it)
					}
					return it.check
				})
				if err := sh.quarantineRows(s, kind, unsure, "may already have been stored before its day left the "+
					fmt.Sprint(sh.cfg.RetentionDays)+"-day retention window, where ClickHouse can no longer be asked", nil); err != nil {
					return inserted, err
				}
			}
			if slices.ContainsFunc(its, func(it item) bool { return it.check }) {
				if !waited {
					// A timed-out insert of this segment may still be running on the server and commit
					// after we look: make sure none is before checking.
					if err := sh.awaitAttempts(ctx, s.id); err != nil {
						return inserted, err
					}
					waited = true
				}
				if its, err = sh.withoutStored(ctx, kind, its); err != nil {
					return inserted, err
				}
			}
			n, bad, err := sh.insertIsolating(ctx, s, kind, its)
			inserted += n
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
func (sh *shipper) resolve(ctx context.Context, bs []*batch, attempted bool) ([2][]item, error) {
	var out [2][]item
	kinds := [2]Kind{KindEvent, KindIncrement}
	rows := func(b *batch, k int) int {
		if k == 0 {
			return len(b.events)
		}
		return len(b.incs)
	}
	if sh.claims == nil {
		for _, b := range bs {
			for k := range kinds {
				for i := 0; i < rows(b, k); i++ {
					out[k] = append(out[k], item{b: b, i: i, check: attempted || b.checkAll})
				}
			}
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
	epochs := map[uuid.UUID]time.Time{}
	if len(tenants) > 0 {
		var err error
		if epochs, err = sh.claims.Epochs(ctx, tenants); err != nil {
			return out, fmt.Errorf("check claims before shipping: %w", err)
		}
	}
	type group struct {
		tenant uuid.UUID
		kind   Kind
	}
	verify := map[group][]item{}
	dups := 0
	for _, b := range bs {
		evDup, incDup, epoch, settled := b.claim.get()
		for k, kind := range kinds {
			dup := evDup
			if k == 1 {
				dup = incDup
			}
			for i := 0; i < rows(b, k); i++ {
				it := item{b: b, i: i}
				t := it.tenant(kind)
				if settled && len(dup) == rows(b, k) && epochs[t].Equal(epoch) {
					if dup[i] {
						dups++
						continue
					}
					it.counted = true // by the request-time claim
					it.unsure = !trusted(epoch, it.received(kind), window)
					it.check = attempted || b.checkAll || it.unsure
					out[k] = append(out[k], it)
					continue
				}
				// Counted if a request-time claim counted it before Redis lost the claims; unknown, so
				// a duplicate found now rebuilds the counters (see the Dup case below).
				it.counted = settled && i < len(dup) && !dup[i]
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
			now := time.Now()
			unit := func(i int) (string, int64, time.Time, time.Time) { return sh.unit(g.kind, part[i].b, part[i].i, now) }
			held, reclaimed, epoch, err := sh.claims.Verify(ctx, g.tenant, g.kind, ids, wids, unit, sh.countedFor(g.tenant))
			if err != nil {
				return out, fmt.Errorf("verify claims before shipping: %w", err)
			}
			k := 0
			if g.kind == KindIncrement {
				k = 1
			}
			for i, it := range part {
				switch {
				case !held[i]:
					dups++
					if it.counted {
						sh.uncount(it.tenant(g.kind), it.ts(g.kind))
					}
					continue
				case reclaimed[i]:
					it.unsure, it.check = true, true
					// Counted now, by Verify — unless received more than a window ago: then it may have
					// been counted when first claimed, and its counters are rebuilt instead.
					it.counted = now.Sub(it.received(g.kind)) < window
					if !it.counted {
						sh.uncount(it.tenant(g.kind), it.ts(g.kind))
					}
				default:
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
	return out, nil
}

// unit is what row i of b (of a kind) adds to the live counters when claimed at now: its metric, the
// amount, its UTC day, when it was received. Only today and yesterday have live counters.
func (sh *shipper) unit(kind Kind, b *batch, i int, now time.Time) (string, int64, time.Time, time.Time) {
	if sh.eventMetrics == nil || b.uncounted {
		return "", 0, time.Time{}, time.Time{}
	}
	var metric string
	var n int64
	var ts, received time.Time
	if kind == KindEvent {
		r := &b.events[i]
		metric, n, ts, received = sh.eventMetrics[r.Event], 1, r.Ts, r.ReceivedAt
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
	if sh.counted == nil {
		return nil
	}
	return func(d time.Time, metric string, by, value int64) { sh.counted(tenant, d, metric, by, value) }
}

func (sh *shipper) uncount(tenant uuid.UUID, ts time.Time) {
	if sh.uncounted != nil {
		sh.uncounted(tenant, day(ts))
	}
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
			lo, hi := its[part[0]].ts(kind), its[part[0]].ts(kind)
			for j, i := range part {
				ids[j] = its[i].key(kind).id
				lo, hi = minTime(lo, its[i].ts(kind)), maxTime(hi, its[i].ts(kind))
			}
			have, err := sh.stored(ctx, kind, tenant, lo, hi, ids)
			if err != nil {
				return nil, err
			}
			sh.metrics.CheckedRows.Add(float64(n))
			for _, i := range part {
				if have[its[i].key(kind).id] {
					drop[i] = true
					if its[i].counted && its[i].unsure {
						// Counted live as new, but an earlier copy was stored (and counted) before.
						sh.uncount(tenant, its[i].ts(kind))
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

// insertIsolating inserts its (one kind, one day). When ClickHouse refuses the insert outright it
// splits it — by tenant, then in halves — and inserts the parts, returning the rows it still refuses
// one by one. A failure that is not a refusal (the network, a timeout, the server's state) aborts
// with that error: the chunk is retried whole.
func (sh *shipper) insertIsolating(ctx context.Context, s *segment, kind Kind, its []item) (int, []refusal, error) {
	if len(its) == 0 {
		return 0, nil, nil
	}
	err := sh.insert(ctx, s, kind, its)
	if err == nil {
		sh.lastSuccess.Store(time.Now().UnixNano())
		return len(its), nil, nil
	}
	if !refusedRows(err) {
		return 0, nil, err
	}
	if len(its) == 1 {
		return 0, []refusal{{it: its[0], err: err, at: time.Now(), okBefore: sh.lastSuccess.Load()}}, nil
	}
	// A refused insert may still have written some rows (a materialized view failing after the table
	// took the block): never insert what is already there.
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
	if len(byTenant) > 1 {
		for _, p := range byTenant {
			parts = append(parts, p)
		}
	} else if len(its) > 0 {
		parts = [][]item{its[:len(its)/2], its[len(its)/2:]}
	}
	total := 0
	var bad []refusal
	for _, p := range parts {
		n, b, err := sh.insertIsolating(ctx, s, kind, p)
		total += n
		bad = append(bad, b...)
		if err != nil {
			return total, bad, err
		}
	}
	return total, bad, nil
}

// refusal is a row ClickHouse refused on its own: when, and the last successful insert before that.
type refusal struct {
	it       item
	err      error
	at       time.Time
	okBefore int64 // lastSuccess when the row was refused (unix nanoseconds)
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

// expired reports whether day d is older than the retention window (today - RetentionDays), where
// the sweeper or the table's TTL may have dropped its partition.
func (sh *shipper) expired(d time.Time) bool {
	return sh.cfg.RetentionDays > 0 && (retention.Window{Days: sh.cfg.RetentionDays}).Expired(d, time.Now())
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
	if cause != nil {
		info.Error = truncateTo(cause.Error(), 1000)
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
	for _, it := range its {
		delete(s.bad, it.key(kind))
		if it.counted {
			sh.uncount(it.tenant(kind), it.ts(kind))
		}
	}
	sh.metrics.Quarantined.Add(float64(len(its)))
	sh.log.Error("rows moved to the spool's quarantine; see `analyticsd spool status`, fix the cause, then `analyticsd spool requeue`",
		"file", info.Name, "rows", len(its), "tenants", info.Tenants, "reason", reason, "err", info.Error)
	return nil
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
