package ingest

import (
	"context"
	"errors"
	"log/slog"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/uuid"
)

// downCounter is a Counter whose Redis is down: every Add fails, and is counted.
type downCounter struct{ adds atomic.Int32 }

func (c *downCounter) Add(context.Context, uuid.UUID, time.Time, time.Time, map[string]int64) error {
	c.adds.Add(1)
	return errors.New("redis: connection refused")
}

func (c *downCounter) Counted(context.Context, uuid.UUID, time.Time, string, int64, int64) {}

// Counting on the request path (addNow) must not make every request wait for a Redis that is down:
// after a failed send, the next second's deltas go to the background feed instead.
func TestAddNowStopsWaitingOnADownRedis(t *testing.T) {
	c := &downCounter{}
	l := newLiveCounts(c, NewMetrics(nil, 0), slog.New(slog.DiscardHandler), time.Hour)
	go l.run()
	defer l.close()
	d := map[countKey]map[string]int64{{uuid.New(), time.Now().UTC().Truncate(24 * time.Hour), time.Now().UTC()}: {"builds_daily": 1}}
	l.addNow(d)
	l.addNow(d)
	l.addNow(d)
	if n := c.adds.Load(); n != 1 {
		t.Errorf("%d sends on the request path while Redis was down, want 1 (then the feed)", n)
	}
}
