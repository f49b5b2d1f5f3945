package ingest

import (
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"regexp"
	"strings"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/google/uuid"

	"github.com/analyticsd/analyticsd/ingest/spool"
)

func TestValidate(t *testing.T) {
	now := time.Date(2026, 11, 27, 12, 0, 0, 0, time.UTC)
	tenant := uuid.MustParse("11111111-1111-4111-8111-111111111111")
	lim := DefaultLimits()
	raw := func(s string) json.RawMessage { return json.RawMessage(s) }
	ok := Event{Event: "auth.user.login"}
	with := func(f func(e *Event)) Event { e := ok; f(&e); return e }

	cases := []struct {
		name    string
		in      Event
		wantErr string // substring; "" means valid
		check   func(t *testing.T, r Row)
	}{
		{"minimal", ok, "", func(t *testing.T, r Row) {
			if r.Source != "app" || r.Props != "{}" || !r.Ts.Equal(now) || r.ID == uuid.Nil || r.TenantID != tenant {
				t.Errorf("defaults: got %+v", r)
			}
		}},
		{"missing event", with(func(e *Event) { e.Event = "" }), "event is required", nil},
		{"uppercase event", with(func(e *Event) { e.Event = "Auth.Login" }), "domain.action", nil},
		{"one segment", with(func(e *Event) { e.Event = "login" }), "domain.action", nil},
		{"event too long", with(func(e *Event) { e.Event = "a." + strings.Repeat("b", 127) }), "limit is 128", nil},
		{"underscore and digits", with(func(e *Event) { e.Event = "apikey.rate_limited2" }), "", nil},
		{"bad source", with(func(e *Event) { e.Source = "cron" }), `source "cron" is not one of app, api`, nil},
		{"every source", with(func(e *Event) { e.Source = "agent" }), "", nil},
		{"bad id", with(func(e *Event) { e.ID = "event-123" }), "must be a UUID", nil},
		{"nil id", with(func(e *Event) { e.ID = "00000000-0000-0000-0000-000000000000" }), "must not be the nil UUID", nil},
		{"generated ids are time-ordered (v7)", ok, "", func(t *testing.T, r Row) {
			if r.ID.Version() != 7 {
				t.Errorf("generated id %s is version %d, want 7", r.ID, r.ID.Version())
			}
		}},
		{"given id", with(func(e *Event) { e.ID = "5f0c6d1e-8a1b-4c7e-9d2f-3a4b5c6d7e8f" }), "", func(t *testing.T, r Row) {
			if r.ID.String() != "5f0c6d1e-8a1b-4c7e-9d2f-3a4b5c6d7e8f" {
				t.Errorf("id: got %s", r.ID)
			}
		}},
		{"rfc3339 ts", with(func(e *Event) { e.Ts = raw(`"2026-11-27T10:30:00.750+01:00"`) }), "", func(t *testing.T, r Row) {
			if want := time.Date(2026, 11, 27, 9, 30, 0, 0, time.UTC); !r.Ts.Equal(want) || r.Ts.Location() != time.UTC {
				t.Errorf("ts: got %v, want %v UTC", r.Ts, want)
			}
		}},
		{"epoch ms ts", with(func(e *Event) { e.Ts = raw(`1795780800000`) }), "", func(t *testing.T, r Row) {
			if !r.Ts.Equal(time.UnixMilli(1795780800000)) {
				t.Errorf("ts: got %v", r.Ts)
			}
		}},
		{"epoch seconds by mistake", with(func(e *Event) { e.Ts = raw(`1795780800`) }), "seconds sent by mistake", nil},
		{"ts garbage", with(func(e *Event) { e.Ts = raw(`"yesterday"`) }), "not RFC3339", nil},
		{"ts float", with(func(e *Event) { e.Ts = raw(`1795780800000.5`) }), "whole number", nil},
		{"ts too old", with(func(e *Event) { e.Ts = raw(`"2026-08-01T00:00:00Z"`) }), "older than the 90-day retention window (oldest accepted: 2026-08-29T12:00:00Z)", nil},
		{"ts too far ahead", with(func(e *Event) { e.Ts = raw(`"2026-11-27T13:30:00Z"`) }), "more than 1h0m0s in the future (newest accepted: 2026-11-27T13:00:00Z)", nil},
		{"ts just ahead", with(func(e *Event) { e.Ts = raw(`"2026-11-27T12:59:00Z"`) }), "", nil},
		{"props array", with(func(e *Event) { e.Props = raw(`[1,2]`) }), "props must be a JSON object", nil},
		{"props string", with(func(e *Event) { e.Props = raw(`"x"`) }), "props must be a JSON object", nil},
		{"props compacted", with(func(e *Event) { e.Props = raw(`{ "plan" : "pro", "n": [1, 2] }`) }), "", func(t *testing.T, r Row) {
			if r.Props != `{"plan":"pro","n":[1,2]}` {
				t.Errorf("props: got %s", r.Props)
			}
		}},
		{"props too big", with(func(e *Event) { e.Props = raw(`{"k":"` + strings.Repeat("x", 8200) + `"}`) }), "the limit is 8192", nil},
		{"props invalid utf8", with(func(e *Event) { e.Props = raw("{\"k\":\"\xff\"}") }), "invalid UTF-8", nil},
		{"user_id too long", with(func(e *Event) { e.UserID = strings.Repeat("u", 256) }), "user_id is 256 bytes; the limit is 255", nil},
		{"request_id too long", with(func(e *Event) { e.RequestID = strings.Repeat("r", 256) }), "request_id is 256 bytes", nil},
		{"bad ip", with(func(e *Event) { e.IP = "300.1.1.1" }), "not an IPv4 or IPv6 address", nil},
		{"ipv6", with(func(e *Event) { e.IP = "2001:db8::1" }), "", nil},
		// A zone is free text after '%': it carried a CSV formula (and a line break) into exports.
		{"ipv6 zone", with(func(e *Event) { e.IP = "fe80::1%,=HYPERLINK(\"x\")" }), "has a zone", nil},
		{"mapped ipv4", with(func(e *Event) { e.IP = "::ffff:192.168.1.1" }), "", func(t *testing.T, r Row) {
			if r.IP != "192.168.1.1" {
				t.Errorf("ip: got %s", r.IP)
			}
		}},
		{"foreign tenant_id", with(func(e *Event) { e.TenantID = "22222222-2222-4222-8222-222222222222" }), "tenant always comes from the API key", nil},
		{"own tenant_id", with(func(e *Event) { e.TenantID = tenant.String() }), "", nil},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			r, err := lim.Validate(&tc.in, tenant, now)
			if tc.wantErr == "" {
				if err != nil {
					t.Fatalf("got error %q, want valid", err)
				}
				if tc.check != nil {
					tc.check(t, r)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Fatalf("got error %v, want one containing %q", err, tc.wantErr)
			}
		})
	}
}

