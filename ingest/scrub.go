package ingest

import (
	"context"
	"fmt"
	"sort"

	"github.com/google/uuid"

	"github.com/analyticsd/analyticsd/ingest/spool"
)

// ScrubQuarantine removes from the writer's spool quarantine the events of user in tenant, or every
// row of tenant when user is "" (package erasure's Scrubber), and returns how many rows it removed.
// It does nothing without a spool (memory durability).
func (w *Writer) ScrubQuarantine(_ context.Context, tenant uuid.UUID, user string) (int, error) {
	if w.sp == nil {
		return 0, nil
	}
	return ScrubQuarantine(w.sp, tenant, user)
}

// ScrubQuarantine rewrites each quarantine file of sp that holds rows of tenant (of user, when set)
// without them: the remaining rows go to a new file, written durably, and the old file is removed,
// under the old file's requeue lock. A crash between the two leaves both: the next scrub removes the
// rows from the old one as well, and a requeue checks every row in ClickHouse before inserting it, so
// the rows in both files are not stored twice. A file that cannot be read whole is left as it is,
// with an error.
func ScrubQuarantine(sp *spool.Spool, tenant uuid.UUID, user string) (int, error) {
	files, err := spool.ListQuarantine(sp.Dir())
	if err != nil {
		return 0, err
	}
	removed := 0
	for _, q := range files {
		n, err := scrubQuarantineFile(sp, q.Name, tenant, user)
		removed += n
		if err != nil {
			return removed, err
		}
	}
	return removed, nil
}

func scrubQuarantineFile(sp *spool.Spool, name string, tenant uuid.UUID, user string) (int, error) {
	r, info, err := spool.OpenQuarantine(sp.Dir(), name)
	if err != nil {
		return 0, err
	}
	defer r.Close()
	kept := spool.QuarantineInfo{Segment: info.Segment, Reason: info.Reason, Error: info.Error, Attempts: info.Attempts, Format: info.Format}
	if info.Format == spool.FormatLegacy {
		kept.Format = 2 // rewritten records carry a batch id (0 for these)
	}
	erased := func(t uuid.UUID, u string) bool { return t == tenant && (user == "" || u == user) }
	tenants := map[string]bool{}
	var recs [][]byte
	removed := 0
	for r.Next() {
		wid, events, incs, err := decodeRecord(r.Record(), info.Format, nil, nil)
		if err != nil {
			return 0, fmt.Errorf("scrub quarantine file %s: %w", name, err)
		}
		keepEvents := events[:0]
		for _, e := range events {
			if erased(e.TenantID, e.UserID) {
				removed++
				continue
			}
			keepEvents = append(keepEvents, e)
			tenants[e.TenantID.String()] = true
		}
		keepIncs := incs[:0]
		for _, in := range incs {
			if user == "" && in.TenantID == tenant { // increments carry no user: only a tenant's erasure takes them
				removed++
				continue
			}
			keepIncs = append(keepIncs, in)
			tenants[in.TenantID.String()] = true
		}
		if len(keepEvents)+len(keepIncs) == 0 {
			continue
		}
		kept.Events += len(keepEvents)
		kept.Increments += len(keepIncs)
		recs = append(recs, appendRecord(nil, wid, keepEvents, keepIncs)[spool.FrameOverhead:])
	}
	if r.Err() != nil || r.Torn() || len(r.Damage()) > 0 {
		return 0, fmt.Errorf("scrub quarantine file %s: it cannot be read whole (%v); left as it is", name, r.Err())
	}
	if removed == 0 {
		return 0, nil
	}
	if len(recs) > 0 {
		for t := range tenants {
			kept.Tenants = append(kept.Tenants, t)
		}
		sort.Strings(kept.Tenants)
		if _, err := sp.Quarantine(kept, recs); err != nil {
			return 0, fmt.Errorf("scrub quarantine file %s: %w", name, err)
		}
	}
	if err := spool.RemoveQuarantine(sp.Dir(), name); err != nil {
		return removed, fmt.Errorf("scrub quarantine file %s: %w", name, err)
	}
	return removed, nil
}
