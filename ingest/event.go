// Package ingest owns the write path: the event model and its validation, decoding request bodies,
// the REST ingest handlers, the durable spool every accepted event is written to before it is
// acknowledged, and the batching writer that ships the spool to ClickHouse. It does not read events
// back (package query) or decide quotas (package quota); it only bumps live counters through Counter.
package ingest

import (
	"bytes"
	"encoding/json"
	"fmt"
	"math"
	"net/netip"
	"strconv"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/google/uuid"

	"github.com/analyticsd/analyticsd/internal/excerpt"
	"github.com/analyticsd/analyticsd/retention"
)

// Sources are the event sources of the contract (docs/contract.md).
var Sources = []string{"app", "api", "webhook", "job", "payments", "files", "builder", "agent"}

// DefaultSource is used when an event names none (docs/contract.md: its examples send "app").
const DefaultSource = "app"

// Event is one event as a client sends it. Ts and Props stay raw so their form can be checked; after
// Decode they may point into the body they came from, so validate events before that buffer is reused.
type Event struct {
	ID        string          `json:"id"`
	Event     string          `json:"event"`
	UserID    string          `json:"user_id"`
	Source    string          `json:"source"`
	Ts        json.RawMessage `json:"ts"`
	Props     json.RawMessage `json:"props"`
	IP        string          `json:"ip"`
	RequestID string          `json:"request_id"`
	// TenantID is read only to refuse it: the tenant always comes from the credential.
	TenantID string `json:"tenant_id"`

	index int // position in the request, for error reports
	line  int // 1-based line of an NDJSON body, for error reports
	// decoded: Decode produced this event with a JSON decoder that had already checked that Props is
	// well-formed JSON, so Validate need not parse it again.
	decoded bool
}

// Index is the event's position in its request.
func (e *Event) Index() int { return e.index }

// Row is a validated event, ready for ClickHouse.
type Row struct {
	ID         uuid.UUID
	TenantID   uuid.UUID
	Ts         time.Time // UTC, whole seconds
	ReceivedAt time.Time // UTC, whole seconds
	Event      string
	Source     string
	UserID     string
	Props      string // compact JSON object
	IP         string
	RequestID  string
}

// Limits bound what one event and one request may carry.
type Limits struct {
	MaxPropsBytes   int           // compact JSON size of props (default 8 KiB)
	MaxUserID       int           // bytes (default 255: the VARCHAR(255) of docs/contract.md)
	MaxRequestID    int           // bytes (default 255)
	MaxBodyBytes    int64         // decompressed request body (default 10 MiB)
	MaxEvents       int           // events per request (default 10,000)
	RetentionDays   int           // ts older than this is refused (it would be dropped at once)
	MaxFuture       time.Duration // ts further ahead than this is refused (default 1 h)
	MaxMetricLength int           // increment metric names (default 128)
}

// DefaultLimits returns the documented defaults.
func DefaultLimits() Limits {
	return Limits{
		MaxPropsBytes:   8 << 10,
		MaxUserID:       255,
		MaxRequestID:    255,
		MaxBodyBytes:    10 << 20,
		MaxEvents:       10_000,
		RetentionDays:   90,
		MaxFuture:       time.Hour,
		MaxMetricLength: 128,
	}
}

// ValidEventName reports whether name is a well-formed event name of at most 128 bytes: "domain.action",
// lowercase segments of letters, digits, '_' or '-', joined by dots, at least two segments, each
// starting with a letter (the regular expression ^[a-z][a-z0-9_-]*(\.[a-z][a-z0-9_-]*)+$, as a loop:
// it runs once per ingested event).
func ValidEventName(name string) bool {
	if len(name) > 128 {
		return false
	}
	segments, start := 1, true
	for i := 0; i < len(name); i++ {
		c := name[i]
		switch {
		case c >= 'a' && c <= 'z':
		case start:
			return false // a segment must start with a letter (this also refuses "", "..", a leading dot)
		case c == '.':
			segments++
			start = true
			continue
		case c >= '0' && c <= '9', c == '_', c == '-':
		default:
			return false
		}
		start = false
	}
	return segments >= 2 && !start
}

