package query

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"strings"
	"sync"
	"time"
	"unicode/utf8"

	"github.com/ClickHouse/clickhouse-go/v2"
	"github.com/google/uuid"

	"github.com/analyticsd/analyticsd/internal/chlimit"
	"github.com/analyticsd/analyticsd/internal/jsontext"
)

// ExportHeader is the CSV header row; NDJSON lines carry the same fields, named as in GET /events.
var ExportHeader = []string{"id", "ts", "event", "source", "user_id", "ip", "request_id", "props"}

// Format is an export's encoding.
type Format int

const (
	CSV    Format = iota // RFC 4180, cells a spreadsheet would run neutralised (see appendCell)
	NDJSON               // one JSON object per line, lossless, for machines
)

// utf8BOM makes Excel read a CSV download as UTF-8 (without it, 用户 shows as mojibake).
const utf8BOM = "\xEF\xBB\xBF"

// Export is a started export: the page's boundary is known and its query is running; Write streams
// its rows.
//
// A page holds the newest rows of the filter, at most the cap. When more rows match, the page ends
// at a boundary row found before any byte is sent, so the response headers can say the export was
// truncated and hand out the cursor of the next page (Next): the rows strictly older than the
// boundary. The page query is bounded by the boundary row rather than by LIMIT, so consecutive pages
// partition the rows exactly — an event arriving late below the boundary is on a later page, never
// lost between two.
type Export struct {
	Truncated bool
	Next      Cursor // set when Truncated

	store *Store
	query string
	args  []any
}

// PlanExport finds the page of f (newest first, at most max rows as of the moment it runs): whether
// more rows match and, if so, the boundary row, so the response headers can say so before any byte
// is sent. It runs under ctx (the request's); the page's own query runs in Write.
func (s *Store) PlanExport(ctx context.Context, f EventFilter, max int) (*Export, error) {
	ctx = chlimit.Limit(s.maxExec).Context(ctx)
	where, args := f.where(f.Range.From, f.Range.To)
	exp := &Export{store: s}
	// Are there more than max rows? Counting stops at max+1 (the inner LIMIT), so this reads only
	// the key columns of at most one page more than it sends. The inner query selects ts, not a
	// constant: 18.16 fails "SELECT 1 FROM <Distributed> WHERE a AND b" (cannot find column
	// `equals(...)` in source stream), which is every export on a cluster.
	var n uint64
	if err := s.ch.QueryRow(ctx, fmt.Sprintf("SELECT count() FROM (SELECT ts FROM %s.events WHERE %s LIMIT %d)", s.db, where, max+1), args...).Scan(&n); err != nil {
		return nil, fmt.Errorf("count export rows: %w", err)
	}
	if n > uint64(max) {
		// The page's last row: its key bounds the page query and is the next page's cursor.
		var ts time.Time
		var id uuid.UUID
		if err := s.ch.QueryRow(ctx, fmt.Sprintf("SELECT ts, id FROM %s.events WHERE %s ORDER BY ts DESC, id DESC LIMIT %d, 1", s.db, where, max-1), args...).Scan(&ts, &id); err != nil {
			return nil, fmt.Errorf("find the export page's boundary: %w", err)
		}
		exp.Truncated, exp.Next = true, Cursor{Ts: ts.UTC(), ID: id, From: f.Range.From}
		where += " AND (ts > ? OR (ts = ? AND id >= toUUID(?)))"
		args = append(args, ts, ts, id.String())
	}
	exp.query = selectEvents(s.db, where, 0)
	exp.args = args
	return exp, nil
}

// Duration bounds a whole export stream, however slowly its client reads: the page query's
// max_execution_time and a minute to deliver what it read. A client slower than that gets the
// export cut short (and a continuation from where the complete pages ended), and the ClickHouse
// connection back.
func (e *Export) Duration() time.Duration { return e.store.maxExec + time.Minute }

// flushAt is how much encoded output is gathered before a write: each write is one chunk and one
// writev(2) on the connection (api.Stream), and row-sized writes cost a syscall per row (measured
// with fasthttp's 4 KiB stream buffer: a third of the export's CPU went to write(2)).
const flushAt = 256 << 10

