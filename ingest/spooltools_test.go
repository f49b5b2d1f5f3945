package ingest

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/analyticsd/analyticsd/ingest/spool"
	"github.com/analyticsd/analyticsd/internal/testenv"
)

// A quarantine file damaged after it was written (cut short by a copy, a disk) holds rows requeue
// cannot read. Before, requeue shipped the rows before the damage, reported "3 rows, 2 inserted, the
// rest were already stored" and deleted the file with the third row in it.
func TestRequeueOfADamagedQuarantineFileKeepsIt(t *testing.T) {
	env := testenv.Migrated(t)
	dir := t.TempDir()
	sp, err := spool.Open(spool.Options{Dir: dir, Format: recordFormat})
	if err != nil {
		t.Fatal(err)
	}
	tenantID := uuid.New()
	now := time.Now().UTC().Truncate(time.Second)
	var recs [][]byte
	for i := range 3 {
		row := Row{ID: uuid.New(), TenantID: tenantID, Ts: now, ReceivedAt: now, Event: "a.b", Source: "app", Props: "{}"}
		recs = append(recs, appendRecord(nil, uint64(10+i)<<3, []Row{row}, nil)[spool.FrameOverhead:])
	}
	info, err := sp.Quarantine(spool.QuarantineInfo{Segment: "seg", Reason: "test", Events: 3, Tenants: []string{tenantID.String()}}, recs)
	if err != nil {
		t.Fatal(err)
	}
	sp.Close()
	path := filepath.Join(spool.QuarantineDir(dir), info.Name)
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(path, fi.Size()-1); err != nil {
		t.Fatal(err)
	}
	res, err := Requeue(context.Background(), dir, info.Name, env.CH, env.DB, nil, RequeueOptions{})
	if err == nil || !strings.Contains(err.Error(), "2 of the 3 rows") || !strings.Contains(err.Error(), "kept") {
		t.Errorf("requeue of a quarantine file cut short: %+v, err %v; want an error saying 2 of the 3 rows were read and the file kept", res, err)
	}
	if _, err := os.Stat(path); err != nil {
		t.Errorf("the damaged quarantine file is gone (%v): its third row with it", err)
	}
	var stored uint64
	if err := env.CH.QueryRow(context.Background(), "SELECT count() FROM "+env.DB+".events WHERE tenant_id = ?", tenantID).Scan(&stored); err != nil {
		t.Fatal(err)
	}
	if stored != 2 {
		t.Errorf("%d rows stored, want the 2 that could be read", stored)
	}
}

// `analyticsd spool status` and `inspect` read a running server's spool without its lock. Before, a
// segment the server renamed to in-flight (or shipped and removed) between the listing and its
// opening was reported with an error and its rows left out of the totals.
func TestInspectToleratesSegmentsShippedMeanwhile(t *testing.T) {
	dir := t.TempDir()
	sp, err := spool.Open(spool.Options{Dir: dir, Format: recordFormat})
	if err != nil {
		t.Fatal(err)
	}
	defer sp.Close()
	now := time.Now().UTC().Truncate(time.Second)
	row := Row{ID: uuid.New(), TenantID: uuid.New(), Ts: now, ReceivedAt: now, Event: "a.b", Source: "app", Props: "{}"}
	var stop atomic.Bool
	done := make(chan error, 1)
	go func() { // what a running server does to its segments
		for !stop.Load() {
			g, err := sp.Create()
			if err == nil {
				err = g.Append(appendRecord(nil, 1<<3, []Row{row}, nil))
			}
			if err == nil {
				err = g.Seal()
			}
			if err == nil {
				err = g.MarkInflight()
			}
			if err == nil {
				err = sp.Remove(g)
			}
			if err != nil {
				done <- err
				return
			}
		}
		done <- nil
	}()
	var reports, failures int
	var first string
	for deadline := time.Now().Add(2 * time.Second); time.Now().Before(deadline); reports++ {
		rep, err := InspectSpool(dir, nil, nil)
		if err != nil {
			failures++
			first = err.Error()
			continue
		}
		for _, g := range rep.Segments {
			if g.Error != "" || g.Events > 1 { // 0 while the segment is still being written
				if failures++; first == "" {
					first = fmt.Sprintf("segment %d: %d events, error %q", g.Seq, g.Events, g.Error)
				}
			}
		}
	}
	stop.Store(true)
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if failures > 0 {
		t.Errorf("%d of %d reports of a spool in use were wrong, first: %s", failures, reports, first)
	}
}

// A record a release could not decode is quarantined as it is, saying it holds no rows (it could not
// count them). Requeued by a release that can read it, the check that a file read whole ships all the
// rows it says it holds took it for damaged: the row was stored and the file kept for ever (found by
// review of that check).
func TestRequeueOfARecordNowReadableRemovesItsFile(t *testing.T) {
	env := testenv.Migrated(t)
	dir := t.TempDir()
	sp, err := spool.Open(spool.Options{Dir: dir, Format: recordFormat})
	if err != nil {
		t.Fatal(err)
	}
	tenantID := uuid.New()
	now := time.Now().UTC().Truncate(time.Second)
	row := Row{ID: uuid.New(), TenantID: tenantID, Ts: now, ReceivedAt: now, Event: "a.b", Source: "app", Props: "{}"}
	rec := appendRecord(nil, 10<<3, []Row{row}, nil)[spool.FrameOverhead:]
	// As the writer quarantines a record it cannot read: no rows counted.
	info, err := sp.Quarantine(spool.QuarantineInfo{Segment: "seg", Reason: "a spool record this release cannot read",
		Error: "unknown record version", Format: recordFormat}, [][]byte{rec})
	if err != nil {
		t.Fatal(err)
	}
	sp.Close()
	if res, err := Requeue(context.Background(), dir, info.Name, env.CH, env.DB, nil, RequeueOptions{}); err != nil || res.Inserted != 1 {
		t.Errorf("requeue of a once-unreadable record now readable: %+v, %v; want its row stored and the file removed", res, err)
	}
	if _, err := os.Stat(filepath.Join(spool.QuarantineDir(dir), info.Name)); err == nil {
		t.Error("the file is kept")
	}
}

// When who holds a spool cannot be read, inspect says so instead of reporting it free: an operator
// reading "no process holds it" may take a live spool for a retired one. Before, the error was
// dropped and the report said nobody held it. (Fails on the code before this change.)
func TestInspectReportsAnUnreadableHolder(t *testing.T) {
	dir := t.TempDir()
	if err := os.Mkdir(filepath.Join(dir, "LOCK"), 0o750); err != nil { // a LOCK that cannot be opened
		t.Fatal(err)
	}
	rep, err := InspectSpool(dir, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	if rep.Holder != nil || rep.HolderError == "" {
		t.Errorf("holder %+v, error %q; want the error reported", rep.Holder, rep.HolderError)
	}
}
