package spool

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"time"
)

const damagedSub = "damaged"

// DamagedDir is where a spool directory keeps the damaged stretches of its segments.
func DamagedDir(spoolDir string) string { return filepath.Join(spoolDir, damagedSub) }

// DamagedInfo describes one kept damaged stretch.
type DamagedInfo struct {
	Name  string    `json:"name"`
	Bytes int64     `json:"bytes"`
	At    time.Time `json:"at"`
}

// KeepDamaged writes a damaged stretch of segment (its ID) at offset, as it was, durably, before the
// segment may go. The bytes are not records anyone can read back (their checksums failed): they
// are kept apart from the quarantine, which requeue ships and erasure scrubs, for an operator to
// inspect and delete. Kept again after a crash, a stretch lands under the same name.
func (s *Spool) KeepDamaged(segment string, offset int64, b []byte) (string, error) {
	dir := DamagedDir(s.opts.Dir)
	if _, err := os.Stat(dir); errors.Is(err, os.ErrNotExist) {
		if err := os.Mkdir(dir, 0o750); err != nil && !errors.Is(err, os.ErrExist) {
			return "", fmt.Errorf("create damaged dir: %w", err)
		}
		if err := syncDir(s.opts.Dir); err != nil { // the new directory's entry
			return "", fmt.Errorf("create damaged dir: sync: %w", err)
		}
	}
	name := fmt.Sprintf("%s-at-%d.bin", segment, offset)
	tmp := filepath.Join(dir, "."+name+".tmp")
	if err := writeDurably(tmp, b); err != nil {
		return "", fmt.Errorf("keep damaged spool bytes: %w", err)
	}
	if err := os.Rename(tmp, filepath.Join(dir, name)); err != nil {
		os.Remove(tmp)
		return "", fmt.Errorf("keep damaged spool bytes: %w", err)
	}
	if err := syncDir(dir); err != nil {
		return "", fmt.Errorf("keep damaged spool bytes: sync dir: %w", err)
	}
	return name, nil
}

// ListDamaged lists the damaged stretches a spool directory keeps, by name. It needs no lock.
func ListDamaged(spoolDir string) ([]DamagedInfo, error) {
	dir := DamagedDir(spoolDir)
	entries, err := os.ReadDir(dir)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read damaged dir %s: %w", dir, err)
	}
	var out []DamagedInfo
	for _, e := range entries {
		if strings.HasPrefix(e.Name(), ".") {
			continue
		}
		info, err := e.Info()
		if err != nil {
			continue // removed meanwhile
		}
		out = append(out, DamagedInfo{Name: e.Name(), Bytes: info.Size(), At: info.ModTime().UTC()})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out, nil
}
