// Package spool is ingest's write-ahead log on local disk: numbered segment files of framed,
// checksummed records, written (and fsync'd, when asked) before a request is acknowledged, and
// deleted only once their rows are in ClickHouse. It owns the files, their format, the order in
// which they are handed out, the directory lock that keeps a second process out, and the quarantine
// where rows ClickHouse refuses for good are kept for an operator. It knows nothing of what a record
// holds (package ingest encodes rows into records) and never talks to ClickHouse.
//
// On disk, in one directory:
//
//	LOCK                        flock'd by the owning process; holds who that is (JSON)
//	0000000000000042.seg        a segment: header, then records appended in order
//	0000000000000041.inflight   a segment whose insert was under way (it may be partly in ClickHouse)
//	quarantine/*.seg            rows ClickHouse refused for good, with why (see Quarantine)
//
// A segment starts with a 24-byte header: "ADSPOOL", the record format version, 16 random bytes
// naming the segment (its ClickHouse insert attempts carry them in their query ids). Files without
// that header are segments of the first release, format version 1. Each record is framed as
//
//	u32 payload length | u32 CRC-32C of payload | payload
//
// so a record cut short by a crash (never acknowledged: the fsync had not returned) is detected and
// ignored on replay, together with anything after it.
package spool

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"

	"github.com/analyticsd/analyticsd/internal/logger"
)

const (
	segExt      = ".seg"
	inflightExt = ".inflight"
	magic       = "ADSPOOL"
	headerSize  = len(magic) + 1 + 16

	// FormatLegacy is the record format of segments written before segment headers existed.
	FormatLegacy byte = 1
)

// Options shape a spool.
type Options struct {
	Dir string
	// Sync: fsync each append, and the directory after each file is created or renamed, before the
	// call returns. Without it the spool survives a crash of the process but not of the machine.
	Sync bool
	// Format is the record format version new segments declare (the owner's encoding, ≥ 2).
	Format byte
	// Owner describes this process in the lock file, for the error a second process gets.
	Owner string
	Log   *slog.Logger
	// remove and syncDir replace os.Remove and the directory fsync (tests watch and break them).
	remove  func(string) error
	syncDir func(string) error
}

// Spool is one process's spool directory.
type Spool struct {
	opts      Options
	lock      *dirLock
	recovered []*Segment

	mu      sync.Mutex
	nextSeq uint64
	zombies []*Segment // shipped segments whose file could not be removed yet

	bytes      atomic.Int64
	quarantine quarantineCache
	id         [16]byte
}

// Open locks dir (creating it if needed) and lists the segments a previous process left there, to be
// shipped first. It fails with a *LockedError when another process holds the directory.
func Open(o Options) (*Spool, error) {
	o.Log = logger.Or(o.Log)
	if o.remove == nil {
		o.remove = os.Remove
	}
	if o.syncDir == nil {
		o.syncDir = syncDir
	}
	if o.Format < 2 {
		return nil, fmt.Errorf("spool: record format %d: new segments need a format of 2 or more", o.Format)
	}
	if err := os.MkdirAll(o.Dir, 0o750); err != nil {
		return nil, fmt.Errorf("create spool dir %s: %w", o.Dir, err)
	}
	lock, err := lockDir(o.Dir, o.Owner)
	if err != nil {
		return nil, err
	}
	s := &Spool{opts: o, lock: lock, nextSeq: 1}
	if err := s.readID(true); err != nil {
		lock.Close()
		return nil, err
	}
	if err := s.scan(); err != nil {
		lock.Close()
		return nil, err
	}
	return s, nil
}

const idName = "ID"

// readID reads the spool's identity, 16 random bytes kept in dir/ID and made on first use (create):
// what tells this spool's records from another's wherever it is replayed.
func (s *Spool) readID(create bool) error {
	path := filepath.Join(s.opts.Dir, idName)
	b, err := os.ReadFile(path)
	if err == nil && len(b) == 32 {
		_, err = hex.Decode(s.id[:], b)
		return err
	}
	if !create || (err != nil && !errors.Is(err, os.ErrNotExist)) {
		if err == nil {
			err = fmt.Errorf("%d bytes, want 32 hex digits", len(b))
		}
		return fmt.Errorf("read spool id %s: %w", path, err)
	}
	if _, err := rand.Read(s.id[:]); err != nil {
		return err
	}
	if err := writeDurably(path, []byte(hex.EncodeToString(s.id[:]))); err != nil {
		return fmt.Errorf("write spool id %s: %w", path, err)
	}
	return s.opts.syncDir(s.opts.Dir)
}

// ID is the spool's identity (see readID).
func (s *Spool) ID() [16]byte { return s.id }

