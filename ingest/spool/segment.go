package spool

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"os"
	"slices"
)

// Segment is one spool file: appended to while active, then sealed, shipped and removed.
type Segment struct {
	Seq uint64
	// UID names the segment for its whole life, across renames and restarts (zero for legacy files).
	UID [16]byte
	// Format is the record format version the writer used (FormatLegacy for files without a header).
	Format byte
	// Inflight: an insert of this segment was started, so some of its rows may be in ClickHouse.
	Inflight bool
	// Recovered: the segment was left by an earlier process (found at Open).
	Recovered bool

	sp   *Spool
	path string
	f    *os.File
	size int64
}

// ID is the segment's UID as hex, or its sequence number for legacy segments.
func (g *Segment) ID() string {
	if g.UID == ([16]byte{}) {
		return fmt.Sprintf("legacy-%d", g.Seq)
	}
	return hex.EncodeToString(g.UID[:])
}

// Path is the segment's current file.
func (g *Segment) Path() string { return g.path }

// Size is the segment's size on disk.
func (g *Segment) Size() int64 { return g.size }

func (g *Segment) readHeader() error {
	f, err := os.Open(g.path)
	if err != nil {
		return fmt.Errorf("open spool segment %s: %w", g.path, err)
	}
	defer f.Close()
	return g.headerFrom(f)
}

// headerFrom sets the segment's format (and UID) from the start of its file.
func (g *Segment) headerFrom(f *os.File) error {
	var hdr [headerSize]byte
	n, err := f.ReadAt(hdr[:], 0)
	if err != nil && !errors.Is(err, io.EOF) {
		return fmt.Errorf("read spool segment %s: %w", f.Name(), err)
	}
	switch {
	case n < len(magic) && string(hdr[:n]) == magic[:n]:
		// Empty, or its header being written (a running server's, read by `spool inspect`): a new
		// segment with nothing in it yet. Read as a first-release one, its header's bytes were
		// taken for a broken record, and the search for the next frame found the first record.
		g.Format = 0
	case n >= len(magic) && string(hdr[:len(magic)]) == magic:
		if n < headerSize {
			// Created, then the process died before the header reached the disk: nothing was
			// acknowledged into it (or, for a running server's, its header is being written).
			g.Format = 0
			return nil
		}
		g.Format = hdr[len(magic)]
		copy(g.UID[:], hdr[len(magic)+1:])
	default:
		// A first-release segment: records from byte 0. (Its first four bytes are a record length
		// below 1 GiB, which can never read as "ADSP".)
		g.Format = FormatLegacy
	}
	return nil
}

func (g *Segment) dataStart() int64 {
	if g.Format == FormatLegacy {
		return 0
	}
	return int64(headerSize)
}

// Append writes buf — whole frames — at the end of the segment and, in Sync mode, fsyncs it. On
// failure the file is cut back to where it was, so a partial write can never be replayed as if it
// had been acknowledged.
func (g *Segment) Append(buf []byte) error {
	if g.f == nil {
		return fmt.Errorf("append to spool segment %d: segment is sealed", g.Seq)
	}
	n, err := g.f.Write(buf)
	if err == nil && g.sp.opts.Sync {
		err = g.f.Sync()
	}
	if err != nil {
		if terr := g.f.Truncate(g.size); terr != nil {
			err = errors.Join(err, terr)
		}
		_, _ = g.f.Seek(g.size, io.SeekStart)
		return err
	}
	g.size += int64(n)
	g.sp.bytes.Add(int64(n))
	return nil
}

// Seal closes the segment for appends.
func (g *Segment) Seal() error {
	if g.f == nil {
		return nil
	}
	err := g.f.Close()
	g.f = nil
	return err
}

// Empty reports whether the segment holds no record.
func (g *Segment) Empty() bool { return g.size <= g.dataStart() }

// MarkInflight renames a sealed segment to *.inflight before its first insert, durably (in Sync
// mode): if the process dies mid-insert, the next one knows to check ClickHouse for its rows.
func (g *Segment) MarkInflight() error {
	if g.Inflight {
		return nil
	}
	to := g.sp.segPath(g.Seq, inflightExt)
	if g.path != to {
		if err := os.Rename(g.path, to); err != nil {
			return fmt.Errorf("mark spool segment %d in flight: %w", g.Seq, err)
		}
		g.path = to
	}
	if g.sp.opts.Sync {
		// Without this a power loss could bring back the *.seg name after ClickHouse committed the
		// insert, and the replay would then skip the check. Until it succeeds the segment is not in
		// flight: the next call syncs again before any insert.
		if err := g.sp.opts.syncDir(g.sp.opts.Dir); err != nil {
			return fmt.Errorf("mark spool segment %d in flight: sync dir: %w", g.Seq, err)
		}
	}
	g.Inflight = true
	return nil
}

