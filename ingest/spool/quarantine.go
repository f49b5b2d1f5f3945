package spool

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"syscall"
	"time"
)

// QuarantineInfo describes one quarantine file: rows ClickHouse kept refusing (or that could not be
// shipped without risking a duplicate), taken out of the spool so they stop blocking the rows behind
// them. They are kept, never deleted, until an operator requeues them (`analyticsd spool requeue`).
type QuarantineInfo struct {
	Name       string    `json:"name"`
	Segment    string    `json:"segment"` // the segment the rows came from
	Reason     string    `json:"reason"`
	Error      string    `json:"error,omitempty"`
	Events     int       `json:"events"`
	Increments int       `json:"increments"`
	Tenants    []string  `json:"tenants,omitempty"`
	Attempts   int       `json:"attempts"`
	At         time.Time `json:"at"`
	Format     byte      `json:"format"`
}

// Rows is events plus increments.
func (q QuarantineInfo) Rows() int { return q.Events + q.Increments }

const quarantineSub = "quarantine"

// QuarantineDir is where a spool directory keeps its quarantine.
func QuarantineDir(spoolDir string) string { return filepath.Join(spoolDir, quarantineSub) }

// Quarantine writes records (payloads in the spool's format) to a new quarantine file, durably: a
// temporary file, fsync'd, renamed into place, and the directory fsync'd. Only then may the caller
// drop the rows from the spool. The file starts with the info as its first record.
func (s *Spool) Quarantine(info QuarantineInfo, records [][]byte) (QuarantineInfo, error) {
	dir := QuarantineDir(s.opts.Dir)
	if err := os.MkdirAll(dir, 0o750); err != nil {
		return info, fmt.Errorf("create quarantine dir: %w", err)
	}
	info.At = time.Now().UTC()
	if info.Format == 0 {
		info.Format = s.opts.Format
	}
	info.Name = fmt.Sprintf("%s-%s.seg", info.At.Format("20060102T150405.000000000Z"), strings.ReplaceAll(info.Segment, "-", ""))
	meta, err := json.Marshal(info)
	if err != nil {
		return info, err
	}
	buf := make([]byte, 0, headerSize+frameHeader+len(meta))
	buf = append(append(append(buf, magic...), info.Format), make([]byte, 16)...)
	buf, start := FrameStart(buf)
	buf = FrameEnd(append(buf, meta...), start)
	for _, r := range records {
		buf, start = FrameStart(buf)
		buf = FrameEnd(append(buf, r...), start)
	}
	tmp := filepath.Join(dir, "."+info.Name+".tmp")
	if err := writeDurably(tmp, buf); err != nil {
		return info, fmt.Errorf("write quarantine file: %w", err)
	}
	if err := os.Rename(tmp, filepath.Join(dir, info.Name)); err != nil {
		os.Remove(tmp)
		return info, fmt.Errorf("write quarantine file: %w", err)
	}
	if err := syncDir(dir); err != nil {
		return info, fmt.Errorf("write quarantine file: sync dir: %w", err)
	}
	s.quarantine.put(info)
	return info, nil
}

func writeDurably(path string, b []byte) error {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_TRUNC|os.O_WRONLY, 0o640)
	if err != nil {
		return err
	}
	if _, err = f.Write(b); err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		os.Remove(path)
	}
	return err
}

// QuarantineStats counts the files and rows in quarantine now (files removed by another process,
// such as `analyticsd spool requeue`, are noticed).
func (s *Spool) QuarantineStats() (files, rows int) {
	infos, _ := s.quarantine.list(QuarantineDir(s.opts.Dir))
	for _, q := range infos {
		rows += q.Rows()
	}
	return len(infos), rows
}

// ListQuarantine lists a spool directory's quarantine files, oldest first. It needs no lock.
func ListQuarantine(spoolDir string) ([]QuarantineInfo, error) {
	var c quarantineCache
	return c.list(QuarantineDir(spoolDir))
}

// quarantineCache remembers each file's info (files never change once written).
type quarantineCache struct {
	mu    sync.Mutex
	infos map[string]QuarantineInfo
}