// Write streams the page to w in format — the CSV header (after a BOM when bom is set) and every
// row — as ClickHouse returns them, so memory stays flat however many rows there are, and returns
// how many rows it wrote. A write error (the client went away) cancels the query.
//
// Rows are encoded by hand into one reused buffer: encoding/csv, per-row scan targets escaping to the
// heap and row-sized writes took about 2 µs of CPU per row (profile in BENCHMARKS.md).
func (e *Export) Write(w io.Writer, format Format, bom bool) (int, error) {
	// The stream outlives the request handler, so the page query gets its own deadline. Small blocks
	// keep the stream's memory flat: clickhouse-go decodes a whole block at a time, and the default
	// 65,536 rows of eight string columns is tens of MiB per block.
	ctx, cancel := context.WithTimeout(context.Background(), e.Duration())
	rows, err := e.store.ch.Query(chlimit.Context(ctx, e.store.maxExec, clickhouse.Settings{"max_block_size": 8192}), e.query, e.args...)
	if err != nil {
		cancel()
		return 0, fmt.Errorf("query export page: %w", err)
	}
	// Cancel first: rows.Close alone reads the rest of the result (a client that left would keep the
	// query, and its connection, busy to the end).
	defer func() { cancel(); rows.Close() }()
	buf := make([]byte, 0, flushAt+64<<10)
	if format == CSV {
		if bom {
			buf = append(buf, utf8BOM...)
		}
		buf = append(buf, "id,ts,event,source,user_id,ip,request_id,props\n"...)
	}
	var (
		id                             uuid.UUID
		ts                             time.Time
		event, source, user, ip, reqID string
		props                          []byte // scanned without a copy of the string clickhouse-go made
		n                              int
	)
	for rows.Next() {
		if err := rows.Scan(&id, &ts, &event, &source, &user, &props, &ip, &reqID); err != nil {
			return n, fmt.Errorf("scan export row: %w", err)
		}
		if format == NDJSON {
			buf = appendJSONLine(buf, id, ts, event, source, user, props, ip, reqID)
		} else {
			buf = appendCSVLine(buf, id, ts, event, source, user, props, ip, reqID)
		}
		n++
		if len(buf) >= flushAt {
			if _, err := w.Write(buf); err != nil {
				return n, err
			}
			buf = buf[:0]
		}
	}
	if err := rows.Err(); err != nil {
		return n, err
	}
	_, err = w.Write(buf)
	return n, err
}

func appendCSVLine(b []byte, id uuid.UUID, ts time.Time, event, source, user string, props []byte, ip, reqID string) []byte {
	b = jsontext.AppendUUID(b, id)
	b = append(b, ',')
	b = ts.UTC().AppendFormat(b, time.RFC3339)
	b = append(b, ',')
	// Every text cell goes through appendCell, event and source too: ingest's name rule holds for
	// what ingest stored, but the importer keeps the guide's rows as they were (its event is TEXT),
	// and a name like =HYPERLINK(...) or one holding a comma was written raw (found by review). ip
	// likewise: an IPv6 zone ("fe80::1%eth0") is free text after the '%'.
	b = appendCell(b, event)
	b = append(b, ',')
	b = appendCell(b, source)
	b = append(b, ',')
	b = appendCell(b, user)
	b = append(b, ',')
	b = appendCell(b, ip)
	b = append(b, ',')
	b = appendCell(b, reqID)
	b = append(b, ',')
	return append(appendProps(b, exportProps(props)), '\n')
}

// exportProps is props as GET /events shows them: stored props that are not one line of valid JSON
// (rows written by something other than ingest, which stores compact objects) read as {}, so an
// NDJSON line is always one JSON object and a CSV cell never carries raw control characters.
func exportProps(props []byte) []byte {
	if len(props) == 0 || bytes.IndexByte(props, '\n') >= 0 || bytes.IndexByte(props, '\r') >= 0 || !json.Valid(props) {
		return emptyProps
	}
	return props
}

var emptyProps = []byte("{}")

// appendProps appends props as a quoted CSV cell. Props are compact JSON objects that ingest wrote
// (valid UTF-8, control characters escaped, starting with '{'), so only their quotes need doubling;
// runs between quotes are copied whole (bytes.IndexByte is vectorised): props are most of an
// export's bytes.
func appendProps(b []byte, props []byte) []byte {
	b = append(b, '"')
	for {
		i := bytes.IndexByte(props, '"')
		if i < 0 {
			break
		}
		b = append(b, props[:i+1]...)
		b = append(b, '"')
		props = props[i+1:]
	}
	b = append(b, props...)
	return append(b, '"')
}

func appendJSONLine(b []byte, id uuid.UUID, ts time.Time, event, source, user string, props []byte, ip, reqID string) []byte {
	b = append(b, `{"id":"`...)
	b = jsontext.AppendUUID(b, id)
	b = append(b, `","user_id":`...)
	b = jsontext.AppendString(b, user)
	b = append(b, `,"source":`...)
	b = jsontext.AppendString(b, source)
	b = append(b, `,"event":`...)
	b = jsontext.AppendString(b, event)
	b = append(b, `,"ts":"`...)
	b = ts.UTC().AppendFormat(b, time.RFC3339)
	b = append(b, `","props":`...)
	b = append(b, exportProps(props)...)
	b = append(b, `,"ip":`...)
	b = jsontext.AppendString(b, ip)
	b = append(b, `,"request_id":`...)
	b = jsontext.AppendString(b, reqID)
	return append(b, "}\n"...)
}

