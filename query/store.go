package query

import (
	"time"

	"github.com/ClickHouse/clickhouse-go/v2/lib/driver"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/analyticsd/analyticsd/internal/clock"
)

// Store runs the read queries: events, usage, KPIs and names on ClickHouse; reconciled daily usage on
// Postgres.
type Store struct {
	ch      driver.Conn
	db      string
	pg      *pgxpool.Pool
	maxExec time.Duration
	now     func() time.Time
}

// NewStore returns a Store. maxExec bounds every ClickHouse query (max_execution_time; default 30 s).
func NewStore(ch driver.Conn, db string, pg *pgxpool.Pool, maxExec time.Duration) *Store {
	if maxExec <= 0 {
		maxExec = DefaultTimeout
	}
	return &Store{ch: ch, db: db, pg: pg, maxExec: maxExec, now: clock.Now}
}