func TestDecodeFormats(t *testing.T) {
	check := func(name, body string, f Format, wantEvents []string, wantBad []int, wantErr string) {
		t.Helper()
		events, bad, err := Decode([]byte(body), f, 3)
		if wantErr != "" {
			if err == nil || !strings.Contains(err.Error(), wantErr) {
				t.Errorf("%s: got error %v, want %q", name, err, wantErr)
			}
			return
		}
		if err != nil {
			t.Errorf("%s: unexpected error %v", name, err)
			return
		}
		var got []string
		for _, e := range events {
			got = append(got, e.Event)
		}
		var gotBad []int
		for _, b := range bad {
			gotBad = append(gotBad, b.Index)
		}
		if strings.Join(got, ",") != strings.Join(wantEvents, ",") || len(gotBad) != len(wantBad) {
			t.Errorf("%s: got events %v bad %v, want %v bad %v", name, got, gotBad, wantEvents, wantBad)
			return
		}
		for i := range gotBad {
			if gotBad[i] != wantBad[i] {
				t.Errorf("%s: bad indexes %v, want %v", name, gotBad, wantBad)
			}
		}
	}
	check("object", `{"event":"a.b"}`, FormatJSON, []string{"a.b"}, nil, "")
	check("array", `[{"event":"a.b"},{"event":"c.d"}]`, FormatJSON, []string{"a.b", "c.d"}, nil, "")
	check("envelope", `{"events":[{"event":"a.b"},7,{"event":"c.d"}]}`, FormatJSON, []string{"a.b", "c.d"}, []int{1}, "")
	check("wrong field type", `[{"event":"a.b","user_id":5},{"event":"c.d"}]`, FormatJSON, []string{"c.d"}, []int{0}, "")
	check("ndjson", "{\"event\":\"a.b\"}\n\nnot json\n{\"event\":\"c.d\"}\n", FormatNDJSON, []string{"a.b", "c.d"}, []int{1}, "")
	check("too many", `[{},{},{},{}]`, FormatJSON, nil, nil, "more than 3 events")
	check("too many ndjson", "{}\n{}\n{}\n{}", FormatNDJSON, nil, nil, "more than 3 events")
	check("syntax error", `[{"event":"a.b"`, FormatJSON, nil, nil, "not a valid JSON array")
	check("empty", ` `, FormatJSON, nil, nil, "no events in body")
	check("empty array", `[]`, FormatJSON, nil, nil, "no events in body")
	check("scalar", `42`, FormatJSON, nil, nil, "must be a JSON object or array")
	check("events not array", `{"events":{"event":"a.b"}}`, FormatJSON, nil, nil, "events must be a JSON array")
}

