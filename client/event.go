package client

import (
	"bytes"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"time"
)

// Event is one event, with the fields of the server's POST /api/analytics/events (see the README's
// Ingest section for each field's rules; the server checks them).
type Event struct {
	// ID is the event's UUID. Leave it empty for a random UUIDv4, or set your own (v4 or v7) when the
	// same event might be tracked again, e.g. by a retried job: the server stores an id once.
	ID string
	// Event is the name, lowercase "domain.action", e.g. "business.order.completed" (required).
	Event string
	// UserID is who did it (up to 255 bytes).
	UserID string
	// Source is one of app, api, webhook, job, payments, files, builder, agent; empty means app.
	Source string
	// Ts is when it happened; zero means when Track was called. The server keeps whole seconds.
	Ts time.Time
	// Props are the event's properties, a JSON object of at most 8 KiB once encoded.
	Props map[string]any
	// IP is an IPv4 or IPv6 address, RequestID any text (up to 255 bytes).
	IP, RequestID string
}

// wireEvent is an Event as the server reads it.
type wireEvent struct {
	ID        string         `json:"id"`
	Event     string         `json:"event"`
	UserID    string         `json:"user_id,omitempty"`
	Source    string         `json:"source,omitempty"`
	Ts        string         `json:"ts"`
	Props     map[string]any `json:"props,omitempty"`
	IP        string         `json:"ip,omitempty"`
	RequestID string         `json:"request_id,omitempty"`
}

// prepare fills in e's id and time and encodes it.
func (e *Event) prepare(now func() time.Time) ([]byte, error) {
	if e.Event == "" {
		return nil, errors.New("analyticsd client: event name is required, e.g. \"business.order.completed\"")
	}
	if e.ID == "" {
		e.ID = NewID()
	} else {
		id, err := canonicalUUID(e.ID)
		if err != nil {
			return nil, fmt.Errorf("analyticsd client: event %s: %w", e.Event, err)
		}
		e.ID = id
	}
	if e.Ts.IsZero() {
		e.Ts = now()
	}
	// No HTML escaping: json.Marshal writes <, > and & as 6-byte escapes, and the server measures
	// props as sent against its 8 KiB limit, so escaped props well under it were refused.
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetEscapeHTML(false)
	err := enc.Encode(wireEvent{ID: e.ID, Event: e.Event, UserID: e.UserID, Source: e.Source,
		Ts: e.Ts.UTC().Format(time.RFC3339Nano), Props: e.Props, IP: e.IP, RequestID: e.RequestID})
	if err != nil {
		return nil, fmt.Errorf("analyticsd client: event %s: props cannot be encoded as JSON: %w", e.Event, err)
	}
	return bytes.TrimSuffix(buf.Bytes(), []byte("\n")), nil
}

// event is the item's event as Track encoded it, decoded afresh: what OnFailure gets. It shares no
// map with the caller, who may change Props after Track.
func (it item) event() Event {
	var w wireEvent
	dec := json.NewDecoder(bytes.NewReader(it.raw))
	dec.UseNumber()
	if err := dec.Decode(&w); err != nil {
		// Unreachable: raw is what encoding/json wrote.
		return Event{ID: it.id, Event: it.name}
	}
	ts, _ := time.Parse(time.RFC3339Nano, w.Ts)
	return Event{ID: w.ID, Event: w.Event, UserID: w.UserID, Source: w.Source, Ts: ts, Props: w.Props, IP: w.IP, RequestID: w.RequestID}
}

// NewID returns a random (version 4) UUID, the id Track gives an event that has none.
func NewID() string {
	var b [16]byte
	_, _ = rand.Read(b[:]) // crypto/rand.Read never fails (Go 1.24+)
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	var s [36]byte
	hex.Encode(s[0:8], b[0:4])
	s[8] = '-'
	hex.Encode(s[9:13], b[4:6])
	s[13] = '-'
	hex.Encode(s[14:18], b[6:8])
	s[18] = '-'
	hex.Encode(s[19:23], b[8:10])
	s[23] = '-'
	hex.Encode(s[24:], b[10:])
	return string(s[:])
}

// canonicalUUID checks that s is a UUID in its 36-character form (not the nil UUID, which the server
// refuses) and returns it in lowercase.
func canonicalUUID(s string) (string, error) {
	bad := fmt.Errorf("id %q is not a UUID like \"6f1c2d3e-4a5b-4c6d-8e7f-a0b1c2d3e4f5\"; leave ID empty to get one", s)
	if len(s) != 36 {
		return "", bad
	}
	s = strings.ToLower(s)
	for i := 0; i < len(s); i++ {
		switch {
		case i == 8 || i == 13 || i == 18 || i == 23:
			if s[i] != '-' {
				return "", bad
			}
		case s[i] >= '0' && s[i] <= '9', s[i] >= 'a' && s[i] <= 'f':
		default:
			return "", bad
		}
	}
	if s == "00000000-0000-0000-0000-000000000000" {
		return "", errors.New("id is the nil UUID, which the server refuses; leave ID empty to get one")
	}
	return s, nil
}
