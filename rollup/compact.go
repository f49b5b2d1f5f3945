package rollup

import (
	"context"
	"fmt"
	"log/slog"
	"time"
)

// compact merges a closed day's events into one part, once the day has been reconciled. The events
// table is sorted by (tenant, hour, event, ts, id), so a day in one part keeps each tenant's events of
// one name together across the whole day, and that is what compresses: on the bench's data a merged
// day stores ~10 % fewer bytes than the same day left in the parts its inserts wrote, and ClickHouse's
// own merges need not ever get there (it leaves a handful of parts per day alone). A day already in one
// part is left as it is, so repeat runs cost one query; a late event for the day adds a part, and the
// next run over the day folds it in.
//
// Only whole-day runs of days before today compact (a per-tenant run must not rewrite everyone's day,
// and today is still being written). A failed compaction is logged and counted, not returned: the
// reconciled usage is committed by then, and the next run tries again.
func (r *Reconciler) compact(ctx context.Context, log *slog.Logger, day time.Time) bool {
	if !day.Before(Day(r.now())) {
		return false
	}
	partition := day.Format("20060102")
	var parts uint64
	err := r.ch.QueryRow(ctx, "SELECT count() FROM system.parts WHERE database = ? AND table = 'events' AND partition = ? AND active",
		r.db, partition).Scan(&parts)
	if err == nil && parts < 2 {
		return false
	}
	start := time.Now()
	if err == nil {
		// OPTIMIZE is not bounded by max_execution_time; the caller's context (the scheduler's run timeout)
		// is. The partition is a YYYYMMDD formatted here, never input.
		err = r.ch.Exec(ctx, fmt.Sprintf("OPTIMIZE TABLE %s.events PARTITION %s FINAL", r.db, partition))
	}
	if err != nil {
		r.m.compactions.WithLabelValues("failed").Inc()
		log.Warn("rollup: compacting the day's events failed; the next run over the day retries", "err", err)
		return false
	}
	r.m.compactions.WithLabelValues("ok").Inc()
	log.Info("rollup: compacted the day's events", "parts", parts, "took", time.Since(start))
	return true
}
