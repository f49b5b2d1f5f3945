package ingest

import (
	"strings"
	"testing"
)

// An unknown or misspelt field refuses its event, naming the field and the one it probably meant;
// before, {"userId":…,"timestamp":…,"properties":…} was stored with an empty user, ts = now and {}
// props. Names match exactly ("Event" is not "event"). The envelope refuses unknown fields too, and
// an NDJSON error names its line as well as its index.
func TestDecodeRefusesUnknownFields(t *testing.T) {
	for _, tc := range []struct {
		name, body string
		f          Format
		want       []string // substrings of the one item error
		line       int
	}{
		{"segment style", `{"event":"segment.style","userId":"u-77","timestamp":"2026-11-20T10:00:00Z","properties":{"plan":"pro"}}`, FormatJSON,
			[]string{`unknown field "properties"`, `did you mean "props"?`, "2 more unknown", "the fields are id, event, user_id, source, ts, props, ip, request_id"}, 0},
		{"case", `[{"event":"a.b"},{"Event":"a.b"}]`, FormatJSON, []string{`unknown field "Event"`, `did you mean "event"?`}, 0},
		{"camel user", `[{"event":"a.b","userId":"u"}]`, FormatJSON, []string{`unknown field "userId"`, `did you mean "user_id"?`}, 0},
		{"no guess", `[{"event":"a.b","zzz":1}]`, FormatJSON, []string{`unknown field "zzz"`}, 0},
		{"ndjson", "{\"event\":\"a.b\"}\n\n{\"event\":\"a.b\",\"time\":1}\n", FormatNDJSON, []string{`unknown field "time"`, `did you mean "ts"?`}, 3},
	} {
		events, bad, err := Decode([]byte(tc.body), tc.f, 100)
		if err != nil {
			t.Errorf("%s: request error %v, want one item refused", tc.name, err)
			continue
		}
		if len(bad) != 1 {
			t.Errorf("%s: %d items refused (%v), want 1; accepted %d", tc.name, len(bad), bad, len(events))
			continue
		}
		for _, w := range tc.want {
			if !strings.Contains(bad[0].Error, w) {
				t.Errorf("%s: error %q does not say %q", tc.name, bad[0].Error, w)
			}
		}
		if bad[0].Line != tc.line {
			t.Errorf("%s: line %d, want %d", tc.name, bad[0].Line, tc.line)
		}
	}
	if _, _, err := Decode([]byte(`{"events":[{"event":"a.b"}],"batch_id":"x"}`), FormatJSON, 100); err == nil || !strings.Contains(err.Error(), `unknown field "batch_id"`) {
		t.Errorf("envelope with an unknown field: %v, want a request error naming batch_id", err)
	}
	// An event's field at the envelope's top level is not applied to the events, nor dropped: the
	// fast decoder took it as the embedded event's and the batch went through without it.
	for _, f := range []string{"user_id", "props", "ts", "source"} {
		body := `{"events":[{"event":"a.b"}],"` + f + `":` + map[string]string{"user_id": `"u-1"`, "props": `{"a":1}`, "ts": `1`, "source": `"api"`}[f] + `}`
		if _, _, err := Decode([]byte(body), FormatJSON, 100); err == nil || !strings.Contains(err.Error(), f) {
			t.Errorf("%s: %v, want a request error naming %s", body, err, f)
		}
	}
	// Known fields in any order, and tenant_id (refused later by Validate with its own message), pass.
	if events, bad, err := Decode([]byte(`[{"request_id":"r","ip":"10.0.0.1","props":{},"ts":1,"source":"app","user_id":"u","event":"a.b","id":"0190b0b0-0000-7000-8000-000000000001","tenant_id":"x"}]`), FormatJSON, 100); err != nil || len(bad) != 0 || len(events) != 1 {
		t.Errorf("every known field: %d events, %v, %v", len(events), bad, err)
	}
}

func TestDidYouMean(t *testing.T) {
	for in, want := range map[string]string{"userId": "user_id", "USER_ID": "user_id", "timestamp": "ts", "properties": "props",
		"messageId": "id", "requestId": "request_id", "ip_address": "ip", "name": "event", "colour": ""} {
		if got := didYouMean(in, eventFields); got != want {
			t.Errorf("didYouMean(%q) = %q, want %q", in, got, want)
		}
	}
	if got := didYouMean("count", usageFields); got != "n" {
		t.Errorf("usage: didYouMean(count) = %q, want n", got)
	}
}
