package erasure

import (
	"context"
	"fmt"
	"time"

	"github.com/ClickHouse/clickhouse-go/v2"
	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
)

// catchUpRounds bounds the rounds a user's erasure runs once a round found fewer rows than RoundRows
// (the stored backlog is gone): rows the user sends while the job runs are taken by the next round,
// and a user who never stops sending would otherwise keep the job running forever. Rows stored after
// the last round are events sent after the erasure, and are kept.
const catchUpRounds = 3

// eraseUserRows deletes the user's events in rounds. Each round, under a lock on (tenant, user):
// snapshot up to RoundRows of the user's event ids and count every stored row of them (per day, event
// and received minute: an id may be stored more than once), record them in the ledger in one
// transaction; then count in copies stored since, delete exactly those ids and mark the round applied
// once none of them is left on any replica. Rounds recorded but not applied — this job's,
// after a crash, or a failed job's for the same user — are finished first, so a re-run or a
// re-submitted request neither counts their rows twice nor leaves them.
func (s *Service) eraseUserRows(ctx context.Context, j *Job) error {
	digest := UserDigest(j.UserID)
	short := 0
	for {
		if err := s.applyPending(ctx, j.ID, j.TenantID, digest); err != nil {
			return err
		}
		if short > catchUpRounds {
			break
		}
		n, err := s.recordRound(ctx, j, digest)
		if err != nil {
			return err
		}
		if n == 0 {
			break
		}
		if n < s.cfg.RoundRows {
			short++
		}
	}
	rows, err := s.roundRows(ctx, j.ID)
	if err != nil {
		return err
	}
	scrubbed, err := s.scrubbed(ctx, j.ID)
	if err != nil {
		return err
	}
	j.RowsErased = rows + scrubbed
	return nil
}

// roundRows is the rows of the rounds job applied: its own, and those of a failed job it finished.
func (s *Service) roundRows(ctx context.Context, job uuid.UUID) (int64, error) {
	var n int64
	if err := s.pg.QueryRow(ctx, "SELECT coalesce(sum(rows), 0)::bigint FROM erasure_rounds WHERE applied_by = $1", job).Scan(&n); err != nil {
		return 0, fmt.Errorf("read erasure rounds: %w", err)
	}
	return n, nil
}

// cell is a round's count key: the event's day (toDate(ts)), name and received minute.
type cell struct {
	date   string
	event  string
	minute int64
}

// recordRound snapshots the user's next RoundRows event ids and records them as a pending round of j,
// with every stored row of those ids; it returns how many ids it recorded (0: the user has no rows
// left). The transaction holds an advisory lock on (tenant, digest), so two jobs for the same user
// never snapshot the same rows; rows of pending rounds are left out of the snapshot.
//
// The snapshot is per id, not per row: two stored rows of a user can share an id (a client's retry
// after INGEST_DEDUP_WINDOW, a block shipped twice), and the delete names ids, so it removes every
// copy. The LIMIT counts distinct ids and the counts are taken by the delete's own predicate
// (rowsPredicate), so every copy present at the snapshot is in the ledger with its multiplicity. A
// copy stored later is covered by applyPending (coverCopies).
func (s *Service) recordRound(ctx context.Context, j *Job, digest string) (int, error) {
	var n int
	err := pgx.BeginFunc(ctx, s.pg, func(tx pgx.Tx) error {
		if err := lockUser(ctx, tx, j.TenantID, digest); err != nil {
			return err
		}
		var busy [][]uuid.UUID
		rows, err := tx.Query(ctx, "SELECT ids FROM erasure_rounds WHERE tenant_id = $1 AND user_digest = $2 AND NOT applied", j.TenantID, digest)
		if err == nil {
			busy, err = pgx.CollectRows(rows, pgx.RowTo[[]uuid.UUID])
		}
		if err != nil {
			return fmt.Errorf("read pending rounds: %w", err)
		}
		q := "SELECT id FROM " + s.cfg.Layout.Table("events") + " WHERE tenant_id = ? AND SHA256(user_id) = unhex(?)"
		for _, ids := range busy {
			q += " AND NOT (" + rowsPredicate(j.TenantID, digest, ids) + ")"
		}
		q += fmt.Sprintf(" GROUP BY id ORDER BY min(ts), id LIMIT %d", s.cfg.RoundRows)
		ids, err := s.snapshotIDs(ctx, q, j.TenantID, digest)
		if err != nil {
			return err
		}
		if n = len(ids); n == 0 {
			return nil
		}
		counts, err := s.cellCounts(ctx, rowsPredicate(j.TenantID, digest, ids))
		if err != nil {
			return err
		}
		var total int64
		for _, k := range counts {
			total += k
		}
		var round int
		if err := tx.QueryRow(ctx, "SELECT coalesce(max(round), 0) + 1 FROM erasure_rounds WHERE job_id = $1", j.ID).Scan(&round); err != nil {
			return fmt.Errorf("number the round: %w", err)
		}
		if _, err := tx.Exec(ctx, `INSERT INTO erasure_rounds (job_id, round, tenant_id, user_digest, ids, rows)
			VALUES ($1, $2, $3, $4, $5, $6)`, j.ID, round, j.TenantID, digest, ids, total); err != nil {
			return fmt.Errorf("record the round: %w", err)
		}
		if err := addCounts(ctx, tx, j.TenantID, j.ID, round, counts); err != nil {
			return err
		}
		return bumpLedger(ctx, tx)
	})
	return n, err
}

