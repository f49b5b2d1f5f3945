package erasure

import (
	"context"
	"fmt"
	"strings"
	"time"

	"github.com/ClickHouse/clickhouse-go/v2"
	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

// Querier is what the ledger is read through: a *pgxpool.Pool or a pgx.Tx.
type Querier interface {
	Query(ctx context.Context, sql string, args ...any) (pgx.Rows, error)
	QueryRow(ctx context.Context, sql string, args ...any) pgx.Row
	Exec(ctx context.Context, sql string, args ...any) (pgconn.CommandTag, error)
}

// Erased is a count of events a user's erasure removed: of tenant, on date (toDate(ts)), of event
// name Metric, received in unix minute Minute.
type Erased struct {
	Tenant uuid.UUID
	Date   time.Time
	Metric string
	Minute int64
	N      int64
}

// pending is a recorded round whose delete has not been confirmed: its rows may or may not still be
// in ClickHouse, so readers leave them out by the same predicate the delete uses.
type pending struct {
	tenant uuid.UUID
	digest string
	ids    []uuid.UUID
}

// Ledger is what user erasures took out of one day's raw events: the counts to add back to a count
// of the raw rows, and the rows of rounds still being deleted, to leave out of it (ExcludeEvents).
//
// Why a ledger and not "trust the aggregate on days an erasure touched": the quota reconciler needs
// per-minute counts the aggregate does not have, and the rollup would lose its repair of real drift
// on those days for good. Why exact ids and not the user's predicate at delete time: rows of the same
// user inserted between a count and the delete (the user is active, or another instance's spool ships)
// would be deleted uncounted; counting by received_at cut-offs would rest on every instance's clock.
// With ids, the rows counted are the rows deleted, whatever arrives meanwhile (the next round takes
// it) — except a copy of a round's id (a retry after the dedup window, a block shipped twice), which
// the delete removes too: rounds count every copy of their ids, at the snapshot and again just before
// the delete is sent (recordRound, coverCopies in rounds.go).
//
// Readers call ReadLedger, run their ClickHouse count with ExcludeEvents, then Unchanged: a round
// recorded or applied in between (whose delete may have run while they counted) makes them read
// again. Rounds are recorded before their delete is issued, so a count taken while the ledger did not
// change cannot have missed rows that are neither excluded nor counted.
type Ledger struct {
	Counts  []Erased
	pending []pending
	version int64
}

// ledgerVersion is erasure_ledger_version: the transactions that record a round and that apply one
// each increment it.
func ledgerVersion(ctx context.Context, q Querier) (int64, error) {
	var v int64
	if err := q.QueryRow(ctx, "SELECT v FROM erasure_ledger_version").Scan(&v); err != nil {
		return 0, fmt.Errorf("read the erasure ledger's version: %w", err)
	}
	return v, nil
}

// bumpLedger increments the ledger's version inside tx (which records or applies a round).
func bumpLedger(ctx context.Context, tx pgx.Tx) error {
	if _, err := tx.Exec(ctx, "UPDATE erasure_ledger_version SET v = v + 1"); err != nil {
		return fmt.Errorf("bump the erasure ledger's version: %w", err)
	}
	return nil
}

// TenantsErasing lists the tenants whose tenant erasure is queued or running.
func TenantsErasing(ctx context.Context, q Querier) ([]uuid.UUID, error) {
	return tenantJobs(ctx, q, []string{KindTenant}, `status IN ($2, $3)`, StatusQueued, StatusRunning)
}

// TenantsWithOpenErasures lists the tenants with an erasure of any kind, of the tenant or of one of its
// users, queued or running: rows written into them meanwhile (an import) may escape its delete.
func TenantsWithOpenErasures(ctx context.Context, q Querier) ([]uuid.UUID, error) {
	return tenantJobs(ctx, q, []string{KindTenant, KindUser}, `status IN ($2, $3)`, StatusQueued, StatusRunning)
}

// TenantsDeleting lists the tenants whose tenant erasure may have deleted rows since `since`
// (Postgres' clock: take it from the same database): running past its acknowledgements (its delete
// may be under way), or ended — done or failed — at or after since. A reader of ClickHouse that began
// at since must not write these tenants' counts anywhere: they may count rows deleted since. A job
// still waiting for acknowledgements has deleted nothing, and does not list its tenant.
func TenantsDeleting(ctx context.Context, q Querier, since time.Time) ([]uuid.UUID, error) {
	var deleting []string
	for step, order := range stepOrder {
		if order >= stepOrder[stepAcked] {
			deleting = append(deleting, step)
		}
	}
	return tenantJobs(ctx, q, []string{KindTenant}, `(status = $2 AND step = ANY($3)) OR (status IN ($4, $5) AND finished_at >= $6)`,
		StatusRunning, deleting, StatusDone, StatusFailed, since)
}

// tenantJobs lists the tenants of erasures of kinds matching where (its arguments from $2).
func tenantJobs(ctx context.Context, q Querier, kinds []string, where string, args ...any) ([]uuid.UUID, error) {
	rows, err := q.Query(ctx, "SELECT DISTINCT tenant_id FROM erasure_jobs WHERE kind = ANY($1) AND ("+where+") ORDER BY tenant_id",
		append([]any{kinds}, args...)...)
	if err != nil {
		return nil, fmt.Errorf("read tenant erasures: %w", err)
	}
	ids, err := pgx.CollectRows(rows, pgx.RowTo[uuid.UUID])
	if err != nil {
		return nil, fmt.Errorf("read tenant erasures: %w", err)
	}
	return ids, nil
}

// ReadLedger reads what erasures took out of day (UTC midnight) for tenant (uuid.Nil: every tenant).
func ReadLedger(ctx context.Context, q Querier, day time.Time, tenant uuid.UUID) (Ledger, error) {
	var l Ledger
	var err error
	if l.version, err = ledgerVersion(ctx, q); err != nil {
		return l, err
	}
	date := day.UTC().Format(time.DateOnly)
	var tenantArg *uuid.UUID
	if tenant != uuid.Nil {
		tenantArg = &tenant
	}
	rows, err := q.Query(ctx, `SELECT tenant_id, date, metric, minute, sum(n)::bigint FROM erased_usage
		WHERE date = $1::date AND ($2::uuid IS NULL OR tenant_id = $2) GROUP BY tenant_id, date, metric, minute`, date, tenantArg)
	if err != nil {
		return l, fmt.Errorf("read erased usage of %s: %w", date, err)
	}
	for rows.Next() {
		var e Erased
		if err := rows.Scan(&e.Tenant, &e.Date, &e.Metric, &e.Minute, &e.N); err != nil {
			rows.Close()
			return l, fmt.Errorf("read erased usage of %s: %w", date, err)
		}
		l.Counts = append(l.Counts, e)
	}
	rows.Close()
	if err := rows.Err(); err != nil {
		return l, fmt.Errorf("read erased usage of %s: %w", date, err)
	}
	rows, err = q.Query(ctx, `SELECT r.tenant_id, r.user_digest, r.ids FROM erasure_rounds r
		WHERE NOT r.applied AND ($2::uuid IS NULL OR r.tenant_id = $2)
		AND EXISTS (SELECT 1 FROM erased_usage u WHERE u.job_id = r.job_id AND u.round = r.round AND u.date = $1::date)`, date, tenantArg)
	if err != nil {
		return l, fmt.Errorf("read pending erasures of %s: %w", date, err)
	}
	defer rows.Close()
	for rows.Next() {
		var p pending
		if err := rows.Scan(&p.tenant, &p.digest, &p.ids); err != nil {
			return l, fmt.Errorf("read pending erasures of %s: %w", date, err)
		}
		l.pending = append(l.pending, p)
	}
	return l, rows.Err()
}

// Unchanged reports whether no round was recorded or applied since l was read.
func (l Ledger) Unchanged(ctx context.Context, q Querier) (bool, error) {
	v, err := ledgerVersion(ctx, q)
	return v == l.version, err
}

// ExcludeEvents is a predicate to AND to a read of the events table ("" when nothing is pending):
// it leaves out the rows of rounds whose delete is not confirmed. It names no user id: tenant, event
// ids and the digest SHA256(user_id) only, all rendered from parsed values.
func (l Ledger) ExcludeEvents() string {
	var b strings.Builder
	for _, p := range l.pending {
		b.WriteString(" AND NOT (")
		b.WriteString(rowsPredicate(p.tenant, p.digest, p.ids))
		b.WriteString(")")
	}
	return b.String()
}

// Settings are the per-query settings a query carrying ExcludeEvents needs (nil: the defaults will do).
func (l Ledger) Settings(q string) clickhouse.Settings { return bigQuery(q) }

// querySize is the max_query_size q needs: 0 below 200,000 bytes (the default is 262,144).
func querySize(q string) int {
	if len(q) < 200_000 {
		return 0
	}
	return len(q) + 64<<10
}

// bigQuery is max_query_size for q, and with it max_ast_elements and max_expanded_ast_elements (nil
// when q is short enough for the defaults). Every id of a round is one literal of an IN list, and
// 18.16 counts each as an AST element: twelve pending rounds of 4,500 ids on one day are 54,000, over
// the default max_ast_elements of 50,000 ("Code: 168 AST is too big"), however large
// max_query_size is. A literal takes 40 bytes of the query ('<uuid>', ), so len(q) elements on top of
// the defaults bound what these queries hold. Go ints: 18.16 takes int settings from clickhouse-go.
func bigQuery(q string) clickhouse.Settings {
	n := querySize(q)
	if n == 0 {
		return nil
	}
	return clickhouse.Settings{
		"max_query_size":            n,
		"max_ast_elements":          len(q) + 50_000,
		"max_expanded_ast_elements": len(q) + 500_000,
	}
}

// rowsPredicate selects exactly the rows of a round: the tenant's rows with one of ids whose user id
// has the digest. The digest keeps a row of another user that happened to share an id out of it; the
// ids keep rows the user sent after the round's snapshot out of it.
func rowsPredicate(tenant uuid.UUID, digest string, ids []uuid.UUID) string {
	var b strings.Builder
	b.Grow(len(ids)*40 + 160)
	b.WriteString("tenant_id = toUUID('")
	b.WriteString(tenant.String())
	b.WriteString("') AND id IN (")
	for i, id := range ids {
		if i > 0 {
			b.WriteString(", ")
		}
		b.WriteString("'")
		b.WriteString(id.String())
		b.WriteString("'")
	}
	if len(ids) == 0 {
		b.WriteString("toUUID('00000000-0000-0000-0000-000000000000')")
	}
	b.WriteString(") AND SHA256(user_id) = unhex('")
	b.WriteString(digest) // hex, from UserDigest
	b.WriteString("')")
	return b.String()
}
