package ingest

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/ClickHouse/clickhouse-go/v2/lib/driver"
	"github.com/google/uuid"
)

// Durability says when an accepted request is acknowledged.
type Durability string

const (
	// DurabilityFsync (default): rows are written to the spool and fsync'd before the 2xx. Nothing
	// acknowledged is lost to a crash of analyticsd, of ClickHouse or of the machine.
	DurabilityFsync Durability = "fsync"
	// DurabilityBuffered: written to the spool without fsync. Survives analyticsd being killed and
	// ClickHouse outages; the last moments before a power loss or kernel crash may be lost.
	DurabilityBuffered Durability = "buffered"
	// DurabilityMemory: no spool; rows wait in memory for ClickHouse. A crash of analyticsd loses
	// whatever was not yet inserted. Fastest, for data you can afford to lose.
	DurabilityMemory Durability = "memory"
)

// ParseDurability reads a Durability name.
func ParseDurability(s string) (Durability, error) {
	switch d := Durability(s); d {
	case DurabilityFsync, DurabilityBuffered, DurabilityMemory:
		return d, nil
	}
	return "", fmt.Errorf("durability %q: want fsync, buffered or memory", s)
}

// WriterConfig shapes the spool and the ClickHouse writer.
type WriterConfig struct {
	Dir             string        // spool directory (not used in memory mode)
	Durability      Durability    // default fsync
	BatchRows       int           // a segment is sealed and shipped at this many rows (default 50,000)
	FlushInterval   time.Duration // ... or when its first row is this old (default 1 s)
	Flushers        int           // concurrent ClickHouse inserts (default 2)
	MaxBufferedRows int           // rows kept in memory awaiting ClickHouse; beyond, spool-only (default 1,000,000)
	MaxSpoolBytes   int64         // spool size at which ingest answers 503 (default 8 GiB)
	InsertTimeout   time.Duration // one ClickHouse insert (default 60 s)
	RetryMax        time.Duration // longest wait between insert retries (default 30 s)
}

func (c *WriterConfig) defaults() {
	if c.Durability == "" {
		c.Durability = DurabilityFsync
	}
	if c.BatchRows <= 0 {
		c.BatchRows = 50_000
	}
	if c.FlushInterval <= 0 {
		c.FlushInterval = time.Second
	}
	if c.Flushers <= 0 {
		c.Flushers = 2
	}
	if c.MaxBufferedRows <= 0 {
		c.MaxBufferedRows = 1_000_000
	}
	if c.MaxSpoolBytes <= 0 {
		c.MaxSpoolBytes = 8 << 30
	}
	if c.InsertTimeout <= 0 {
		c.InsertTimeout = 60 * time.Second
	}
	if c.RetryMax <= 0 {
		c.RetryMax = 30 * time.Second
	}
}

// ErrFull is returned by Append when the spool (or, in memory mode, the buffer) has no room: the
// request must be refused with 503 and Retry-After, never acknowledged.
var ErrFull = errors.New("ingest buffer is full")

// ErrClosed is returned by Append after Close.
var ErrClosed = errors.New("ingest writer is shutting down")

// FullError carries the Retry-After advice with ErrFull.
type FullError struct {
	Reason     string
	RetryAfter time.Duration
}

func (e *FullError) Error() string {
	return "ingest is temporarily unable to accept events (" + e.Reason + "); retry after " + strconv.Itoa(int(e.RetryAfter.Seconds())) + "s"
}
func (e *FullError) Unwrap() error     { return ErrFull }
func (e *FullError) HTTPStatus() int   { return http.StatusServiceUnavailable }
func (e *FullError) ErrorCode() string { return "ingest_unavailable" }
func (e *FullError) RetryAfterSeconds() int {
	s := int(e.RetryAfter.Round(time.Second).Seconds())
	return max(s, 1)
}

// segment is a unit of the spool and of shipping: the rows of consecutive requests, one file on disk
// (none in memory mode), inserted into ClickHouse as one batch and deleted once inserted.
type segment struct {
	seq    uint64
	path   string // "" in memory mode
	f      *os.File
	size   int64
	opened time.Time

	events   [][]Row // each request's rows as it sent them: never copied into one growing slice
	incs     []Increment
	nEvents  int
	nIncs    int
	spilled  bool // rows not kept in memory: read back from the file to ship
	inMemory int  // rows counted against MaxBufferedRows

	// attempted: an insert of this segment may have reached ClickHouse (it failed ambiguously, or the
	// process died mid-insert); the next attempt first drops rows ClickHouse already has.
	attempted  bool
	eventsDone bool
	claimed    bool // a flusher is shipping it
}

