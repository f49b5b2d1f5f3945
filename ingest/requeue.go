package ingest

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/ClickHouse/clickhouse-go/v2/lib/driver"

	"github.com/analyticsd/analyticsd/ingest/spool"
	"github.com/analyticsd/analyticsd/internal/logger"
	"github.com/analyticsd/analyticsd/schema"
)

// RequeueResult says what a requeue of one quarantine file did.
type RequeueResult struct {
	File     string `json:"file"`
	Rows     int    `json:"rows"`
	Inserted int    `json:"inserted"`
}

// RequeueOptions shape a requeue.
type RequeueOptions struct {
	// RetentionDays and Floor guard expired days as shipping does (WriterConfig): rows of a day
	// retention may have dropped are not inserted (they may have been stored before). Both zero
	// inserts them anyway: an operator's decision, for rows known never to have reached ClickHouse.
	RetentionDays int
	Floor         func(context.Context) (time.Time, error)
	// Shards, on a cluster: as WriterConfig.Shards, every server is asked for an earlier insert still
	// running. Nil on one server.
	Shards *schema.Shards
	Log    *slog.Logger
}

// Requeue ships the rows of one quarantine file of the spool in spoolDir to ClickHouse, the way the
// writer ships a replayed segment (claims verified, every row checked in ClickHouse first), and
// deletes the file once all of them are stored or found to be duplicates. Rows still refused keep the
// file. It can run while a server owns the spool: it locks only the file.
func Requeue(ctx context.Context, spoolDir, name string, ch driver.Conn, db string, claims Claims, o RequeueOptions) (RequeueResult, error) {
	res := RequeueResult{File: name}
	r, info, err := spool.OpenQuarantine(spoolDir, name)
	if err != nil {
		return res, err
	}
	defer r.Close()
	res.Rows = info.Rows()
	o.Log = logger.Or(o.Log)
	sh := newShipper(ch, db, claims, WriterConfig{InsertTimeout: time.Minute, QuarantineAfter: 1, RetentionDays: o.RetentionDays, Floor: o.Floor, Shards: o.Shards}, NewMetrics(nil, 0), o.Log)
	s := &segment{id: "requeue" + info.Segment, claims: map[uint64]*claimState{}}
	spoolID, err := spool.ReadID(spoolDir)
	if err != nil {
		return res, err
	}
	cr := chunkReader{format: info.Format, claims: s.claims, spool: spoolID}
	read := 0
	err = cr.read(r, func(_ int, bs []*batch) error {
		for _, b := range bs {
			read += len(b.events) + len(b.incs)
			b.checkAll = true // the rows' history is unknown: an earlier attempt may have stored some
			// Taken out of the live counters when quarantined; counted again by the counters'
			// reconciliation with ClickHouse once stored.
			b.uncounted = true
		}
		n, err := sh.shipChunk(s, bs, true)
		res.Inserted += n
		return err
	})
	if errors.Is(err, errRefused) {
		return res, fmt.Errorf("requeue %s: clickhouse still refuses some rows (or their day left retention); the file is kept: %v", name, firstRefusal(s))
	}
	if err != nil {
		return res, fmt.Errorf("requeue %s: %w; the file is kept, run requeue again", name, err)
	}
	if err := ctx.Err(); err != nil {
		return res, err
	}
	// A file cut short or damaged after it was written (a copy, a disk) reads as fewer rows than it
	// says it holds: the rows after the damage were never read, and deleting the file would lose
	// them. Before, the file was removed with them. A file of records a release could not decode
	// says it holds none (it could not count them): only a torn end tells its damage.
	if r.Torn() || len(r.Damage()) > 0 || (info.Rows() > 0 && read != info.Rows()) {
		where := fmt.Sprintf("after byte %d", r.Intact())
		if d := r.Damage(); len(d) > 0 {
			where = fmt.Sprintf("at byte %d", d[0].Offset)
		}
		return res, fmt.Errorf("requeue %s: read %d of the %d rows the file says it holds (damaged %s); the file is kept "+
			"(the rows read are stored): copy it aside and inspect it with `analyticsd spool inspect`", name, read, info.Rows(), where)
	}
	if err := spool.RemoveQuarantine(spoolDir, name); err != nil {
		return res, err
	}
	return res, nil
}

func firstRefusal(s *segment) string {
	for _, b := range s.bad {
		return b.err
	}
	return "rows of a day outside the retention window (use --include-expired if they never reached ClickHouse)"
}

// DrainResult says what a drain of a spool directory did.
type DrainResult struct {
	Stats
	Drained bool `json:"drained"`
}

// Drain ships every segment of a spool directory no server owns any more (a retired instance's) and
// returns when the spool is empty or ctx ends. It takes the directory's lock, so it refuses a spool
// a running server holds.
func Drain(ctx context.Context, cfg WriterConfig, ch driver.Conn, db string, claims Claims, log *slog.Logger) (DrainResult, error) {
	if cfg.Durability == DurabilityMemory {
		cfg.Durability = DurabilityFsync
	}
	w, err := NewWriter(cfg, ch, db, claims, nil, log)
	if err != nil {
		return DrainResult{}, err
	}
	w.Start()
	err = w.Close(ctx)
	st := w.Stats()
	return DrainResult{Stats: st, Drained: st.PendingSegments == 0}, err
}
