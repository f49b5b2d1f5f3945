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
	var hdr [headerSize]byte
	n, err := io.ReadFull(f, hdr[:])
	if err != nil && !errors.Is(err, io.ErrUnexpectedEOF) && !errors.Is(err, io.EOF) {
		return fmt.Errorf("read spool segment %s: %w", g.path, err)
	}
	if n >= len(magic) && string(hdr[:len(magic)]) == magic {
		if n < headerSize {
			// Created, then the process died before the header reached the disk: nothing was
			// acknowledged into it.
			g.Format = 0
			return nil
		}
		g.Format = hdr[len(magic)]
		copy(g.UID[:], hdr[len(magic)+1:])
		return nil
	}
	// A first-release segment: records from byte 0. (Its first four bytes are a record length below
	// 1 GiB, which can never read as "ADSP".)
	g.Format = FormatLegacy
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
	r, err := newReader(f, g.dataStart())
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("read spool segment %s: %w", path, err)
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

// Reader streams a segment's intact records. Read them with Next and Record. Torn reports whether
// the file ended in a record cut short — the unacknowledged write a crash interrupted, ignored.
// Damage reports the stretches that are not that: a frame failing its checksum with records after
// it, or bytes after a broken frame that are not the zeros a crash leaves. Their bytes are kept for
// the quarantine; the records after a damaged frame are read on.
type Reader struct {
	f       *os.File
	br      *bufio.Reader
	pos     int64 // file offset of the next frame
	left    int64 // bytes after the current position
	intact  int64 // bytes of whole records read, from the data start
	rec     []byte
	torn    bool
	damage  []Damage
	err     error
	hdr     [frameHeader]byte
	onClose func()
}

// Damage is a stretch of a spool file that is neither an intact record nor a torn tail: bit rot,
// a bad copy, a disk's error. Bytes is the stretch as it was on disk (one frame's payload when a
// frame failed only its checksum, so a record whose header took the hit can still be decoded).
type Damage struct {
	Offset int64
	Bytes  []byte
	// Rest: the stretch runs to the end of the file (the frames in it could not be told apart).
	Rest bool
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

// Next reads the next intact record, reporting false at the end, at a torn tail, at damage it
// cannot read past, or on an error.
func (r *Reader) Next() bool {
	for {
		if r.err != nil || r.torn || r.left == 0 {
			return false
		}
		if r.left < frameHeader {
			r.torn = true
			return false
		}
		if _, err := io.ReadFull(r.br, r.hdr[:]); err != nil {
			r.err = err
			return false
		}
		n := int64(binary.LittleEndian.Uint32(r.hdr[:]))
		sum := binary.LittleEndian.Uint32(r.hdr[4:])
		if n > r.left-frameHeader {
			// The frame runs past the end of the file: the last write, cut short by a crash before
			// it was acknowledged.
			r.torn = true
			return false
		}
		if n == 0 {
			// No record is empty: eight zero bytes are a tail the file system extended but never
			// wrote, after a crash — unless something other than zeros follows.
			r.brokenAt()
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
		at := r.pos
		r.pos += frameHeader + n
		r.left -= frameHeader + n
		if crc32.Checksum(r.rec, castagnoli) == sum {
			r.intact += frameHeader + n
			return true
		}
		if r.left == 0 {
			r.torn = true // the last frame: a write that did not reach the disk whole
			return false
		}
		ok, err := r.frameAt(r.pos)
		if err != nil {
			r.err = err
			return false
		}
		if !ok {
			r.pos, r.left = at, r.left+frameHeader+n
			r.brokenAt()
			return false
		}
		// Intact frames follow, so this was no torn write: keep the frame's bytes, read on.
		r.damage = append(r.damage, Damage{Offset: at, Bytes: append([]byte(nil), r.rec...)})
	}
}

// frameAt reports whether an intact frame starts at off, without moving the stream.
func (r *Reader) frameAt(off int64) (bool, error) {
	var hdr [frameHeader]byte
	if _, err := r.f.ReadAt(hdr[:], off); err != nil {
		return false, nil
	}
	n := int64(binary.LittleEndian.Uint32(hdr[:]))
	if n == 0 || n > r.left-frameHeader {
		return false, nil
	}
	buf := make([]byte, n)
	if _, err := r.f.ReadAt(buf, off+frameHeader); err != nil {
		return false, err
	}
	return crc32.Checksum(buf, castagnoli) == binary.LittleEndian.Uint32(hdr[4:]), nil
}

// brokenAt ends reading at a frame that cannot be read at r.pos: a torn tail if only zeros follow
// (a crash that extended the file), otherwise damage running to the end of the file.
func (r *Reader) brokenAt() {
	rest := make([]byte, r.left)
	if _, err := r.f.ReadAt(rest, r.pos); err != nil {
		r.err = err
		return
	}
	if bytes.Count(rest, []byte{0}) == len(rest) {
		r.torn = true
		return
	}
	r.damage = append(r.damage, Damage{Offset: r.pos, Bytes: rest, Rest: true})
	r.left = 0
}

// Record is the payload Next read; it is only valid until the next call to Next.
func (r *Reader) Record() []byte { return r.rec }

// Torn reports whether reading stopped at a record cut short: a write never acknowledged.
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