type appendReq struct {
	events []Row
	incs   []Increment
	rec    []byte
	done   chan error
}

// Writer accepts validated rows durably and ships them to ClickHouse in large batches.
type Writer struct {
	cfg     WriterConfig
	ch      driver.Conn
	db      string
	log     *slog.Logger
	metrics *Metrics

	appends chan appendReq
	quit    chan struct{}
	// gate orders Append against Close: once Close holds it, no request can be queued that the
	// committer's final drain would miss.
	gate   sync.RWMutex
	closed bool
	wg     sync.WaitGroup

	mu            sync.Mutex
	cond          *sync.Cond
	active        *segment
	sealed        []*segment // oldest first; shipped by the flushers
	nextSeq       uint64
	spoolBytes    int64
	buffered      int // rows in memory across unshipped segments
	draining      bool
	committerDone bool
	drainDone     chan struct{} // closed when Close's deadline passes
	lastErr       error
	lastErrAt     time.Time
	errLogged     time.Time
}

// NewWriter opens (creating if needed) the spool in cfg.Dir and picks up every segment a previous
// process left there, to be shipped first. Call Start to begin, Close to stop.
func NewWriter(cfg WriterConfig, ch driver.Conn, db string, m *Metrics, log *slog.Logger) (*Writer, error) {
	cfg.defaults()
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if m == nil {
		m = NewMetrics(nil, 0)
	}
	w := &Writer{cfg: cfg, ch: ch, db: db, log: log, metrics: m, appends: make(chan appendReq, 256), quit: make(chan struct{}), nextSeq: 1}
	w.cond = sync.NewCond(&w.mu)
	if cfg.Durability != DurabilityMemory {
		if err := os.MkdirAll(cfg.Dir, 0o750); err != nil {
			return nil, fmt.Errorf("create spool dir %s: %w", cfg.Dir, err)
		}
		if err := w.recover(); err != nil {
			return nil, err
		}
	}
	w.updateGauges()
	return w, nil
}

const (
	segExt      = ".seg"
	inflightExt = ".inflight"
)

func (w *Writer) segPath(seq uint64, ext string) string {
	return filepath.Join(w.cfg.Dir, fmt.Sprintf("%016d%s", seq, ext))
}

// recover lists the spool's leftovers: every segment file is a sealed, unshipped batch. Its rows are
// read back from disk when its turn comes; a torn tail (a write cut short, never acknowledged) is ignored.
func (w *Writer) recover() error {
	entries, err := os.ReadDir(w.cfg.Dir)
	if err != nil {
		return fmt.Errorf("read spool dir %s: %w", w.cfg.Dir, err)
	}
	for _, e := range entries {
		name := e.Name()
		ext := filepath.Ext(name)
		if ext != segExt && ext != inflightExt {
			continue
		}
		seq, err := strconv.ParseUint(strings.TrimSuffix(name, ext), 10, 64)
		if err != nil {
			continue
		}
		info, err := e.Info()
		if err != nil {
			return fmt.Errorf("stat spool segment %s: %w", name, err)
		}
		s := &segment{seq: seq, path: filepath.Join(w.cfg.Dir, name), size: info.Size(), spilled: true, attempted: ext == inflightExt}
		w.sealed = append(w.sealed, s)
		w.spoolBytes += s.size
		w.nextSeq = max(w.nextSeq, seq+1)
	}
	sort.Slice(w.sealed, func(i, j int) bool { return w.sealed[i].seq < w.sealed[j].seq })
	if len(w.sealed) > 0 {
		w.log.Info("spool has segments from a previous run; replaying them first", "segments", len(w.sealed), "bytes", w.spoolBytes)
	}
	return nil
}

// Start launches the spool committer and the flushers.
func (w *Writer) Start() {
	w.wg.Add(1)
	go w.commitLoop()
	for i := 0; i < w.cfg.Flushers; i++ {
		w.wg.Add(1)
		go w.flushLoop(i)
	}
}

