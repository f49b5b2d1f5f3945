package segment

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"strings"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/analyticsd/analyticsd/ingest"
)

func TestEventName(t *testing.T) {
	check := func(in, want string) {
		t.Helper()
		got := EventName(in)
		if got != want {
			t.Errorf("EventName(%q) = %q, want %q", in, got, want)
		}
		if !ingest.ValidEventName(got) {
			t.Errorf("EventName(%q) = %q, which ingest refuses", in, got)
		}
	}
	check("auth.user.login", "auth.user.login") // already a name: kept, so Segment calls feed the catalog
	check("Order Completed", "segment.order_completed")
	check("order completed", "segment.order_completed")
	check("ORDER_COMPLETED", "segment.order_completed")
	check("  Order -- Completed!! ", "segment.order_completed")
	check("Checkout.Started", "segment.checkout_started")
	check("signup", "segment.signup")
	check("3D View", "segment.e_3d_view")
	check("404", "segment.e_404")
	// Names a slug would fold together get the name's hash: non-ASCII letters, or no ASCII at all.
	if a, b := EventName("Café Visited"), EventName("Cafè Visited"); a == b || !strings.HasPrefix(a, "segment.caf_visited_") {
		t.Errorf("Café/Cafè Visited = %q, %q; want two segment.caf_visited_<hash> names", a, b)
	}
	if a, b := EventName("注文完了"), EventName("注文キャンセル"); a == b || !strings.HasPrefix(a, "segment.e_") {
		t.Errorf("two Japanese names = %q, %q; want two segment.e_<hash> names", a, b)
	}
	if a, b := EventName("!!!"), EventName("???"); a == b {
		t.Errorf("!!! and ??? both %q", a)
	}
	// Hashed names are fixed too: a changed hash would split an event's history in two.
	if got := EventName("Café Visited"); got != "segment.caf_visited_1bc30543" {
		t.Errorf("EventName(Café Visited) = %q; the hashed form changed", got)
	}
	long := strings.Repeat("Very Long Event Name ", 20)
	got := EventName(long)
	if len(got) > 128 || !ingest.ValidEventName(got) || got == EventName(long+"x") {
		t.Errorf("EventName(long) = %q (%d bytes); want ≤ 128 bytes, valid, and apart from a longer name with the same start", got, len(got))
	}
	if EventName(long) != got {
		t.Error("EventName is not deterministic")
	}
}

func TestEventID(t *testing.T) {
	u := "5f0c6d1e-8a1b-4c7e-9d2f-3a4b5c6d7e8f"
	if id, ok := EventID(u); !ok || id.String() != u {
		t.Errorf("EventID(%s) = %v, %v; want the UUID itself", u, id, ok)
	}
	if id, _ := EventID(strings.ToUpper(u)); id.String() != u {
		t.Errorf("EventID(upper-case UUID) = %v, want %s", id, u)
	}
	a, _ := EventID("ajs-next-1701234567890-abc")
	b, _ := EventID("ajs-next-1701234567890-abc")
	c, _ := EventID("ajs-next-1701234567890-abd")
	if a != b || a == c || a.Version() != 5 {
		t.Errorf("hashed ids %v %v %v; want the same for the same messageId, another for another, version 5", a, b, c)
	}
	// The nil UUID and UUIDs in other spellings are not taken as ids: they are hashed like any text.
	for _, m := range []string{uuid.Nil.String(), "{" + u + "}", "urn:uuid:" + u} {
		if id, _ := EventID(m); id == uuid.Nil || id.String() == u {
			t.Errorf("EventID(%q) = %v; want a hashed id", m, id)
		}
	}
	// The namespace is fixed forever: a changed one would let every retry across the change be stored
	// twice (docs/segment.md shows this id).
	if id, _ := EventID("order-42"); id.String() != "fac7bd4d-bd95-5af8-ba5e-af2e21825b44" {
		t.Errorf("EventID(order-42) = %v; the namespace or the hash changed", id)
	}
	if _, ok := EventID(""); ok {
		t.Error("EventID(\"\") is ok; want no id")
	}
}