func (c *quarantineCache) put(q QuarantineInfo) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.infos == nil {
		c.infos = map[string]QuarantineInfo{}
	}
	c.infos[q.Name] = q
}

func (c *quarantineCache) list(dir string) ([]QuarantineInfo, error) {
	entries, err := os.ReadDir(dir)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read quarantine dir %s: %w", dir, err)
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.infos == nil {
		c.infos = map[string]QuarantineInfo{}
	}
	var out []QuarantineInfo
	seen := map[string]bool{}
	for _, e := range entries {
		name := e.Name()
		if strings.HasPrefix(name, ".") || filepath.Ext(name) != segExt {
			continue
		}
		seen[name] = true
		q, ok := c.infos[name]
		if !ok {
			r, info, err := openQuarantine(dir, name, false)
			if err != nil {
				q = QuarantineInfo{Name: name, Reason: "unreadable: " + err.Error()}
			} else {
				r.Close()
				q = info
			}
			c.infos[name] = q
		}
		out = append(out, q)
	}
	for name := range c.infos {
		if !seen[name] {
			delete(c.infos, name)
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out, nil
}

// OpenQuarantine opens one quarantine file of a spool directory for requeueing: it takes an exclusive
// lock on the file (ErrLocked if another requeue holds it) and returns a reader positioned at the
// first row record. The lock goes with the reader's Close.
func OpenQuarantine(spoolDir, name string) (*Reader, QuarantineInfo, error) {
	if name != filepath.Base(name) || filepath.Ext(name) != segExt {
		return nil, QuarantineInfo{}, fmt.Errorf("quarantine file %q: want a name listed by `analyticsd spool status`", name)
	}
	return openQuarantine(QuarantineDir(spoolDir), name, true)
}

func openQuarantine(dir, name string, exclusive bool) (*Reader, QuarantineInfo, error) {
	var info QuarantineInfo
	path := filepath.Join(dir, name)
	f, err := os.Open(path)
	if err != nil {
		return nil, info, fmt.Errorf("open quarantine file %s: %w", path, err)
	}
	if exclusive {
		quarantineOpened(path)
		if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
			f.Close()
			return nil, info, fmt.Errorf("quarantine file %s is being requeued by another process: %w", path, ErrLocked)
		}
		// The lock's holder may have finished between our open and our lock: a requeue that shipped
		// and removed the file, or an erasure's scrub that replaced it with a copy without the
		// erased rows. Its rows are no longer ours to ship (a scrubbed user's would come back).
		if same, err := sameFile(f, path); err != nil || !same {
			f.Close()
			return nil, info, fmt.Errorf("quarantine file %s was requeued or replaced meanwhile: %w", path, os.ErrNotExist)
		}
	}
	r, err := newReader(f, int64(headerSize))
	if err != nil {
		f.Close()
		return nil, info, fmt.Errorf("read quarantine file %s: %w", path, err)
	}
	if !r.Next() {
		r.Close()
		return nil, info, fmt.Errorf("read quarantine file %s: no description record", path)
	}
	if err := json.Unmarshal(r.Record(), &info); err != nil {
		r.Close()
		return nil, info, fmt.Errorf("read quarantine file %s: %w", path, err)
	}
	info.Name = name
	return r, info, nil
}

// quarantineOpened is called between a quarantine file's opening and its locking: a test's way into
// that window.
var quarantineOpened = func(path string) {}

// sameFile says whether path still names the file f has open.
func sameFile(f *os.File, path string) (bool, error) {
	open, err := f.Stat()
	if err != nil {
		return false, err
	}
	now, err := os.Stat(path)
	if errors.Is(err, os.ErrNotExist) {
		return false, nil
	}
	if err != nil {
		return false, err
	}
	return os.SameFile(open, now), nil
}

// RemoveQuarantine deletes a quarantine file once its rows are shipped.
func RemoveQuarantine(spoolDir, name string) error {
	dir := QuarantineDir(spoolDir)
	if err := os.Remove(filepath.Join(dir, name)); err != nil {
		return fmt.Errorf("remove quarantine file: %w", err)
	}
	return syncDir(dir)
}