// Append stores rows durably (per the configured Durability) and returns once they are safe to
// acknowledge. It returns a *FullError (wrapping ErrFull) when there is no room, and ErrClosed
// during shutdown; in both cases nothing was stored.
func (w *Writer) Append(ctx context.Context, events []Row, incs []Increment) error {
	if len(events) == 0 && len(incs) == 0 {
		return nil
	}
	req := appendReq{events: events, incs: incs, done: make(chan error, 1)}
	if w.cfg.Durability != DurabilityMemory {
		req.rec = encodeRecord(nil, events, incs)
	}
	w.gate.RLock()
	if w.closed {
		w.gate.RUnlock()
		return ErrClosed
	}
	select {
	case w.appends <- req:
		w.gate.RUnlock()
	case <-ctx.Done():
		w.gate.RUnlock()
		return ctx.Err()
	}
	// Once queued, the committer always answers; waiting for it (not ctx) keeps "acknowledged"
	// and "stored" the same thing.
	return <-req.done
}

func (w *Writer) commitLoop() {
	defer w.wg.Done()
	tick := time.NewTicker(min(w.cfg.FlushInterval/4, 250*time.Millisecond))
	defer tick.Stop()
	group := make([]appendReq, 0, 64)
	for {
		select {
		case req := <-w.appends:
			group = append(group[:0], req)
		drain:
			for len(group) < cap(group) {
				select {
				case r := <-w.appends:
					group = append(group, r)
				default:
					break drain
				}
			}
			w.commit(group)
		case <-tick.C:
			w.mu.Lock()
			if w.active != nil && time.Since(w.active.opened) >= w.cfg.FlushInterval {
				w.sealLocked()
			}
			w.mu.Unlock()
		case <-w.quit:
			// Answer whatever is still queued, then seal the last segment for the final drain.
			for {
				select {
				case r := <-w.appends:
					w.commit([]appendReq{r})
					continue
				default:
				}
				break
			}
			w.mu.Lock()
			w.sealLocked()
			w.committerDone = true
			w.cond.Broadcast()
			w.mu.Unlock()
			return
		}
	}
}

// commit writes a group of requests with one write and one fsync (group commit), then makes their
// rows available to the flushers.
func (w *Writer) commit(group []appendReq) {
	rows := 0
	var bytes int64
	for _, r := range group {
		rows += len(r.events) + len(r.incs)
		bytes += int64(len(r.rec))
	}
	err := w.writeGroup(group, rows, bytes)
	for _, r := range group {
		r.done <- err
	}
}

func (w *Writer) writeGroup(group []appendReq, rows int, size int64) error {
	w.mu.Lock()
	defer w.mu.Unlock()
	memory := w.cfg.Durability == DurabilityMemory
	if memory && w.buffered+rows > w.cfg.MaxBufferedRows {
		w.metrics.Refused.WithLabelValues("buffer_full").Inc()
		return &FullError{Reason: "in-memory buffer full while ClickHouse catches up", RetryAfter: w.retryAfter()}
	}
	if !memory && w.spoolBytes+size > w.cfg.MaxSpoolBytes {
		w.metrics.Refused.WithLabelValues("spool_full").Inc()
		return &FullError{Reason: "spool full while ClickHouse catches up", RetryAfter: w.retryAfter()}
	}
	if w.active == nil {
		if err := w.openSegmentLocked(); err != nil {
			w.metrics.Refused.WithLabelValues("spool_error").Inc()
			return &FullError{Reason: "spool unavailable: " + err.Error(), RetryAfter: 5 * time.Second}
		}
	}
	s := w.active
	if !memory {
		buf := group[0].rec
		if len(group) > 1 {
			buf = make([]byte, 0, size)
			for _, r := range group {
				buf = append(buf, r.rec...)
			}
		}
		if err := w.writeFile(s, buf); err != nil {
			w.metrics.Refused.WithLabelValues("spool_error").Inc()
			reason := "spool write failed"
			if errors.Is(err, syscall.ENOSPC) || errors.Is(err, syscall.EDQUOT) {
				reason = "spool disk full"
			}
			w.log.Error("spool write failed; refusing requests", "segment", s.seq, "err", err)
			return &FullError{Reason: reason, RetryAfter: 5 * time.Second}
		}
	}
	for _, r := range group {
		s.nEvents += len(r.events)
		s.nIncs += len(r.incs)
		if !s.spilled && (memory || w.buffered+len(r.events)+len(r.incs) <= w.cfg.MaxBufferedRows) {
			if len(r.events) > 0 {
				s.events = append(s.events, r.events)
			}
			s.incs = append(s.incs, r.incs...)
			s.inMemory += len(r.events) + len(r.incs)
			w.buffered += len(r.events) + len(r.incs)
		} else if !s.spilled {
			// Past the memory budget: keep this segment on disk only, to be read back when shipped.
			s.spilled = true
			w.buffered -= s.inMemory
			s.events, s.incs, s.inMemory = nil, nil, 0
		}
	}
	if s.nEvents+s.nIncs >= w.cfg.BatchRows {
		w.sealLocked()
	}
	w.updateGaugesLocked()
	return nil
}

