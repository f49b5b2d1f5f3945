package ingest

import (
	"errors"
	"os"
	"time"

	"github.com/analyticsd/analyticsd/ingest/spool"
)

// SegmentSummary describes one spool segment, for `analyticsd spool inspect`.
type SegmentSummary struct {
	Seq        uint64    `json:"seq"`
	ID         string    `json:"id"`
	State      string    `json:"state"` // "waiting", "in_flight" (an insert was started: rows are checked before retrying)
	Format     byte      `json:"format"`
	Bytes      int64     `json:"bytes"`
	Records    int       `json:"records"`
	Events     int       `json:"events"`
	Increments int       `json:"increments"`
	Tenants    int       `json:"tenants"`
	FirstTs    time.Time `json:"first_ts,omitzero"`
	LastTs     time.Time `json:"last_ts,omitzero"`
	Received   time.Time `json:"first_received,omitzero"` // when its first row was accepted
	TornTail   bool      `json:"torn_tail,omitempty"`
	// DamagedAt lists the byte offsets of damaged stretches (not a torn write): the server keeps
	// them apart (spool.DamagedDir) when it ships the segment.
	DamagedAt []int64 `json:"damaged_at,omitempty"`
	Error     string  `json:"error,omitempty"`
}

// SpoolReport is what waits in a spool directory.
type SpoolReport struct {
	Dir    string        `json:"dir"`
	Holder *spool.Holder `json:"held_by,omitempty"`
	// HolderError: whether a process holds the spool could not be read.
	HolderError string                 `json:"held_by_error,omitempty"`
	Segments    []SegmentSummary       `json:"segments"`
	Quarantine  []spool.QuarantineInfo `json:"quarantine"`
	// Damaged are the damaged stretches of segments kept apart (spool.DamagedDir).
	Damaged    []spool.DamagedInfo `json:"damaged,omitempty"`
	Bytes      int64               `json:"bytes"`
	Events     int                 `json:"events"`
	Increments int                 `json:"increments"`
}

// RowVisitor receives every row InspectSpool reads (one of them is nil).
type RowVisitor func(seq uint64, ev *Row, inc *Increment)

// InspectSpool reads a spool directory without locking it — a running server's too — and
// summarises every segment and quarantine file. When visit is set it also receives each row of the
// segments whose seq is in only (all when only is empty).
func InspectSpool(dir string, only map[uint64]bool, visit RowVisitor) (SpoolReport, error) {
	rep := SpoolReport{Dir: dir, Segments: []SegmentSummary{}}
	h, held, err := spool.ReadHolder(dir)
	switch {
	case err != nil:
		// Not "no process holds it": an operator reading that could take a live spool for a retired one.
		rep.HolderError = err.Error()
	case held:
		rep.Holder = &h
	}
	segs, err := spool.List(dir)
	if err != nil {
		return rep, err
	}
	for _, g := range segs {
		sum := SegmentSummary{Seq: g.Seq, ID: g.ID(), State: "waiting", Format: g.Format, Bytes: g.Size()}
		if g.Inflight {
			sum.State = "in_flight"
		}
		tenants := map[[16]byte]bool{}
		r, err := g.Open()
		if errors.Is(err, os.ErrNotExist) && !g.Inflight {
			// Renamed to in-flight by its server since the listing.
			sum.State = "in_flight"
			r, err = g.OpenInflight()
		}
		if errors.Is(err, os.ErrNotExist) {
			continue // shipped and removed by its server since the listing
		}
		if err != nil {
			sum.Error = err.Error()
			rep.Segments = append(rep.Segments, sum)
			continue
		}
		see := func(ts, received time.Time) {
			if sum.FirstTs.IsZero() || ts.Before(sum.FirstTs) {
				sum.FirstTs = ts
			}
			if ts.After(sum.LastTs) {
				sum.LastTs = ts
			}
			if sum.Received.IsZero() || received.Before(sum.Received) {
				sum.Received = received
			}
		}
		for r.Next() {
			_, events, incs, err := decodeRecord(r.Record(), g.Format, nil, nil)
			if err != nil {
				sum.Error = err.Error()
				break
			}
			sum.Records++
			for i := range events {
				tenants[events[i].TenantID] = true
				see(events[i].Ts, events[i].ReceivedAt)
				if visit != nil && (len(only) == 0 || only[g.Seq]) {
					visit(g.Seq, &events[i], nil)
				}
			}
			for i := range incs {
				tenants[incs[i].TenantID] = true
				see(incs[i].Ts, incs[i].Ts)
				if visit != nil && (len(only) == 0 || only[g.Seq]) {
					visit(g.Seq, nil, &incs[i])
				}
			}
			sum.Events += len(events)
			sum.Increments += len(incs)
		}
		if r.Err() != nil {
			sum.Error = r.Err().Error()
		}
		sum.TornTail = r.Torn()
		for _, d := range r.Damage() {
			sum.DamagedAt = append(sum.DamagedAt, d.Offset)
		}
		r.Close()
		sum.Tenants = len(tenants)
		rep.Segments = append(rep.Segments, sum)
		rep.Bytes += sum.Bytes
		rep.Events += sum.Events
		rep.Increments += sum.Increments
	}
	if rep.Quarantine, err = spool.ListQuarantine(dir); err != nil {
		return rep, err
	}
	if rep.Quarantine == nil {
		rep.Quarantine = []spool.QuarantineInfo{}
	}
	if rep.Damaged, err = spool.ListDamaged(dir); err != nil {
		return rep, err
	}
	return rep, nil
}