// Open returns a reader over the segment's records, streamed from disk.
func (g *Segment) Open() (*Reader, error) { return g.open(g.path) }

// OpenInflight opens a waiting segment listed without the lock under the name its server gave it
// since, when it started inserting it: for a reader racing a running server.
func (g *Segment) OpenInflight() (*Reader, error) { return g.open(g.sp.segPath(g.Seq, inflightExt)) }

func (g *Segment) open(path string) (*Reader, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("read spool segment %s: %w", path, err)
	}
	if g.Format == 0 {
		// Its header was incomplete when it was listed: a running server's new segment, whose
		// records may have followed since.
		if err := g.headerFrom(f); err != nil {
			f.Close()
			return nil, err
		}
	}
	r, err := newReader(f, g.dataStart())
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("read spool segment %s: %w", path, err)
	}
	if g.Format == 0 {
		r.left = 0 // no header, no records: any that follow were written after we looked
	}
	return r, nil
}

const frameHeader = 8

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// FrameStart reserves a frame header at the end of dst; append the payload, then call FrameEnd with
// the returned offset. A frame is built in place, without copying its payload.
func FrameStart(dst []byte) ([]byte, int) {
	return append(dst, make([]byte, frameHeader)...), len(dst)
}

// FrameEnd fills in the header of the frame started at start.
func FrameEnd(dst []byte, start int) []byte {
	payload := dst[start+frameHeader:]
	binary.LittleEndian.PutUint32(dst[start:], uint32(len(payload)))
	binary.LittleEndian.PutUint32(dst[start+4:], crc32.Checksum(payload, castagnoli))
	return dst
}

// FrameOverhead is the bytes a frame adds to its payload.
const FrameOverhead = frameHeader

// Reader streams a segment's intact records. Read them with Next and Record. A frame that cannot
// be read — cut short, a bad checksum, a length that does not fit — is either the torn tail of the
// write a crash cut short, never acknowledged (Torn; ignored), or damage: bit rot, a bad copy (a
// crash tears only the last write, since a failed append is cut back). Damage reports it:
//
//   - a frame whose length fits but whose checksum fails, with an intact frame where it ends: that
//     frame's bytes are damage, and reading goes on at its end (where its own header says);
//   - otherwise, when an intact frame can be found anywhere after it: everything from it to the end
//     of the file is damage, kept as it was, and reading ends. Frames found by searching are never
//     read as records: a record's payload holds client bytes (user ids, props), so a client can
//     plant a well-formed frame inside its own, for a torn write to expose;
//   - otherwise it is a torn tail.
type Reader struct {
	f       *os.File
	br      *bufio.Reader
	pos     int64 // file offset of the next frame
	left    int64 // bytes from pos to the end of the file
	intact  int64 // bytes of whole records read, from the data start
	rec     []byte
	torn    bool
	damage  []Damage
	err     error
	hdr     [frameHeader]byte
	onClose func()
}

// Damage is a stretch of a spool file that is neither records nor a torn tail, as it was on disk.
type Damage struct {
	Offset int64
	Bytes  []byte
}

func newReader(f *os.File, start int64) (*Reader, error) {
	info, err := f.Stat()
	if err != nil {
		return nil, err
	}
	if _, err := f.Seek(start, io.SeekStart); err != nil {
		return nil, err
	}
	return &Reader{f: f, br: bufio.NewReaderSize(f, 256<<10), pos: start, left: max(info.Size()-start, 0)}, nil
}

// Next reads the next intact record, reporting false at the end, at a torn tail or on an error.
func (r *Reader) Next() bool {
	for r.err == nil && !r.torn && r.left > 0 {
		if r.left < frameHeader {
			r.torn = true
			return false
		}
		if _, err := io.ReadFull(r.br, r.hdr[:]); err != nil {
			r.err = err
			return false
		}
		// No record is empty: eight zero bytes are a tail the file system extended but never wrote.
		n := int64(binary.LittleEndian.Uint32(r.hdr[:]))
		if n == 0 || n > r.left-frameHeader {
			r.broken()
			return false
		}
		if int64(cap(r.rec)) < n {
			r.rec = make([]byte, n)
		}
		r.rec = r.rec[:n]
		if _, err := io.ReadFull(r.br, r.rec); err != nil {
			r.err = err
			return false
		}
		if crc32.Checksum(r.rec, castagnoli) == binary.LittleEndian.Uint32(r.hdr[4:]) {
			r.pos += frameHeader + n
			r.left -= frameHeader + n
			r.intact += frameHeader + n
			return true
		}
		// Its length fits: if an intact frame starts where it ends, only this frame is damaged.
		end := r.pos + frameHeader + n
		ok, err := r.intactAt(end, r.left-frameHeader-n)
		if err != nil {
			r.err = err
			return false
		}
		if !ok {
			r.broken()
			return false
		}
		if len(r.damage) >= maxDamage {
			r.restIsDamage(nil)
			return false
		}
		r.damage = append(r.damage, Damage{Offset: r.pos, Bytes: append(slices.Clone(r.hdr[:]), r.rec...)})
		r.pos, r.left = end, r.left-frameHeader-n
	}
	return false
}