func (w *Writer) writeFile(s *segment, buf []byte) error {
	n, err := s.f.Write(buf)
	if err == nil && w.cfg.Durability == DurabilityFsync {
		err = s.f.Sync()
	}
	if err != nil {
		// Cut the file back so a partial write can never be replayed as if acknowledged.
		if terr := s.f.Truncate(s.size); terr != nil {
			err = errors.Join(err, terr)
		}
		_, _ = s.f.Seek(s.size, 0)
		return err
	}
	s.size += int64(n)
	w.spoolBytes += int64(n)
	return nil
}

func (w *Writer) openSegmentLocked() error {
	s := &segment{seq: w.nextSeq, opened: time.Now()}
	if w.cfg.Durability != DurabilityMemory {
		s.path = w.segPath(s.seq, segExt)
		f, err := os.OpenFile(s.path, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o640)
		if err != nil {
			return err
		}
		if w.cfg.Durability == DurabilityFsync {
			if err := syncDir(w.cfg.Dir); err != nil {
				f.Close()
				os.Remove(s.path)
				return err
			}
		}
		s.f = f
	}
	w.nextSeq++
	w.active = s
	return nil
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}

func (w *Writer) sealLocked() {
	s := w.active
	if s == nil {
		return
	}
	w.active = nil
	if s.f != nil {
		if err := s.f.Close(); err != nil {
			w.log.Error("close spool segment", "segment", s.seq, "err", err)
		}
		s.f = nil
	}
	if s.nEvents+s.nIncs == 0 {
		w.removeFile(s)
		return
	}
	w.sealed = append(w.sealed, s)
	w.cond.Broadcast()
}

func (w *Writer) removeFile(s *segment) {
	if s.path == "" {
		return
	}
	if err := os.Remove(s.path); err != nil && !errors.Is(err, os.ErrNotExist) {
		w.log.Error("remove shipped spool segment", "path", s.path, "err", err)
		return
	}
	w.spoolBytes -= s.size
}

// next hands a flusher the oldest sealed segment nobody is shipping, waiting for one.
func (w *Writer) next() *segment {
	w.mu.Lock()
	defer w.mu.Unlock()
	for {
		for _, s := range w.sealed {
			if !s.claimed {
				s.claimed = true
				return s
			}
		}
		if w.draining && w.committerDone {
			return nil
		}
		w.cond.Wait()
	}
}

func (w *Writer) flushLoop(id int) {
	defer w.wg.Done()
	backoff := 100 * time.Millisecond
	for {
		s := w.next()
		if s == nil {
			return
		}
		for {
			err := w.ship(s)
			if err == nil {
				backoff = 100 * time.Millisecond
				break
			}
			w.noteError(err)
			w.mu.Lock()
			draining := w.draining
			w.mu.Unlock()
			if draining && w.drainExpired() {
				// Shutdown deadline: the segment stays in the spool for the next start.
				w.mu.Lock()
				s.claimed = false
				w.mu.Unlock()
				return
			}
			select {
			case <-time.After(backoff):
			case <-w.drainDeadline():
			}
			backoff = min(backoff*2, w.cfg.RetryMax)
		}
	}
}

// drainDeadline is closed once a shutdown's deadline has passed (nil, never ready, before shutdown).
func (w *Writer) drainDeadline() <-chan struct{} {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.drainDone
}

func (w *Writer) drainExpired() bool {
	select {
	case <-w.drainDeadline():
		return true
	default:
		return false
	}
}

