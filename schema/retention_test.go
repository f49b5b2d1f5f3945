package schema_test

import (
	"context"
	"database/sql"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/ClickHouse/clickhouse-go/v2/lib/driver"
	"github.com/ClickHouse/clickhouse-go/v2/lib/proto"

	"github.com/analyticsd/analyticsd/internal/testenv"
	"github.com/analyticsd/analyticsd/retention"
	"github.com/analyticsd/analyticsd/schema"
)

// modernConn plays a ClickHouse 25.8 whose raw tables were created with a 90-day TTL: 18.16 has no
// TTL to change. It records every statement it is asked to execute.
type modernConn struct {
	driver.Conn
	ttlDays string
	mu      sync.Mutex
	execs   []string
}

func (c *modernConn) ServerVersion() (*driver.ServerVersion, error) {
	return &driver.ServerVersion{Version: proto.Version{Major: 25, Minor: 8, Patch: 2}}, nil
}

func (c *modernConn) Exec(_ context.Context, q string, _ ...any) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.execs = append(c.execs, q)
	return nil
}

func (c *modernConn) QueryRow(_ context.Context, q string, args ...any) driver.Row {
	if strings.Contains(q, "timezone()") {
		return textRow("UTC")
	}
	return textRow("CREATE TABLE a." + args[1].(string) + " (`ts` DateTime) ENGINE = MergeTree ORDER BY ts TTL ts + toIntervalDay(" + c.ttlDays + ") SETTINGS ttl_only_drop_parts = 1")
}

// Query answers schema_migrations: every version applied already.
func (c *modernConn) Query(context.Context, string, ...any) (driver.Rows, error) {
	return &versionRows{left: []uint32{1, 2, 3, 4, 5, 6, 7, 8, 9}}, nil
}

func (c *modernConn) PrepareBatch(context.Context, string, ...driver.PrepareBatchOption) (driver.Batch, error) {
	return nil, sql.ErrConnDone
}

type textRow string

func (r textRow) Err() error             { return nil }
func (r textRow) Scan(dest ...any) error { *(dest[0].(*string)) = string(r); return nil }
func (r textRow) ScanStruct(any) error   { return nil }

type versionRows struct {
	driver.Rows
	left []uint32
	cur  uint32
}

func (r *versionRows) Next() bool {
	if len(r.left) == 0 {
		return false
	}
	r.cur, r.left = r.left[0], r.left[1:]
	return true
}
func (r *versionRows) Scan(dest ...any) error { *(dest[0].(*uint32)) = r.cur; return nil }
func (r *versionRows) Err() error             { return nil }
func (r *versionRows) Close() error           { return nil }

// Finding 8: a changed RETENTION_DAYS is applied by migrate (MODIFY TTL on servers with TTL), and
// raising it records the retention floor first, so the days the old window dropped are never taken
// for complete.
func TestMigrateAppliesAChangedRetention(t *testing.T) {
	env := testenv.Migrated(t)
	ctx := context.Background()
	ch := &modernConn{ttlDays: "90"}
	res, err := (&schema.Migrator{CH: ch, PG: env.PG, DB: env.DB, Cluster: testenv.Cluster(), RetentionDays: 120}).Run(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var want []string
	for _, table := range schema.Retained {
		want = append(want, schema.ModifyTTL(env.Layout(), table, 120))
	}
	if len(want) != 3 || strings.Join(ch.execs[len(ch.execs)-len(want):], "; ") != strings.Join(want, "; ") || res.Retention != "90 -> 120 days" {
		t.Errorf("statements %q, result %q; want the last ones to be %q", ch.execs, res.Retention, want)
	}
	floor, err := retention.NewFloor(env.PG, env.DB).Get(ctx)
	if want := retention.Day(time.Now()).AddDate(0, 0, -89); err != nil || !floor.Equal(want) {
		t.Errorf("retention floor %v %v, want %v (the first day the 90-day window still kept whole)", floor, err, want)
	}

	// The same window again changes nothing.
	same := &modernConn{ttlDays: "120"}
	if res, err := (&schema.Migrator{CH: same, PG: env.PG, DB: env.DB, Cluster: testenv.Cluster(), RetentionDays: 120}).Run(ctx); err != nil || res.Retention != "" {
		t.Errorf("unchanged window: %+v %v", res, err)
	}
	for _, q := range same.execs {
		if strings.Contains(q, "MODIFY TTL") {
			t.Errorf("unchanged window: %s", q)
		}
	}
}

// A RETENTION_DAYS below the tables' TTL — often one left unset in the shell that runs migrate,
// reading as 90 — would delete the days in between for good: refused before any statement, naming
// the flag that allows it, which then applies it. Before, migrate shortened the TTL at once. (Fails
// on the code before this change.)
func TestMigrateRefusesToShrinkRetentionUnlessTold(t *testing.T) {
	env := testenv.Migrated(t)
	ctx := context.Background()
	ch := &modernConn{ttlDays: "365"}
	_, err := (&schema.Migrator{CH: ch, PG: env.PG, DB: env.DB, Cluster: testenv.Cluster(), RetentionDays: 90}).Run(ctx)
	if err == nil || !strings.Contains(err.Error(), "--shrink-retention") {
		t.Errorf("shrinking 365 → 90 days: %v, want a refusal naming --shrink-retention", err)
	}
	for _, q := range ch.execs {
		if strings.Contains(q, "MODIFY TTL") {
			t.Errorf("refused, yet ran %s", q)
		}
	}
	told := &modernConn{ttlDays: "365"}
	res, err := (&schema.Migrator{CH: told, PG: env.PG, DB: env.DB, Cluster: testenv.Cluster(), RetentionDays: 90, ShrinkRetention: true}).Run(ctx)
	if err != nil || res.Retention != "365 -> 90 days" {
		t.Errorf("with ShrinkRetention: %+v %v, want 365 -> 90 days applied", res, err)
	}
}

// Finding 9 at migrate: a server outside UTC is refused before anything is created.
func TestMigrateRefusesAServerOutsideUTC(t *testing.T) {
	env := testenv.Migrated(t)
	ch := &tzModernConn{modernConn: modernConn{ttlDays: "90"}}
	_, err := (&schema.Migrator{CH: ch, PG: env.PG, DB: env.DB, Cluster: testenv.Cluster(), RetentionDays: 90}).Run(context.Background())
	if err == nil || !strings.Contains(err.Error(), "America/Chicago") || len(ch.execs) != 0 {
		t.Errorf("got %v after %d statements; want a refusal before any", err, len(ch.execs))
	}
}

type tzModernConn struct{ modernConn }

func (c *tzModernConn) QueryRow(ctx context.Context, q string, args ...any) driver.Row {
	if strings.Contains(q, "timezone()") {
		return textRow("America/Chicago")
	}
	return c.modernConn.QueryRow(ctx, q, args...)
}