func TestTimestamp(t *testing.T) {
	at := func(s string) *time.Time {
		v, err := time.Parse(time.RFC3339, s)
		if err != nil {
			t.Fatal(err)
		}
		return &v
	}
	received := *at("2026-01-15T12:00:10Z")
	check := func(ts, sent *time.Time, want time.Time) {
		t.Helper()
		if got := Timestamp(ts, sent, received); !got.Equal(want) {
			t.Errorf("Timestamp(%v, %v) = %v, want %v", ts, sent, got, want)
		}
	}
	// The device's clock is 1 h fast: it stamped the event at 13:00:00 and sent it at 13:00:05; the
	// server got it at 12:00:10, so it happened at 12:00:05.
	check(at("2026-01-15T13:00:00Z"), at("2026-01-15T13:00:05Z"), *at("2026-01-15T12:00:05Z"))
	check(at("2026-01-15T11:00:00Z"), nil, *at("2026-01-15T11:00:00Z"))
	check(nil, at("2026-01-15T13:00:05Z"), received)
	check(nil, nil, received)
}

func TestTranslate(t *testing.T) {
	now := time.Date(2026, 1, 15, 12, 0, 0, 0, time.UTC)
	ok := func(raw, typ string, d defaults) (ingest.Event, map[string]any) {
		t.Helper()
		ev, err := translate(json.RawMessage(raw), typ, d, now)
		if err != nil {
			t.Fatalf("translate(%s): %v", raw, err)
		}
		var props map[string]any
		if err := json.Unmarshal(ev.Props, &props); err != nil {
			t.Fatal(err)
		}
		return ev, props
	}
	ev, props := ok(`{"type":"track","event":"Order Completed","userId":"u1","anonymousId":"a1","messageId":"m-1",
		"properties":{"revenue":9.5},"context":{"ip":"203.0.113.7"},"timestamp":"2026-01-15T11:59:00Z"}`, "", defaults{})
	id, _ := EventID("m-1")
	meta, _ := props["$segment"].(map[string]any)
	if ev.Event != "segment.order_completed" || ev.UserID != "u1" || ev.ID != id.String() || ev.IP != "203.0.113.7" ||
		string(ev.Ts) != `"2026-01-15T11:59:00Z"` || props["revenue"] != 9.5 || meta["event"] != "Order Completed" ||
		meta["anonymous_id"] != "a1" || meta["message_id"] != "m-1" || meta["type"] != "track" {
		t.Errorf("track: %+v props %s", ev, ev.Props)
	}

	// Batch defaults: sentAt and context.ip apply to messages without their own.
	ev, _ = ok(`{"type":"page","name":"Home","anonymousId":"a2","timestamp":"2026-01-15T13:00:00Z"}`, "",
		defaults{sentAt: json.RawMessage(`"2026-01-15T13:00:05Z"`), ip: "198.51.100.1"})
	if ev.Event != "segment.page" || ev.UserID != "a2" || string(ev.Ts) != `"2026-01-15T11:59:55Z"` || ev.IP != "198.51.100.1" {
		t.Errorf("page with batch defaults: %+v", ev)
	}
	ev, props = ok(`{"userId":42,"traits":{"plan":"pro"}}`, "identify", defaults{})
	if ev.Event != "segment.identify" || ev.UserID != "42" || props["plan"] != "pro" || ev.ID != "" || string(ev.Ts) != `"2026-01-15T12:00:00Z"` {
		t.Errorf("identify: %+v props %s", ev, ev.Props)
	}
	ev, props = ok(`{"type":"group","userId":"u","groupId":"g1","traits":{"name":"Acme"}}`, "group", defaults{})
	if meta, _ := props["$segment"].(map[string]any); ev.Event != "segment.group" || meta["group_id"] != "g1" || props["name"] != "Acme" {
		t.Errorf("group: %+v props %s", ev, ev.Props)
	}
	ev, props = ok(`{"userId":"u","previousId":"anon-1"}`, "alias", defaults{})
	if meta, _ := props["$segment"].(map[string]any); ev.Event != "segment.alias" || meta["previous_id"] != "anon-1" {
		t.Errorf("alias: %+v props %s", ev, ev.Props)
	}
	ev, props = ok(`{"userId":"u","name":"Settings","category":"Account","properties":{"tab":2}}`, "screen", defaults{})
	if meta, _ := props["$segment"].(map[string]any); ev.Event != "segment.screen" || meta["name"] != "Settings" || meta["category"] != "Account" || props["tab"] != 2.0 {
		t.Errorf("screen: %+v props %s", ev, ev.Props)
	}

	refused := func(raw, typ, want string) {
		t.Helper()
		_, err := translate(json.RawMessage(raw), typ, defaults{}, now)
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("translate(%s) error %v, want one containing %q", raw, err, want)
		}
	}
	refused(`{"event":"x","userId":"u"}`, "", "type is required")
	refused(`{"type":"purchase","userId":"u"}`, "", "is not one of")
	refused(`{"type":"identify","userId":"u"}`, "track", "sent to /v1/track")
	refused(`{"type":"track","event":"x"}`, "", "userId or anonymousId is required")
	refused(`{"type":"track","userId":"u"}`, "", "event is required")
	refused(`{"type":"group","userId":"u"}`, "", "groupId is required")
	refused(`{"type":"alias","previousId":"p","anonymousId":"a"}`, "", "needs both previousId and userId")
	refused(`{"type":"track","event":"x","userId":"u","timestamp":"yesterday"}`, "", "timestamp \"yesterday\"")
	refused(`{"type":"track","event":"x","userId":"u","properties":[1]}`, "", "must be JSON objects")
	refused(`{"type":"track","event":"x","userId":"u","properties":{"$segment":1}}`, "", `"$segment"`)
	refused(`{"type":"track","event":"x","userId":{"id":1}}`, "", "userId must be a string")
	refused(`{"type":"track","event":"x","userId":"u","messageId":"`+strings.Repeat("m", 256)+`"}`, "", "messageId is 256 bytes")
}

