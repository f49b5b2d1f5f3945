package ingest

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/fnv"
	"log/slog"
	"path/filepath"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/ClickHouse/clickhouse-go/v2/lib/driver"
	"github.com/google/uuid"

	"github.com/analyticsd/analyticsd/ingest/spool"
	"github.com/analyticsd/analyticsd/internal/logger"
	"github.com/analyticsd/analyticsd/schema"
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
	// GroupWait is how long a group commit of a single request waits for company before its fsync,
	// when requests are flowing (the last group was committed less than 4 × GroupWait ago) and the
	// durability is fsync: one fsync then serves several requests (default 1 ms; negative: never).
	// An fsync cost 175–550 µs of CPU where we measured (BENCHMARKS.md), a consume's largest item.
	GroupWait time.Duration
	// QuarantineAfter is how many times rows ClickHouse refuses are tried before they are moved to the
	// quarantine, provided other inserts succeed meanwhile (default 3).
	QuarantineAfter int
	// Owner describes this process in the spool's lock file.
	Owner string
	// RetentionDays is the raw tables' retention: a row that must be checked in ClickHouse but whose
	// day has left the window cannot be (its partition may be gone), so it is quarantined rather than
	// inserted a second time. 0: no such guard (tests of other things).
	RetentionDays int
	// Gate, when set, must pass before the writer ships anything: serve's checks of a ClickHouse
	// that was unreachable at start-up (its time zone, its TTL). Until then rows stay in the spool.
	Gate func(context.Context) error
	// Floor, when set, reads the retention floor (retention.Floor.Get): the first day whose raw rows
	// are known complete. A day before it may have lost its partition while the window was shorter,
	// so such a row is guarded as an expired one. Nil: the window alone.
	Floor func(context.Context) (time.Time, error)
	// Shards, on a cluster, reaches each server directly: an insert that a retry must wait for may be
	// running on any of them (the server it was sent to, or the shards' servers it writes to). Nil on
	// one server.
	Shards *schema.Shards
}

// DefaultWriterConfig returns the documented defaults (fields left zero in a WriterConfig take them).
func DefaultWriterConfig() WriterConfig {
	return WriterConfig{
		Dir:             ".data/spool",
		Durability:      DurabilityFsync,
		BatchRows:       50_000,
		FlushInterval:   time.Second,
		Flushers:        2,
		GroupWait:       time.Millisecond,
		MaxBufferedRows: 1_000_000,
		MaxSpoolBytes:   8 << 30,
		InsertTimeout:   60 * time.Second,
		RetryMax:        30 * time.Second,
		QuarantineAfter: 3,
	}
}

func (c *WriterConfig) defaults() {
	d := DefaultWriterConfig()
	if c.Durability == "" {
		c.Durability = d.Durability
	}
	if c.BatchRows <= 0 {
		c.BatchRows = d.BatchRows
	}
	if c.FlushInterval <= 0 {
		c.FlushInterval = d.FlushInterval
	}
	if c.Flushers <= 0 {
		c.Flushers = d.Flushers
	}
	if c.MaxBufferedRows <= 0 {
		c.MaxBufferedRows = d.MaxBufferedRows
	}
	if c.MaxSpoolBytes <= 0 {
		c.MaxSpoolBytes = d.MaxSpoolBytes
	}
	if c.InsertTimeout <= 0 {
		c.InsertTimeout = d.InsertTimeout
	}
	if c.RetryMax <= 0 {
		c.RetryMax = d.RetryMax
	}
	if c.QuarantineAfter <= 0 {
		c.QuarantineAfter = d.QuarantineAfter
	}
	if c.GroupWait == 0 {
		c.GroupWait = d.GroupWait
	}
}

// ErrFull is returned by Append when the spool (or, in memory mode, the buffer) has no room: the
// request must be refused with 503 and Retry-After, never acknowledged.
var ErrFull = errors.New("ingest buffer is full")

// ErrClosed is returned by Append after Close.
var ErrClosed = errors.New("ingest writer is shutting down")

// FullError is ErrFull with why, and how long to wait before retrying.
type FullError struct {
	Reason     string
	RetryAfter time.Duration
}

