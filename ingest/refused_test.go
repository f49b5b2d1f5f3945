package ingest

import (
	"fmt"
	"testing"

	"github.com/ClickHouse/clickhouse-go/v2"
)

// Which ClickHouse answers say "these rows are refused" (split, isolate, in the end quarantine) and
// which say "the server cannot take anything now" (retry the chunk whole). On a cluster a shard with
// every replica down answers 279: a lone row of a tenant on that shard was isolated and, once other
// tenants' inserts succeeded meanwhile, quarantined — an acknowledged row waiting for a manual requeue.
func TestRefusedRowsOnlyForTheRows(t *testing.T) {
	for code, refused := range map[int32]bool{
		279: false, // every replica of a shard unreachable
		252: false, // too many parts
		242: false, // read-only (ZooKeeper down)
		999: false, // ZooKeeper session
		53:  true,  // type mismatch: the rows
		395: true,  // throwIf on a row's value
	} {
		err := fmt.Errorf("insert: %w", &clickhouse.Exception{Code: code})
		if got := refusedRows(err); got != refused {
			t.Errorf("code %d: refusedRows = %v, want %v", code, got, refused)
		}
	}
}
