// Package query owns the read side on ClickHouse (and, for reconciled usage, Postgres): event lists with
// keyset cursors, usage series, KPIs, event names and the streaming CSV export, plus their HTTP handlers.
// Every query is tenant-scoped first, binds user values as parameters and carries ClickHouse limits.
package query

import (
	"encoding/base64"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/google/uuid"

	"github.com/analyticsd/analyticsd/internal/excerpt"
)

// ParamError is a bad query parameter; its message names the parameter and the fix.
type ParamError struct{ Msg string }

func (e *ParamError) Error() string { return e.Msg }

func paramErr(format string, args ...any) error { return &ParamError{fmt.Sprintf(format, args...)} }

// ErrBadCursor: the cursor is neither one we issued nor an RFC3339 time.
var ErrBadCursor = &ParamError{"cursor is not valid: pass next_cursor from the previous page unchanged, or an RFC3339 time"}

// Range is a half-open time range [From, To) and the zone whose days it was read in.
type Range struct {
	From, To time.Time
	Zone     Zone
}

// Days returns the inclusive local dates (in r.Zone, as midnight UTC values) the range touches.
func (r Range) Days() (first, last time.Time) {
	return r.Zone.Date(r.From), r.Zone.Date(r.To.Add(-time.Second))
}

// MaxRangeDays caps how much one request may scan.
const MaxRangeDays = 366

// ParseRange is ParseRangeIn in UTC.
func ParseRange(from, to string, now time.Time) (Range, error) {
	return ParseRangeIn(from, to, now, UTC)
}

// ParseRangeIn reads from/to: YYYY-MM-DD means whole days of zone z (from its local midnight; to
// inclusive), RFC3339 an instant (to exclusive). Defaults: the last 30 local days including today.
func ParseRangeIn(from, to string, now time.Time, z Zone) (Range, error) {
	today := z.Date(now)
	r := Range{Zone: z}
	var err error
	var toDay time.Time // the local date after the last one, when to is a date or the default
	if to == "" {
		toDay = today.AddDate(0, 0, 1)
		r.To = z.DayStart(toDay)
	} else if r.To, err = parseBound("to", to, true); err != nil {
		return r, err
	} else if len(to) == len(time.DateOnly) {
		toDay = r.To
		r.To = z.DayStart(toDay)
	}
	switch {
	case from != "":
		if r.From, err = parseBound("from", from, false); err != nil {
			return r, err
		}
		if len(from) == len(time.DateOnly) {
			r.From = z.DayStart(r.From)
		}
	case !toDay.IsZero():
		r.From = z.DayStart(toDay.AddDate(0, 0, -30))
	case r.To.Equal(z.DayStart(z.Date(r.To))):
		// An instant at a local midnight: 30 local days before it, whatever a DST change in
		// between did to their length (720 hours would land an hour off midnight, which /usage,
		// counting whole days, refuses).
		r.From = z.DayStart(z.Date(r.To).AddDate(0, 0, -30))
	default:
		r.From = r.To.Add(-30 * 24 * time.Hour)
	}
	if !r.From.Before(r.To) {
		return r, paramErr("from (%s) must be before to (%s)", r.From.Format(time.RFC3339), r.To.Format(time.RFC3339))
	}
	if r.To.Sub(r.From) > MaxRangeDays*24*time.Hour+2*time.Hour { // a DST change may lengthen the local days
		return r, paramErr("the range from %s to %s is longer than %d days; narrow it", from, to, MaxRangeDays)
	}
	return r, nil
}

// parseBound reads one end of a range. Dates and times alike must fall in the years 1970-2105, what
// ClickHouse's DateTime holds: beyond it a query fails in storage (once a 503 that clients retried
// forever) or, for usage filled with zeros, invents days no event can have.
func parseBound(name, v string, end bool) (time.Time, error) {
	var t time.Time
	var err error
	if len(v) == len(time.DateOnly) {
		t, err = time.Parse(time.DateOnly, v)
	} else {
		t, err = time.Parse(time.RFC3339Nano, v)
	}
	if err != nil {
		return time.Time{}, paramErr("%s=%q is not a date (YYYY-MM-DD) or RFC3339 time", name, excerpt.Short(v))
	}
	if t.Year() < 1970 || t.Year() > 2105 {
		return time.Time{}, paramErr("%s=%q is outside the years 1970-2105", name, excerpt.Short(v))
	}
	if len(v) == len(time.DateOnly) && end {
		t = t.Add(24 * time.Hour) // whole day, inclusive
	}
	if t.Nanosecond() != 0 {
		// Stored times are whole seconds, and both bounds round up: from=10:30:00.5 does not
		// include an event at 10:30:00, to=10:30:00.5 (exclusive) does. Truncated, both were off by
		// that second's events (found by review).
		t = t.Truncate(time.Second).Add(time.Second)
	}
	return t.UTC(), nil
}