func (e *FullError) Error() string {
	return "ingest is temporarily unable to accept events (" + e.Reason + "); retry after " + strconv.Itoa(int(e.RetryAfter.Seconds())) + "s"
}
func (e *FullError) Unwrap() error { return ErrFull }

// RetryAfterSeconds is RetryAfter in whole seconds, at least 1.
func (e *FullError) RetryAfterSeconds() int {
	s := int(e.RetryAfter.Round(time.Second).Seconds())
	return max(s, 1)
}

// segment is a unit of the spool and of shipping: the batches of consecutive requests, one spool
// file (none in memory mode), deleted once every row is in ClickHouse (or in quarantine).
type segment struct {
	file   *spool.Segment // nil in memory mode
	seq    uint64
	id     string // names the segment's inserts (query ids), so a late one can be found and waited for
	opened time.Time

	batches  []*batch               // in memory, in request order; nil once spilled
	claims   map[uint64]*claimState // every batch's claim, by batch id, kept when rows spill
	nEvents  int
	nIncs    int
	spilled  bool // rows not kept in memory: streamed back from the file to ship
	inMemory int  // rows counted against MaxBufferedRows

	// attempted: an insert of this segment may have reached ClickHouse (it failed, or the process
	// died mid-insert), so the next attempt asks ClickHouse which rows it already has.
	attempted   bool
	chunksDone  int                // leading chunks fully shipped by this process
	bad         map[rowKey]*badRow // rows ClickHouse refused, with their history
	unreadable  map[int]bool       // records (by ordinal) already moved to the quarantine
	damaged     map[int64]bool     // damaged stretches (by offset) already kept apart
	quarantined map[rowKey]bool    // rows already moved to the quarantine
	notBefore   time.Time          // parked after a refusal: shipped again no earlier than this
	refusals    int                // consecutive refused attempts (for the parking backoff)
	claimed     bool               // a flusher is shipping it
}

type appendReq struct {
	b    *batch
	rec  []byte
	done chan error
}

// Writer accepts validated rows durably and ships them to ClickHouse in large batches.
type Writer struct {
	cfg     WriterConfig
	log     *slog.Logger
	metrics *Metrics
	sp      *spool.Spool // nil in memory mode
	sh      *shipper
	damaged atomic.Int64 // damaged stretches of spool segments found and kept apart

	appends chan appendReq
	quit    chan struct{}
	// gate orders Append against Close: once Close holds it, no request can be queued that the
	// committer's final drain would miss.
	gate   sync.RWMutex
	closed bool
	wg     sync.WaitGroup

	mu            sync.Mutex
	changed       chan struct{} // closed (and replaced) whenever flushers may find new work
	active        *segment
	sealed        []*segment // oldest first; shipped by the flushers
	nextSeq       uint64     // memory mode only (the spool numbers its files)
	buffered      int        // rows in memory across unshipped segments
	draining      bool
	committerDone bool
	drainDone     chan struct{} // closed when Close's deadline passes
	lastErr       error
	lastErrAt     time.Time
	errLogged     time.Time
}

// NewWriter opens (creating if needed) and locks the spool in cfg.Dir and picks up every segment a
// previous process left there, to be shipped first. claims may be nil (no deduplication). Call Start
// to begin, Close to stop.
func NewWriter(cfg WriterConfig, ch driver.Conn, db string, claims Claims, m *Metrics, log *slog.Logger) (*Writer, error) {
	cfg.defaults()
	log = logger.Or(log)
	if m == nil {
		m = NewMetrics(nil, 0)
	}
	w := &Writer{cfg: cfg, log: log, metrics: m, appends: make(chan appendReq, 256), quit: make(chan struct{}),
		changed: make(chan struct{}), nextSeq: 1}
	w.sh = newShipper(ch, db, claims, cfg, m, log)
	if cfg.Durability != DurabilityMemory {
		sp, err := spool.Open(spool.Options{Dir: cfg.Dir, Sync: cfg.Durability == DurabilityFsync, Format: recordFormat, Owner: cfg.Owner, Log: log})
		if err != nil {
			return nil, err
		}
		w.sp = sp
		w.sh.quarantine = sp.Quarantine
		stats := sp.QuarantineStats
		m.quarantine.Store(&stats)
		for _, f := range sp.Recovered() {
			w.sealed = append(w.sealed, &segment{file: f, seq: f.Seq, id: f.ID(), spilled: true, attempted: f.Inflight, claims: map[uint64]*claimState{}})
		}
		if n := len(w.sealed); n > 0 {
			w.log.Info("spool has segments from a previous run; replaying them first", "segments", n, "bytes", sp.Bytes())
		}
	}
	w.updateGauges()
	return w, nil
}