// ValidSource reports whether s is one of Sources.
func ValidSource(s string) bool {
	for _, v := range Sources {
		if s == v {
			return true
		}
	}
	return false
}

// Validate turns a client event into a Row for tenant, or says what is wrong with it.
func (l Limits) Validate(e *Event, tenant uuid.UUID, now time.Time) (Row, error) {
	r := Row{TenantID: tenant, ReceivedAt: now.UTC().Truncate(time.Second)}
	if e.TenantID != "" {
		if id, err := uuid.Parse(e.TenantID); err != nil || id != tenant {
			return r, fmt.Errorf("tenant_id does not match the credential's tenant; omit it, the tenant always comes from the API key")
		}
	}
	switch {
	case e.Event == "":
		return r, fmt.Errorf("event is required, e.g. \"auth.user.login\"")
	case len(e.Event) > 128:
		return r, fmt.Errorf("event is %d bytes; the limit is 128", len(e.Event))
	case !ValidEventName(e.Event):
		return r, fmt.Errorf("event %q must be lowercase domain.action form, e.g. \"auth.user.login\" (letters, digits, '_' or '-', separated by dots)", excerpt.Short(e.Event))
	}
	r.Event = e.Event

	r.Source = e.Source
	if r.Source == "" {
		r.Source = DefaultSource
	} else if !ValidSource(r.Source) {
		return r, fmt.Errorf("source %q is not one of %s", excerpt.Short(r.Source), strings.Join(Sources, ", "))
	}

	if e.ID == "" {
		r.ID = newID()
	} else {
		id, err := uuid.Parse(e.ID)
		if err != nil || len(e.ID) != 36 {
			return r, fmt.Errorf("id %q must be a UUID such as 5f0c6d1e-8a1b-4c7e-9d2f-3a4b5c6d7e8f, or omitted", excerpt.Short(e.ID))
		}
		if id == uuid.Nil {
			// Every client that forgets to fill its ids in would collide on it: the second event
			// would be taken for a duplicate of the first and dropped.
			return r, fmt.Errorf("id must not be the nil UUID 00000000-0000-0000-0000-000000000000; send a unique UUID per event (v4 or v7), or omit it and one is made")
		}
		r.ID = id
	}

	ts, err := parseTs(e.Ts, now)
	if err != nil {
		return r, err
	}
	if oldest := (retention.Window{Days: l.RetentionDays}).OldestAccepted(now); ts.Before(oldest) {
		return r, fmt.Errorf("ts %s is older than the %d-day retention window (oldest accepted: %s)",
			ts.Format(time.RFC3339), l.RetentionDays, oldest.UTC().Truncate(time.Second).Format(time.RFC3339))
	}
	if newest := now.Add(l.MaxFuture); ts.After(newest) {
		return r, fmt.Errorf("ts %s is more than %s in the future (newest accepted: %s)",
			ts.Format(time.RFC3339), l.MaxFuture, newest.UTC().Truncate(time.Second).Format(time.RFC3339))
	}
	r.Ts = ts

	props, err := compactProps(e.Props, l.MaxPropsBytes, e.decoded)
	if err != nil {
		return r, err
	}
	r.Props = props

	if len(e.UserID) > l.MaxUserID {
		return r, fmt.Errorf("user_id is %d bytes; the limit is %d", len(e.UserID), l.MaxUserID)
	}
	r.UserID = e.UserID
	if len(e.RequestID) > l.MaxRequestID {
		return r, fmt.Errorf("request_id is %d bytes; the limit is %d", len(e.RequestID), l.MaxRequestID)
	}
	r.RequestID = e.RequestID
	if e.IP != "" {
		addr, err := netip.ParseAddr(e.IP)
		if err != nil {
			return r, fmt.Errorf("ip %q is not an IPv4 or IPv6 address", excerpt.Short(e.IP))
		}
		if addr.Zone() != "" {
			// A zone ("fe80::1%eth0") names an interface of the sender's host, means nothing here,
			// and is free text: "%,=HYPERLINK(…)" would ride into exports.
			return r, fmt.Errorf("ip %q has a zone (%%…): send the address without it", excerpt.Short(e.IP))
		}
		r.IP = addr.Unmap().String()
	}
	return r, nil
}