// Props are stored as the client sent them, with "$segment" put first. They were decoded into a map
// and encoded again with json.Marshal: keys sorted, one of duplicate keys kept, and '<', '>', '&'
// (and U+2028/9) escaped as \u003c…, six bytes each — stored unlike the same props sent to POST
// /api/analytics/events, and 3 KB of HTML in a property grew past the 8 KiB limit.
func TestPropsKeptAsSentWithSegmentFirst(t *testing.T) {
	now := time.Date(2026, 1, 15, 12, 0, 0, 0, time.UTC)
	props := func(msg string) string {
		t.Helper()
		ev, err := translate(json.RawMessage(msg), "track", defaults{}, now)
		if err != nil {
			t.Fatalf("translate(%s): %v", msg, err)
		}
		var b bytes.Buffer
		if err := json.Compact(&b, ev.Props); err != nil { // as ingest stores them
			t.Fatalf("props %s: %v", ev.Props, err)
		}
		return b.String()
	}
	const meta = `{"$segment":{"type":"track","event":"A <b> & c","message_id":"m-1"}`
	sent := "{\"z\":\"<a>&\u2028</script>\",\"a\":1,\"z\":2,\"e\":\"\\u003c\",\"n\":{\"y\":1,\"x\":[\"&amp;\"]}}"
	msg := `{"event":"A <b> & c","userId":"u","messageId":"m-1","properties":` + sent + `}`
	if got, want := props(msg), meta+","+sent[1:]; got != want {
		t.Errorf("props stored as\n%s\nwant\n%s", got, want)
	}
	spaced := `{"event":"A <b> & c","userId":"u","messageId":"m-1","properties":{ "b" : [1, 2] ,"a":{} }}`
	if got, want := props(spaced), meta+`,"b":[1,2],"a":{}}`; got != want {
		t.Errorf("spaced props stored as %s, want %s", got, want)
	}
	for _, empty := range []string{`,"properties":{}`, `,"properties":{ }`, `,"properties":null`, ``} {
		if got := props(`{"event":"A <b> & c","userId":"u","messageId":"m-1"` + empty + `}`); got != meta+"}" {
			t.Errorf("props %q stored as %s, want %s}", empty, got, meta)
		}
	}
	for _, bad := range []string{`{"\u0024segment":1}`, `{"a":1,"$segment":{}}`, `"text"`, `[]`} {
		if _, err := translate(json.RawMessage(`{"event":"x","userId":"u","properties":`+bad+`}`), "track", defaults{}, now); err == nil {
			t.Errorf("properties %s accepted", bad)
		}
	}
}