func (w *Writer) noteError(err error) {
	w.metrics.InsertErrors.Inc()
	w.mu.Lock()
	defer w.mu.Unlock()
	w.lastErr, w.lastErrAt = err, time.Now()
	// Throttled: one line per 10 s however many batches fail.
	if time.Since(w.errLogged) >= 10*time.Second {
		w.errLogged = time.Now()
		w.log.Error("clickhouse insert failed; the batch stays in the spool and is retried", "err", err,
			"pending_segments", len(w.sealed), "spool_bytes", w.spoolBytes)
	}
}

// retryAfter estimates how long a refused client should wait: longer while inserts are failing.
func (w *Writer) retryAfter() time.Duration {
	if w.lastErr != nil && time.Since(w.lastErrAt) < 30*time.Second {
		return 10 * time.Second
	}
	return 2 * time.Second
}

// ship inserts one segment's rows and, on success, deletes it.
func (w *Writer) ship(s *segment) error {
	events, incs := s.events, s.incs
	if s.spilled {
		var err error
		if events, incs, err = w.readSegment(s); err != nil {
			return err
		}
	}
	if s.path != "" && !s.attempted {
		// Mark the segment in flight on disk: if we die mid-insert, the next start checks ClickHouse
		// for its rows before inserting them again.
		inflight := w.segPath(s.seq, inflightExt)
		if err := os.Rename(s.path, inflight); err != nil {
			return fmt.Errorf("mark spool segment %d in flight: %w", s.seq, err)
		}
		s.path = inflight
	}
	if s.attempted {
		var err error
		if events, incs, err = w.withoutInserted(s, events, incs); err != nil {
			return err
		}
	}
	s.attempted = true
	start := time.Now()
	nEvents := 0
	for _, c := range events {
		nEvents += len(c)
	}
	if !s.eventsDone && nEvents > 0 {
		if err := w.insertEvents(events); err != nil {
			return err
		}
	}
	s.eventsDone = true
	if len(incs) > 0 {
		if err := w.insertIncrements(incs); err != nil {
			return err
		}
	}
	w.metrics.FlushDuration.Observe(time.Since(start).Seconds())
	w.metrics.BatchRows.Observe(float64(nEvents + len(incs)))
	w.metrics.RowsWritten.Add(float64(nEvents + len(incs)))

	w.mu.Lock()
	defer w.mu.Unlock()
	w.removeFile(s)
	w.sealed = slices.DeleteFunc(w.sealed, func(x *segment) bool { return x == s })
	w.buffered -= s.inMemory
	s.events, s.incs, s.inMemory = nil, nil, 0
	w.lastErr = nil
	w.updateGaugesLocked()
	w.cond.Broadcast()
	return nil
}

func (w *Writer) readSegment(s *segment) ([][]Row, []Increment, error) {
	data, err := os.ReadFile(s.path)
	if err != nil {
		return nil, nil, fmt.Errorf("read spool segment %s: %w", s.path, err)
	}
	events, incs, n := decodeRecords(data, make([]Row, 0, s.nEvents), make([]Increment, 0, s.nIncs))
	if n != len(data) {
		w.log.Warn("spool segment has a torn tail (an unacknowledged write cut short); ignoring it",
			"segment", s.path, "intact_bytes", n, "size", len(data))
	}
	return [][]Row{events}, incs, nil
}

// withoutInserted drops the rows of s that ClickHouse already has, so a retried or replayed segment
// adds each row once. Rows of a segment share a short received_at window, which bounds the lookup.
func (w *Writer) withoutInserted(s *segment, chunks [][]Row, incs []Increment) ([][]Row, []Increment, error) {
	ctx, cancel := context.WithTimeout(context.Background(), w.cfg.InsertTimeout)
	defer cancel()
	have := map[uuid.UUID]struct{}{}
	events := slices.Concat(chunks...) // a fresh slice: the filtering below must not touch the segment's rows
	if len(events) > 0 && !s.eventsDone {
		lo, hi, rlo, rhi := events[0].Ts, events[0].Ts, events[0].ReceivedAt, events[0].ReceivedAt
		for _, r := range events {
			lo, hi = minTime(lo, r.Ts), maxTime(hi, r.Ts)
			rlo, rhi = minTime(rlo, r.ReceivedAt), maxTime(rhi, r.ReceivedAt)
		}
		if err := w.collectIDs(ctx, have, "SELECT id FROM "+w.db+".events WHERE ts >= ? AND ts <= ? AND received_at >= ? AND received_at <= ?", lo, hi, rlo, rhi); err != nil {
			return nil, nil, err
		}
	}
	if len(incs) > 0 {
		lo, hi := incs[0].Ts, incs[0].Ts
		for _, r := range incs {
			lo, hi = minTime(lo, r.Ts), maxTime(hi, r.Ts)
		}
		if err := w.collectIDs(ctx, have, "SELECT id FROM "+w.db+".usage_increments WHERE ts >= ? AND ts <= ?", lo, hi); err != nil {
			return nil, nil, err
		}
	}
	if len(have) == 0 {
		return chunks, incs, nil
	}
	before := len(events) + len(incs)
	events = slices.DeleteFunc(events, func(r Row) bool { _, ok := have[r.ID]; return ok })
	incs = slices.DeleteFunc(slices.Clone(incs), func(r Increment) bool { _, ok := have[r.ID]; return ok })
	w.log.Info("spool segment was partly or wholly inserted before; skipping rows ClickHouse has",
		"segment", s.seq, "skipped", before-len(events)-len(incs), "remaining", len(events)+len(incs))
	return [][]Row{events}, incs, nil
}

