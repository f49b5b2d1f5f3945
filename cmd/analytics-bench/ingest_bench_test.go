package main

import (
	"bytes"
	"encoding/json"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/analyticsd/analyticsd/ingest"
)

// Micro-benchmarks of analyticsd's ingest request path on the harness's own 500-event bodies, to
// check a profile's story in isolation (see BENCHMARKS.md): `go test -run - -bench Ingest
// ./cmd/analytics-bench`. The "reference" ones are not analyticsd code: they show what the same work
// costs done another way, i.e. the headroom.

func benchBody(b *testing.B) ([]byte, int) {
	b.Helper()
	g := NewGenerator(1, time.Now().Unix(), 50)
	ev := make([]Event, 500)
	idx := make([]int32, len(ev))
	for i := range ev {
		g.Fill(&ev[i], streamMain, uint64(i))
		idx[i] = int32(i)
	}
	return encodeBatch(ev, idx), len(ev)
}

// BenchmarkIngestDecode is ingest.Decode as analyticsd runs it: the array into json.RawMessage, then
// each element again.
func BenchmarkIngestDecode(b *testing.B) {
	body, n := benchBody(b)
	b.SetBytes(int64(len(body)))
	b.ReportAllocs()
	for b.Loop() {
		ev, bad, err := ingest.Decode(body, ingest.FormatJSON, 10_000)
		if err != nil || len(ev) != n || len(bad) != 0 {
			b.Fatal(err, len(ev), len(bad))
		}
	}
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N*n)/1000, "µs/event")
}

// BenchmarkIngestDecodeReferenceOnePass decodes the same body with one json.Unmarshal into the same
// event type: the cost of decoding once.
func BenchmarkIngestDecodeReferenceOnePass(b *testing.B) {
	body, n := benchBody(b)
	b.SetBytes(int64(len(body)))
	b.ReportAllocs()
	for b.Loop() {
		var ev []ingest.Event
		if err := json.Unmarshal(body, &ev); err != nil || len(ev) != n {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N*n)/1000, "µs/event")
}

// BenchmarkIngestValidate is ingest.Limits.Validate over 500 decoded events.
func BenchmarkIngestValidate(b *testing.B) {
	body, n := benchBody(b)
	ev, _, err := ingest.Decode(body, ingest.FormatJSON, 10_000)
	if err != nil {
		b.Fatal(err)
	}
	lim := ingest.DefaultLimits()
	tenant := uuid.New()
	now := time.Now()
	b.ReportAllocs()
	for b.Loop() {
		for i := range ev {
			if _, err := lim.Validate(&ev[i], tenant, now); err != nil {
				b.Fatal(err)
			}
		}
	}
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N*n)/1000, "µs/event")
}

// BenchmarkIngestCompactReference is json.Compact over every event's props (what Validate does to
// each), against BenchmarkIngestCompactCheckReference: one pass that only finds whether any
// whitespace sits outside strings (none does in compact input, the common case).
func BenchmarkIngestCompactReference(b *testing.B) {
	props := benchProps(b)
	b.ReportAllocs()
	for b.Loop() {
		for _, p := range props {
			var buf bytes.Buffer
			buf.Grow(len(p))
			if err := json.Compact(&buf, p); err != nil {
				b.Fatal(err)
			}
			_ = buf.String()
		}
	}
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N*len(props))/1000, "µs/event")
}

func BenchmarkIngestCompactCheckReference(b *testing.B) {
	props := benchProps(b)
	b.ReportAllocs()
	for b.Loop() {
		for _, p := range props {
			if !compactAlready(p) {
				b.Fatal("generated props are compact")
			}
			_ = string(p)
		}
	}
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N*len(props))/1000, "µs/event")
}

func benchProps(b *testing.B) [][]byte {
	g := NewGenerator(1, time.Now().Unix(), 50)
	out := make([][]byte, 500)
	var e Event
	for i := range out {
		g.Fill(&e, streamMain, uint64(i))
		out[i] = []byte(e.Props)
	}
	return out
}

// compactAlready reports whether valid JSON p has no whitespace outside its strings.
func compactAlready(p []byte) bool {
	in, esc := false, false
	for _, c := range p {
		switch {
		case esc:
			esc = false
		case in && c == '\\':
			esc = true
		case c == '"':
			in = !in
		case !in && (c == ' ' || c == '\t' || c == '\n' || c == '\r'):
			return false
		}
	}
	return true
}
