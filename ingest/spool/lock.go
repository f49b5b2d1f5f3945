package spool

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"
)

// LockedError: another process holds the spool directory. Two writers on one spool would take over
// each other's segments (rows acknowledged by one, deleted or renamed under it by the other).
type LockedError struct {
	Dir    string
	Holder string // what the holder wrote into the lock file: pid, host, start time
}

func (e *LockedError) Error() string {
	holder := e.Holder
	if holder == "" {
		holder = "another process"
	}
	return fmt.Sprintf("spool directory %s is in use by %s; every analyticsd serve needs its own ANALYTICS_SPOOL_DIR "+
		"(to ship a retired instance's spool, stop it and run `analyticsd spool drain --dir %s`)", e.Dir, holder, e.Dir)
}

// ErrLocked matches a *LockedError with errors.Is.
var ErrLocked = errors.New("spool directory is locked by another process")

func (e *LockedError) Is(target error) bool { return target == ErrLocked }

// Holder describes the process holding a spool, as written into its lock file.
type Holder struct {
	PID     int       `json:"pid"`
	Host    string    `json:"host"`
	Owner   string    `json:"owner,omitempty"`
	Started time.Time `json:"started"`
}

func (h Holder) String() string {
	s := fmt.Sprintf("pid %d on %s since %s", h.PID, h.Host, h.Started.UTC().Format(time.RFC3339))
	if h.Owner != "" {
		s += " (" + h.Owner + ")"
	}
	return s
}

const lockName = "LOCK"

// dirLock is a held spool lock: flocks on dir/LOCK and on the directory itself.
type dirLock struct{ file, dir *os.File }

func (l *dirLock) Close() error { return errors.Join(l.dir.Close(), l.file.Close()) }

// lockDir takes exclusive, non-blocking flocks on dir/LOCK and on dir itself, and records in LOCK who
// holds them. The kernel drops them when the process dies, however it dies, so a crash never leaves a
// stale lock. LOCK is what earlier releases lock, so a rolling upgrade on one directory still
// excludes; the directory's own lock is what an `rm LOCK` (an operator "clearing a stale lock")
// cannot take away: with LOCK alone, the next process created a new LOCK, locked it and worked beside
// the holder (found by review).
func lockDir(dir, owner string) (*dirLock, error) {
	f, err := os.OpenFile(filepath.Join(dir, lockName), os.O_RDWR|os.O_CREATE, 0o640)
	if err != nil {
		return nil, fmt.Errorf("open spool lock in %s: %w", dir, err)
	}
	d, err := os.Open(dir)
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("open spool directory %s: %w", dir, err)
	}
	l := &dirLock{file: f, dir: d}
	// A few tries: `analyticsd spool status` holds a shared lock for a moment to see whether a
	// server runs, and a server starting in that moment must not take it for another server.
	lock := func() error {
		if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
			return err
		}
		if err := syscall.Flock(int(d.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
			_ = syscall.Flock(int(f.Fd()), syscall.LOCK_UN)
			return err
		}
		return nil
	}
	err = lock()
	for try := 0; try < 5 && errors.Is(err, syscall.EWOULDBLOCK); try++ {
		time.Sleep(20 * time.Millisecond)
		err = lock()
	}
	if err != nil {
		defer l.Close()
		if errors.Is(err, syscall.EWOULDBLOCK) {
			b, _ := io.ReadAll(io.LimitReader(f, 4096))
			return nil, &LockedError{Dir: dir, Holder: describeHolder(b)}
		}
		return nil, fmt.Errorf("lock spool directory %s: %w", dir, err)
	}
	host, _ := os.Hostname()
	b, _ := json.Marshal(Holder{PID: os.Getpid(), Host: host, Owner: owner, Started: time.Now().UTC()})
	if err := f.Truncate(0); err == nil {
		_, _ = f.WriteAt(append(b, '\n'), 0)
	}
	return l, nil
}

func describeHolder(b []byte) string {
	var h Holder
	if json.Unmarshal(b, &h) == nil && h.PID != 0 {
		return h.String()
	}
	return strings.TrimSpace(string(b))
}

// ReadHolder reports who holds dir's lock right now, if anyone, without taking it.
func ReadHolder(dir string) (Holder, bool, error) {
	f, err := os.OpenFile(filepath.Join(dir, lockName), os.O_RDWR, 0)
	if errors.Is(err, os.ErrNotExist) {
		// LOCK removed under a holder: the directory's own lock still says it is held.
		return Holder{}, dirHeld(dir), nil
	}
	if err != nil {
		return Holder{}, false, err
	}
	defer f.Close()
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_SH|syscall.LOCK_NB); err == nil {
		_ = syscall.Flock(int(f.Fd()), syscall.LOCK_UN)
		return Holder{}, dirHeld(dir), nil
	}
	var h Holder
	b, _ := io.ReadAll(io.LimitReader(f, 4096))
	_ = json.Unmarshal(b, &h)
	return h, true, nil
}

// dirHeld says whether a process holds dir's own lock.
func dirHeld(dir string) bool {
	d, err := os.Open(dir)
	if err != nil {
		return false
	}
	defer d.Close()
	if err := syscall.Flock(int(d.Fd()), syscall.LOCK_SH|syscall.LOCK_NB); err != nil {
		return errors.Is(err, syscall.EWOULDBLOCK)
	}
	_ = syscall.Flock(int(d.Fd()), syscall.LOCK_UN)
	return false
}