func (w *Writer) collectIDs(ctx context.Context, into map[uuid.UUID]struct{}, query string, args ...any) error {
	rows, err := w.ch.Query(ctx, query, args...)
	if err != nil {
		return fmt.Errorf("check which spooled rows clickhouse has: %w", err)
	}
	defer rows.Close()
	for rows.Next() {
		var id uuid.UUID
		if err := rows.Scan(&id); err != nil {
			return fmt.Errorf("check which spooled rows clickhouse has: %w", err)
		}
		into[id] = struct{}{}
	}
	return rows.Err()
}

func minTime(a, b time.Time) time.Time {
	if b.Before(a) {
		return b
	}
	return a
}

func maxTime(a, b time.Time) time.Time {
	if b.After(a) {
		return b
	}
	return a
}

// insertBlockRows is how many rows go into each block of one INSERT. The server squashes the blocks
// of an INSERT back into large ones before writing parts (min_insert_block_size_rows), so the parts
// are the same as with one big block, while the client encodes every block into the same, already
// grown column buffers. One block per segment meant growing ~15 MB of fresh buffers per insert, and
// on this VM the page faults of that made runtime.growslice 42% of ingest CPU (BENCHMARKS.md).
const insertBlockRows = 8192

// insertEvents inserts the rows of chunks, in order, as one INSERT.
func (w *Writer) insertEvents(chunks [][]Row) error {
	ctx, cancel := context.WithTimeout(context.Background(), w.cfg.InsertTimeout)
	defer cancel()
	batch, err := w.ch.PrepareBatch(ctx, "INSERT INTO "+w.db+".events (tenant_id, ts, id, received_at, event, source, user_id, props, ip, request_id)")
	if err != nil {
		return fmt.Errorf("insert into %s.events: prepare: %w", w.db, err)
	}
	total := 0
	for _, c := range chunks {
		total += len(c)
	}
	n := min(total, insertBlockRows)
	tenant, id := make([]uuid.UUID, 0, n), make([]uuid.UUID, 0, n)
	ts, recv := make([]time.Time, 0, n), make([]time.Time, 0, n)
	event, source, user, props, ip, req := make([]string, 0, n), make([]string, 0, n), make([]string, 0, n), make([]string, 0, n), make([]string, 0, n), make([]string, 0, n)
	// send hands the block to the batch; on failure the INSERT is aborted.
	send := func() error {
		var err error
		for i, col := range []any{tenant, ts, id, recv, event, source, user, props, ip, req} {
			if err = batch.Column(i).Append(col); err != nil {
				err = fmt.Errorf("column %d: %w", i, err)
				break
			}
		}
		if err == nil {
			err = batch.Flush()
		}
		if err != nil {
			_ = batch.Abort()
			return fmt.Errorf("insert %d rows into %s.events: %w", total, w.db, err)
		}
		tenant, id, ts, recv = tenant[:0], id[:0], ts[:0], recv[:0]
		event, source, user, props, ip, req = event[:0], source[:0], user[:0], props[:0], ip[:0], req[:0]
		return nil
	}
	for _, c := range chunks {
		for i := range c {
			r := &c[i]
			tenant, ts, id, recv = append(tenant, r.TenantID), append(ts, r.Ts), append(id, r.ID), append(recv, r.ReceivedAt)
			event, source, user = append(event, r.Event), append(source, r.Source), append(user, r.UserID)
			props, ip, req = append(props, r.Props), append(ip, r.IP), append(req, r.RequestID)
			if len(tenant) == insertBlockRows {
				if err := send(); err != nil {
					return err
				}
			}
		}
	}
	if len(tenant) > 0 {
		if err := send(); err != nil {
			return err
		}
	}
	if err := batch.Send(); err != nil {
		return fmt.Errorf("insert %d rows into %s.events: %w", total, w.db, err)
	}
	return nil
}

