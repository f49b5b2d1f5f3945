package ingest

import (
	"encoding/binary"
	"errors"
	"fmt"
	"slices"
	"time"

	"github.com/google/uuid"

	"github.com/analyticsd/analyticsd/ingest/spool"
)

// Increment is one explicit increment_usage call: add N to Metric for the tenant on Ts's UTC day.
type Increment struct {
	ID       uuid.UUID
	TenantID uuid.UUID
	Ts       time.Time
	Metric   string
	N        int64
}

// A spool record holds the rows of one accepted request (one batch); package spool frames it with
// its length and a CRC-32C, so a record cut short by a crash is detected on replay. Its payload, in
// record format 2:
//
//	u64 batch id (little endian) | uvarint event count, events... | uvarint increment count, increments...
//	event: 16 id, 16 tenant, uvarint ts, uvarint received_at, 6 × (uvarint len, bytes)
//	increment: 16 id, 16 tenant, uvarint ts, (uvarint len, metric), varint n
//
// Format 1, written by the first release, is the same without the batch id. The batch id names the
// request that claimed its rows' ids (see Claims); replay needs it to tell its own claims from others'.
// Format 3 has format 2's layout; its batch ids carry two flags in bits 1 and 2 (widMinted,
// widUncounted), so a replayed batch is shipped as it would have been from memory.
const recordFormat byte = 3

// Flags in the batch id of a format-3 record.
const (
	widMinted    uint64 = 1 << 1 // every id was made by the server: no claim was made or is needed
	widUncounted uint64 = 1 << 2 // the live counters have the rows already (a consume's increment)
	widFlags            = widMinted | widUncounted
)

var errCorrupt = errors.New("corrupt spool record")

// batchFlags reads the flags of a batch id from a record of the given format (none before format 3).
func batchFlags(wid uint64, format byte) (minted, uncounted bool) {
	if format < 3 {
		return false, false
	}
	return wid&widMinted != 0, wid&widUncounted != 0
}

func appendString(b []byte, s string) []byte {
	b = binary.AppendUvarint(b, uint64(len(s)))
	return append(b, s...)
}

func appendTime(b []byte, t time.Time) []byte { return binary.AppendUvarint(b, uint64(t.Unix())) }

// appendRecord appends one framed record (format 2) to dst.
func appendRecord(dst []byte, wid uint64, events []Row, incs []Increment) []byte {
	dst = slices.Grow(dst, recordSize(events, incs)) // one allocation, not a doubling series
	dst, start := spool.FrameStart(dst)
	dst = binary.LittleEndian.AppendUint64(dst, wid)
	dst = binary.AppendUvarint(dst, uint64(len(events)))
	for i := range events {
		r := &events[i]
		dst = append(dst, r.ID[:]...)
		dst = append(dst, r.TenantID[:]...)
		dst = appendTime(dst, r.Ts)
		dst = appendTime(dst, r.ReceivedAt)
		dst = appendString(dst, r.Event)
		dst = appendString(dst, r.Source)
		dst = appendString(dst, r.UserID)
		dst = appendString(dst, r.Props)
		dst = appendString(dst, r.IP)
		dst = appendString(dst, r.RequestID)
	}
	dst = binary.AppendUvarint(dst, uint64(len(incs)))
	for i := range incs {
		in := &incs[i]
		dst = append(dst, in.ID[:]...)
		dst = append(dst, in.TenantID[:]...)
		dst = appendTime(dst, in.Ts)
		dst = appendString(dst, in.Metric)
		dst = binary.AppendVarint(dst, in.N)
	}
	return spool.FrameEnd(dst, start)
}

// recordSize bounds the encoded size of a framed record: every varint counted at its maximum length.
func recordSize(events []Row, incs []Increment) int {
	const v = binary.MaxVarintLen64
	n := spool.FrameOverhead + 8 + 2*v
	for i := range events {
		r := &events[i]
		n += 32 + 2*v + 6*v + len(r.Event) + len(r.Source) + len(r.UserID) + len(r.Props) + len(r.IP) + len(r.RequestID)
	}
	for i := range incs {
		n += 32 + v + v + len(incs[i].Metric) + v
	}
	return n
}

type decoder struct {
	b   []byte
	err error
}

func (d *decoder) uvarint() uint64 {
	if d.err != nil {
		return 0
	}
	v, n := binary.Uvarint(d.b)
	if n <= 0 {
		d.err = errCorrupt
		return 0
	}
	d.b = d.b[n:]
	return v
}

func (d *decoder) varint() int64 {
	if d.err != nil {
		return 0
	}
	v, n := binary.Varint(d.b)
	if n <= 0 {
		d.err = errCorrupt
		return 0
	}
	d.b = d.b[n:]
	return v
}

func (d *decoder) uuid() (u uuid.UUID) {
	if d.err != nil || len(d.b) < 16 {
		d.err = errCorrupt
		return u
	}
	copy(u[:], d.b[:16])
	d.b = d.b[16:]
	return u
}

func (d *decoder) time() time.Time { return time.Unix(int64(d.uvarint()), 0).UTC() }

func (d *decoder) string() string {
	n := d.uvarint()
	if d.err != nil || uint64(len(d.b)) < n {
		d.err = errCorrupt
		return ""
	}
	s := string(d.b[:n])
	d.b = d.b[n:]
	return s
}

// decodeRecord reads one record's payload in the given format, appending its rows to events and
// incs. Format 1 records have no batch id (0 is returned).
func decodeRecord(p []byte, format byte, events []Row, incs []Increment) (uint64, []Row, []Increment, error) {
	var wid uint64
	switch format {
	case spool.FormatLegacy:
	case 2, recordFormat:
		if len(p) < 8 {
			return 0, events, incs, errCorrupt
		}
		wid, p = binary.LittleEndian.Uint64(p), p[8:]
	default:
		return 0, events, incs, fmt.Errorf("%w: unknown record format %d", errCorrupt, format)
	}
	d := &decoder{b: p}
	n := d.uvarint()
	if n > uint64(len(p)) {
		return 0, events, incs, errCorrupt
	}
	base := len(events)
	for i := uint64(0); i < n && d.err == nil; i++ {
		events = append(events, Row{
			ID: d.uuid(), TenantID: d.uuid(), Ts: d.time(), ReceivedAt: d.time(),
			Event: d.string(), Source: d.string(), UserID: d.string(), Props: d.string(), IP: d.string(), RequestID: d.string(),
		})
	}
	m := d.uvarint()
	if m > uint64(len(p)) {
		return 0, events[:base], incs, errCorrupt
	}
	ibase := len(incs)
	for i := uint64(0); i < m && d.err == nil; i++ {
		incs = append(incs, Increment{ID: d.uuid(), TenantID: d.uuid(), Ts: d.time(), Metric: d.string(), N: d.varint()})
	}
	if d.err != nil || len(d.b) != 0 {
		return 0, events[:base], incs[:ibase], fmt.Errorf("%w: %d trailing bytes", errCorrupt, len(d.b))
	}
	return wid, events, incs, nil
}
