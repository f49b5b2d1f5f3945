package ingest

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"slices"
	"time"

	"github.com/google/uuid"
)

// Increment is one explicit increment_usage call: add N to Metric for the tenant on Ts's UTC day.
type Increment struct {
	ID       uuid.UUID
	TenantID uuid.UUID
	Ts       time.Time
	Metric   string
	N        int64
}

// A spool record holds the rows of one accepted request:
//
//	u32 payload length | u32 CRC-32C of payload | payload
//	payload: uvarint event count, events..., uvarint increment count, increments...
//	event: 16 id, 16 tenant, uvarint ts, uvarint received_at, 6 × (uvarint len, bytes)
//	increment: 16 id, 16 tenant, uvarint ts, (uvarint len, metric), varint n
//
// The CRC makes a torn tail — a write cut short by a crash, never acknowledged — detectable on replay.
const recordHeader = 8

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

var errCorrupt = errors.New("corrupt spool record")

func appendString(b []byte, s string) []byte {
	b = binary.AppendUvarint(b, uint64(len(s)))
	return append(b, s...)
}

func appendTime(b []byte, t time.Time) []byte { return binary.AppendUvarint(b, uint64(t.Unix())) }

// encodeRecord appends one framed record to dst.
func encodeRecord(dst []byte, events []Row, incs []Increment) []byte {
	dst = slices.Grow(dst, recordSize(events, incs)) // one allocation, not a doubling series
	start := len(dst)
	dst = append(dst, make([]byte, recordHeader)...)
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
	payload := dst[start+recordHeader:]
	binary.LittleEndian.PutUint32(dst[start:], uint32(len(payload)))
	binary.LittleEndian.PutUint32(dst[start+4:], crc32.Checksum(payload, castagnoli))
	return dst
}

// recordSize bounds the encoded size of a record: every varint counted at its maximum length.
func recordSize(events []Row, incs []Increment) int {
	const v = binary.MaxVarintLen64
	n := recordHeader + 2*v
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

// decodeRecords reads every intact record of a segment file's contents, appending to events and incs.
// It stops at the first torn or corrupt record and reports how many bytes were intact.
func decodeRecords(data []byte, events []Row, incs []Increment) ([]Row, []Increment, int) {
	off := 0
	for len(data)-off >= recordHeader {
		n := int(binary.LittleEndian.Uint32(data[off:]))
		sum := binary.LittleEndian.Uint32(data[off+4:])
		if n > len(data)-off-recordHeader {
			break
		}
		payload := data[off+recordHeader : off+recordHeader+n]
		if crc32.Checksum(payload, castagnoli) != sum {
			break
		}
		ev, in, err := decodePayload(payload, events, incs)
		if err != nil {
			break
		}
		events, incs = ev, in
		off += recordHeader + n
	}
	return events, incs, off
}

func decodePayload(p []byte, events []Row, incs []Increment) ([]Row, []Increment, error) {
	d := &decoder{b: p}
	n := d.uvarint()
	if n > uint64(len(p)) {
		return events, incs, errCorrupt
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
		return events[:base], incs, errCorrupt
	}
	ibase := len(incs)
	for i := uint64(0); i < m && d.err == nil; i++ {
		incs = append(incs, Increment{ID: d.uuid(), TenantID: d.uuid(), Ts: d.time(), Metric: d.string(), N: d.varint()})
	}
	if d.err != nil || len(d.b) != 0 {
		return events[:base], incs[:ibase], fmt.Errorf("%w: %d trailing bytes", errCorrupt, len(d.b))
	}
	return events, incs, nil
}
