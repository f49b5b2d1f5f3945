package ingest

import (
	"context"
	"log/slog"
	"testing"
	"time"

	"github.com/ClickHouse/clickhouse-go/v2"

	"github.com/analyticsd/analyticsd/internal/testenv"
	"github.com/analyticsd/analyticsd/schema"
)

// On a cluster, the earlier attempt of a segment's insert that a retry must wait for may be running
// on another server than the one the retry's connection reaches: the server the attempt was sent to
// before the pool failed over, or a shard's server its rows were written to. Before the check asked
// every server, awaitAttempts returned at once while the attempt (here a 2 s query with its id, on the
// cluster's last server; the shipper's connection is on the first) was still running there. Now it
// waits for it, or stops it (KILL on each server).
func TestAwaitAttemptsWaitsForAnAttemptOnAnotherServer(t *testing.T) {
	if testenv.Cluster() == "" {
		t.Skip("an attempt on another server of a cluster: runs under make test-cluster")
	}
	t.Parallel()
	env := testenv.Migrated(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	// env.CH is on the DSN's first server (load balancing in order): take the cluster's last one, and
	// make sure it is another.
	opts, err := clickhouse.ParseDSN(env.Target.ClickHouseDSN)
	if err != nil {
		t.Fatal(err)
	}
	servers, err := schema.ClusterServers(ctx, env.CH, env.Target.Cluster)
	if err != nil {
		t.Fatal(err)
	}
	last := servers[len(servers)-1].Addr
	if last == opts.Addr[0] {
		t.Fatalf("the cluster's last server %s is the DSN's first: this test needs another server than the shipper's", last)
	}
	direct := *opts // the DSN's credentials, on that server alone
	direct.Addr, direct.Auth.Database = []string{last}, "default"
	other, err := clickhouse.Open(&direct)
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close()
	seg := "attempt" + testenv.Name()[2:]
	running := func() uint64 {
		var n uint64
		if err := other.QueryRow(ctx, "SELECT count() FROM system.processes WHERE query_id = ?", "ingest-"+seg+"-1").Scan(&n); err != nil {
			t.Fatal(err)
		}
		return n
	}
	done := make(chan error, 1)
	go func() {
		done <- other.Exec(clickhouse.Context(ctx, clickhouse.WithQueryID("ingest-"+seg+"-1")), "SELECT sleep(2)")
	}()
	testenv.Eventually(t, 5*time.Second, func() error {
		if running() == 0 {
			return context.DeadlineExceeded
		}
		return nil
	})

	sh := newShipper(env.CH, env.DB, nil, WriterConfig{Shards: env.Layout().Shards}, NewMetrics(nil, 0), slog.New(slog.DiscardHandler))
	if err := sh.awaitAttempts(ctx, seg); err != nil {
		t.Fatal(err)
	}
	if n := running(); n != 0 {
		t.Errorf("awaitAttempts returned while the attempt still ran on %s", last)
	}
	if err := <-done; err != nil {
		t.Logf("the attempt on %s ended with %v", last, err)
	}
}
