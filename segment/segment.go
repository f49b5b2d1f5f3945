// Package segment serves Segment's HTTP tracking API — POST /v1/batch, /v1/track, /v1/identify,
// /v1/page, /v1/screen, /v1/group and /v1/alias — so apps that already run a Segment library send
// to analyticsd by changing its host and write key. It owns only the translation: Segment's
// credentials into analyticsd's (the write key is an API key), and each Segment message into one
// analyticsd event by the rules below (docs/segment.md has them for users). Validation, the spool,
// deduplication, live counters and the ClickHouse insert are ingest's: the translated events go
// through ingest's own POST /events handler, never around it.
//
// The rules, each deterministic (the same message always makes the same event):
//
//   - id: a messageId that is a UUID (36 characters) other than the nil UUID is the event id; any
//     other messageId is hashed into a name-based UUID (version 5, SHA-1, namespace messageIDSpace),
//     the same in every tenant — ids are deduplicated per tenant, so two tenants' equal messageIds
//     are two events. An SDK's retry carries the same messageId, so it is stored once. Without a
//     messageId the event gets a fresh id (a retry may then be stored twice).
//   - event: track's event when it already passes analyticsd's rule (ingest.ValidEventName, e.g.
//     "auth.user.login"); otherwise EventName's "segment.<slug>" ("Order Completed" →
//     "segment.order_completed"). The other types are the events segment.identify, segment.page,
//     segment.screen, segment.group and segment.alias.
//   - user_id: userId, else anonymousId (one of them is required, as Segment requires).
//   - props: properties (track, page, screen) or traits (identify, group) as the client sent them,
//     with the member "$segment" put first, holding what has no column: the type, the original event
//     name, page/screen name and category, groupId, previousId, anonymousId, messageId and the
//     client's own timestamp. A message whose properties already have "$segment" is refused.
//   - ip: context.ip (the message's, else the batch's).
//   - ts: Segment's clock-skew correction (Timestamp).
//   - source: app.
package segment

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"
	"unicode"
	"unicode/utf8"

	"github.com/google/uuid"

	"github.com/analyticsd/analyticsd/ingest"
	"github.com/analyticsd/analyticsd/internal/excerpt"
)

// Segment's documented limits on its tracking API: a request (a batch) of at most 500 KB, each
// message at most 32 KB.
const (
	MaxBatchBytes   = 500 << 10
	MaxMessageBytes = 32 << 10
)

// Limits on the message fields copied into props.$segment (and userId, which is user_id), each
// refused naming its field. Without them a long one counted toward props' limit
// (INGEST_MAX_PROPS_BYTES) and was refused as "props is N bytes… send fewer or shorter keys",
// blaming properties the client may not have sent at all.
const (
	// MaxIDBytes bounds userId, anonymousId, groupId, previousId and messageId: the user_id column's
	// 255 bytes (docs/contract.md), which anonymousId fills when there is no userId.
	MaxIDBytes = 255
	// MaxNameBytes bounds a track's event and a page's or screen's name and category: far above any
	// real name (the stored event name is at most 128 bytes), far below the props limit.
	MaxNameBytes = 1024
)

// Types are the Segment call types, each with its own endpoint /v1/<type>.
var Types = []string{"track", "identify", "page", "screen", "group", "alias"}

// messageIDSpace is the UUID namespace of event ids hashed from messageIds that are not UUIDs. It is
// fixed forever: changing it would let every retry across the change be stored twice.
var messageIDSpace = uuid.MustParse("0d4be5c2-7c1e-4f7a-9a63-5b2e8f3d9c41")

// EventID maps a Segment messageId to an analyticsd event id: a UUID messageId is itself (so ids
// stay what the SDK logged), any other — the nil UUID among them, which ingest refuses as an id — is
// its name-based UUID in messageIDSpace. It does not depend on the tenant: ingest deduplicates per
// tenant, so equal messageIds of two tenants never meet. ok is false for an empty messageId.
func EventID(messageID string) (id uuid.UUID, ok bool) {
	if messageID == "" {
		return uuid.Nil, false
	}
	if len(messageID) == 36 {
		if id, err := uuid.Parse(messageID); err == nil && id != uuid.Nil {
			return id, true
		}
	}
	return uuid.NewSHA1(messageIDSpace, []byte(messageID)), true
}