// Fullwidth forms of = + - @ that spreadsheets (Excel with East Asian input, LibreOffice) also read as
// the start of a formula.
const (
	fullwidthEquals = "\uFF1D"
	fullwidthPlus   = "\uFF0B"
	fullwidthMinus  = "\uFF0D"
	fullwidthAt     = "\uFF20"
)

// formulaStart reports whether a spreadsheet would read s as a formula or a command: it starts with
// = + - @ (ASCII or fullwidth), a tab, or a line break.
func formulaStart(s string) bool {
	if s == "" {
		return false
	}
	switch s[0] {
	case '=', '+', '-', '@', '\t', '\r', '\n':
		return true
	case 0xEF:
		if len(s) >= 3 {
			p := s[:3]
			return p == fullwidthEquals || p == fullwidthPlus || p == fullwidthMinus || p == fullwidthAt
		}
	}
	return false
}

// control reports whether c is a C0 control character (other than tab, LF and CR, which CSV quoting
// carries) or DEL: no spreadsheet shows them usefully and some treat NUL as the end of the file.
func control(c byte) bool { return (c < 0x20 && c != '\t' && c != '\n' && c != '\r') || c == 0x7f }

// appendCell appends s as one CSV cell: neutralised as OWASP recommends for CSV injection (a cell a
// spreadsheet would run gets a leading '), with control characters and invalid UTF-8 as U+FFFD, and
// quoted when it holds a delimiter (',' or ';', which Excel splits on in many locales, or a tab,
// which some importers split on), a quote, a line break or a leading space.
func appendCell(b []byte, s string) []byte {
	quote, clean := false, true
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case c == ',' || c == ';' || c == '"' || c == '\n' || c == '\r' || c == '\t':
			// A tab too: importers that split on it as well saw "x<TAB>=1+1" as a cell "=1+1",
			// past the check of the cell's start (found by review).
			quote = true
		case control(c) || c >= 0x80:
			clean = false
		}
	}
	if s != "" && s[0] == ' ' {
		quote = true
	}
	// After leading spaces too: some spreadsheets trim them, and " =1+1" becomes a formula there.
	neutralise := formulaStart(strings.TrimLeft(s, " "))
	if !quote && clean && !neutralise {
		return append(b, s...)
	}
	if quote {
		b = append(b, '"')
	}
	if neutralise {
		b = append(b, '\'')
	}
	for i := 0; i < len(s); {
		c := s[i]
		if c < utf8.RuneSelf {
			switch {
			case c == '"':
				b = append(b, '"', '"')
			case control(c):
				b = append(b, "\uFFFD"...)
			default:
				b = append(b, c)
			}
			i++
			continue
		}
		r, size := utf8.DecodeRuneInString(s[i:])
		if r == utf8.RuneError && size == 1 {
			b = append(b, "\uFFFD"...)
		} else {
			b = append(b, s[i:i+size]...)
		}
		i += size
	}
	if quote {
		b = append(b, '"')
	}
	return b
}

// Concurrent exports are bounded: each holds a ClickHouse connection for as long as its client
// reads, and the pool (16) is shared with ingest and every other read. A tenant may run
// exportsPerTenant at once, all tenants exportsTotal; beyond that the export is refused (429) at
// once rather than queued.
const (
	exportsPerTenant = 2
	exportsTotal     = 4
)

// exportGate counts running exports, per tenant and in all, and lets shutdown wait for them.
type exportGate struct {
	mu       sync.Mutex
	running  map[uuid.UUID]int
	total    int
	finished chan struct{} // closed when total drops to 0; replaced when it rises from 0
}

// enter takes a slot for tenant, or reports false when none is free.
func (g *exportGate) enter(tenant uuid.UUID) bool {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.total >= exportsTotal || g.running[tenant] >= exportsPerTenant {
		return false
	}
	if g.running == nil {
		g.running = map[uuid.UUID]int{}
	}
	if g.total == 0 {
		g.finished = make(chan struct{})
	}
	g.running[tenant]++
	g.total++
	return true
}

// leave gives tenant's slot back.
func (g *exportGate) leave(tenant uuid.UUID) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.running[tenant]--; g.running[tenant] <= 0 {
		delete(g.running, tenant)
	}
	if g.total--; g.total == 0 {
		close(g.finished)
	}
}

// wait returns once no export runs, or when ctx ends.
func (g *exportGate) wait(ctx context.Context) error {
	g.mu.Lock()
	if g.total == 0 {
		g.mu.Unlock()
		return nil
	}
	finished, n := g.finished, g.total
	g.mu.Unlock()
	select {
	case <-finished:
		return nil
	case <-ctx.Done():
		return fmt.Errorf("%d exports still streaming at the shutdown deadline (they end cut short): %w", n, ctx.Err())
	}
}
