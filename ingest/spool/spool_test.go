package spool

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"math/rand"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

func open(t *testing.T, dir string, mod func(*Options)) *Spool {
	t.Helper()
	o := Options{Dir: dir, Sync: true, Format: 2, Owner: "test"}
	if mod != nil {
		mod(&o)
	}
	s, err := Open(o)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

func frame(payloads ...string) []byte {
	var b []byte
	for _, p := range payloads {
		var start int
		b, start = FrameStart(b)
		b = FrameEnd(append(b, p...), start)
	}
	return b
}

func records(t *testing.T, g *Segment) ([]string, bool) {
	t.Helper()
	out, torn, _ := read(t, g)
	return out, torn
}

// read reads g whole: its records, whether it ended torn, and the damage found.
func read(t *testing.T, g *Segment) ([]string, bool, []Damage) {
	t.Helper()
	r, err := g.Open()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	var out []string
	for r.Next() {
		out = append(out, string(r.Record()))
	}
	if r.Err() != nil {
		t.Fatal(r.Err())
	}
	return out, r.Torn(), r.Damage()
}

// segmentWith is a segment of the record "kept", then the bytes of broken, then the frames of after.
func segmentWith(t *testing.T, broken []byte, after ...string) *Segment {
	t.Helper()
	s := open(t, t.TempDir(), nil)
	g, _ := s.Create()
	g.Append(frame("kept"))
	f, err := os.OpenFile(g.Path(), os.O_APPEND|os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	f.Write(broken)
	f.Write(frame(after...))
	f.Close()
	return g
}

func TestSecondOpenOfADirectoryIsRefused(t *testing.T) {
	dir := t.TempDir()
	first := open(t, dir, nil)
	_, err := Open(Options{Dir: dir, Format: 2})
	if !errors.Is(err, ErrLocked) {
		t.Fatalf("second Open: got %v, want ErrLocked", err)
	}
	if msg := err.Error(); !strings.Contains(msg, dir) || !strings.Contains(msg, fmt.Sprintf("pid %d", os.Getpid())) {
		t.Errorf("error should name the directory and the holder: %s", msg)
	}
	if h, held, err := ReadHolder(dir); err != nil || !held || h.PID != os.Getpid() || h.Owner != "test" {
		t.Errorf("ReadHolder: %+v held=%v err=%v", h, held, err)
	}
	first.Close()
	if _, held, _ := ReadHolder(dir); held {
		t.Error("ReadHolder: still held after Close")
	}
	again, err := Open(Options{Dir: dir, Format: 2})
	if err != nil {
		t.Fatalf("Open after the holder closed: %v", err)
	}
	again.Close()
}

// An operator "clearing a stale lock" with rm LOCK must not let a second process in beside the
// holder. Before, the second Open created a new LOCK, locked it and took the directory (found by
// review); the directory's own lock now refuses it, and ReadHolder still says the spool is held.
func TestRemovedLockFileDoesNotLetASecondOwnerIn(t *testing.T) {
	dir := t.TempDir()
	first := open(t, dir, nil)
	defer first.Close()
	if err := os.Remove(filepath.Join(dir, lockName)); err != nil {
		t.Fatal(err)
	}
	if _, held, err := ReadHolder(dir); err != nil || !held {
		t.Errorf("ReadHolder with LOCK removed: held=%v err=%v; want held", held, err)
	}
	second, err := Open(Options{Dir: dir, Format: 2})
	if err == nil {
		second.Close()
		t.Fatal("a second Open took a directory the first still holds, once LOCK was removed")
	}
	if !errors.Is(err, ErrLocked) {
		t.Errorf("second Open: %v, want ErrLocked", err)
	}
}

// `analyticsd spool status` lists a running server's spool without its lock, while the server
// renames segments to in-flight and removes shipped ones. Before, a segment renamed or removed between
// the directory listing and its stat failed the whole listing (728 of 54,068 listings in review).
func TestListToleratesSegmentsShippedMeanwhile(t *testing.T) {
	dir := t.TempDir()
	sp, err := Open(Options{Dir: dir, Format: 2}) // no fsyncs: as many renames as the disk allows
	if err != nil {
		t.Fatal(err)
	}
	defer sp.Close()
	var stop atomic.Bool
	done := make(chan error, 1)
	go func() { // what a running server does to its segments
		for !stop.Load() {
			g, err := sp.Create()
			if err != nil {
				done <- err
				return
			}
			buf, start := FrameStart(nil)
			if err := g.Append(FrameEnd(append(buf, "x"...), start)); err != nil {
				done <- err
				return
			}
			if err := g.Seal(); err != nil {
				done <- err
				return
			}
			if err := g.MarkInflight(); err != nil {
				done <- err
				return
			}
			if err := sp.Remove(g); err != nil {
				done <- err
				return
			}
		}
		done <- nil
	}()
	var listings, failures int
	var first error
	for deadline := time.Now().Add(2 * time.Second); time.Now().Before(deadline); listings++ {
		if _, err := List(dir); err != nil {
			if failures++; first == nil {
				first = err
			}
		}
	}
	stop.Store(true)
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if failures > 0 {
		t.Errorf("List of a spool in use failed %d of %d times, first: %v", failures, listings, first)
	}
}

// A file that already has the next segment's name (left by another process) costs one failed Create,
// not every Create from then on.
func TestCreateMovesPastAStrayFile(t *testing.T) {
	dir := t.TempDir()
	s := open(t, dir, nil)
	if err := os.WriteFile(filepath.Join(dir, "0000000000000001.seg"), nil, 0o640); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Create(); err == nil {
		t.Fatal("Create over an existing file succeeded")
	}
	g, err := s.Create()
	if err != nil {
		t.Fatalf("the next Create: %v", err)
	}
	if g.Seq != 2 {
		t.Errorf("got segment %d, want 2", g.Seq)
	}
}

func TestAppendThenReplayAfterReopen(t *testing.T) {
	dir := t.TempDir()
	s := open(t, dir, nil)
	a, _ := s.Create()
	if err := a.Append(frame("one", "two")); err != nil {
		t.Fatal(err)
	}
	if err := a.Append(frame("three")); err != nil {
		t.Fatal(err)
	}
	a.Seal()
	if err := a.MarkInflight(); err != nil {
		t.Fatal(err)
	}
	b, _ := s.Create()
	b.Append(frame("four"))
	b.Seal()
	want := a.Size() + b.Size()
	if s.Bytes() != want {
		t.Errorf("Bytes %d, want %d", s.Bytes(), want)
	}
	s.Close()

	s2 := open(t, dir, nil)
	got := s2.Recovered()
	if len(got) != 2 || got[0].Seq != a.Seq || got[1].Seq != b.Seq {
		t.Fatalf("recovered %v, want segments %d and %d", got, a.Seq, b.Seq)
	}
	if !got[0].Inflight || got[1].Inflight || got[0].UID != a.UID || got[0].Format != 2 || !got[0].Recovered {
		t.Errorf("recovered state: %+v / %+v", got[0], got[1])
	}
	if recs, torn := records(t, got[0]); torn || strings.Join(recs, ",") != "one,two,three" {
		t.Errorf("segment a: %v torn=%v", recs, torn)
	}
	if s2.Bytes() != want {
		t.Errorf("Bytes after reopen %d, want %d", s2.Bytes(), want)
	}
	if c, _ := s2.Create(); c.Seq != b.Seq+1 {
		t.Errorf("next segment %d, want %d", c.Seq, b.Seq+1)
	}
}

// A record cut short at the end of the file — the write a crash interrupted, never acknowledged —
// ends the segment and is ignored.
func TestTornTailsAreIgnored(t *testing.T) {
	for _, tc := range []struct {
		name string
		tail func(full []byte) []byte
	}{
		{"cut in the header", func(f []byte) []byte { return f[:5] }},
		{"cut in the payload", func(f []byte) []byte { return f[:len(f)-2] }},
		{"bad checksum", func(f []byte) []byte { c := bytes.Clone(f); c[len(c)-1] ^= 0xff; return c }},
		{"zero-filled (extended, never written)", func([]byte) []byte { return make([]byte, 4096) }},
		{"absurd length", func(f []byte) []byte {
			c := bytes.Clone(f)
			binary.LittleEndian.PutUint32(c, 1<<31)
			return c
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			recs, torn, dmg := read(t, segmentWith(t, tc.tail(frame("lost-record"))))
			if !torn || len(dmg) != 0 || len(recs) != 1 || recs[0] != "kept" {
				t.Errorf("got %v torn=%v damage=%d, want [kept] torn, no damage", recs, torn, len(dmg))
			}
		})
	}
}

// A broken frame with an intact frame somewhere after it is no torn write (a crash tears only the
// last write: a failed append is cut back): it is damage — bit rot, a bad copy. A frame failing
// only its checksum is stepped over when an intact frame starts where its header says it ends;
// any other break keeps everything from it to the end of the file as damage. Before, each of these
// read as a torn tail: the records after it were dropped, and the writer removed the segment with
// them. (Fails on the code before this change.)
func TestDamageInsideASegmentIsReportedNotDropped(t *testing.T) {
	for _, tc := range []struct {
		name     string
		broken   func(full []byte) []byte
		stepOver bool // only the broken frame is damage; the records after it are read
	}{
		{"bad checksum", func(f []byte) []byte { c := bytes.Clone(f); c[len(c)-1] ^= 0xff; return c }, true},
		{"cut in the payload", func(f []byte) []byte { return f[:len(f)-2] }, false},
		{"zeros, then more", func([]byte) []byte { return make([]byte, 64) }, false},
		{"a length past the end", func(f []byte) []byte {
			c := bytes.Clone(f)
			binary.LittleEndian.PutUint32(c, 1<<31)
			return c
		}, false},
		{"a shorter length", func(f []byte) []byte {
			c := bytes.Clone(f)
			binary.LittleEndian.PutUint32(c, 3)
			return c
		}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			broken := tc.broken(frame("lost-record"))
			recs, torn, dmg := read(t, segmentWith(t, broken, "after", "last"))
			wantRecs, wantBytes := "kept", append(bytes.Clone(broken), frame("after", "last")...)
			if tc.stepOver {
				wantRecs, wantBytes = "kept,after,last", broken
			}
			if strings.Join(recs, ",") != wantRecs || torn || len(dmg) != 1 {
				t.Fatalf("got %v torn=%v damage=%+v, want %s and one damaged stretch", recs, torn, dmg, wantRecs)
			}
			if want := int64(headerSize + len(frame("kept"))); dmg[0].Offset != want || !bytes.Equal(dmg[0].Bytes, wantBytes) {
				t.Errorf("damage at byte %d: %q; want at %d: %q", dmg[0].Offset, dmg[0].Bytes, want, wantBytes)
			}
		})
	}
}

// A client can plant a well-formed frame inside its own record (a user id or props hold any bytes),
// for a torn write to expose once the record's own frame is cut short. Frames found by searching
// past a break are never read as records: here the torn tail with a planted frame inside is kept as
// damage (an intact frame was found) and nothing in it is returned. Before this change's second
// version, the search stepped onto the planted frame and returned it as a record — with the tenant
// and rows its sender chose.
func TestAFramePlantedInATornRecordIsNeverRead(t *testing.T) {
	planted := append(frame("FORGED-RECORD"), frame("x")[:8]...) // a frame, then a header that fits
	record := append(append([]byte("user-id-bytes:"), planted...), []byte(":more-props")...)
	for name, tail := range map[string][]byte{
		"cut short":        frame(string(record))[:8+14+len(planted)+3],
		"cut, then zeros":  append(frame(string(record))[:8+14+len(planted)+3], make([]byte, 64)...),
		"checksum, at end": func() []byte { c := frame(string(record)); c[len(c)-1] ^= 1; return c }(),
	} {
		t.Run(name, func(t *testing.T) {
			recs, _, _ := read(t, segmentWith(t, tail))
			if slices.Contains(recs, "FORGED-RECORD") {
				t.Fatalf("read %v: the planted frame was returned as a record", recs)
			}
			if strings.Join(recs, ",") != "kept" {
				t.Errorf("read %v, want kept only", recs)
			}
		})
	}
}

// Bit rot in a record whose neighbour the crash then cut short: the damaged record is stepped over
// (an intact frame starts where it ends), the intact one read, and the cut one is the torn tail.
// (A second review found the intact record dropped, unseen, with the torn tail.)
func TestDamageThenAnIntactRecordThenATornTail(t *testing.T) {
	rotten := frame("rotten")
	rotten[len(rotten)-1] ^= 1
	tail := append(append(rotten, frame("intact")...), frame("cut-short")[:10]...)
	recs, torn, dmg := read(t, segmentWith(t, tail))
	if strings.Join(recs, ",") != "kept,intact" || !torn || len(dmg) != 1 || !bytes.Equal(dmg[0].Bytes, rotten) {
		t.Errorf("got %v torn=%v damage=%d, want kept,intact, the rotten frame as damage and a torn tail", recs, torn, len(dmg))
	}
}

// Damaged frames stepped over one by one are copied out, each its own size, and bounded: past
// maxDamage the rest of the file is one stretch. (A second review measured 768 MiB of heap for 200
// damaged frames in an 8 MiB segment: each kept the whole rest of the file alive.)
func TestManyDamagedFramesAreBounded(t *testing.T) {
	var tail []byte
	for i := 0; i < maxDamage+10; i++ {
		bad := frame(fmt.Sprintf("bad-%d", i))
		bad[len(bad)-1] ^= 1
		tail = append(append(tail, bad...), frame(fmt.Sprintf("good-%d", i))...)
	}
	recs, torn, dmg := read(t, segmentWith(t, tail))
	if torn || len(dmg) != maxDamage+1 || len(recs) != 1+maxDamage {
		t.Fatalf("torn=%v, %d damaged stretches, %d records; want %d stretches and %d records", torn, len(dmg), len(recs), maxDamage+1, 1+maxDamage)
	}
	for i, d := range dmg[:maxDamage] {
		if len(d.Bytes) != len(frame(fmt.Sprintf("bad-%d", i))) {
			t.Fatalf("damaged stretch %d is %d bytes, want its frame's %d", i, len(d.Bytes), len(frame(fmt.Sprintf("bad-%d", i))))
		}
	}
}

// Megabytes of garbage before the next intact frame: the search for it is bounded (a pass over
// random bytes checksums every length that happens to fit), and a search that gives up keeps
// everything from the break on as damage: never a torn tail, never records dropped unseen.
func TestGarbageBeforeTheNextFrameIsDamageWhateverTheSearchFinds(t *testing.T) {
	for name, fill := range map[string]func(b []byte){
		"random": func(b []byte) { rand.New(rand.NewSource(1)).Read(b) },
		"pattern": func(b []byte) {
			for i := range b {
				b[i] = byte(i % 7)
			}
		},
	} {
		t.Run(name, func(t *testing.T) {
			garbage := make([]byte, 8<<20)
			fill(garbage)
			recs, torn, dmg := read(t, segmentWith(t, garbage, "after"))
			if torn || len(dmg) == 0 {
				t.Fatalf("torn=%v, %d damaged stretches; want damage", torn, len(dmg))
			}
			if last := dmg[len(dmg)-1].Bytes; !bytes.HasSuffix(last, frame("after")) || slices.Contains(recs, "after") {
				t.Errorf("read %v: want the record after the garbage kept with the damage, not read", recs)
			}
		})
	}
}

// The usual power loss in a group commit: the write's first frame partly on disk and the rest of
// the grown file zeros, or frames cut anywhere with nothing intact after them. A torn tail, not
// damage: nothing after it was acknowledged.
func TestATornGroupWriteIsNotDamage(t *testing.T) {
	group := frame("first-of-group", "second-of-group")
	for name, tail := range map[string][]byte{
		"first frame partly written, then zeros": append(bytes.Clone(group[:12]), make([]byte, len(group)-12)...),
		"second frame cut":                       group[:len(group)-3],
		"second frame's page zeros":              append(bytes.Clone(group[:len(frame("first-of-group"))+4]), make([]byte, 4096)...),
	} {
		t.Run(name, func(t *testing.T) {
			recs, torn, dmg := read(t, segmentWith(t, tail))
			if !torn || len(dmg) != 0 || recs[0] != "kept" {
				t.Errorf("got %v torn=%v damage=%d, want a torn tail and no damage", recs, torn, len(dmg))
			}
		})
	}
}

// A failed append is cut back: nothing of it can be replayed.
func TestFailedAppendLeavesNoPartialRecord(t *testing.T) {
	s := open(t, t.TempDir(), nil)
	g, _ := s.Create()
	g.Append(frame("kept"))
	size := g.Size()
	g.f.Close() // the next write fails
	if err := g.Append(frame("refused")); err == nil {
		t.Fatal("append to a closed file succeeded")
	}
	if g.Size() != size || s.Bytes() != size {
		t.Errorf("size %d / bytes %d after a failed append, want %d", g.Size(), s.Bytes(), size)
	}
	g.f = nil
	if recs, _ := records(t, g); len(recs) != 1 {
		t.Errorf("records %v", recs)
	}
}

// The *.seg → *.inflight rename must reach the disk before the insert starts: the directory is
// fsync'd after the rename (a power loss must not bring back the .seg name after ClickHouse committed).
func TestMarkInflightSyncsTheDirectoryAfterRenaming(t *testing.T) {
	dir := t.TempDir()
	var synced []string
	s := open(t, dir, func(o *Options) {
		o.syncDir = func(d string) error {
			names, _ := filepath.Glob(filepath.Join(d, "*.inflight"))
			synced = append(synced, fmt.Sprintf("%s:%d", d, len(names)))
			return nil
		}
	})
	g, _ := s.Create()
	g.Append(frame("x"))
	g.Seal()
	synced = nil
	if err := g.MarkInflight(); err != nil {
		t.Fatal(err)
	}
	if len(synced) != 1 || synced[0] != dir+":1" {
		t.Errorf("directory syncs during MarkInflight: %v, want one of %s after the rename", synced, dir)
	}
}

// A shipped segment whose file cannot be removed stays counted (it is still on disk) and is removed
// at the next chance; it never leaks out of the accounting, so the spool does not look full forever.
func TestFailedRemovalIsRetried(t *testing.T) {
	dir := t.TempDir()
	fail := true
	s := open(t, dir, func(o *Options) {
		o.remove = func(p string) error {
			if fail {
				return errors.New("injected: EIO")
			}
			return os.Remove(p)
		}
	})
	a, _ := s.Create()
	a.Append(frame("a"))
	a.Seal()
	b, _ := s.Create()
	b.Append(frame("b"))
	b.Seal()
	if err := s.Remove(a); err == nil {
		t.Fatal("Remove succeeded with removal failing")
	}
	if s.Bytes() != a.Size()+b.Size() || s.PendingRemovals() != 1 {
		t.Errorf("after a failed removal: bytes %d (want %d), pending %d", s.Bytes(), a.Size()+b.Size(), s.PendingRemovals())
	}
	fail = false
	if err := s.Remove(b); err != nil {
		t.Fatal(err)
	}
	if s.Bytes() != 0 || s.PendingRemovals() != 0 {
		t.Errorf("after removal works again: bytes %d, pending %d; want 0, 0", s.Bytes(), s.PendingRemovals())
	}
	if left, _ := filepath.Glob(filepath.Join(dir, "*.seg")); len(left) != 0 {
		t.Errorf("files left: %v", left)
	}
}

// Segments of the first release have no header; they are still replayed.
func TestLegacySegmentsAreRead(t *testing.T) {
	dir := t.TempDir()
	os.WriteFile(filepath.Join(dir, "0000000000000003.inflight"), frame("old1", "old2"), 0o640)
	s := open(t, dir, nil)
	g := s.Recovered()
	if len(g) != 1 || g[0].Format != FormatLegacy || !g[0].Inflight {
		t.Fatalf("recovered %+v", g)
	}
	if recs, torn := records(t, g[0]); torn || strings.Join(recs, ",") != "old1,old2" {
		t.Errorf("legacy records %v torn=%v", recs, torn)
	}
}

// A segment created just before a crash, with its header not yet complete, holds nothing.
func TestHalfWrittenHeaderHoldsNoRecord(t *testing.T) {
	dir := t.TempDir()
	os.WriteFile(filepath.Join(dir, "0000000000000009.seg"), []byte(magic+"\x02"), 0o640)
	s := open(t, dir, nil)
	g := s.Recovered()
	if len(g) != 1 || !g[0].Empty() {
		t.Fatalf("recovered %+v, want one empty segment", g)
	}
	if recs, _ := records(t, g[0]); len(recs) != 0 {
		t.Errorf("records %v", recs)
	}
}

func TestQuarantineKeepsRowsUntilRequeued(t *testing.T) {
	dir := t.TempDir()
	s := open(t, dir, nil)
	info, err := s.Quarantine(QuarantineInfo{Segment: "abc", Reason: "rejected by clickhouse", Error: "code: 252", Events: 2, Tenants: []string{"t1"}},
		[][]byte{[]byte("row-a"), []byte("row-b")})
	if err != nil {
		t.Fatal(err)
	}
	if files, rows := s.QuarantineStats(); files != 1 || rows != 2 {
		t.Errorf("stats: %d files, %d rows; want 1, 2", files, rows)
	}
	list, err := ListQuarantine(dir)
	if err != nil || len(list) != 1 || list[0].Name != info.Name || list[0].Error != "code: 252" || list[0].Events != 2 {
		t.Fatalf("list: %+v %v", list, err)
	}
	r, got, err := OpenQuarantine(dir, info.Name)
	if err != nil {
		t.Fatal(err)
	}
	if got.Reason != "rejected by clickhouse" {
		t.Errorf("info %+v", got)
	}
	var recs []string
	for r.Next() {
		recs = append(recs, string(r.Record()))
	}
	if strings.Join(recs, ",") != "row-a,row-b" {
		t.Errorf("records %v", recs)
	}
	if _, _, err := OpenQuarantine(dir, info.Name); !errors.Is(err, ErrLocked) {
		t.Errorf("a second requeue of the same file: got %v, want ErrLocked", err)
	}
	r.Close()
	if _, _, err := OpenQuarantine(dir, "../LOCK"); err == nil {
		t.Error("a path outside the quarantine was accepted")
	}
	if err := RemoveQuarantine(dir, info.Name); err != nil {
		t.Fatal(err)
	}
	if files, rows := s.QuarantineStats(); files != 0 || rows != 0 {
		t.Errorf("stats after removal: %d files, %d rows", files, rows)
	}
}

// A spool keeps its identity across reopening (it names its records wherever they are replayed).
func TestSpoolIDPersists(t *testing.T) {
	dir := t.TempDir()
	s := open(t, dir, nil)
	id := s.ID()
	s.Close()
	if id == ([16]byte{}) {
		t.Fatal("zero spool id")
	}
	if again := open(t, dir, nil); again.ID() != id {
		t.Errorf("id changed across reopen: %x then %x", id, again.ID())
	}
	if read, err := ReadID(dir); err != nil || read != id {
		t.Errorf("ReadID: %x %v", read, err)
	}
	if other := open(t, t.TempDir(), nil); other.ID() == id {
		t.Error("two spools share an id")
	}
}

// A directory fsync that fails after the rename leaves the segment not in flight; the next call
// syncs again and only then marks it, so no insert starts before the rename is durable.
func TestMarkInflightRetriesAFailedDirectorySync(t *testing.T) {
	fail := false
	s := open(t, t.TempDir(), func(o *Options) {
		o.syncDir = func(string) error {
			if fail {
				return errors.New("injected: EIO")
			}
			return nil
		}
	})
	g, _ := s.Create()
	g.Append(frame("x"))
	g.Seal()
	fail = true
	if err := g.MarkInflight(); err == nil || g.Inflight {
		t.Fatalf("with the sync failing: err %v, in flight %v; want an error and not in flight", err, g.Inflight)
	}
	fail = false
	if err := g.MarkInflight(); err != nil || !g.Inflight || filepath.Ext(g.Path()) != inflightExt {
		t.Errorf("retry: err %v, in flight %v, path %s", err, g.Inflight, g.Path())
	}
}

// A requeue (or an erasure's scrub) that opened a quarantine file just before another finished with
// it — shipped and removed it, or replaced it with a copy without an erased user's rows — must not go
// on with the file it holds. Before, it locked the removed file and shipped it: rows twice, or the
// erased user's rows back in ClickHouse (found by review).
func TestAQuarantineFileFinishedBeforeItsLockIsNotShipped(t *testing.T) {
	dir := t.TempDir()
	s := open(t, dir, nil)
	info, err := s.Quarantine(QuarantineInfo{Segment: "abc", Reason: "test", Events: 1}, [][]byte{[]byte("row-a")})
	if err != nil {
		t.Fatal(err)
	}
	defer func(f func(string)) { quarantineOpened = f }(quarantineOpened)
	quarantineOpened = func(path string) { // the other holder removes it, and unlocks, now
		if err := os.Remove(path); err != nil {
			t.Error(err)
		}
	}
	r, _, err := OpenQuarantine(dir, info.Name)
	if err == nil {
		r.Close()
		t.Fatal("a quarantine file removed between its opening and its locking was opened for requeue")
	}
	if !errors.Is(err, os.ErrNotExist) {
		t.Errorf("error %v, want one matching os.ErrNotExist", err)
	}
}

// A listing of a running server's spool (no lock) reads a large directory in several calls, and a
// segment renamed from .seg to .inflight between them shows under both names. Before, List reported
// it twice, doubling the segments and bytes `spool status` shows (found by review).
func TestListNeverReportsASegmentTwice(t *testing.T) {
	dir := t.TempDir()
	sp, err := Open(Options{Dir: dir, Format: 2})
	if err != nil {
		t.Fatal(err)
	}
	defer sp.Close()
	const n = 3000
	for i := 0; i < n; i++ {
		os.WriteFile(filepath.Join(dir, fmt.Sprintf("%016d.seg", 100+i)), []byte("ADSP"), 0o640)
	}
	var stop atomic.Bool
	stopped := make(chan struct{})
	go func() { // only what a server does: .seg -> .inflight, later removed; new segments created
		for i := 0; !stop.Load(); i++ {
			p := func(k int) string { return filepath.Join(dir, fmt.Sprintf("%016d", 100+k)) }
			os.Rename(p(i)+".seg", p(i)+".inflight")
			if i >= 500 {
				os.Remove(p(i-500) + ".inflight")
			}
			os.WriteFile(p(n+i)+".seg", []byte("ADSP"), 0o640)
		}
		close(stopped)
	}()
	defer func() { stop.Store(true); <-stopped }() // before TempDir's removal
	dups := 0
	for deadline := time.Now().Add(3 * time.Second); time.Now().Before(deadline); {
		segs, err := List(dir)
		if err != nil {
			t.Fatal(err)
		}
		seen := map[uint64]bool{}
		for _, g := range segs {
			if seen[g.Seq] {
				dups++
			}
			seen[g.Seq] = true
		}
	}
	if dups > 0 {
		t.Errorf("%d segments listed twice", dups)
	}
}