// lockUser takes the transaction-scoped advisory lock on a user's rounds.
func lockUser(ctx context.Context, tx pgx.Tx, tenant uuid.UUID, digest string) error {
	if _, err := tx.Exec(ctx, "SELECT pg_advisory_xact_lock(hashtext($1))", "analyticsd.erasure."+tenant.String()+"."+digest); err != nil {
		return fmt.Errorf("lock the user's rounds: %w", err)
	}
	return nil
}

// addCounts adds counts to a round's erased_usage.
func addCounts(ctx context.Context, tx pgx.Tx, tenant, job uuid.UUID, round int, counts map[cell]int64) error {
	var dates, events []string
	var minutes, ns []int64
	for c, k := range counts {
		dates, events, minutes, ns = append(dates, c.date), append(events, c.event), append(minutes, c.minute), append(ns, k)
	}
	if _, err := tx.Exec(ctx, `INSERT INTO erased_usage (tenant_id, date, metric, minute, n, job_id, round)
		SELECT $1, t.date::date, t.metric, t.minute, t.n, $2, $3
		FROM unnest($4::text[], $5::text[], $6::bigint[], $7::bigint[]) AS t (date, metric, minute, n)
		ON CONFLICT (job_id, round, tenant_id, date, metric, minute) DO UPDATE SET n = erased_usage.n + excluded.n`,
		tenant, job, round, dates, events, minutes, ns); err != nil {
		return fmt.Errorf("record the round's counts: %w", err)
	}
	return nil
}

func (s *Service) snapshotIDs(ctx context.Context, q string, tenant uuid.UUID, digest string) ([]uuid.UUID, error) {
	rows, err := s.ch.Query(sized(ctx, q), q, tenant, digest)
	if err != nil {
		return nil, fmt.Errorf("find the user's rows: %w", err)
	}
	defer rows.Close()
	var out []uuid.UUID
	for rows.Next() {
		var id uuid.UUID
		if err := rows.Scan(&id); err != nil {
			return nil, fmt.Errorf("find the user's rows: %w", err)
		}
		out = append(out, id)
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("find the user's rows: %w", err)
	}
	return out, nil
}

// cellCounts counts the events matching where per day, event and received minute.
func (s *Service) cellCounts(ctx context.Context, where string) (map[cell]int64, error) {
	q := "SELECT toDate(ts), event, intDiv(toUInt32(received_at), 60) AS m, count() FROM " + s.cfg.Layout.Table("events") +
		" WHERE " + where + " GROUP BY toDate(ts), event, m"
	rows, err := s.ch.Query(sized(ctx, q), q)
	if err != nil {
		return nil, fmt.Errorf("count the round's rows: %w", err)
	}
	defer rows.Close()
	out := map[cell]int64{}
	for rows.Next() {
		var d time.Time
		var ev string
		var m uint32
		var n uint64
		if err := rows.Scan(&d, &ev, &m, &n); err != nil {
			return nil, fmt.Errorf("count the round's rows: %w", err)
		}
		out[cell{d.Format(time.DateOnly), ev, int64(m)}] += int64(n)
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("count the round's rows: %w", err)
	}
	return out, nil
}

