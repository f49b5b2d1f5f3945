package query

import (
	"sync"
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
	// retentionDays is how long raw events are kept (RETENTION_DAYS): local-day counts come from
	// them inside that window only.
	retentionDays int
	// qh remembers whether usage_quarter_hour can be read (quarterHours).
	qh struct {
		sync.Mutex
		ready   bool
		checked time.Time
	}
}

// NewStore returns a Store. maxExec bounds every ClickHouse query (max_execution_time; default 30 s).
func NewStore(ch driver.Conn, db string, pg *pgxpool.Pool, maxExec time.Duration) *Store {
	if maxExec <= 0 {
		maxExec = DefaultTimeout
	}
	return &Store{ch: ch, db: db, pg: pg, maxExec: maxExec, now: clock.Now, retentionDays: 90}
}

// SetRetentionDays tells the store RETENTION_DAYS (default 90): days of a non-UTC zone older than
// that are answered from the UTC-day aggregate, because their raw events are gone.
func (s *Store) SetRetentionDays(days int) {
	if days > 0 {
		s.retentionDays = days
	}
}
