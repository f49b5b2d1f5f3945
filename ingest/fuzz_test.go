package ingest

import (
	"bytes"
	"compress/gzip"
	"testing"
	"time"

	"github.com/google/uuid"
)

// FuzzDecode feeds arbitrary bodies through decompression, decoding and validation: nothing may panic,
// and every event must come back exactly once, either accepted or rejected by its own index.
func FuzzDecode(f *testing.F) {
	var gz bytes.Buffer
	zw := gzip.NewWriter(&gz)
	zw.Write([]byte(`[{"event":"a.b"}]`))
	zw.Close()
	for _, seed := range []struct {
		body []byte
		nd   bool
		gz   bool
	}{
		{[]byte(`{"event":"auth.user.login","user_id":"u1","source":"app","ts":"2026-11-27T10:00:00Z","props":{"a":1}}`), false, false},
		{[]byte(`[{"event":"a.b","ts":1795780800000},{"event":"BAD"},3,null]`), false, false},
		{[]byte(`{"events":[{"event":"a.b","props":[1]},{"id":"x"}]}`), false, false},
		{[]byte("{\"event\":\"a.b\"}\n{\"event\":\n\n{}\n"), true, false},
		{[]byte(`{"event":"a.b","props":{"deep":[[[[[[[[[[{}]]]]]]]]]]}}`), false, false},
		{[]byte("{\"event\":\"a.b\",\"user_id\":\"\xff\x00\"}"), false, false},
		{[]byte(`[{"event":"a.b","ts":1e400}]`), false, false},
		{gz.Bytes(), false, true},
		{[]byte{0x1f, 0x8b, 0x08, 0, 0, 0, 0, 0}, false, true},
	} {
		f.Add(seed.body, seed.nd, seed.gz)
	}
	tenant := uuid.MustParse("11111111-1111-4111-8111-111111111111")
	now := time.Date(2026, 11, 27, 12, 0, 0, 0, time.UTC)
	lim := DefaultLimits()
	f.Fuzz(func(t *testing.T, body []byte, nd, gz bool) {
		enc := ""
		if gz {
			enc = "gzip"
		}
		plain, err := Decompress(body, enc, 1<<20)
		if err != nil {
			return
		}
		format := FormatJSON
		if nd {
			format = FormatNDJSON
		}
		events, bad, err := Decode(plain, format, 1000)
		if err != nil {
			return
		}
		seen := map[int]bool{}
		for _, b := range bad {
			if seen[b.Index] {
				t.Fatalf("index %d reported twice", b.Index)
			}
			seen[b.Index] = true
		}
		for i := range events {
			if seen[events[i].Index()] {
				t.Fatalf("index %d both decoded and rejected", events[i].Index())
			}
			seen[events[i].Index()] = true
			if r, err := lim.Validate(&events[i], tenant, now); err == nil {
				if !ValidEventName(r.Event) || !ValidSource(r.Source) || len(r.Props) > lim.MaxPropsBytes || r.TenantID != tenant {
					t.Fatalf("accepted an invalid row: %+v", r)
				}
			}
		}
		for i := 0; i < len(seen); i++ {
			if !seen[i] {
				t.Fatalf("indexes are not 0..%d: missing %d", len(seen)-1, i)
			}
		}
	})
}
