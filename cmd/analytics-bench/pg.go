package main

import (
	"context"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgtype"
)

// Baseline (b): the guide's own Postgres design, verbatim — analytics_events referencing tenants, with
// the guide's two indexes — in the bench schema, next to analyticsd's own tables (tenants is theirs).

func (b *bench) createPGTable(ctx context.Context, table string) error {
	ddl := `CREATE TABLE ` + table + ` (
    id UUID PRIMARY KEY,
    tenant_id UUID REFERENCES tenants(id),
    user_id VARCHAR(255),
    source VARCHAR(50),
    event TEXT NOT NULL,
    ts TIMESTAMPTZ DEFAULT NOW(),
    props JSONB,
    ip TEXT,
    request_id TEXT
);
CREATE INDEX idx_` + table + `_tenant_ts ON ` + table + `(tenant_id, ts);
CREATE INDEX idx_` + table + `_tenant_event_ts ON ` + table + `(tenant_id, event, ts);`
	if _, err := b.pg.Exec(ctx, ddl); err != nil {
		return fmt.Errorf("create postgres %s: %w", table, err)
	}
	return nil
}

var pgColumns = []string{"id", "tenant_id", "user_id", "source", "event", "ts", "props", "ip", "request_id"}

func (b *bench) pgRow(e *Event) []any {
	return []any{
		pgtype.UUID{Bytes: [16]byte(e.ID), Valid: true},
		pgtype.UUID{Bytes: [16]byte(b.tenants[e.Tenant].ID), Valid: true},
		e.UserID, e.Source(), e.Name(), time.Unix(e.Ts, 0).UTC(), e.Props, e.IP, e.RequestID,
	}
}

// pgCopy loads events with COPY (pgx CopyFrom, binary) and returns how long it took and the CPU time
// the Postgres backend serving it used.
func (b *bench) pgCopy(ctx context.Context, table string, events []Event) (time.Duration, time.Duration, error) {
	conn, err := b.pg.Acquire(ctx)
	if err != nil {
		return 0, 0, err
	}
	defer conn.Release()
	var backend int
	if err := conn.QueryRow(ctx, "SELECT pg_backend_pid()").Scan(&backend); err != nil {
		return 0, 0, err
	}
	i := 0
	src := pgx.CopyFromFunc(func() ([]any, error) {
		if i >= len(events) {
			return nil, nil
		}
		i++
		return b.pgRow(&events[i-1]), nil
	})
	m := meterCPU(backend)
	start := time.Now()
	n, err := conn.CopyFrom(ctx, pgx.Identifier{table}, pgColumns, src)
	if err != nil {
		return 0, 0, fmt.Errorf("copy into %s: %w", table, err)
	}
	if int(n) != len(events) {
		return 0, 0, fmt.Errorf("copy into %s: %d rows, want %d", table, n, len(events))
	}
	return time.Since(start), sum(m.used()), nil
}

// pgInsert loads the first m ingest events the way an application writes per request: one multi-row
// INSERT per batch (the same per-tenant batches REST gets), over --connections connections.
func (b *bench) pgInsert(ctx context.Context, table string, m int) (time.Duration, error) {
	var todo [][]int32
	left := m
	for _, bt := range b.batches {
		if left <= 0 {
			break
		}
		idx := bt.idx[:min(len(bt.idx), left)]
		todo = append(todo, idx)
		left -= len(idx)
	}
	var sb strings.Builder
	stmt := func(rows int) string {
		sb.Reset()
		sb.WriteString("INSERT INTO " + table + " (" + strings.Join(pgColumns, ", ") + ") VALUES ")
		p := 1
		for r := 0; r < rows; r++ {
			if r > 0 {
				sb.WriteByte(',')
			}
			sb.WriteByte('(')
			for c := range pgColumns {
				if c > 0 {
					sb.WriteByte(',')
				}
				sb.WriteString("$" + strconv.Itoa(p))
				p++
			}
			sb.WriteByte(')')
		}
		return sb.String()
	}
	sqls := map[int]string{}
	for _, idx := range todo {
		if _, ok := sqls[len(idx)]; !ok {
			sqls[len(idx)] = stmt(len(idx))
		}
	}
	args := make([][]any, b.opt.connections) // one argument buffer per connection, reused
	start := time.Now()
	err := parallel(b.opt.connections, len(todo), func(w, k int) error {
		args[w] = args[w][:0]
		for _, i := range todo[k] {
			args[w] = append(args[w], b.pgRow(&b.ingest[i])...)
		}
		if _, err := b.pg.Exec(ctx, sqls[len(todo[k])], args[w]...); err != nil {
			return fmt.Errorf("insert into %s: %w", table, err)
		}
		return nil
	})
	if err != nil {
		return 0, err
	}
	return time.Since(start), nil
}
