package rollup

import (
	"context"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
)

// tryLock takes the session-level Postgres advisory lock named name on a connection of its own, without
// waiting. ok is false when another session holds it. When ok, the caller must call the returned
// unlock, which releases the lock and returns the connection to the pool.
func tryLock(ctx context.Context, pg *pgxpool.Pool, name string) (unlock func(), ok bool, err error) {
	conn, err := pg.Acquire(ctx)
	if err != nil {
		return nil, false, fmt.Errorf("lock %s: connect to postgres: %w", name, err)
	}
	if err := conn.QueryRow(ctx, "SELECT pg_try_advisory_lock(hashtext($1))", name).Scan(&ok); err != nil {
		conn.Release()
		return nil, false, fmt.Errorf("lock %s: %w", name, err)
	}
	if !ok {
		conn.Release()
		return nil, false, nil
	}
	return func() {
		// A fresh context: the lock must be released even when ctx was cancelled. If unlocking fails,
		// closing the connection ends the session, which releases the lock too.
		uctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if _, err := conn.Exec(uctx, "SELECT pg_advisory_unlock(hashtext($1))", name); err != nil {
			_ = conn.Conn().Close(uctx)
		}
		conn.Release()
	}, true, nil
}
