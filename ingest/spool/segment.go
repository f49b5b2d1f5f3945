package spool

import (
	"bufio"
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

// Reader streams a segment's intact records. Read them with Next and Record; Torn reports whether
// the file ended in a record cut short (or corrupt), which is ignored with everything after it.
type Reader struct {
	f       *os.File
	br      *bufio.Reader
	left    int64 // bytes after the current position
	intact  int64 // bytes of whole records read, from the data start
	rec     []byte
	torn    bool
	err     error
	hdr     [frameHeader]byte
	onClose func()
}

func newReader(f *os.File, start int64) (*Reader, error) {
	info, err := f.Stat()
	if err != nil {
		return nil, err
	}
	if _, err := f.Seek(start, io.SeekStart); err != nil {
		return nil, err
	}
	return &Reader{f: f, br: bufio.NewReaderSize(f, 256<<10), left: max(info.Size()-start, 0)}, nil
}

// Next reads the next intact record, reporting false at the end, at a torn record or on an error.
func (r *Reader) Next() bool {
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
	if n == 0 || n > r.left-frameHeader {
		// No record is empty: eight zero bytes — a tail the file system extended but never wrote,
		// after a crash — would otherwise pass as a frame (the CRC-32C of nothing is 0).
		r.torn = true
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
	if crc32.Checksum(r.rec, castagnoli) != sum {
		r.torn = true
		return false
	}
	r.left -= frameHeader + n
	r.intact += frameHeader + n
	return true
}

// Record is the payload Next read; it is only valid until the next call to Next.
func (r *Reader) Record() []byte { return r.rec }

// Torn reports whether reading stopped at a record cut short or corrupt.
func (r *Reader) Torn() bool { return r.torn }

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
