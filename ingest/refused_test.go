package ingest

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"testing"
	"time"

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

// The retention floor is read at most once a minute; when Postgres cannot answer, the last floor read
// stands (the floor moves at most daily), where before every checked row failed its shipment while
// Postgres was away. With none read yet, the attempt fails, to be retried.
func TestAnUnreadableFloorKeepsTheLastOneRead(t *testing.T) {
	day := time.Now().UTC().Truncate(24*time.Hour).AddDate(0, 0, -3)
	answers := []error{errors.New("postgres down"), nil, errors.New("postgres down")}
	calls := 0
	sh := newShipper(nil, "db", nil, WriterConfig{Floor: func(context.Context) (time.Time, error) {
		err := answers[calls]
		calls++
		return day, err
	}}, NewMetrics(nil, 0), slog.New(slog.DiscardHandler))
	ctx := context.Background()
	if _, err := sh.expired(ctx, day.AddDate(0, 0, -1)); err == nil {
		t.Fatal("no floor read yet and Postgres down: want an error, the attempt retried later")
	}
	if why, err := sh.expired(ctx, day.AddDate(0, 0, -1)); err != nil || why == "" {
		t.Fatalf("floor read: %q %v, want the day before it expired", why, err)
	}
	sh.floorAsked = sh.floorAsked.Add(-2 * time.Minute) // a minute on: asked again, and Postgres is down
	if why, err := sh.expired(ctx, day.AddDate(0, 0, -1)); err != nil || why == "" || calls != 3 {
		t.Errorf("floor unreadable after one was read: %q %v after %d reads; want the last floor to stand", why, err, calls)
	}
	if why, err := sh.expired(ctx, day); err != nil || why != "" || calls != 3 {
		t.Errorf("the floor's own day: %q %v after %d reads; want it kept, and no read within the minute", why, err, calls)
	}
}