// Start launches the spool committer and the flushers.
func (w *Writer) Start() {
	w.wg.Add(1)
	go w.commitLoop()
	for i := 0; i < w.cfg.Flushers; i++ {
		w.wg.Add(1)
		go w.flushLoop()
	}
}

// Append stores a batch durably (per the configured Durability) and returns once it is safe to
// acknowledge. It returns a *FullError (wrapping ErrFull) when there is no room, and ErrClosed
// during shutdown; in both cases nothing was stored.
func (w *Writer) Append(ctx context.Context, b *batch) error {
	if len(b.events) == 0 && len(b.incs) == 0 {
		return nil
	}
	req := appendReq{b: b, done: make(chan error, 1)}
	if w.sp != nil {
		req.rec = appendRecord(nil, b.wid, b.events, b.incs)
		if n := int64(len(req.rec)); n > w.cfg.MaxSpoolBytes {
			// It could never fit, however empty the spool: a 503 would be retried forever.
			return tooLarge("this request takes %d bytes in the spool, more than the whole spool holds (%d bytes, "+
				"INGEST_MAX_SPOOL_MB): send its events in smaller batches", n, w.cfg.MaxSpoolBytes)
		}
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

// groupWaits reports whether a lone request's group commit waits for company: only an fsync is worth
// sharing.
func (w *Writer) groupWaits() bool {
	return w.cfg.GroupWait > 0 && w.sp != nil && w.cfg.Durability == DurabilityFsync
}

// Durable reports whether Append's success means the rows survive a crash of this process (the
// spool), which is what makes it safe to claim their ids.
func (w *Writer) Durable() bool { return w.sp != nil }

func (w *Writer) commitLoop() {
	defer w.wg.Done()
	tick := time.NewTicker(min(w.cfg.FlushInterval/4, 250*time.Millisecond))
	defer tick.Stop()
	group := make([]appendReq, 0, 64)
	var company *time.Timer // GroupWait's
	var committed time.Time // when the last group was
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
			if len(group) == 1 && w.groupWaits() && time.Since(committed) < 4*w.cfg.GroupWait {
				// A lone request while requests are flowing: its fsync can serve the next ones too.
				// (Consumes at 2,500/s on two cores, A/B: 1 ms took analyticsd's CPU per consume from
				// 255-311 to 238-261 µs and the p99 from 13.8-29 to 7.5-18.6 ms; BENCHMARKS.md.)
				if company == nil {
					company = time.NewTimer(w.cfg.GroupWait)
				} else {
					company.Reset(w.cfg.GroupWait)
				}
			wait:
				for len(group) < cap(group) {
					select {
					case r := <-w.appends:
						group = append(group, r)
					case <-company.C:
						break wait
					}
				}
				company.Stop()
			}
			w.commit(group)
			committed = time.Now()
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
			w.signalLocked()
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
		rows += len(r.b.events) + len(r.b.incs)
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
	memory := w.sp == nil
	if memory && w.buffered+rows > w.cfg.MaxBufferedRows {
		w.metrics.Refused.WithLabelValues("buffer_full").Inc()
		return &FullError{Reason: "in-memory buffer full while ClickHouse catches up", RetryAfter: w.retryAfter()}
	}
	if !memory && w.sp.Bytes()+size > w.cfg.MaxSpoolBytes {
		w.metrics.Refused.WithLabelValues("spool_full").Inc()
		return &FullError{Reason: "spool full while ClickHouse catches up", RetryAfter: w.retryAfter()}
	}
	if w.active == nil {
		if err := w.openSegmentLocked(); err != nil {
			w.metrics.Refused.WithLabelValues("spool_error").Inc()
			w.log.Error("cannot open a spool segment; refusing requests", "err", err)
			return &FullError{Reason: "spool unavailable", RetryAfter: 5 * time.Second}
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
		if err := s.file.Append(buf); err != nil {
			w.metrics.Refused.WithLabelValues("spool_error").Inc()
			reason := "spool write failed"
			if errors.Is(err, syscall.ENOSPC) || errors.Is(err, syscall.EDQUOT) {
				reason = "spool disk full"
			}
			w.log.Error("spool write failed; refusing requests", "segment", s.seq, "err", err)
			return &FullError{Reason: reason, RetryAfter: 5 * time.Second}
		}
		w.metrics.SpoolWrites.Inc()
		w.metrics.SpoolAppends.Add(float64(len(group)))
	}
	for _, r := range group {
		n := len(r.b.events) + len(r.b.incs)
		s.nEvents += len(r.b.events)
		s.nIncs += len(r.b.incs)
		s.claims[r.b.wid] = r.b.claim
		if !s.spilled && (memory || w.buffered+n <= w.cfg.MaxBufferedRows) {
			s.batches = append(s.batches, r.b)
			s.inMemory += n
			w.buffered += n
		} else if !s.spilled {
			// Past the memory budget: keep this segment on disk only, to be read back when shipped.
			s.spilled = true
			w.buffered -= s.inMemory
			s.batches, s.inMemory = nil, 0
		}
	}
	if s.nEvents+s.nIncs >= w.cfg.BatchRows {
		w.sealLocked()
	}
	w.updateGaugesLocked()
	return nil
}

func (w *Writer) openSegmentLocked() error {
	s := &segment{opened: time.Now(), claims: map[uint64]*claimState{}}
	if w.sp != nil {
		f, err := w.sp.Create()
		if err != nil {
			return err
		}
		s.file, s.seq, s.id = f, f.Seq, f.ID()
	} else {
		s.seq = w.nextSeq
		w.nextSeq++
		s.id = fmt.Sprintf("mem%016x", newBatchID())
	}
	w.active = s
	return nil
}

func (w *Writer) sealLocked() {
	s := w.active
	if s == nil {
		return
	}
	w.active = nil
	if s.file != nil {
		if err := s.file.Seal(); err != nil {
			w.log.Error("close spool segment", "segment", s.seq, "err", err)
		}
	}
	if s.nEvents+s.nIncs == 0 {
		w.removeLocked(s)
		return
	}
	w.sealed = append(w.sealed, s)
	w.signalLocked()
}

// signalLocked wakes every flusher waiting for work.
func (w *Writer) signalLocked() {
	close(w.changed)
	w.changed = make(chan struct{})
}

func (w *Writer) removeLocked(s *segment) {
	if s.file == nil {
		return
	}
	if err := w.sp.Remove(s.file); err != nil {
		w.log.Error("shipped spool segment not removed yet; retried at the next removal", "err", err)
	}
}

// next hands a flusher the oldest sealed segment nobody is shipping and that is not parked, waiting
// for one. It returns nil when the writer is closing and nothing is left to ship.
func (w *Writer) next() *segment {
	for {
		w.mu.Lock()
		var wake time.Time
		for _, s := range w.sealed {
			if s.claimed {
				continue
			}
			if s.notBefore.After(time.Now()) {
				if wake.IsZero() || s.notBefore.Before(wake) {
					wake = s.notBefore
				}
				continue
			}
			s.claimed = true
			w.mu.Unlock()
			return s
		}
		if w.draining && w.committerDone && w.allClaimedLocked() {
			w.mu.Unlock()
			return nil
		}
		changed, drain := w.changed, w.drainDone
		w.mu.Unlock()
		if !w.wait(changed, drain, wake) {
			return nil
		}
	}
}

// wait blocks until changed is closed or wake (when set) comes; false when the drain deadline passed.
func (w *Writer) wait(changed, drain <-chan struct{}, wake time.Time) bool {
	var timer <-chan time.Time
	if !wake.IsZero() {
		t := time.NewTimer(time.Until(wake))
		defer t.Stop()
		timer = t.C
	}
	select {
	case <-changed:
	case <-timer:
	case <-drain:
		return false
	}
	return true
}

func (w *Writer) allClaimedLocked() bool {
	for _, s := range w.sealed {
		if !s.claimed {
			return false
		}
	}
	return true
}

// errRefused: some of a segment's rows were refused by ClickHouse and are not yet quarantined.
var errRefused = errors.New("clickhouse refused some rows")

func (w *Writer) flushLoop() {
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
			if w.drainExpired() {
				// Shutdown deadline: the segment stays in the spool for the next start.
				w.release(s)
				return
			}
			if errors.Is(err, errRefused) {
				// Rows ClickHouse refuses must not hold up the segments behind them: park this one and
				// take the next; it is retried after a growing pause.
				w.mu.Lock()
				s.refusals++
				s.notBefore = time.Now().Add(min(100*time.Millisecond<<min(s.refusals, 10), w.cfg.RetryMax))
				s.claimed = false
				w.signalLocked()
				w.mu.Unlock()
				break
			}
			select {
			case <-time.After(backoff):
			case <-w.drainDeadline():
			}
			if !errors.Is(err, errHistoryChanged) { // judged again at the first pause
				backoff = min(backoff*2, w.cfg.RetryMax)
			}
		}
	}
}

func (w *Writer) release(s *segment) {
	w.mu.Lock()
	s.claimed = false
	w.mu.Unlock()
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
	if errors.Is(err, errHistoryChanged) || errors.Is(err, errLossSettling) {
		// Not insert failures: the rows wait for, or are judged again after, a loss of claims
		// (histories.go).
		w.log.Info("shipping a segment again", "err", err)
		return
	}
	if !errors.Is(err, errRefused) {
		w.metrics.InsertErrors.Inc()
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	w.lastErr, w.lastErrAt = err, time.Now()
	// Throttled: one line per 10 s however many batches fail.
	if time.Since(w.errLogged) >= 10*time.Second {
		w.errLogged = time.Now()
		w.log.Error("clickhouse insert failed; the rows stay in the spool and are retried", "err", err,
			"pending_segments", len(w.sealed), "spool_bytes", w.spoolBytes())
	}
}

func (w *Writer) spoolBytes() int64 {
	if w.sp == nil {
		return 0
	}
	return w.sp.Bytes()
}

// retryAfter estimates how long a refused client should wait: longer while inserts are failing.
func (w *Writer) retryAfter() time.Duration {
	if w.lastErr != nil && time.Since(w.lastErrAt) < 30*time.Second {
		return 10 * time.Second
	}
	return 2 * time.Second
}

// ship inserts one segment's rows and, once every row is in ClickHouse or in quarantine, deletes it.
func (w *Writer) ship(s *segment) error {
	if w.cfg.Gate != nil {
		// Bounded: a flusher waiting on it holds up Close.
		gctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
		err := w.cfg.Gate(gctx)
		cancel()
		if err != nil {
			return err
		}
	}
	if s.file != nil && !s.file.Inflight {
		// Mark the segment in flight on disk: if we die mid-insert, the next start checks ClickHouse
		// for its rows before inserting them again.
		if err := s.file.MarkInflight(); err != nil {
			return err
		}
	}
	attempted := s.attempted
	s.attempted = true
	start := time.Now()
	rows := 0
	err := w.chunks(s, func(i int, bs []*batch) error {
		if i < s.chunksDone {
			return nil
		}
		n, err := w.sh.shipChunk(s, bs, attempted)
		rows += n
		if err != nil {
			return err
		}
		s.chunksDone = i + 1
		return nil
	})
	if err != nil {
		return err
	}
	w.metrics.FlushDuration.Observe(time.Since(start).Seconds())
	w.metrics.BatchRows.Observe(float64(rows))

	w.mu.Lock()
	defer w.mu.Unlock()
	w.removeLocked(s)
	w.sealed = slices.DeleteFunc(w.sealed, func(x *segment) bool { return x == s })
	w.buffered -= s.inMemory
	s.batches, s.inMemory = nil, 0
	w.lastErr = nil
	w.updateGaugesLocked()
	w.signalLocked()
	return nil
}

// Rows are shipped in chunks of at most chunkRows rows or about chunkBytes of row data, so a segment
// read back from disk never has to fit in memory whole (50,000 rows of 9 KiB props would be 450 MB).
// Variables, so tests can make chunks small.
var (
	chunkRows  = 50_000
	chunkBytes = 32 << 20
)

// chunks calls fn with the segment's batches, from memory, or streamed from its file in chunks.
func (w *Writer) chunks(s *segment, fn func(i int, bs []*batch) error) error {
	if !s.spilled {
		return fn(0, s.batches)
	}
	r, err := s.file.Open()
	if err != nil {
		return err
	}
	defer r.Close()
	cr := chunkReader{format: s.file.Format, claims: s.claims, spool: w.sp.ID(), seq: s.seq, onBad: func(ordinal int, rec []byte, err error) error {
		// The CRC matched, so this is not a torn write but a record this release cannot read: it
		// must not hold up the records around it, nor be dropped. Set it aside, once.
		if s.unreadable[ordinal] {
			return nil
		}
		info, qerr := w.sp.Quarantine(spool.QuarantineInfo{Segment: s.id, Reason: "a spool record this release cannot read",
			Error: err.Error(), Format: s.file.Format}, [][]byte{rec})
		if qerr != nil {
			return fmt.Errorf("quarantine an unreadable record of spool segment %d: %w", s.seq, qerr)
		}
		if s.unreadable == nil {
			s.unreadable = map[int]bool{}
		}
		s.unreadable[ordinal] = true
		w.log.Error("unreadable spool record moved to the quarantine", "segment", s.seq, "record", ordinal, "file", info.Name, "err", err)
		return nil
	}}
	if err := cr.read(r, fn); err != nil {
		return fmt.Errorf("spool segment %d: %w", s.seq, err)
	}
	for _, d := range r.Damage() {
		// Not a torn write (an intact record follows, and a crash tears only the last write): the
		// disk or a copy damaged what may be acknowledged records. Keep the bytes as they are, apart,
		// before the segment goes.
		if s.damaged[d.Offset] {
			continue
		}
		name, kerr := w.sp.KeepDamaged(s.id, d.Offset, d.Bytes)
		if kerr != nil {
			return fmt.Errorf("spool segment %d: %w", s.seq, kerr)
		}
		if s.damaged == nil {
			s.damaged = map[int64]bool{}
		}
		s.damaged[d.Offset] = true
		w.damaged.Add(1)
		w.log.Error("damaged spool bytes kept apart: rows in them may be lost",
			"segment", s.file.Path(), "offset", d.Offset, "bytes", len(d.Bytes), "kept_as", filepath.Join(spool.DamagedDir(w.sp.Dir()), name))
	}
	if r.Torn() {
		w.log.Warn("spool segment has a torn tail (an unacknowledged write cut short); ignoring it",
			"segment", s.file.Path(), "intact_bytes", r.Intact())
	}
	return nil
}

// chunkReader decodes a spool file's records into batches, a chunk at a time.
type chunkReader struct {
	format byte
	// claims are the request-time claims of the batches, by batch id (none for a segment left by
	// another process).
	claims map[uint64]*claimState
	// spool and seq name the file, for the batch ids of first-release records, which have none.
	spool [16]byte
	seq   uint64
	// onBad is told of a record that cannot be decoded; reading goes on unless it returns an error.
	onBad func(ordinal int, rec []byte, err error) error
}

func (cr chunkReader) read(r *spool.Reader, fn func(i int, bs []*batch) error) error {
	var bs []*batch
	i, rows, size := 0, 0, 0
	for ordinal := 0; r.Next(); ordinal++ {
		rec := r.Record()
		wid, events, incs, err := decodeRecord(rec, cr.format, nil, nil)
		if err != nil {
			if cr.onBad == nil {
				return err
			}
			if err := cr.onBad(ordinal, rec, err); err != nil {
				return err
			}
			continue
		}
		b := &batch{wid: wid, events: events, incs: incs, claim: cr.claims[wid]}
		b.minted, b.uncounted = batchFlags(wid, cr.format)
		if cr.format == spool.FormatLegacy {
			// No batch id (and so no claim) was kept with these rows. Name the record by where it
			// is — the spool's identity, the file, its place in it — so that every read, here or
			// after a restart, claims its ids for the same batch; and let ClickHouse say which it has.
			b.wid, b.checkAll = legacyBatchID(cr.spool, cr.seq, ordinal), true
		}
		bs = append(bs, b)
		rows += len(events) + len(incs)
		size += len(rec)
		if rows >= chunkRows || size >= chunkBytes {
			if err := fn(i, bs); err != nil {
				return err
			}
			i, bs, rows, size = i+1, nil, 0, 0
		}
	}
	if err := r.Err(); err != nil {
		return fmt.Errorf("read: %w", err)
	}
	if len(bs) > 0 {
		return fn(i, bs)
	}
	return nil
}

// legacyBatchID is the batch id of the ordinal-th record of first-release segment seq of a spool.
func legacyBatchID(spoolID [16]byte, seq uint64, ordinal int) uint64 {
	h := fnv.New64a()
	h.Write(spoolID[:])
	binary.Write(h, binary.LittleEndian, seq)
	binary.Write(h, binary.LittleEndian, int64(ordinal))
	return h.Sum64() | 1
}

// Stats is a snapshot of the writer, for readiness and tests.
type Stats struct {
	PendingSegments int    `json:"pending_segments"`
	BufferedRows    int    `json:"buffered_rows"`
	SpoolBytes      int64  `json:"spool_bytes"`
	Durability      string `json:"durability"`
	LastError       string `json:"last_error,omitempty"`
	// QuarantinedFiles and QuarantinedRows are rows ClickHouse kept refusing, set aside in the spool's
	// quarantine for an operator (`analyticsd spool status`, `analyticsd spool requeue`).
	QuarantinedFiles int `json:"quarantined_files"`
	QuarantinedRows  int `json:"quarantined_rows"`
	// DamagedStretches counts the damaged stretches of spool segments (not torn writes) this
	// writer found; DamagedFiles is how many the spool keeps (spool.DamagedDir), found by any
	// process, until an operator deletes them.
	DamagedStretches int `json:"damaged_stretches,omitempty"`
	DamagedFiles     int `json:"damaged_files,omitempty"`
}

// Stats reports the writer's backlog.
func (w *Writer) Stats() Stats {
	w.mu.Lock()
	st := Stats{PendingSegments: len(w.sealed), BufferedRows: w.buffered, SpoolBytes: w.spoolBytes(), Durability: string(w.cfg.Durability)}
	if w.active != nil {
		st.PendingSegments++
	}
	if w.lastErr != nil {
		st.LastError = w.lastErr.Error()
	}
	w.mu.Unlock()
	st.DamagedStretches = int(w.damaged.Load())
	if w.sp != nil {
		st.QuarantinedFiles, st.QuarantinedRows = w.sp.QuarantineStats()
		kept, _ := spool.ListDamaged(w.sp.Dir())
		st.DamagedFiles = len(kept)
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
	w.metrics.SpoolBytes.Set(float64(w.spoolBytes()))
	n := len(w.sealed)
	if w.active != nil {
		n++
	}
	w.metrics.SpoolSegments.Set(float64(n))
}

// Close stops accepting, seals the open segment and ships everything pending until ctx ends. What
// could not be shipped by then stays in the spool and is replayed at the next start (in memory mode
// it is lost, and Close says how much). The spool's lock is released last.
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
	w.signalLocked()
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
	if w.sp != nil {
		defer w.sp.Close()
	}
	if st.PendingSegments > 0 {
		if w.sp == nil {
			return fmt.Errorf("shutdown: %d buffered rows were not written to ClickHouse and are lost (memory durability)", st.BufferedRows)
		}
		w.log.Warn("shutdown: segments left in the spool; they are replayed at the next start", "segments", st.PendingSegments, "bytes", st.SpoolBytes)
	}
	return nil
}

// rowKey names a row across retries: its kind and id (ids are unique per kind within a segment's
// shipped rows, duplicates having been dropped before).
type rowKey struct {
	kind   Kind
	tenant uuid.UUID
	id     uuid.UUID
}

// badRow is the history of a row ClickHouse refused.
type badRow struct {
	attempts   int
	firstFail  time.Time
	sawSuccess bool // another insert succeeded between its first refusal and a later one
	err        string
}