// maxDamage bounds the damaged frames a reader steps over one by one; past it, the rest of the file
// is one damaged stretch.
const maxDamage = 256

// intactAt reports whether an intact frame starts at file offset off, with left bytes from there to
// the end of the file, without moving the stream.
func (r *Reader) intactAt(off, left int64) (bool, error) {
	if left < frameHeader {
		return false, nil
	}
	var hdr [frameHeader]byte
	if _, err := r.f.ReadAt(hdr[:], off); err != nil {
		return false, err
	}
	n := int64(binary.LittleEndian.Uint32(hdr[:]))
	if n == 0 || n > left-frameHeader {
		return false, nil
	}
	buf := make([]byte, n)
	if _, err := r.f.ReadAt(buf, off+frameHeader); err != nil {
		return false, err
	}
	return crc32.Checksum(buf, castagnoli) == binary.LittleEndian.Uint32(hdr[4:]), nil
}

// broken ends reading at the frame at r.pos, which cannot be read and is not followed by an intact
// frame where it says it ends: damage from here to the end of the file if an intact frame can be
// found anywhere after it (or the search gives up), else a torn tail.
func (r *Reader) broken() {
	r.restIsDamage(func(rest []byte) bool {
		found, err := anyFrame(rest)
		return found || err != nil
	})
}

// restIsDamage ends reading at r.pos: everything from there on is one damaged stretch if damaged
// (nil: always) says so of those bytes, else a torn tail.
func (r *Reader) restIsDamage(damaged func(rest []byte) bool) {
	rest := make([]byte, r.left)
	if _, err := r.f.ReadAt(rest, r.pos); err != nil {
		r.err = err
		return
	}
	if damaged != nil && !damaged(rest) {
		r.torn = true
		return
	}
	r.damage = append(r.damage, Damage{Offset: r.pos, Bytes: rest})
	r.pos, r.left = r.pos+r.left, 0
}

// anyFrame reports whether b holds, after its first byte, an intact frame that ends b or is followed
// by the header of a frame that fits in b, or by zeros only; errNoResync when the search would cost
// more than a few passes over b. The check of what follows comes before the checksum, so that in
// random bytes almost no length that happens to fit costs a checksum of that length; in regular
// bytes (a repeating pattern) many can, hence the budget.
func anyFrame(b []byte) (bool, error) {
	budget := 8*len(b) + 16<<20 // bytes checksummed
	for p := 1; p+frameHeader < len(b); p++ {
		n := int(binary.LittleEndian.Uint32(b[p:]))
		if n == 0 || n > len(b)-p-frameHeader {
			continue
		}
		q := p + frameHeader + n
		if q < len(b) && !headerFits(b[q:]) {
			if b[q] != 0 || b[len(b)-1] != 0 {
				continue
			}
			if budget -= len(b) - q; budget < 0 {
				return false, errNoResync
			}
			if !zeros(b[q:]) {
				continue
			}
		}
		if budget -= n; budget < 0 {
			return false, errNoResync
		}
		if crc32.Checksum(b[p+frameHeader:q], castagnoli) == binary.LittleEndian.Uint32(b[p+4:]) {
			return true, nil
		}
	}
	return false, nil
}

// errNoResync: the search for an intact frame after a broken one gave up.
var errNoResync = errors.New("no intact frame found within the search's budget")

// headerFits reports whether b starts with a frame header whose frame fits in b.
func headerFits(b []byte) bool {
	if len(b) < frameHeader {
		return false
	}
	n := int(binary.LittleEndian.Uint32(b))
	return n > 0 && n <= len(b)-frameHeader
}

func zeros(b []byte) bool { return bytes.Count(b, []byte{0}) == len(b) }

// Record is the payload Next read; it is only valid until the next call to Next.
func (r *Reader) Record() []byte { return r.rec }

// Torn reports whether reading stopped at a torn tail: a write never acknowledged.
func (r *Reader) Torn() bool { return r.torn }

// Damage lists the stretches found so far that are neither records nor a torn tail.
func (r *Reader) Damage() []Damage { return r.damage }

// Intact is how many bytes of whole records were read.
func (r *Reader) Intact() int64 { return r.intact }

// Err is the I/O error that stopped reading, if any.
func (r *Reader) Err() error { return r.err }

// Close closes the file.
func (r *Reader) Close() error {
	if r.onClose != nil {
		r.onClose()
	}
	return r.f.Close()
}
