package retention_test

import (
	"context"
	"database/sql"
	"strings"
	"testing"
	"time"

	"github.com/ClickHouse/clickhouse-go/v2/lib/driver"

	"github.com/analyticsd/analyticsd/internal/testenv"
	. "github.com/analyticsd/analyticsd/retention"
)

func TestParseTTLDays(t *testing.T) {
	check := func(create string, want int, wantOK bool) {
		t.Helper()
		if got, ok := ParseTTLDays(create); got != want || ok != wantOK {
			t.Errorf("ParseTTLDays(%q) = %d, %v; want %d, %v", create, got, ok, want, wantOK)
		}
	}
	// As 25.8 shows the table analyticsd creates.
	check("CREATE TABLE analytics.events (`tenant_id` UUID, `ts` DateTime) ENGINE = MergeTree PARTITION BY toYYYYMMDD(ts) ORDER BY (tenant_id, ts, id) TTL ts + toIntervalDay(90) SETTINGS index_granularity = 8192, ttl_only_drop_parts = 1", 90, true)
	check("CREATE TABLE e (ts DateTime) ENGINE = MergeTree ORDER BY ts TTL ts + INTERVAL 120 DAY", 120, true)
	// As 18.16 shows it: no TTL.
	check("CREATE TABLE analytics.events ( tenant_id UUID,  ts DateTime) ENGINE = MergeTree PARTITION BY toYYYYMMDD(ts) ORDER BY (tenant_id, ts, id) SETTINGS index_granularity = 8192", 0, false)
}

func TestWindowArithmetic(t *testing.T) {
	now := time.Date(2026, 11, 29, 17, 30, 0, 0, time.UTC)
	w := Window{Days: 90}
	if got := w.Cutoff(now); !got.Equal(time.Date(2026, 8, 31, 0, 0, 0, 0, time.UTC)) {
		t.Errorf("Cutoff = %v", got)
	}
	if got := w.OldestAccepted(now); !got.Equal(now.Add(-90 * 24 * time.Hour)) {
		t.Errorf("OldestAccepted = %v", got)
	}
	if !w.Expired(time.Date(2026, 8, 30, 0, 0, 0, 0, time.UTC), now) || w.Expired(w.Cutoff(now), now) {
		t.Error("Expired: the day before the cutoff is expired, the cutoff day is not")
	}
	if got := w.CompleteFrom(time.Time{}, now); !got.Equal(time.Date(2026, 9, 1, 0, 0, 0, 0, time.UTC)) {
		t.Errorf("CompleteFrom without a floor = %v, want the day after the cutoff", got)
	}
	floor := time.Date(2026, 10, 1, 0, 0, 0, 0, time.UTC)
	if got := w.CompleteFrom(floor, now); !got.Equal(floor) {
		t.Errorf("CompleteFrom with a later floor = %v, want the floor", got)
	}
}

// createConn answers the events table's definition from a script (18.16 cannot show a TTL).
type createConn struct {
	driver.Conn
	create string // "" : no such table
}

func (c createConn) QueryRow(context.Context, string, ...any) driver.Row { return stringRow(c.create) }

type stringRow string

func (r stringRow) Err() error { return nil }
func (r stringRow) Scan(dest ...any) error {
	if r == "" {
		return sql.ErrNoRows
	}
	*(dest[0].(*string)) = string(r)
	return nil
}
func (r stringRow) ScanStruct(any) error { return nil }

func TestEffectiveRefusesATTLMigrateHasNotApplied(t *testing.T) {
	ctx := context.Background()
	ttl90 := createConn{create: "CREATE TABLE a.events (ts DateTime) ENGINE = MergeTree ORDER BY ts TTL ts + toIntervalDay(90)"}
	if w, err := Effective(ctx, ttl90, "a", "events", 90); err != nil || w.Days != 90 || !w.TTL {
		t.Errorf("TTL 90, RETENTION_DAYS 90: %+v %v", w, err)
	}
	_, err := Effective(ctx, ttl90, "a", "events", 120)
	if err == nil || !strings.Contains(err.Error(), "analyticsd migrate") {
		t.Errorf("TTL 90, RETENTION_DAYS 120: %v, want a refusal naming migrate", err)
	}
	if w, err := Effective(ctx, createConn{create: "CREATE TABLE a.events (ts DateTime) ENGINE = MergeTree ORDER BY ts"}, "a", "events", 120); err != nil || w.Days != 120 || w.TTL {
		t.Errorf("no TTL (the sweeper's): %+v %v", w, err)
	}
	if _, err := Effective(ctx, createConn{}, "a", "events", 90); err != ErrNoTable {
		t.Errorf("no table: %v, want ErrNoTable", err)
	}
}

func TestFloorOnlyMovesForward(t *testing.T) {
	env := testenv.Migrated(t)
	ctx := context.Background()
	f := NewFloor(env.PG, env.DB)
	if d, err := f.Get(ctx); err != nil || !d.IsZero() {
		t.Fatalf("no floor yet: %v %v", d, err)
	}
	d1 := time.Date(2026, 9, 1, 13, 0, 0, 0, time.UTC)
	f.Raise(ctx, d1)
	f.Raise(ctx, d1.AddDate(0, 0, -10))
	if d, err := f.Get(ctx); err != nil || !d.Equal(Day(d1)) {
		t.Errorf("floor %v %v, want %v", d, err, Day(d1))
	}
	if other, _ := NewFloor(env.PG, "another_db").Get(ctx); !other.IsZero() {
		t.Errorf("another database's floor: %v", other)
	}
}
