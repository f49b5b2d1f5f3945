package ingest

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"time"

	"github.com/ClickHouse/clickhouse-go/v2"
	"github.com/ClickHouse/clickhouse-go/v2/lib/driver"
)

// faultConn wraps a real ClickHouse connection and scripts what a real server cannot be made to do on
// demand: an insert whose client gives up (a timeout) while the server commits it later. It also
// records the rows of every insert that reached the server.
type faultConn struct {
	driver.Conn
	mu      sync.Mutex
	late    int           // the next `late` inserts time out on the client and commit after delay
	delay   time.Duration //
	running int           // late inserts not committed yet: system.processes reports them
	// The next `slow` inserts send their data only after slowFor: the server lists them as running
	// from PrepareBatch on, and they commit (and return) when the data is sent.
	slow    int
	slowFor time.Duration
	holding int // slow inserts holding their data now: their process has confirmed them (prepare)
	// The next `reachLate` inserts reach the server only after reachLateBy (a full pool, a dial to a
	// server that is down); reaching is closed when the first begins to wait.
	reachLate   int
	reachLateBy time.Duration
	reaching    chan struct{}
	// The next query (QueryRow) containing stallQuery is answered stallFor after the server answered
	// it; stalled is closed when it begins to wait.
	stallQuery string
	stallFor   time.Duration
	stalled    chan struct{}
	sizes      []int // rows of each committed insert, in order
	// maxPartitions, when set, refuses an insert whose rows span more UTC days, as ClickHouse 19+
	// does past max_partitions_per_insert_block (code 252); 18.16 has no such limit.
	maxPartitions int
}

func (f *faultConn) PrepareBatch(ctx context.Context, query string, opts ...driver.PrepareBatchOption) (driver.Batch, error) {
	f.mu.Lock()
	late := f.late > 0 && strings.HasPrefix(query, "INSERT")
	if late {
		f.late--
		// The server does not stop when the client gives up: the insert outlives its context.
		ctx = context.WithoutCancel(ctx)
	}
	var slow time.Duration
	if f.slow > 0 && strings.HasPrefix(query, "INSERT") {
		f.slow--
		slow = f.slowFor
	}
	var reachLate time.Duration
	if f.reachLate > 0 && strings.HasPrefix(query, "INSERT") {
		f.reachLate--
		reachLate = f.reachLateBy
		close(f.reaching)
	}
	f.mu.Unlock()
	time.Sleep(reachLate)
	b, err := f.Conn.PrepareBatch(ctx, query, opts...)
	if err != nil {
		return nil, err
	}
	return &faultBatch{Batch: b, f: f, late: late, slow: slow, days: map[time.Time]bool{}}, nil
}

type faultBatch struct {
	driver.Batch
	f    *faultConn
	late bool
	slow time.Duration
	rows int
	days map[time.Time]bool // UTC days of the rows appended (the ts column, second of every insert)
}

func (b *faultBatch) Column(i int) driver.BatchColumn {
	c := b.Batch.Column(i)
	if i != 1 {
		return c
	}
	return dayColumn{c, b.days}
}

// dayColumn notes the days of a ts column's values.
type dayColumn struct {
	driver.BatchColumn
	days map[time.Time]bool
}

func (c dayColumn) Append(v any) error {
	if ts, ok := v.([]time.Time); ok {
		for _, t := range ts {
			c.days[t.UTC().Truncate(24*time.Hour)] = true
		}
	}
	return c.BatchColumn.Append(v)
}

// refuse is the scripted server refusal, made before any of the batch's data leaves, as the server
// refuses before committing anything.
func (b *faultBatch) refuse() error {
	if max := b.f.maxPartitions; max > 0 && len(b.days) > max {
		_ = b.Batch.Abort()
		return &clickhouse.Exception{Code: 252, Name: "DB::Exception", Message: fmt.Sprintf(
			"Too many partitions for single INSERT block (more than %d). The limit is controlled by 'max_partitions_per_insert_block' setting.", max)}
	}
	return nil
}

func (b *faultBatch) Flush() error {
	if err := b.refuse(); err != nil {
		return err
	}
	b.rows += b.Batch.Rows()
	return b.Batch.Flush()
}

func (b *faultBatch) Send() error {
	if err := b.refuse(); err != nil {
		return err
	}
	rows := b.rows + b.Batch.Rows()
	if b.slow > 0 {
		b.f.mu.Lock()
		b.f.holding++
		b.f.mu.Unlock()
		time.Sleep(b.slow)
		b.f.mu.Lock()
		b.f.holding--
		b.f.mu.Unlock()
	}
	if !b.late {
		err := b.Batch.Send()
		if err == nil {
			b.f.mu.Lock()
			b.f.sizes = append(b.f.sizes, rows)
			b.f.mu.Unlock()
		}
		return err
	}
	b.f.mu.Lock()
	b.f.running++
	delay := b.f.delay
	b.f.mu.Unlock()
	go func() {
		time.Sleep(delay)
		err := b.Batch.Send()
		b.f.mu.Lock()
		b.f.running--
		if err == nil {
			b.f.sizes = append(b.f.sizes, rows)
		}
		b.f.mu.Unlock()
	}()
	return fmt.Errorf("insert: %w (scripted: the server commits later)", context.DeadlineExceeded)
}

func (f *faultConn) QueryRow(ctx context.Context, query string, args ...any) driver.Row {
	f.mu.Lock()
	running := f.running
	var stall time.Duration
	if f.stallQuery != "" && strings.Contains(query, f.stallQuery) {
		f.stallQuery, stall = "", f.stallFor
	}
	f.mu.Unlock()
	if stall > 0 {
		row := f.Conn.QueryRow(ctx, query, args...)
		close(f.stalled)
		time.Sleep(stall)
		return row
	}
	if running > 0 && strings.Contains(query, "system.processes") {
		return countRow(running)
	}
	return f.Conn.QueryRow(ctx, query, args...)
}

func (f *faultConn) committed() []int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]int(nil), f.sizes...)
}

// countRow is a one-column row holding a count.
type countRow uint64

func (r countRow) Err() error { return nil }
func (r countRow) Scan(dest ...any) error {
	*(dest[0].(*uint64)) = uint64(r)
	return nil
}
func (r countRow) ScanStruct(any) error { return fmt.Errorf("not supported") }
