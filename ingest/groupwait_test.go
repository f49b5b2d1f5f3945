package ingest

import (
	"context"
	"sync"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/analyticsd/analyticsd/internal/testenv"
)

// While requests are flowing, a lone request's group commit waits (GroupWait) for the next ones to
// share its fsync: two appends 100 ms apart are one spool write with a 1 s wait and two without.
// After a pause longer than 4 × GroupWait the first append does not wait: it and one 100 ms later
// are two writes. (The gap is wide so that a goroutine started late on a loaded machine does not
// make the two appends one group by arriving together.)
func TestGroupWaitSharesAnFsync(t *testing.T) {
	t.Parallel()
	env := testenv.Migrated(t)
	tenant := uuid.New()
	cases := []struct {
		name   string
		wait   time.Duration
		pause  time.Duration // before the pair
		writes float64
	}{
		{"flowing, waits", time.Second, 0, 1},
		{"flowing, off", -1, 0, 2},
		{"after a pause", time.Second, 4500 * time.Millisecond, 2},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			m := NewMetrics(nil, 0)
			w, err := NewWriter(WriterConfig{Dir: t.TempDir(), FlushInterval: time.Minute, GroupWait: c.wait}, env.CH, env.DB, nil, m, nil)
			if err != nil {
				t.Fatal(err)
			}
			w.Start()
			ctx := context.Background()
			t.Cleanup(func() { w.Close(ctx) })
			add := func() {
				now := time.Now().UTC().Truncate(time.Second)
				row := Row{ID: uuid.New(), TenantID: tenant, Ts: now, ReceivedAt: now, Event: "a.b", Source: "app", Props: "{}"}
				if err := w.Append(ctx, newBatch([]Row{row}, nil)); err != nil {
					t.Error(err)
				}
			}
			add() // requests are now flowing
			time.Sleep(c.pause)
			before := counterValue(m.SpoolWrites)
			var wg sync.WaitGroup
			wg.Add(1)
			go func() { defer wg.Done(); add() }()
			time.Sleep(100 * time.Millisecond)
			add()
			wg.Wait()
			if got := counterValue(m.SpoolWrites) - before; got != c.writes {
				t.Errorf("two appends 100 ms apart: %v spool writes, want %v", got, c.writes)
			}
			if got := counterValue(m.SpoolAppends); got != 3 {
				t.Errorf("appends counted: %v, want 3", got)
			}
		})
	}
}