// EventName maps a free-text Segment event name to one that passes ingest.ValidEventName. A name
// that passes already is kept. Otherwise ASCII letters are lowercased, each run of characters other
// than ASCII letters and digits becomes one '_' (trimmed at both ends), a slug that is empty or starts
// with a digit gets "e_" in front, and the result is "segment.<slug>": "Order Completed",
// "order completed" and "ORDER_COMPLETED" are all "segment.order_completed". When that would lose
// information a reader cannot restore — the name has non-ASCII letters, digits or combining marks ("Café Visited"),
// or none that are ASCII ("!!!"), or the slug is longer than 111 bytes — the slug is cut to 111 bytes and "_" plus the first 8 hex
// digits of the name's SHA-256 is appended, so two such names never share an event; the whole name
// is then at most 128 bytes, the rule's limit. The original name is kept in props.$segment.event.
func EventName(name string) string {
	if ingest.ValidEventName(name) {
		return name
	}
	var b strings.Builder
	gap, foreign := false, false
	// The name's own runes decide, and only ASCII is lowercased: strings.ToLower turns the Kelvin
	// sign K (U+212A) into k and İ (U+0130) into i, ASCII letters that took the name without its hash
	// into another name's event ("Key Event").
	for _, r := range name {
		if r >= 'A' && r <= 'Z' {
			r += 'a' - 'A'
		}
		switch {
		case r >= 'a' && r <= 'z', r >= '0' && r <= '9':
			if gap && b.Len() > 0 {
				b.WriteByte('_')
			}
			gap = false
			b.WriteRune(r)
		default:
			// A combining mark is part of a letter: "Cafe\u0301" (é decomposed, as NFD text has it) is
			// not "Cafe".
			if r >= utf8.RuneSelf && (unicode.IsLetter(r) || unicode.IsDigit(r) || unicode.IsMark(r)) {
				foreign = true
			}
			gap = true
		}
	}
	slug := b.String()
	if slug == "" {
		foreign = true // "!!!" and "???" must not share an event
	}
	if slug == "" || slug[0] <= '9' {
		slug = strings.TrimSuffix("e_"+slug, "_")
	}
	if foreign || len(slug) > 111 {
		sum := sha256.Sum256([]byte(name))
		slug = strings.TrimRight(slug[:min(len(slug), 111)], "_") + "_" + hex.EncodeToString(sum[:4])
	}
	return "segment." + slug
}

// Timestamp is when a message happened, corrected for the sending device's clock as Segment does
// it: with both the message's timestamp and sentAt (the device's clock when the batch left), the
// device's offset from the server is sentAt − receivedAt, so the event happened at
// receivedAt − (sentAt − timestamp). With a timestamp and no sentAt the timestamp is taken as it is;
// without a timestamp the event happened when it was received.
func Timestamp(timestamp, sentAt *time.Time, received time.Time) time.Time {
	switch {
	case timestamp == nil:
		return received
	case sentAt == nil:
		return *timestamp
	}
	return received.Add(-sentAt.Sub(*timestamp))
}

// message is one Segment call as the libraries send it. Fields analyticsd has no use for
// (integrations, most of context, version, _metadata, ...) are ignored, as Segment's own API takes
// them; a client-sent receivedAt is ignored too: receivedAt is the server's clock.
type message struct {
	Type        string          `json:"type"`
	MessageID   string          `json:"messageId"`
	UserID      json.RawMessage `json:"userId"`
	AnonymousID json.RawMessage `json:"anonymousId"`
	Event       string          `json:"event"`
	Name        string          `json:"name"`
	Category    string          `json:"category"`
	GroupID     json.RawMessage `json:"groupId"`
	PreviousID  json.RawMessage `json:"previousId"`
	Properties  json.RawMessage `json:"properties"`
	Traits      json.RawMessage `json:"traits"`
	Context     *struct {
		IP string `json:"ip"`
	} `json:"context"`
	Timestamp json.RawMessage `json:"timestamp"`
	SentAt    json.RawMessage `json:"sentAt"`
	WriteKey  string          `json:"writeKey"`
}

// batch is the body of POST /v1/batch. Its sentAt and context.ip apply to messages without their own.
type batch struct {
	Batch   []json.RawMessage `json:"batch"`
	SentAt  json.RawMessage   `json:"sentAt"`
	Context *struct {
		IP string `json:"ip"`
	} `json:"context"`
	WriteKey string `json:"writeKey"`
}