// scan lists the segment files left in the directory: every one is sealed and unshipped.
func (s *Spool) scan() error {
	entries, err := os.ReadDir(s.opts.Dir)
	if err != nil {
		return fmt.Errorf("read spool dir %s: %w", s.opts.Dir, err)
	}
	seen := map[uint64]bool{}
	for _, e := range entries {
		seq, ext, ok := parseName(e.Name())
		if !ok {
			continue
		}
		g, err := s.found(seq, ext)
		if errors.Is(err, os.ErrNotExist) && s.lock == nil {
			// Listed without the lock (`analyticsd spool status` on a running server's spool): the
			// server renamed the segment to in-flight, or shipped and removed it, since ReadDir.
			if ext == segExt {
				g, err = s.found(seq, inflightExt)
			}
			if errors.Is(err, os.ErrNotExist) {
				continue
			}
		}
		if err != nil {
			return err
		}
		if seen[seq] {
			// Listed without the lock and renamed during a listing of several reads: both of its
			// names were seen (found by review: a spool's segments and bytes counted twice).
			continue
		}
		seen[seq] = true
		s.recovered = append(s.recovered, g)
		s.bytes.Add(g.size)
		s.nextSeq = max(s.nextSeq, seq+1)
	}
	sort.Slice(s.recovered, func(i, j int) bool { return s.recovered[i].Seq < s.recovered[j].Seq })
	return nil
}

// found describes the segment file seq with extension ext.
func (s *Spool) found(seq uint64, ext string) (*Segment, error) {
	path := s.segPath(seq, ext)
	info, err := os.Stat(path)
	if err != nil {
		return nil, fmt.Errorf("stat spool segment %s: %w", path, err)
	}
	g := &Segment{Seq: seq, sp: s, path: path, size: info.Size(), Inflight: ext == inflightExt, Recovered: true}
	return g, g.readHeader()
}

func parseName(name string) (seq uint64, ext string, ok bool) {
	ext = filepath.Ext(name)
	if ext != segExt && ext != inflightExt {
		return 0, "", false
	}
	seq, err := strconv.ParseUint(strings.TrimSuffix(name, ext), 10, 64)
	return seq, ext, err == nil
}

// Dir is the spool's directory.
func (s *Spool) Dir() string { return s.opts.Dir }

// Recovered returns the segments found at Open, oldest first.
func (s *Spool) Recovered() []*Segment { return s.recovered }

// Bytes is the size of every segment file on disk (quarantine excluded).
func (s *Spool) Bytes() int64 { return s.bytes.Load() }

func (s *Spool) segPath(seq uint64, ext string) string {
	return filepath.Join(s.opts.Dir, fmt.Sprintf("%016d%s", seq, ext))
}

// Create starts a new segment for appends. Its number is used up even when creation fails, so a
// stray file with that name cannot make every later attempt fail.
func (s *Spool) Create() (*Segment, error) {
	s.mu.Lock()
	seq := s.nextSeq
	s.nextSeq++
	s.mu.Unlock()
	g := &Segment{Seq: seq, Format: s.opts.Format, sp: s, path: s.segPath(seq, segExt)}
	if _, err := rand.Read(g.UID[:]); err != nil {
		return nil, fmt.Errorf("spool: segment id: %w", err)
	}
	f, err := os.OpenFile(g.path, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o640)
	if err != nil {
		return nil, fmt.Errorf("create spool segment: %w", err)
	}
	hdr := make([]byte, 0, headerSize)
	hdr = append(append(append(hdr, magic...), g.Format), g.UID[:]...)
	if _, err = f.Write(hdr); err == nil && s.opts.Sync {
		// The header and the directory entry must be on disk before the first acknowledged record.
		if err = f.Sync(); err == nil {
			err = s.opts.syncDir(s.opts.Dir)
		}
	}
	if err != nil {
		f.Close()
		os.Remove(g.path)
		return nil, fmt.Errorf("create spool segment %s: %w", g.path, err)
	}
	g.f, g.size = f, int64(headerSize)
	s.bytes.Add(g.size)
	return g, nil
}

// Remove deletes a shipped segment. When the file cannot be removed it stays counted in Bytes (it is
// still on disk) and its removal is retried at the next Remove; after a restart it would be replayed
// as in flight, which the owner's duplicate check makes harmless.
func (s *Spool) Remove(g *Segment) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	var errs []error
	pending := append(s.zombies, g)
	s.zombies = nil
	for _, z := range pending {
		if err := s.opts.remove(z.path); err != nil && !errors.Is(err, os.ErrNotExist) {
			s.zombies = append(s.zombies, z)
			errs = append(errs, fmt.Errorf("remove shipped spool segment %s: %w", z.path, err))
			continue
		}
		s.bytes.Add(-z.size)
	}
	return errors.Join(errs...)
}

// PendingRemovals is how many shipped segments still wait for their file to be removed.
func (s *Spool) PendingRemovals() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.zombies)
}

// Close releases the directory lock. Segments still open are the caller's to seal first.
func (s *Spool) Close() error { return s.lock.Close() }

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}

// List returns the segments in dir, oldest first, for reading only: it takes no lock, so it can look
// at a spool a running server owns (the newest segment may still be growing).
func List(dir string) ([]*Segment, error) {
	s := &Spool{opts: Options{Dir: dir}}
	if err := s.scan(); err != nil {
		return nil, err
	}
	return s.recovered, nil
}

// ReadID reads the identity of the spool in dir without locking it (zero when it has none yet).
func ReadID(dir string) ([16]byte, error) {
	s := &Spool{opts: Options{Dir: dir}}
	if err := s.readID(false); err != nil && !errors.Is(err, os.ErrNotExist) {
		return s.id, err
	}
	return s.id, nil
}
