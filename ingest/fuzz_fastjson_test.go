package ingest

import (
	"encoding/json"
	"reflect"
	"strings"
	"testing"
)

// FuzzFastDecodeMatchesStd holds the fast decoder to encoding/json: whatever it accepts, encoding/json
// must accept with the same result — an array of events, one event, or the {"events":[...]} envelope.
// (Where the fast decoder refuses, Decode asks encoding/json, so a refusal can only cost time.)
func FuzzFastDecodeMatchesStd(f *testing.F) {
	for _, seed := range []string{
		`[{"id":"0b5c6f4e-0a51-4f0e-9f39-6f7a4bb0b1f1","event":"auth.user.login","user_id":"u1","source":"app","ts":"2026-11-27T10:00:00Z","props":{"a":1,"b":[true,null,"x"]},"ip":"10.0.0.1","request_id":"r1"}]`,
		`{"events":[{"event":"a.b","props":{"k":"\u00e9\ud83d\ude00"}},{"event":"c.d","ts":1795780800000}]}`,
		`{"EVENT":"a.b","User_ID":"x","event":"dup.last"}`,
		"[{\"event\":\"a.b\",\"user_id\":\"\xff\xfe\",\"props\":{\"\xc3\":\"\xed\xa0\x80\"}}]",
		`[{"event":"a.b","props":{"a":tru}}]`,
		`[{"event":"a.b","props":{"a":01}}]`,
		`[{"event":"a.b","props":{"a":1.}}]`,
		`[{"event":"a.b","props":{"a":"\x"}}]`,
		"[{\"event\":\"a\tb\"}]",
		`[{"event":"a.b","ts":-1e999,"props":[1,2,{"x":{}}]}]`,
		`[{"event":null,"source":null,"props":null,"ts":null}]`,
		`[{"event":"a.b"},3,null,"x",[]]`,
		`[{"event":"a.b","tenant_id":"t","unknown":{"deep":[[[]]]}}]`,
		`{"events":null,"event":"a.b"}`,
		`[{"event":"a.b"}] trailing`,
		`[{"event":"a.b",}]`,
	} {
		f.Add([]byte(seed))
	}
	f.Fuzz(func(t *testing.T, body []byte) {
		same(t, body, func() any { return new([]Event) })
		same(t, body, func() any { return new(Event) })
		same(t, body, func() any { return new(envelope) })
	})
}

func same(t *testing.T, body []byte, fresh func() any) {
	fast, std := fresh(), fresh()
	if !decodeFast(body, fast) {
		return
	}
	if err := json.Unmarshal(body, std); err != nil {
		t.Fatalf("fast decoder accepted what encoding/json refuses (%v): %q", err, body)
	}
	if !reflect.DeepEqual(fast, std) {
		t.Fatalf("decoders disagree on %q:\nfast %+v\nstd  %+v", body, fast, std)
	}
}

func TestShallow(t *testing.T) {
	deep := func(n int) []byte {
		return []byte(`[{"event":"a.b","props":{"x":` + strings.Repeat("[", n) + strings.Repeat("]", n) + `}}]`)
	}
	wide := []byte(`[` + strings.Repeat(`{"props":{"a":[1]}},`, 20000) + `{}]`) // 60k brackets, depth 4
	quoted := []byte(`["` + strings.Repeat("[", 3*maxDepth) + `\"[{"]`)         // brackets inside a string
	for _, tc := range []struct {
		name string
		b    []byte
		want bool
	}{
		{"at the limit", deep(maxDepth - 3), true},
		{"past the limit", deep(maxDepth - 2), false},
		{"wide", wide, true},
		{"brackets in strings", quoted, true},
	} {
		if got := shallow(tc.b); got != tc.want {
			t.Errorf("%s: shallow = %v, want %v", tc.name, got, tc.want)
		}
		if !tc.want {
			if _, _, err := Decode(tc.b, FormatJSON, 10); err == nil || !strings.Contains(err.Error(), "depth") {
				t.Errorf("%s: Decode error %v, want encoding/json's depth error", tc.name, err)
			}
		}
	}
}