// meta is props.$segment: the message's fields that have no column of their own.
type meta struct {
	Type              string `json:"type"`
	Event             string `json:"event,omitempty"`
	Name              string `json:"name,omitempty"`
	Category          string `json:"category,omitempty"`
	GroupID           string `json:"group_id,omitempty"`
	PreviousID        string `json:"previous_id,omitempty"`
	AnonymousID       string `json:"anonymous_id,omitempty"`
	MessageID         string `json:"message_id,omitempty"`
	OriginalTimestamp string `json:"original_timestamp,omitempty"`
}

// metaKey is the props key of meta.
const metaKey = "$segment"

// defaults is what a batch lends its messages.
type defaults struct {
	sentAt json.RawMessage
	ip     string
}

// translate maps one message (raw JSON; typ is the endpoint's type, "" for /v1/batch) to the
// ingest event it becomes, received at received, or says what is wrong with it.
func translate(raw json.RawMessage, typ string, d defaults, received time.Time) (ingest.Event, error) {
	var ev ingest.Event
	var m message
	if err := strictKeys(raw, messageFields); err != nil {
		return ev, err
	}
	if err := json.Unmarshal(raw, &m); err != nil {
		return ev, fmt.Errorf("message is not a JSON object of Segment's shape: %v", err)
	}
	switch {
	case m.Type == "" && typ == "":
		return ev, fmt.Errorf("type is required in a batch: one of %s", strings.Join(Types, ", "))
	case m.Type == "":
		m.Type = typ
	case typ != "" && m.Type != typ:
		return ev, fmt.Errorf("type %q sent to /v1/%s; send it to /v1/%s or /v1/batch", excerpt.Short(m.Type), typ, excerpt.Short(m.Type))
	case !validType(m.Type):
		return ev, fmt.Errorf("type %q is not one of %s", excerpt.Short(m.Type), strings.Join(Types, ", "))
	}
	user, err := idString("userId", m.UserID)
	if err != nil {
		return ev, err
	}
	anon, err := idString("anonymousId", m.AnonymousID)
	if err != nil {
		return ev, err
	}
	groupID, err := idString("groupId", m.GroupID)
	if err != nil {
		return ev, err
	}
	previousID, err := idString("previousId", m.PreviousID)
	if err != nil {
		return ev, err
	}
	mt := meta{Type: m.Type, AnonymousID: anon, MessageID: m.MessageID}
	props := m.Properties
	switch m.Type {
	case "track":
		if m.Event == "" {
			return ev, errors.New("event is required in a track call, e.g. \"Order Completed\"")
		}
		ev.Event, mt.Event = EventName(m.Event), m.Event
	case "identify":
		ev.Event, props = "segment.identify", m.Traits
	case "page", "screen":
		ev.Event, mt.Name, mt.Category = "segment."+m.Type, m.Name, m.Category
	case "group":
		if groupID == "" {
			return ev, errors.New("groupId is required in a group call")
		}
		ev.Event, props, mt.GroupID = "segment.group", m.Traits, groupID
	case "alias":
		if previousID == "" || user == "" {
			return ev, errors.New("an alias call needs both previousId and userId")
		}
		ev.Event, props, mt.PreviousID = "segment.alias", nil, previousID
	}
	ev.UserID = user
	if ev.UserID == "" {
		ev.UserID = anon
	}
	if ev.UserID == "" {
		return ev, errors.New("userId or anonymousId is required")
	}
	// What this message's type copies into props.$segment, and userId.
	for _, f := range []struct {
		name, value string
		max         int
	}{
		{"userId", user, MaxIDBytes}, {"anonymousId", mt.AnonymousID, MaxIDBytes}, {"messageId", mt.MessageID, MaxIDBytes},
		{"groupId", mt.GroupID, MaxIDBytes}, {"previousId", mt.PreviousID, MaxIDBytes},
		{"event", mt.Event, MaxNameBytes}, {"name", mt.Name, MaxNameBytes}, {"category", mt.Category, MaxNameBytes},
	} {
		if len(f.value) > f.max {
			return ev, fmt.Errorf("%s is %d bytes; the limit is %d", f.name, len(f.value), f.max)
		}
	}
	if id, ok := EventID(m.MessageID); ok {
		ev.ID = id.String()
	}
	ts, err := timeField("timestamp", m.Timestamp)
	if err != nil {
		return ev, err
	}
	sentRaw := m.SentAt
	if isNull(sentRaw) {
		sentRaw = d.sentAt
	}
	sent, err := timeField("sentAt", sentRaw)
	if err != nil {
		return ev, err
	}
	if ts != nil {
		mt.OriginalTimestamp = ts.UTC().Format(time.RFC3339Nano)
	}
	ev.Ts = json.RawMessage(strconv.Quote(Timestamp(ts, sent, received).UTC().Format(time.RFC3339Nano)))
	ev.IP = d.ip
	if m.Context != nil && m.Context.IP != "" {
		ev.IP = m.Context.IP
	}
	if ev.Props, err = withMeta(props, mt); err != nil {
		return ev, err
	}
	return ev, nil
}

