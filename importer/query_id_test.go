package importer

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/ClickHouse/clickhouse-go/v2"
	"github.com/google/uuid"

	"github.com/analyticsd/analyticsd/erasure"
	"github.com/analyticsd/analyticsd/internal/testenv"
)

// An import into one ClickHouse database neither waits for nor stops an insert of an import into
// another database of the same server (another deployment: its own lock and checkpoint). Before, it
// counted every query whose id started "analyticsd-import-" on the server, waited 10 s, then KILLed
// the other deployment's insert ("Query was cancelled").
func TestAnImportLeavesAnotherDatabasesInsertsAlone(t *testing.T) {
	other := testenv.Migrated(t) // another deployment on the same ClickHouse server
	src := sourceDB(t, 200, 10)
	_, cfg := setup(t, src)
	ctx := context.Background()

	// The other deployment's import has an insert running for ~12 s (one row a second), under the query
	// id its import gives its inserts.
	done := make(chan error, 1)
	go func() {
		qctx := clickhouse.Context(ctx, clickhouse.WithQueryID(erasure.ImportQueryIDPrefix(other.DB)+uuid.NewString()),
			clickhouse.WithSettings(clickhouse.Settings{"max_block_size": 1}))
		done <- other.CH.Exec(qctx, "INSERT INTO "+other.DB+".daily_usage (tenant_id, date, metric, count) SELECT generateUUIDv4(), today(), 'x.y', toInt64(sleepEachRow(1)) FROM numbers(12)")
	}()
	testenv.Eventually(t, 5*time.Second, func() error {
		if n := count(t, other, "SELECT count() FROM system.processes WHERE startsWith(query_id, ?)", erasure.ImportQueryIDPrefix(other.DB)); n != 1 {
			return fmt.Errorf("%d inserts of the other database running, want 1", n)
		}
		return nil
	})

	im, _ := New(cfg)
	start := time.Now()
	if _, err := im.Run(ctx); err != nil {
		t.Fatal(err)
	}
	if took := time.Since(start); took > 8*time.Second {
		t.Errorf("the import into %s took %s: it waited for the other database's insert", cfg.DB, took)
	}
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("the other database's insert: %v, want it to finish", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("the other database's insert did not end")
	}
}