func TestFormatOf(t *testing.T) {
	check := func(ct string, want Format, wantErr bool) {
		t.Helper()
		got, err := FormatOf(ct)
		if (err != nil) != wantErr || (!wantErr && got != want) {
			t.Errorf("FormatOf(%q) = %v, %v; want %v, error %v", ct, got, err, want, wantErr)
		}
	}
	check("", FormatJSON, false)
	check("application/json; charset=utf-8", FormatJSON, false)
	check("application/x-ndjson", FormatNDJSON, false)
	check("application/x-www-form-urlencoded", FormatJSON, false)
	check("text/csv", 0, true)
}

func TestRecordRoundTrip(t *testing.T) {
	ts := time.Date(2026, 11, 27, 1, 2, 3, 0, time.UTC)
	events := []Row{
		{ID: uuid.New(), TenantID: uuid.New(), Ts: ts, ReceivedAt: ts.Add(time.Second), Event: "a.b", Source: "app", UserID: "u\x00", Props: `{"k":"é"}`, IP: "::1", RequestID: "r"},
		{ID: uuid.New(), TenantID: uuid.New(), Ts: ts, ReceivedAt: ts, Event: "c.d", Source: "api"},
	}
	incs := []Increment{{ID: uuid.New(), TenantID: uuid.New(), Ts: ts, Metric: "builds_daily", N: -3}}
	rec := appendRecord(nil, 42, events, incs)[spool.FrameOverhead:]
	wid, gotE, gotI, err := decodeRecord(rec, recordFormat, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	if wid != 42 || len(gotE) != 2 || len(gotI) != 1 || gotE[0] != events[0] || gotE[1] != events[1] || gotI[0] != incs[0] {
		t.Errorf("round trip changed rows:\n got %d %+v %+v\nwant 42 %+v %+v", wid, gotE, gotI, events, incs)
	}
	// The first release's records are the same without the batch id.
	if wid, gotE, _, err := decodeRecord(rec[8:], spool.FormatLegacy, nil, nil); err != nil || wid != 0 || len(gotE) != 2 || gotE[1] != events[1] {
		t.Errorf("legacy record: wid %d, %d events, err %v", wid, len(gotE), err)
	}
	if _, _, _, err := decodeRecord(rec[:len(rec)-1], recordFormat, nil, nil); err == nil {
		t.Error("a record cut short decoded without error")
	}
	if _, _, _, err := decodeRecord(rec, 9, nil, nil); err == nil {
		t.Error("an unknown record format decoded without error")
	}
	// A batch's flags travel in its id: a replay ships it as the live path would have.
	for _, f := range [][2]bool{{true, false}, {false, true}, {true, true}, {false, false}} {
		b := newBatch(events, incs)
		b.setFlags(f[0], f[1])
		if b.wid&1 == 0 {
			t.Fatalf("batch id %x lost its low bit", b.wid)
		}
		sp := appendRecord(nil, b.wid, b.events, b.incs)
		wid, _, _, err := decodeRecord(sp[spool.FrameOverhead:], recordFormat, nil, nil)
		minted, uncounted := batchFlags(wid, recordFormat)
		if err != nil || wid != b.wid || minted != f[0] || uncounted != f[1] {
			t.Errorf("flags %v: decoded batch id %x (minted %v, uncounted %v), %v", f, wid, minted, uncounted, err)
		}
		// Format 2's batch ids are random in those bits: they carry no flags.
		if m, u := batchFlags(wid, 2); m || u {
			t.Errorf("a format 2 batch id read as flagged")
		}
	}
}

// The event-name loop accepts exactly what the documented pattern does.
func TestValidEventNameMatchesPattern(t *testing.T) {
	re := regexp.MustCompile(`^[a-z][a-z0-9_-]*(\.[a-z][a-z0-9_-]*)+$`)
	check := func(s string) {
		if got, want := ValidEventName(s), re.MatchString(s); got != want {
			t.Fatalf("ValidEventName(%q) = %v, the pattern says %v", s, got, want)
		}
	}
	for _, s := range []string{"", ".", "a", "a.", ".a", "a.b", "a..b", "a.b.", "auth.user.login", "a1.b-c_d",
		"1a.b", "a.1b", "A.b", "a.B", "a._b", "a-.b", "é.b", "a.b\n", strings.Repeat("a.", 64)[:127]} {
		check(s)
	}
	rng := rand.New(rand.NewPCG(1, 2))
	const alphabet = "ab0_-.Z"
	for range 200_000 {
		b := make([]byte, rng.IntN(9))
		for i := range b {
			b[i] = alphabet[rng.IntN(len(alphabet))]
		}
		check(string(b))
	}
	if ValidEventName("a." + strings.Repeat("b", 127)) {
		t.Error("a 129-byte name was accepted")
	}
}

// Props known to be well-formed skip json.Compact when already compact; the result is the same either way.
func TestCompactPropsFastPathAgrees(t *testing.T) {
	for _, p := range []string{`{}`, `{"a":1}`, `{"a":"x y"}`, `{"a":"q\" z"}`, `{"a":"\\"}`, `{"a":"\\", "b":2}`,
		`{ "a":1}`, "{\"a\":\n1}", `{"a":[1, 2]}`, `{"a":{"b":"}{ ]["}}`, `{"a":"\u00e9 \t"}`} {
		slow, errSlow := compactProps(json.RawMessage(p), 8192, false)
		fast, errFast := compactProps(json.RawMessage(p), 8192, true)
		if slow != fast || (errSlow == nil) != (errFast == nil) {
			t.Errorf("%s: compact %q (%v), fast path %q (%v)", p, slow, errSlow, fast, errFast)
		}
	}
	if _, err := compactProps(json.RawMessage(`{"k":"`+strings.Repeat("x", 8200)+`"}`), 8192, true); err == nil {
		t.Error("fast path: oversized props accepted")
	}
	if _, err := compactProps(json.RawMessage("{\"k\":\"\xff\"}"), 8192, true); err == nil {
		t.Error("fast path: invalid UTF-8 accepted")
	}
}

// Every format's events keep their own ts and props up to Validate, however large the body: the
// decoder may leave them pointing into the body, never into a buffer that is reused for later lines.
func TestDecodedEventsKeepTheirOwnBytes(t *testing.T) {
	const n = 3000 // ~300 KB: past any line reader's first buffer
	var arr, nd strings.Builder
	arr.WriteString("[")
	for i := 0; i < n; i++ {
		line := fmt.Sprintf(`{"event":"a.b","ts":%d,"props":{"i":%d,"pad":"%s"}}`, 1795780800000+i*1000, i, strings.Repeat("x", i%97))
		if i > 0 {
			arr.WriteString(",")
		}
		arr.WriteString(line)
		nd.WriteString(line + "\r\n")
	}
	arr.WriteString("]")
	now := time.UnixMilli(1795780800000 + n*1000)
	lim := DefaultLimits()
	for _, tc := range []struct {
		name string
		body string
		f    Format
	}{{"array", arr.String(), FormatJSON}, {"envelope", `{"events":` + arr.String() + `}`, FormatJSON}, {"ndjson", nd.String(), FormatNDJSON}} {
		events, bad, err := Decode([]byte(tc.body), tc.f, 10_000)
		if err != nil || len(bad) != 0 || len(events) != n {
			t.Fatalf("%s: %d events, %v, %v", tc.name, len(events), bad, err)
		}
		for i := range events {
			r, err := lim.Validate(&events[i], uuid.New(), now)
			if err != nil {
				t.Fatalf("%s: event %d: %v", tc.name, i, err)
			}
			want := fmt.Sprintf(`{"i":%d,"pad":"%s"}`, i, strings.Repeat("x", i%97))
			if r.Props != want || r.Ts.UnixMilli() != 1795780800000+int64(i)*1000 {
				t.Fatalf("%s: event %d came back with ts %v props %.60s; want its own", tc.name, i, r.Ts, r.Props)
			}
		}
	}
}

// A body that is not UTF-8 was decoded with each bad byte turned into U+FFFD: a user_id of two bad
// bytes was stored as "\ufffd\ufffd", silently altered (only props had a check of its own). A JSON
// body is now refused whole, naming the first bad byte; an NDJSON line is that line's error.
func TestDecodeRefusesInvalidUTF8(t *testing.T) {
	events, _, err := Decode([]byte("[{\"event\":\"a.b\",\"user_id\":\"\xff\xfe\"}]"), FormatJSON, 10)
	var re *RequestError
	if !errors.As(err, &re) || !errors.Is(re.Kind, ErrBadBody) || !strings.Contains(re.Message, "not valid UTF-8 (byte 27, 0xff)") {
		t.Errorf("JSON: %d events, %v; want the body refused as not UTF-8, naming byte 27", len(events), err)
	}
	events, bad, err := Decode([]byte("{\"event\":\"a.b\",\"user_id\":\"ok\"}\n{\"event\":\"a.b\",\"user_id\":\"\xff\xfe\"}\n"), FormatNDJSON, 10)
	if err != nil || len(events) != 1 || len(bad) != 1 || bad[0].Line != 2 || !strings.Contains(bad[0].Error, "not valid UTF-8 (byte 26, 0xff)") {
		t.Errorf("NDJSON: %d events, refused %+v, %v; want line 1 kept and line 2 refused as not UTF-8", len(events), bad, err)
	}
	if _, _, err := Decode([]byte(`[{"event":"a.b","user_id":"zoë ✓"}]`), FormatJSON, 10); err != nil {
		t.Errorf("valid UTF-8 refused: %v", err)
	}
}

// An escaped half of a UTF-16 surrogate pair is valid UTF-8 on the wire, and JSON decoders turn it
// into U+FFFD: {"user_id":"\ud800"} was stored as "\ufffd". Refused now; whole pairs, escaped
// backslashes before a "u", and ordinary escapes pass.
func TestDecodeRefusesLoneSurrogates(t *testing.T) {
	for _, body := range []string{`[{"event":"a.b","user_id":"\ud800"}]`, `[{"event":"a.b","user_id":"x\udc00y"}]`, `[{"event":"a.b","user_id":"\ud800\u0041"}]`} {
		_, _, err := Decode([]byte(body), FormatJSON, 10)
		if err == nil || !strings.Contains(err.Error(), "surrogate pair") {
			t.Errorf("%s: %v, want refused naming the surrogate", body, err)
		}
	}
	_, bad, err := Decode([]byte("{\"event\":\"a.b\"}\n{\"event\":\"a.b\",\"user_id\":\"\\udfff\"}\n"), FormatNDJSON, 10)
	if err != nil || len(bad) != 1 || bad[0].Line != 2 || !strings.Contains(bad[0].Error, "surrogate pair") {
		t.Errorf("NDJSON: refused %+v, %v; want line 2 refused", bad, err)
	}
	for _, body := range []string{`[{"event":"a.b","user_id":"\ud83d\ude00"}]`, `[{"event":"a.b","user_id":"\\ud800"}]`, `[{"event":"a.b","user_id":"\u00e9\n"}]`} {
		events, _, err := Decode([]byte(body), FormatJSON, 10)
		if err != nil || len(events) != 1 || strings.ContainsRune(events[0].UserID, utf8.RuneError) {
			t.Errorf("%s: %v %v, want accepted as sent", body, events, err)
		}
	}
}