// A name with a non-ASCII letter gets its hash, as documented. The name was lowercased first, and
// the Kelvin sign K (U+212A) and İ (U+0130) lowercase to the ASCII k and i: "Key Event" and
// "\u212Aey Event" were both segment.key_event.
func TestEventNameHashesLettersThatLowercaseToASCII(t *testing.T) {
	for _, p := range [][2]string{{"\u212Aey Event", "Key Event"}, {"\u0130tem Viewed", "I tem Viewed"}, {"\u0130tem Viewed", "Item Viewed"},
		{"Cafe\u0301 Visited", "Cafe Visited"}} {
		a, b := EventName(p[0]), EventName(p[1])
		sum := sha256.Sum256([]byte(p[0]))
		if a == b || !strings.HasSuffix(a, "_"+hex.EncodeToString(sum[:4])) {
			t.Errorf("EventName(%q) = %q, EventName(%q) = %q; want the first with its hash", p[0], a, p[1], b)
		}
		if !ingest.ValidEventName(a) {
			t.Errorf("EventName(%q) = %q, which ingest refuses", p[0], a)
		}
	}
}

// A message field copied into props.$segment (or userId) that is too long is refused naming the
// field. A 9,000-byte event name with no properties was refused as "props is N bytes … send fewer or
// shorter keys": the name is kept in props.$segment.event, and the refusal blamed props.
func TestLongFieldsAreRefusedNamingTheField(t *testing.T) {
	now := time.Date(2026, 1, 15, 12, 0, 0, 0, time.UTC)
	long, id := strings.Repeat("Long Name ", 900), strings.Repeat("a", 256)
	for _, c := range []struct{ msg, want string }{
		{`{"type":"track","userId":"u","event":"` + long + `"}`, "event is 9000 bytes; the limit is 1024"},
		{`{"type":"page","userId":"u","name":"` + long + `"}`, "name is 9000 bytes; the limit is 1024"},
		{`{"type":"screen","userId":"u","name":"x","category":"` + long + `"}`, "category is 9000 bytes; the limit is 1024"},
		{`{"type":"track","userId":"u","event":"x","anonymousId":"` + id + `"}`, "anonymousId is 256 bytes; the limit is 255"},
		{`{"type":"track","event":"x","anonymousId":"` + id + `"}`, "anonymousId is 256 bytes; the limit is 255"},
		{`{"type":"track","event":"x","userId":"` + id + `"}`, "userId is 256 bytes; the limit is 255"},
		{`{"type":"group","userId":"u","groupId":"` + id + `"}`, "groupId is 256 bytes; the limit is 255"},
		{`{"type":"alias","userId":"u","previousId":"` + id + `"}`, "previousId is 256 bytes; the limit is 255"},
	} {
		_, err := translate(json.RawMessage(c.msg), "", defaults{}, now)
		if err == nil || err.Error() != c.want {
			t.Errorf("translate(%.60s…) error %v, want %q", c.msg, err, c.want)
		}
	}
	// At the limits, and a field the type does not copy (a track's name) is not held to them.
	ok := `{"type":"track","userId":"` + id[1:] + `","event":"` + long[:1024] + `","anonymousId":"` + id[1:] + `","name":"` + long + `"}`
	if _, err := translate(json.RawMessage(ok), "", defaults{}, now); err != nil {
		t.Errorf("fields at their limits refused: %v", err)
	}
}
