package chlimit_test

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/analyticsd/analyticsd/internal/chlimit"
	"github.com/analyticsd/analyticsd/internal/testenv"
)

// A 1-second limit holds under a context with a minute left: ClickHouse stops the query (code 159,
// timeout exceeded). Without hiding the deadline, clickhouse-go would send max_execution_time = 65
// and the 4-second query would finish.
func TestLimitHoldsUnderALongDeadline(t *testing.T) {
	env := testenv.Migrated(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	start := time.Now()
	var n uint64
	err := env.CH.QueryRow(chlimit.Context(ctx, time.Second, map[string]any{"max_block_size": 1}),
		"SELECT count() FROM (SELECT sleep(1) FROM system.numbers LIMIT 4)").Scan(&n)
	if err == nil || !strings.Contains(err.Error(), "159") {
		t.Fatalf("a 4 s query under a 1 s limit: %v after %s (count %d), want ClickHouse's timeout (code 159)", err, time.Since(start), n)
	}
	// The caller's cancellation still reaches the query.
	cctx, ccancel := context.WithCancel(context.Background())
	go func() { time.Sleep(300 * time.Millisecond); ccancel() }()
	start = time.Now()
	err = env.CH.QueryRow(chlimit.Context(cctx, time.Minute, map[string]any{"max_block_size": 1}),
		"SELECT count() FROM (SELECT sleep(1) FROM system.numbers LIMIT 5)").Scan(&n)
	if err == nil || time.Since(start) > 3*time.Second {
		t.Errorf("a cancelled query: %v after %s, want it stopped early", err, time.Since(start))
	}
}