// coverCopies makes a pending round's ledger cover every row its delete is about to remove: copies
// of its ids stored after its snapshot are counted into it (per cell, what ClickHouse holds beyond
// what the round recorded), in one transaction that bumps the ledger's version, before the delete is
// sent. It runs under the user's advisory lock, so two jobs finishing the same round add a copy once.
//
// Why counted here and not left for a later round: a copy is byte-for-byte the row it repeats (a
// re-shipped block keeps its received_at), so no predicate of the delete can spare it; counting it
// before the delete is sent is what keeps raw + ledger = aggregate. What this cannot see: a copy
// stored in the moment between this count and the mutation's submission (it is deleted uncounted),
// and, once a delete was sent and found rows left (resent below), left rows are taken as rows the
// delete missed, not as new copies, unless a cell holds more than the round recorded.
func (s *Service) coverCopies(ctx context.Context, tenant uuid.UUID, digest string, job uuid.UUID, round int, where string) error {
	return pgx.BeginFunc(ctx, s.pg, func(tx pgx.Tx) error {
		if err := lockUser(ctx, tx, tenant, digest); err != nil {
			return err
		}
		present, err := s.cellCounts(ctx, where)
		if err != nil {
			return err
		}
		rows, err := tx.Query(ctx, `SELECT date::text, metric, minute, n FROM erased_usage WHERE job_id = $1 AND round = $2`, job, round)
		if err != nil {
			return fmt.Errorf("read the round's counts: %w", err)
		}
		recorded := map[cell]int64{}
		for rows.Next() {
			var c cell
			var n int64
			if err := rows.Scan(&c.date, &c.event, &c.minute, &n); err != nil {
				rows.Close()
				return fmt.Errorf("read the round's counts: %w", err)
			}
			recorded[c] += n
		}
		rows.Close()
		if err := rows.Err(); err != nil {
			return fmt.Errorf("read the round's counts: %w", err)
		}
		extra, more := map[cell]int64{}, int64(0)
		for c, n := range present {
			if n > recorded[c] {
				extra[c] = n - recorded[c]
				more += n - recorded[c]
			}
		}
		if more == 0 {
			return nil
		}
		s.log.Warn("erasure: copies of a round's ids stored after its snapshot; counting them", "job", job, "round", round, "rows", more)
		if err := addCounts(ctx, tx, tenant, job, round, extra); err != nil {
			return err
		}
		if _, err := tx.Exec(ctx, "UPDATE erasure_rounds SET rows = rows + $3 WHERE job_id = $1 AND round = $2", job, round, more); err != nil {
			return fmt.Errorf("count the round's copies: %w", err)
		}
		return bumpLedger(ctx, tx)
	})
}

// applyPending deletes the rows of every pending round of (tenant, digest), checks that none is
// left, and marks the round applied (its ids and digest are then dropped). Running it twice, or in two
// jobs at once, deletes nothing more: the delete names the round's ids.
func (s *Service) applyPending(ctx context.Context, job, tenant uuid.UUID, digest string) error {
	type round struct {
		job   uuid.UUID
		round int
		ids   []uuid.UUID
	}
	rows, err := s.pg.Query(ctx, `SELECT job_id, round, ids FROM erasure_rounds
		WHERE tenant_id = $1 AND user_digest = $2 AND NOT applied ORDER BY recorded_at`, tenant, digest)
	if err != nil {
		return fmt.Errorf("read pending rounds: %w", err)
	}
	pend, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (round, error) {
		var x round
		err := r.Scan(&x.job, &x.round, &x.ids)
		return x, err
	})
	if err != nil {
		return fmt.Errorf("read pending rounds: %w", err)
	}
	// One round's delete at a time, each waited for before the next is sent: on 18.16, ten queued
	// mutations with an IN list each left whole rounds (2,000 rows) in place, also when those were sent
	// again together, in 2 of 2 runs of BenchmarkEraseOneUser with ANALYTICS_BENCH_USER_ROWS=20000
	// (one at a time: 0 of 1), as if one statement's list stood for another's. A round whose rows are
	// still found after its delete is sent again (a delete by ids is safe to repeat), at most twice.
	for _, p := range pend {
		where := rowsPredicate(tenant, digest, p.ids)
		for try := 1; ; try++ {
			if err := s.coverCopies(ctx, tenant, digest, p.job, p.round, where); err != nil {
				return err
			}
			if err := s.delete(ctx, statement{table: "events", where: where}); err != nil {
				return err
			}
			var n uint64
			if err := s.ch.QueryRow(ctx, "SELECT count() FROM "+s.cfg.Layout.Table("events")+" WHERE "+where).Scan(&n); err != nil {
				return fmt.Errorf("count the round's rows left: %w", err)
			}
			if n == 0 {
				break
			}
			if try == 3 {
				return fmt.Errorf("%d rows of round %d still found after %d deletes", n, p.round, try)
			}
			s.log.Warn("erasure: rows of a round still found after its delete; sending it again", "job", job, "round", p.round, "rows", n)
		}
		err := pgx.BeginFunc(ctx, s.pg, func(tx pgx.Tx) error {
			tag, err := tx.Exec(ctx, `UPDATE erasure_rounds SET applied = true, applied_at = now(), applied_by = $3,
				ids = '{}', user_digest = '' WHERE job_id = $1 AND round = $2 AND NOT applied`, p.job, p.round, job)
			if err != nil || tag.RowsAffected() == 0 {
				return err
			}
			return bumpLedger(ctx, tx)
		})
		if err != nil {
			return fmt.Errorf("mark round %d applied: %w", p.round, err)
		}
	}
	return nil
}

// sized carries bigQuery's settings for a query as long as q (a snapshot excluding several pending
// rounds' ids); ctx itself when the defaults will do.
func sized(ctx context.Context, q string) context.Context {
	if set := bigQuery(q); set != nil {
		return clickhouse.Context(ctx, clickhouse.WithSettings(set))
	}
	return ctx
}