// Cursor is a position in the newest-first event order: events strictly after it come next.
// A cursor from a bare RFC3339 time has no ID and means "events older than this instant".
type Cursor struct {
	Ts time.Time
	ID uuid.UUID // uuid.Nil for a bare time
	// From is the lower bound of the range the first page was read with (zero: not carried). A
	// request that names no from of its own pages on with it: the default range ("the last 30 days")
	// recomputed after midnight would skip the oldest day's events.
	From time.Time
}

// Encode returns the opaque form handed out as next_cursor.
func (c Cursor) Encode() string {
	s := strconv.FormatInt(c.Ts.Unix(), 10) + ":" + c.ID.String()
	if !c.From.IsZero() {
		s += ":" + strconv.FormatInt(c.From.Unix(), 10)
	}
	return base64.RawURLEncoding.EncodeToString([]byte(s))
}

// ParseCursor reads an opaque cursor or an RFC3339 time.
func ParseCursor(s string) (Cursor, error) {
	if s == "" {
		return Cursor{}, nil
	}
	if t, err := time.Parse(time.RFC3339Nano, s); err == nil {
		// Events strictly older than the instant. Stored times are whole seconds, so an event at
		// 10:30:00 is older than 10:30:00.5: a fractional cursor rounds up to the next second.
		ts := t.UTC()
		if ts.Year() < 1970 || ts.Year() > 2105 {
			return Cursor{}, paramErr("cursor=%q is outside the years 1970-2105", excerpt.Short(s))
		}
		if ts.Truncate(time.Second) != ts {
			ts = ts.Truncate(time.Second).Add(time.Second)
		}
		return Cursor{Ts: ts}, nil
	}
	raw, err := base64.RawURLEncoding.DecodeString(s)
	if err != nil || len(raw) > 64 {
		return Cursor{}, ErrBadCursor
	}
	parts := strings.Split(string(raw), ":")
	if len(parts) != 2 && len(parts) != 3 {
		return Cursor{}, ErrBadCursor
	}
	n, ok := unixSeconds(parts[0])
	if !ok {
		return Cursor{}, ErrBadCursor
	}
	u, err := uuid.Parse(parts[1])
	if err != nil || len(parts[1]) != 36 {
		return Cursor{}, ErrBadCursor
	}
	c := Cursor{Ts: time.Unix(n, 0).UTC(), ID: u}
	if len(parts) == 3 {
		from, ok := unixSeconds(parts[2])
		if !ok {
			return Cursor{}, ErrBadCursor
		}
		c.From = time.Unix(from, 0).UTC()
	}
	return c, nil
}

// unixSeconds reads a cursor's time: whole seconds from 1970 to 2106 (ClickHouse's DateTime).
func unixSeconds(s string) (int64, bool) {
	n, err := strconv.ParseInt(s, 10, 64)
	return n, err == nil && n >= 0 && n <= 4_294_967_295
}

// PinFrom applies a cursor's carried range start to a request that named no from of its own.
func (c Cursor) PinFrom(r *Range, requestFrom string) {
	if requestFrom == "" && !c.From.IsZero() && c.From.Before(r.To) && r.To.Sub(c.From) <= MaxRangeDays*24*time.Hour {
		r.From = c.From
	}
}

// IsZero reports an absent cursor (first page).
func (c Cursor) IsZero() bool { return c.Ts.IsZero() }

// ParseLimit reads limit: 1..1000, default 100.
func ParseLimit(s string) (int, error) { return parseCount("limit", s, 100, 1000) }

// parseCount reads a whole number from 1 to max; empty is def.
func parseCount(name, s string, def, max int) (int, error) {
	if s == "" {
		return def, nil
	}
	n, err := strconv.Atoi(s)
	if err != nil || n < 1 || n > max {
		return 0, paramErr("%s=%q must be a whole number from 1 to %d", name, excerpt.Short(s), max)
	}
	return n, nil
}