func validType(t string) bool {
	for _, v := range Types {
		if t == v {
			return true
		}
	}
	return false
}

func isNull(raw json.RawMessage) bool {
	raw = bytes.TrimSpace(raw)
	return len(raw) == 0 || string(raw) == "null"
}

// idString reads an identifier Segment documents as a string; libraries of typed languages send
// numbers too (userId: 42), which are read as their decimal text.
func idString(field string, raw json.RawMessage) (string, error) {
	if isNull(raw) {
		return "", nil
	}
	var s string
	if err := json.Unmarshal(raw, &s); err == nil {
		return s, nil
	}
	var n json.Number
	if err := json.Unmarshal(raw, &n); err == nil {
		return n.String(), nil
	}
	return "", fmt.Errorf("%s must be a string", field)
}

// timeField reads an ISO 8601 date-time (what every Segment library sends); nil when absent.
func timeField(field string, raw json.RawMessage) (*time.Time, error) {
	if isNull(raw) {
		return nil, nil
	}
	var s string
	if err := json.Unmarshal(raw, &s); err != nil {
		return nil, fmt.Errorf("%s must be an ISO 8601 date-time string such as \"2026-01-15T10:30:00.000Z\"", field)
	}
	t, err := time.Parse(time.RFC3339Nano, s)
	if err != nil {
		return nil, fmt.Errorf("%s %q is not an ISO 8601 date-time with a time zone, such as \"2026-01-15T10:30:00.000Z\"", field, excerpt.Short(s))
	}
	return &t, nil
}

// withMeta returns props (an object, or absent) with mt as its first member, under metaKey. The
// client's props follow as they were sent — their bytes, key order, duplicate keys and escapes — so
// they are stored as POST /api/analytics/events stores the same props (compacted, nothing else).
// Decoding them into a map and encoding it again sorted the keys, kept one of duplicate keys, and
// escaped '<', '>', '&' as \u003c…: six bytes each, so 3 KB of HTML in a property grew past the
// 8 KiB limit and was refused.
func withMeta(props json.RawMessage, mt meta) (json.RawMessage, error) {
	m, err := marshal(mt)
	if err != nil {
		return nil, err
	}
	out := append([]byte(`{"`+metaKey+`":`), m...)
	if isNull(props) {
		return append(out, '}'), nil
	}
	// Decoded only to check it: an object, without metaKey (however its key is escaped).
	var obj map[string]json.RawMessage
	if err := json.Unmarshal(props, &obj); err != nil {
		return nil, errors.New("properties and traits must be JSON objects")
	}
	if _, ok := obj[metaKey]; ok {
		return nil, fmt.Errorf("properties and traits must not have the key %q: analyticsd keeps the Segment fields that have no column of their own there", metaKey)
	}
	rest := bytes.TrimSpace(props)[1:] // after the object's '{'
	if len(obj) > 0 {
		out = append(out, ',')
	}
	return append(out, rest...), nil
}

// marshal is json.Marshal without its HTML escaping ('<' as \u003c, ...), which would alter and
// grow what is stored: the text stays as sent, as ingest's own decoding keeps it.
func marshal(v any) ([]byte, error) {
	var b bytes.Buffer
	enc := json.NewEncoder(&b)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(v); err != nil {
		return nil, err
	}
	return bytes.TrimSuffix(b.Bytes(), []byte("\n")), nil
}