func (w *Writer) insertIncrements(rows []Increment) error {
	ctx, cancel := context.WithTimeout(context.Background(), w.cfg.InsertTimeout)
	defer cancel()
	batch, err := w.ch.PrepareBatch(ctx, "INSERT INTO "+w.db+".usage_increments (tenant_id, ts, id, metric, n)")
	if err != nil {
		return fmt.Errorf("insert into %s.usage_increments: prepare: %w", w.db, err)
	}
	n := len(rows)
	tenant, ts, id, metric, amount := make([]uuid.UUID, n), make([]time.Time, n), make([]uuid.UUID, n), make([]string, n), make([]int64, n)
	for i, r := range rows {
		tenant[i], ts[i], id[i], metric[i], amount[i] = r.TenantID, r.Ts, r.ID, r.Metric, r.N
	}
	for i, col := range []any{tenant, ts, id, metric, amount} {
		if err := batch.Column(i).Append(col); err != nil {
			_ = batch.Abort()
			return fmt.Errorf("insert into %s.usage_increments: column %d: %w", w.db, i, err)
		}
	}
	if err := batch.Send(); err != nil {
		return fmt.Errorf("insert %d rows into %s.usage_increments: %w", n, w.db, err)
	}
	return nil
}

// Stats is a snapshot of the writer, for readiness and tests.
type Stats struct {
	PendingSegments int    `json:"pending_segments"`
	BufferedRows    int    `json:"buffered_rows"`
	SpoolBytes      int64  `json:"spool_bytes"`
	Durability      string `json:"durability"`
	LastError       string `json:"last_error,omitempty"`
}

// Stats reports the writer's backlog.
func (w *Writer) Stats() Stats {
	w.mu.Lock()
	defer w.mu.Unlock()
	st := Stats{PendingSegments: len(w.sealed), BufferedRows: w.buffered, SpoolBytes: w.spoolBytes, Durability: string(w.cfg.Durability)}
	if w.active != nil {
		st.PendingSegments++
	}
	if w.lastErr != nil {
		st.LastError = w.lastErr.Error()
	}
	return st
}

func (w *Writer) updateGauges() {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.updateGaugesLocked()
}

func (w *Writer) updateGaugesLocked() {
	w.metrics.BufferedRows.Set(float64(w.buffered))
	w.metrics.SpoolBytes.Set(float64(w.spoolBytes))
	n := len(w.sealed)
	if w.active != nil {
		n++
	}
	w.metrics.SpoolSegments.Set(float64(n))
}

// Close stops accepting, seals the open segment and ships everything pending until ctx ends. What
// could not be shipped by then stays in the spool and is replayed at the next start (in memory mode
// it is lost, and Close says how much).
func (w *Writer) Close(ctx context.Context) error {
	w.gate.Lock()
	if w.closed {
		w.gate.Unlock()
		return nil
	}
	w.closed = true
	w.gate.Unlock()
	done := make(chan struct{})
	w.mu.Lock()
	w.draining = true
	w.drainDone = done
	w.cond.Broadcast()
	w.mu.Unlock()
	close(w.quit)
	finished := make(chan struct{})
	go func() { w.wg.Wait(); close(finished) }()
	select {
	case <-finished:
	case <-ctx.Done():
		close(done)
		<-finished
	}
	st := w.Stats()
	if st.PendingSegments > 0 {
		if w.cfg.Durability == DurabilityMemory {
			return fmt.Errorf("shutdown: %d buffered rows were not written to ClickHouse and are lost (memory durability)", st.BufferedRows)
		}
		w.log.Warn("shutdown: segments left in the spool; they are replayed at the next start", "segments", st.PendingSegments, "bytes", st.SpoolBytes)
	}
	return nil
}
