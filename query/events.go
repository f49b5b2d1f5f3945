package query

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/google/uuid"

	"github.com/analyticsd/analyticsd/internal/chlimit"
)

// MaxFilterBytes caps an event, metric or source a filter names.
const MaxFilterBytes = 1000

// ValidName reports whether s can be a stored event, metric or source name a filter may name: not
// empty, valid UTF-8, at most MaxFilterBytes. Ingest stores only lowercase dotted names and the
// catalog's sources, but an import keeps the names and sources of the system it came from
// ("Order Completed.v2", "mobile"), and a filter of the ingest rules refused those with a 400 while
// the event list showed them (found by review). Values are bound as query parameters.
func ValidName(s string) bool { return s != "" && len(s) <= MaxFilterBytes && utf8.ValidString(s) }

// EventFilter selects a tenant's events, newest first.
type EventFilter struct {
	Tenant uuid.UUID
	Range  Range
	Event  string
	Source string
	UserID string
	Cursor Cursor
	Limit  int
}

// Event is one event as the API returns it.
type Event struct {
	ID        string          `json:"id"`
	UserID    string          `json:"user_id"`
	Source    string          `json:"source"`
	Event     string          `json:"event"`
	Ts        string          `json:"ts"`
	Props     json.RawMessage `json:"props"`
	IP        string          `json:"ip"`
	RequestID string          `json:"request_id"`

	ts time.Time
	id uuid.UUID
}

// Page is one page of events.
type Page struct {
	Events     []Event `json:"events"`
	HasMore    bool    `json:"has_more"`
	NextCursor *string `json:"next_cursor"`
}

const eventColumns = "id, ts, event, source, user_id, props, ip, request_id"

// where renders the filter's predicate for the window [lo, hi): tenant first, then time, the
// cursor, then optional filters. Every user value is a bound argument.
func (f EventFilter) where(lo, hi time.Time) (string, []any) {
	var b strings.Builder
	args := []any{f.Tenant, lo, hi}
	b.WriteString("tenant_id = ? AND ts >= ? AND ts < ?")
	switch {
	case f.Cursor.IsZero():
	case f.Cursor.ID != uuid.Nil:
		b.WriteString(" AND (ts < ? OR (ts = ? AND id < toUUID(?)))")
		args = append(args, f.Cursor.Ts, f.Cursor.Ts, f.Cursor.ID.String())
	default: // a bare RFC3339 cursor: events older than the instant
		b.WriteString(" AND ts < ?")
		args = append(args, f.Cursor.Ts)
	}
	if f.Event != "" {
		b.WriteString(" AND event = ?")
		args = append(args, f.Event)
	}
	if f.Source != "" {
		b.WriteString(" AND source = ?")
		args = append(args, f.Source)
	}
	if f.UserID != "" {
		b.WriteString(" AND user_id = ?")
		args = append(args, f.UserID)
	}
	return b.String(), args
}

// SQL returns the events query for the window [lo, hi), at most n rows.
func (f EventFilter) SQL(db string, lo, hi time.Time, n int) (string, []any) {
	where, args := f.where(lo, hi)
	return selectEvents(db, where, n), args
}

// selectEvents is the events query with predicate where, newest first (the keyset order), at most n
// rows (no LIMIT when n is 0).
func selectEvents(db, where string, n int) string {
	q := fmt.Sprintf("SELECT %s FROM %s.events WHERE %s ORDER BY ts DESC, id DESC", eventColumns, db, where)
	if n > 0 {
		q += fmt.Sprintf(" LIMIT %d", n)
	}
	return q
}

// upper is the exclusive upper time bound of the page: the range's end, or the cursor's position.
func (f EventFilter) upper() time.Time {
	hi := f.Range.To
	if !f.Cursor.IsZero() {
		c := f.Cursor.Ts
		if f.Cursor.ID != uuid.Nil {
			c = c.Add(time.Second) // events at the cursor's second with a smaller id still follow
		}
		if c.Before(hi) {
			hi = c
		}
	}
	return hi
}

// Events returns one page. It searches backwards in growing time windows (1 h, then 8× wider each
// step) so a page costs about the same wherever the cursor is: the sort key (tenant_id, ts, id) lets
// ClickHouse read only the window, and a busy tenant's page is found in the first one.
func (s *Store) Events(ctx context.Context, f EventFilter) (Page, error) {
	page := Page{Events: make([]Event, 0, f.Limit)}
	top := f.upper()
	hi := top
	want := f.Limit + 1
	window := time.Hour
	// The default range ends at tomorrow 00:00 UTC, so windows counted from there would first
	// search hours in which nothing can exist yet. The first window instead reaches down to an hour
	// before now (still covering everything above it), and the growing windows go on from there.
	first := hi
	if now := s.now(); now.Before(first) {
		first = now
	}
	for hi.After(f.Range.From) && len(page.Events) < want {
		lo := hi.Add(-window)
		if hi.Equal(top) {
			lo = first.Add(-window)
		}
		if lo.Before(f.Range.From) {
			lo = f.Range.From
		}
		q, args := f.SQL(s.db, lo, hi, want-len(page.Events))
		if err := s.collectEvents(ctx, q, args, &page.Events); err != nil {
			return Page{}, err
		}
		hi = lo
		window *= 8
	}
	if len(page.Events) > f.Limit {
		page.Events = page.Events[:f.Limit]
		page.HasMore = true
		last := page.Events[f.Limit-1]
		c := Cursor{Ts: last.ts, ID: last.id, From: f.Range.From}.Encode()
		page.NextCursor = &c
	}
	return page, nil
}

func (s *Store) collectEvents(ctx context.Context, q string, args []any, into *[]Event) error {
	rows, err := s.ch.Query(chlimit.Limit(s.maxExec).Context(ctx), q, args...)
	if err != nil {
		return fmt.Errorf("query events: %w", err)
	}
	defer rows.Close()
	for rows.Next() {
		var e Event
		var props string
		if err := rows.Scan(&e.id, &e.ts, &e.Event, &e.Source, &e.UserID, &props, &e.IP, &e.RequestID); err != nil {
			return fmt.Errorf("scan event: %w", err)
		}
		e.ts = e.ts.UTC()
		e.ID, e.Ts = e.id.String(), e.ts.Format(time.RFC3339)
		if json.Valid([]byte(props)) {
			e.Props = json.RawMessage(props)
		} else {
			e.Props = json.RawMessage("{}")
		}
		*into = append(*into, e)
	}
	return rows.Err()
}
