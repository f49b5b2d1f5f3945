package query

import (
	"context"
	"encoding/csv"
	"fmt"
	"io"
	"time"

	"github.com/ClickHouse/clickhouse-go/v2"
	"github.com/ClickHouse/clickhouse-go/v2/lib/driver"
	"github.com/google/uuid"

	"github.com/analyticsd/analyticsd/internal/chlimit"
)

// ExportHeader is the CSV header row.
var ExportHeader = []string{"id", "ts", "event", "source", "user_id", "ip", "request_id", "props"}

// Export is a started CSV export: the query is running; Write streams its rows.
type Export struct {
	rows   driver.Rows
	cancel context.CancelFunc
}

// StartExport runs the export query for f (newest first, at most max rows) so failures surface
// before any byte of CSV is sent. The caller must call Write (which closes it) or Close.
func (s *Store) StartExport(f EventFilter, max int) (*Export, error) {
	// The stream outlives the request handler, so it gets its own deadline rather than the request's.
	ctx, cancel := context.WithTimeout(context.Background(), s.maxExec+time.Minute)
	where, args := f.where(f.Range.From, f.Range.To)
	q := fmt.Sprintf("SELECT %s FROM %s.events WHERE %s ORDER BY ts DESC, id DESC LIMIT %d", eventColumns, s.db, where, max)
	// Small blocks keep the stream's memory flat: clickhouse-go decodes a whole block at a time, and
	// the default 65,536 rows of eight string columns is tens of MiB per block.
	rows, err := s.ch.Query(chlimit.Context(ctx, s.maxExec, clickhouse.Settings{"max_block_size": 8192}), q, args...)
	if err != nil {
		cancel()
		return nil, fmt.Errorf("query export: %w", err)
	}
	return &Export{rows: rows, cancel: cancel}, nil
}

// Close abandons the export.
func (e *Export) Close() {
	e.rows.Close()
	e.cancel()
}

// Write streams the header and every row to w as ClickHouse returns them — memory stays flat however
// many rows there are — and returns how many rows it wrote. A write error (the client went away)
// cancels the query.
func (e *Export) Write(w io.Writer) (int, error) {
	defer e.Close()
	cw := csv.NewWriter(w)
	if err := cw.Write(ExportHeader); err != nil {
		return 0, err
	}
	n := 0
	rec := make([]string, len(ExportHeader))
	for e.rows.Next() {
		var id uuid.UUID
		var ts time.Time
		var event, source, user, props, ip, req string
		if err := e.rows.Scan(&id, &ts, &event, &source, &user, &props, &ip, &req); err != nil {
			return n, fmt.Errorf("scan export row: %w", err)
		}
		rec[0], rec[1], rec[2], rec[3] = id.String(), ts.UTC().Format(time.RFC3339), event, source
		rec[4], rec[5], rec[6], rec[7] = SafeCell(user), ip, SafeCell(req), SafeCell(props)
		if err := cw.Write(rec); err != nil {
			return n, err
		}
		n++
		if n%4096 == 0 {
			cw.Flush()
			if err := cw.Error(); err != nil {
				return n, err
			}
		}
	}
	cw.Flush()
	if err := cw.Error(); err != nil {
		return n, err
	}
	return n, e.rows.Err()
}

// SafeCell neutralises a value a spreadsheet would run as a formula (it starts with = + - @, a tab
// or a carriage return) by prefixing a single quote, as OWASP recommends for CSV injection.
func SafeCell(s string) string {
	if s == "" {
		return s
	}
	switch s[0] {
	case '=', '+', '-', '@', '\t', '\r':
		return "'" + s
	}
	return s
}
