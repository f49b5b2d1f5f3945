package main

import (
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

// BenchmarkIngestDecode is ingest.Decode as analyticsd runs it on a well-formed array (one
// json.Unmarshal into []ingest.Event, since 883f3d6; before, the array into json.RawMessage and then
// each element again, at twice the cost).
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

// BenchmarkIngestDecodeReferenceOnePass decodes the same body with a bare encoding/json Unmarshal into
// the same event type: what Decode would cost without its fast decoder.
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