// parseTs reads an RFC3339 string or epoch milliseconds; absent or null means now.
func parseTs(raw json.RawMessage, now time.Time) (time.Time, error) {
	raw = bytes.TrimSpace(raw)
	if len(raw) == 0 || string(raw) == "null" {
		return now.UTC().Truncate(time.Second), nil
	}
	if raw[0] == '"' {
		var s string
		if len(raw) >= 2 && raw[len(raw)-1] == '"' && bytes.IndexByte(raw, '\\') < 0 {
			s = string(raw[1 : len(raw)-1]) // no escapes: the string is its bytes
		} else if err := json.Unmarshal(raw, &s); err != nil {
			return time.Time{}, fmt.Errorf("ts must be an RFC3339 string or epoch milliseconds")
		}
		t, err := time.Parse(time.RFC3339Nano, s)
		if err != nil {
			return time.Time{}, fmt.Errorf("ts %q is not RFC3339 (e.g. \"2024-01-15T10:30:00Z\") or epoch milliseconds", excerpt.Short(s))
		}
		return t.UTC().Truncate(time.Second), nil
	}
	ms, err := strconv.ParseInt(string(raw), 10, 64)
	if err != nil {
		return time.Time{}, fmt.Errorf("ts %s must be epoch milliseconds as a whole number, or an RFC3339 string", excerpt.Short(string(raw)))
	}
	if ms < 1e11 || ms > 1e14 {
		// 1e11 ms is 1973: a value this small is almost certainly epoch seconds.
		return time.Time{}, fmt.Errorf("ts %d is not plausible epoch milliseconds (seconds sent by mistake?)", ms)
	}
	return time.UnixMilli(ms).UTC().Truncate(time.Second), nil
}

// compactProps checks props is a JSON object within max bytes and returns it compact (no spaces), the
// form ClickHouse's visitParamExtract* functions need. wellFormed says raw is known to be valid JSON;
// then, when it is already compact (what clients' JSON encoders send), it is only measured and checked
// for UTF-8, at about a third of the cost of json.Compact.
func compactProps(raw json.RawMessage, max int, wellFormed bool) (string, error) {
	raw = bytes.TrimSpace(raw)
	if len(raw) == 0 || string(raw) == "null" {
		return "{}", nil
	}
	if raw[0] != '{' {
		return "", fmt.Errorf("props must be a JSON object, e.g. {\"plan\":\"pro\"}")
	}
	if wellFormed && compact(raw) {
		if len(raw) > max {
			return "", fmt.Errorf("props is %d bytes; the limit is %d — send fewer or shorter keys", len(raw), max)
		}
		if !utf8.Valid(raw) {
			return "", fmt.Errorf("props contains invalid UTF-8")
		}
		return string(raw), nil
	}
	var b bytes.Buffer
	b.Grow(len(raw))
	if err := json.Compact(&b, raw); err != nil {
		return "", fmt.Errorf("props is not valid JSON: %v", err)
	}
	if b.Len() > max {
		return "", fmt.Errorf("props is %d bytes; the limit is %d — send fewer or shorter keys", b.Len(), max)
	}
	if !utf8.Valid(b.Bytes()) {
		return "", fmt.Errorf("props contains invalid UTF-8")
	}
	return b.String(), nil
}

// compact reports whether well-formed JSON has no whitespace outside its strings.
func compact(b []byte) bool {
	spaced, _ := structure(b, math.MaxInt)
	return !spaced
}

// structure walks JSON text outside its strings: spaced reports whitespace there, and tooDeep that
// arrays and objects nest more than limit deep (the walk stops at that point).
func structure(b []byte, limit int) (spaced, tooDeep bool) {
	depth, in, esc := 0, false, false
	for _, c := range b {
		switch {
		case esc:
			esc = false
		case in:
			if c == '\\' {
				esc = true
			} else if c == '"' {
				in = false
			}
		case c == '"':
			in = true
		case c == '{' || c == '[':
			if depth++; depth > limit {
				return spaced, true
			}
		case c == '}' || c == ']':
			depth--
		case c == ' ', c == '\t', c == '\n', c == '\r':
			spaced = true
		}
	}
	return spaced, false
}
