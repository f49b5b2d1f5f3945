package ingest

import (
	"context"
	"slices"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/analyticsd/analyticsd/internal/testenv"
)

// A group commit waits for an append announced by Expect, so both share one write and fsync; it
// waits no longer than SiblingWait for one that never comes, and not at all when none is expected.
func TestGroupCommitWaitsForExpectedAppends(t *testing.T) {
	t.Parallel()
	env := testenv.Migrated(t)
	open := func(wait time.Duration) *Writer {
		w, err := NewWriter(WriterConfig{Dir: t.TempDir(), SiblingWait: wait}, env.CH, env.DB, nil, nil, nil)
		if err != nil {
			t.Fatal(err)
		}
		w.Start()
		t.Cleanup(func() {
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			_ = w.Close(ctx)
		})
		return w
	}
	inc := func() *batch {
		return newBatch(nil, []Increment{{ID: uuid.New(), TenantID: uuid.New(), Ts: time.Now().UTC().Truncate(time.Second), Metric: "builds_daily", N: 1}})
	}
	ctx := context.Background()

	t.Run("joins", func(t *testing.T) {
		w := open(time.Minute)
		first, second := w.Expect(), w.Expect()
		done := make(chan error, 1)
		first()
		go func() { done <- w.Append(ctx, inc()) }()
		// The first append is queued; the committer must now wait for the second, still expected.
		time.Sleep(50 * time.Millisecond)
		select {
		case err := <-done:
			t.Fatalf("the first append was committed (%v) while another was expected", err)
		default:
		}
		second()
		if err := w.Append(ctx, inc()); err != nil {
			t.Fatal(err)
		}
		if err := <-done; err != nil {
			t.Fatal(err)
		}
		if n := w.commits.Load(); n != 1 {
			t.Fatalf("%d group commits for two appends in flight together; want 1", n)
		}
	})

	t.Run("bounded", func(t *testing.T) {
		w := open(100 * time.Millisecond)
		never := w.Expect()
		defer never()
		start := time.Now()
		if err := w.Append(ctx, inc()); err != nil {
			t.Fatal(err)
		}
		if el := time.Since(start); el < 100*time.Millisecond || el > 5*time.Second {
			t.Fatalf("append took %v waiting for one that never came; want SiblingWait (100ms), a little more", el)
		}
	})

	t.Run("nothing expected", func(t *testing.T) {
		w := open(time.Minute)
		arrived := w.Expect()
		arrived()
		arrived() // a second call changes nothing
		start := time.Now()
		if err := w.Append(ctx, inc()); err != nil {
			t.Fatal(err)
		}
		if el := time.Since(start); el > 30*time.Second {
			t.Fatalf("append took %v with nothing expected", el)
		}
		if n := w.expected.Load(); n != 0 {
			t.Fatalf("expected = %d after every announced append arrived", n)
		}
	})
}

// BenchmarkGroupCommitOpenLoop prices a consume's record at a steady rate, the way quota records
// them: announced (Expect), one simulated Redis round trip later appended. It reports group commits
// (each a write and an fsync) per record, the process's CPU per record and the append latency's p50
// and p99, with SiblingWait off and at its default:
//
//	go test -run - -bench GroupCommitOpenLoop -benchtime 5000x ./ingest/
func BenchmarkGroupCommitOpenLoop(b *testing.B) {
	env := testenv.Migrated(b)
	for _, c := range []struct {
		name string
		wait time.Duration
	}{{"wait=off", -1}, {"wait=default", 0}, {"wait=1ms", time.Millisecond}} {
		b.Run(c.name, func(b *testing.B) {
			w, err := NewWriter(WriterConfig{Dir: b.TempDir(), SiblingWait: c.wait}, env.CH, env.DB, nil, nil, nil)
			if err != nil {
				b.Fatal(err)
			}
			w.Start()
			defer func() {
				ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
				defer cancel()
				_ = w.Close(ctx)
			}()
			const rate, rtt = 2500.0, 300 * time.Microsecond
			lat := make([]time.Duration, b.N)
			var wg sync.WaitGroup
			cpu0 := processCPU()
			b.ResetTimer()
			start := time.Now()
			for i := 0; i < b.N; i++ {
				due := start.Add(time.Duration(float64(i) / rate * float64(time.Second)))
				time.Sleep(time.Until(due))
				wg.Add(1)
				go func() {
					defer wg.Done()
					arrived := w.Expect()
					time.Sleep(rtt) // the consume's Redis step
					arrived()
					if err := w.Append(context.Background(), newBatch(nil, []Increment{{ID: uuid.New(), TenantID: uuid.New(), Ts: due.UTC().Truncate(time.Second), Metric: "builds_daily", N: 1}})); err != nil {
						b.Error(err)
					}
					lat[i] = time.Since(due)
				}()
			}
			wg.Wait()
			b.StopTimer()
			slices.Sort(lat)
			b.ReportMetric(float64(w.commits.Load())/float64(b.N), "commits/op")
			b.ReportMetric(float64(processCPU()-cpu0)/float64(time.Microsecond)/float64(b.N), "cpu-µs/op")
			b.ReportMetric(float64(lat[b.N/2])/float64(time.Millisecond), "p50-ms")
			b.ReportMetric(float64(lat[b.N*99/100])/float64(time.Millisecond), "p99-ms")
		})
	}
}

// processCPU is the CPU time (user and system) this process has used.
func processCPU() time.Duration {
	var ru syscall.Rusage
	_ = syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
