package erasure

import (
	"context"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/ClickHouse/clickhouse-go/v2/lib/driver"

	"github.com/analyticsd/analyticsd/audit"
	"github.com/analyticsd/analyticsd/internal/testenv"
	"github.com/analyticsd/analyticsd/schema"
)

// laggingMutations shows one server's system.mutations as they were before its replica fetched the
// erasure's mutation from the shard's log — none newer than the test began — until lag is over: what
// a replica just back from a restart, or behind, shows.
type laggingMutations struct {
	driver.Conn
	since  string // toDateTime literal: mutations created from then on are hidden
	lagged *atomic.Bool
}

func (c laggingMutations) QueryRow(ctx context.Context, q string, args ...any) driver.Row {
	if c.lagged.Load() && strings.Contains(q, "FROM system.mutations WHERE") {
		q = strings.Replace(q, "FROM system.mutations WHERE", "FROM system.mutations WHERE create_time < toDateTime('"+c.since+"') AND", 1)
	}
	return c.Conn.QueryRow(ctx, q, args...)
}

// A replica that has not fetched the erasure's mutation yet lists nothing unfinished: before each
// server had to list a mutation newer than the one it had before the delete, the job was done while
// that replica still served the rows (here it lags for 3 s, and the job finished well before).
func TestErasureWaitsForAReplicaThatHasNotFetchedTheDelete(t *testing.T) {
	if testenv.Cluster() == "" {
		t.Skip("a replica of a cluster behind on its shard's log: runs under make test-cluster")
	}
	t.Parallel()
	f := newFixture(t)
	ctx := context.Background()
	f.env.Insert(t, "events", eventCols, rows(f.a, "lena", 6)...)
	time.Sleep(1100 * time.Millisecond) // create_time has whole seconds: no earlier mutation in the hidden second
	since := time.Now().UTC().Format(time.DateTime)
	var lagged atomic.Bool
	lagged.Store(true)
	servers, err := schema.ClusterServers(ctx, f.env.CH, f.env.Target.Cluster)
	if err != nil {
		t.Fatal(err)
	}
	behind := servers[len(servers)-1].Addr // a second replica: the statement goes to its shard's first
	layout := f.env.Layout()
	layout.Shards = layout.Shards.Wrap(func(addr string, c driver.Conn) driver.Conn {
		if addr != behind {
			return c
		}
		return laggingMutations{c, since, &lagged}
	})
	s := New(Config{Layout: layout, Poll: 20 * time.Millisecond}, f.env.CH, f.env.PG, audit.New(f.env.PG), nil)
	j, err := s.EraseUser(ctx, f.a, "lena", "test")
	if err != nil {
		t.Fatal(err)
	}
	const lag = 3 * time.Second
	time.AfterFunc(lag, func() { lagged.Store(false) })
	start := time.Now()
	if _, err := s.RunOne(ctx); err != nil {
		t.Fatal(err)
	}
	if took := time.Since(start); took < lag {
		t.Errorf("the erasure finished after %s, while a replica had not fetched its delete for %s", took.Round(time.Millisecond), lag)
	}
	if got := f.job(t, s, f.a, j.ID); got.Status != StatusDone || got.RowsErased != 6 {
		t.Errorf("job: %s %d rows, want done 6", got.Status, got.RowsErased)
	}
}
