// Package erasure owns data-subject and offboarding erasure: deleting every stored event of one user
// of one tenant (GDPR/CCPA), or all of one tenant's events, increments and aggregates. A request is a
// job in Postgres (erasure_jobs) with an id and a status (queued, running, done, failed); any
// instance's runner takes it, a job whose runner died is taken over, and every step is safe to run
// again, so a restart mid-way only repeats work.
//
// What a user's erasure removes: the user's rows of the events table (user_id, props, ip, request_id
// with them), on every shard (Layout). What it keeps: aggregates without personal data — daily_usage,
// billed usage in Postgres, the live counters in Redis — with their counts. Redis holds no user ids:
// event-id claims and Idempotency-Key records expire with the dedup window.
//
// It does not own the spool: before deleting in ClickHouse a job waits until the segments that were in
// the local spool when it started have shipped (Barrier), so events acknowledged before the erasure
// are in ClickHouse when the delete runs. Events the user sends after the job finished are stored as
// usual: nothing remembers the erased rows.
package erasure

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"strconv"
	"strings"
	"time"

	"github.com/ClickHouse/clickhouse-go/v2"
	"github.com/ClickHouse/clickhouse-go/v2/lib/driver"
	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/analyticsd/analyticsd/audit"
	"github.com/analyticsd/analyticsd/internal/excerpt"
	"github.com/analyticsd/analyticsd/internal/logger"
	"github.com/analyticsd/analyticsd/schema"
)

// Kinds of job.
const (
	KindUser   = "user"
	KindTenant = "tenant"
)

// Statuses of a job.
const (
	StatusQueued  = "queued"
	StatusRunning = "running"
	StatusDone    = "done"
	StatusFailed  = "failed"
)

var (
	// ErrNotFound: no job with that id for the tenant.
	ErrNotFound = errors.New("erasure job not found")
	// ErrBadUserID: the user id is empty or longer than 255 bytes (what events can hold).
	ErrBadUserID = errors.New("user id must be 1 to 255 bytes")
)

// Job is one erasure request and how far it got.
type Job struct {
	ID         uuid.UUID  `json:"id"`
	TenantID   uuid.UUID  `json:"tenant_id"`
	Kind       string     `json:"kind"`
	UserID     string     `json:"user_id,omitempty"` // blanked once done
	Status     string     `json:"status"`
	Step       string     `json:"step,omitempty"`
	RowsErased int64      `json:"rows_erased"`
	Error      string     `json:"error,omitempty"`
	CreatedAt  time.Time  `json:"created_at"`
	StartedAt  *time.Time `json:"started_at"`
	FinishedAt *time.Time `json:"finished_at"`

	userHash string
}

// Barrier waits until what the local spool held when it was called has shipped to ClickHouse (or
// ctx ends). nil means nothing to wait for (no spool, memory durability).
type Barrier func(ctx context.Context) error

// Scrubber removes from the local spool's quarantine the events of user in tenant (every row of the
// tenant when user is ""), and returns how many it removed. Quarantined rows are in no table: ClickHouse
// refused them, and they wait for an operator's requeue. nil skips the step.
type Scrubber func(ctx context.Context, tenant uuid.UUID, user string) (int, error)

// KeyDeleter removes a tenant's keys from Redis (live counters, claims, rate-limit buckets) on a
// tenant's erasure; nil skips it.
type KeyDeleter func(ctx context.Context, tenant uuid.UUID) (int, error)

// Config shapes the service.
type Config struct {
	Layout schema.Layout
	// Lightweight: the server has DELETE FROM (schema.LightweightDelete); otherwise ALTER … DELETE.
	Lightweight bool
	Barrier     Barrier
	Quarantine  Scrubber
	DeleteKeys  KeyDeleter
	// Poll is how often a mutation's progress and the job queue are looked at (default 500ms).
	Poll time.Duration
	// Stale is how long a running job's heartbeat may be silent before another runner takes it over
	// (default 1 min).
	Stale time.Duration
}

// Service queues and runs erasure jobs.
type Service struct {
	cfg   Config
	ch    driver.Conn
	pg    *pgxpool.Pool
	audit *audit.Log
	log   *slog.Logger
}

// New returns a Service. auditLog may be nil (tests).
func New(cfg Config, ch driver.Conn, pg *pgxpool.Pool, auditLog *audit.Log, log *slog.Logger) *Service {
	if cfg.Poll <= 0 {
		cfg.Poll = 500 * time.Millisecond
	}
	if cfg.Stale <= 0 {
		cfg.Stale = time.Minute
	}
	return &Service{cfg: cfg, ch: ch, pg: pg, audit: auditLog, log: logger.Or(log)}
}

// UserHash is what stays of a user id once its erasure is done: hex SHA-256 of tenant, NUL, user.
func UserHash(tenant uuid.UUID, user string) string {
	h := sha256.New()
	h.Write(tenant[:])
	h.Write([]byte{0})
	h.Write([]byte(user))
	return hex.EncodeToString(h.Sum(nil))
}

// EraseUser queues the erasure of every event of user in tenant.
func (s *Service) EraseUser(ctx context.Context, tenant uuid.UUID, user, actor string) (Job, error) {
	if user == "" || len(user) > 255 {
		return Job{}, ErrBadUserID
	}
	return s.submit(ctx, Job{TenantID: tenant, Kind: KindUser, UserID: user, userHash: UserHash(tenant, user)}, actor)
}

// EraseTenant queues the erasure of all of tenant's events, increments and aggregates. The caller
// has had the request confirmed.
func (s *Service) EraseTenant(ctx context.Context, tenant uuid.UUID, actor string) (Job, error) {
	return s.submit(ctx, Job{TenantID: tenant, Kind: KindTenant}, actor)
}

func (s *Service) submit(ctx context.Context, j Job, actor string) (Job, error) {
	j.ID, j.Status = uuid.New(), StatusQueued
	err := s.pg.QueryRow(ctx, `INSERT INTO erasure_jobs (id, tenant_id, kind, user_id, user_hash, status, actor)
		VALUES ($1, $2, $3, $4, $5, 'queued', $6) RETURNING created_at`,
		j.ID, j.TenantID, j.Kind, j.UserID, j.userHash, actor).Scan(&j.CreatedAt)
	if err != nil {
		return Job{}, fmt.Errorf("queue erasure: %w", err)
	}
	if err := s.record(ctx, j, actor, "erasure.requested", nil); err != nil {
		return Job{}, err
	}
	return j, nil
}

// record audits a job's event. The user is named by its hash: the audit log outlives the erasure.
func (s *Service) record(ctx context.Context, j Job, actor, action string, meta map[string]any) error {
	if s.audit == nil {
		return nil
	}
	if meta == nil {
		meta = map[string]any{}
	}
	meta["job"], meta["kind"] = j.ID.String(), j.Kind
	if j.Kind == KindUser {
		meta["user_hash"] = j.userHash
	}
	return s.audit.Record(ctx, audit.Entry{TenantID: j.TenantID, Actor: actor, Action: action, Target: j.ID.String(), Meta: meta})
}

const jobColumns = "id, tenant_id, kind, user_id, user_hash, status, step, rows_erased, error, created_at, started_at, finished_at"

func scanJob(row pgx.Row) (Job, error) {
	var j Job
	err := row.Scan(&j.ID, &j.TenantID, &j.Kind, &j.UserID, &j.userHash, &j.Status, &j.Step, &j.RowsErased, &j.Error,
		&j.CreatedAt, &j.StartedAt, &j.FinishedAt)
	return j, err
}

// Get returns tenant's job id.
func (s *Service) Get(ctx context.Context, tenant, id uuid.UUID) (Job, error) {
	j, err := scanJob(s.pg.QueryRow(ctx, "SELECT "+jobColumns+" FROM erasure_jobs WHERE id = $1 AND tenant_id = $2", id, tenant))
	if errors.Is(err, pgx.ErrNoRows) {
		return Job{}, ErrNotFound
	}
	if err != nil {
		return Job{}, fmt.Errorf("read erasure job %s: %w", id, err)
	}
	return j, nil
}

// Run takes and runs jobs until ctx ends, looking for new ones every Poll.
func (s *Service) Run(ctx context.Context) {
	for ctx.Err() == nil {
		ran, err := s.RunOne(ctx)
		if err != nil && ctx.Err() == nil {
			s.log.Warn("erasure job failed; it is retried", "err", err)
		}
		if ran && err == nil {
			continue
		}
		select {
		case <-ctx.Done():
		case <-time.After(s.cfg.Poll * 4):
		}
	}
}

// RunOne takes the oldest queued job, or a running one whose runner went silent, and runs it to the
// end. ran is false when there was none.
func (s *Service) RunOne(ctx context.Context) (ran bool, err error) {
	var j Job
	err = pgx.BeginFunc(ctx, s.pg, func(tx pgx.Tx) error {
		var err error
		j, err = scanJob(tx.QueryRow(ctx, "SELECT "+jobColumns+` FROM erasure_jobs
			WHERE status = 'queued' OR (status = 'running' AND heartbeat_at < now() - make_interval(secs => $1))
			ORDER BY created_at LIMIT 1 FOR UPDATE SKIP LOCKED`, s.cfg.Stale.Seconds()))
		if err != nil {
			return err
		}
		_, err = tx.Exec(ctx, `UPDATE erasure_jobs SET status = 'running', started_at = coalesce(started_at, now()),
			heartbeat_at = now() WHERE id = $1`, j.ID)
		return err
	})
	if errors.Is(err, pgx.ErrNoRows) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("take an erasure job: %w", err)
	}
	return true, s.run(ctx, j)
}

// Steps of a job, in order; a job resumed by another runner starts at the step after the last one
// it finished.
const (
	stepCounted = "counted"      // rows_erased holds the rows found before deleting
	stepSpool   = "spool"        // the spool's rows of before the job have shipped
	stepDeleted = "clickhouse"   // the delete ran and finished
	stepScrub   = "quarantine"   // the local spool's quarantine holds none of the rows
	stepOther   = "other-stores" // Postgres and Redis (tenant erasure)
)

var stepOrder = map[string]int{"": 0, stepCounted: 1, stepSpool: 2, stepDeleted: 3, stepScrub: 4, stepOther: 5}

func (s *Service) run(ctx context.Context, j Job) error {
	beat, stop := context.WithCancel(ctx)
	defer stop()
	go s.heartbeat(beat, j.ID)
	err := s.steps(ctx, &j)
	if err != nil {
		// The job stays running: the next heartbeat check hands it to a runner again.
		if _, uerr := s.pg.Exec(context.WithoutCancel(ctx), "UPDATE erasure_jobs SET error = $2, heartbeat_at = now() - make_interval(secs => $3) WHERE id = $1",
			j.ID, excerpt.Short(err.Error()), s.cfg.Stale.Seconds()); uerr != nil {
			s.log.Warn("erasure job state not saved", "job", j.ID, "err", uerr)
		}
		return fmt.Errorf("erasure job %s at step %q: %w", j.ID, j.Step, err)
	}
	return nil
}

func (s *Service) heartbeat(ctx context.Context, id uuid.UUID) {
	t := time.NewTicker(s.cfg.Stale / 4)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			_, _ = s.pg.Exec(ctx, "UPDATE erasure_jobs SET heartbeat_at = now() WHERE id = $1 AND status = 'running'", id)
		}
	}
}

func (s *Service) setStep(ctx context.Context, j *Job, step string) error {
	if _, err := s.pg.Exec(ctx, "UPDATE erasure_jobs SET step = $2, rows_erased = $3, heartbeat_at = now() WHERE id = $1",
		j.ID, step, j.RowsErased); err != nil {
		return fmt.Errorf("save step %s: %w", step, err)
	}
	j.Step = step
	return nil
}

func (s *Service) steps(ctx context.Context, j *Job) error {
	if stepOrder[j.Step] < stepOrder[stepCounted] {
		n, err := s.count(ctx, *j)
		if err != nil {
			return err
		}
		j.RowsErased = n
		if err := s.setStep(ctx, j, stepCounted); err != nil {
			return err
		}
	}
	if stepOrder[j.Step] < stepOrder[stepSpool] {
		if s.cfg.Barrier != nil {
			if err := s.cfg.Barrier(ctx); err != nil {
				return fmt.Errorf("wait for the spool to ship: %w", err)
			}
		}
		if err := s.setStep(ctx, j, stepSpool); err != nil {
			return err
		}
	}
	if stepOrder[j.Step] < stepOrder[stepDeleted] {
		// Rows that shipped from the spool after the count are erased too; count them in.
		if n, err := s.count(ctx, *j); err == nil && n > j.RowsErased {
			j.RowsErased = n
		}
		for _, st := range s.statements(*j) {
			if err := s.delete(ctx, st); err != nil {
				return err
			}
		}
		if n, err := s.count(ctx, *j); err != nil {
			return err
		} else if n != 0 {
			return fmt.Errorf("%d rows still found after the delete", n)
		}
		if err := s.setStep(ctx, j, stepDeleted); err != nil {
			return err
		}
	}
	if stepOrder[j.Step] < stepOrder[stepScrub] {
		// After the delete: what the spool set aside while the job waited is in the quarantine now.
		// A crash between the scrub and saving the step under-counts rows_erased by what it removed.
		if s.cfg.Quarantine != nil {
			n, err := s.cfg.Quarantine(ctx, j.TenantID, j.UserID)
			if err != nil {
				return fmt.Errorf("scrub the quarantine: %w", err)
			}
			j.RowsErased += int64(n)
		}
		if err := s.setStep(ctx, j, stepScrub); err != nil {
			return err
		}
	}
	if stepOrder[j.Step] < stepOrder[stepOther] && j.Kind == KindTenant {
		if err := s.otherStores(ctx, *j); err != nil {
			return err
		}
		if err := s.setStep(ctx, j, stepOther); err != nil {
			return err
		}
	}
	if _, err := s.pg.Exec(ctx, `UPDATE erasure_jobs SET status = 'done', user_id = '', error = '', finished_at = now()
		WHERE id = $1`, j.ID); err != nil {
		return fmt.Errorf("finish: %w", err)
	}
	j.Status, j.UserID = StatusDone, ""
	return s.record(ctx, *j, "erasure", "erasure.done", map[string]any{"rows_erased": j.RowsErased})
}

// statement is one delete: the table (its local name on a cluster) and the predicate with its args.
type statement struct {
	table string
	where string
	args  []any
}

func (s *Service) statements(j Job) []statement {
	if j.Kind == KindUser {
		return []statement{{"events", "tenant_id = ? AND user_id = ?", []any{j.TenantID, j.UserID}}}
	}
	out := []statement{}
	for _, t := range []string{"events", "usage_increments", "daily_usage"} {
		out = append(out, statement{t, "tenant_id = ?", []any{j.TenantID}})
	}
	return out
}

// SQL renders a statement for the server: a lightweight DELETE where it has one, else an ALTER …
// DELETE mutation; on a cluster on every shard's local table.
func (s *Service) SQL(st statement) string {
	l := s.cfg.Layout
	if s.cfg.Lightweight && st.table != "daily_usage" { // lightweight deletes need a plain MergeTree's _row_exists
		return "DELETE FROM " + l.Local(st.table) + l.OnCluster() + " WHERE " + st.where
	}
	return "ALTER TABLE " + l.Local(st.table) + l.OnCluster() + " DELETE WHERE " + st.where
}

// delete runs one statement and waits until it is applied. A mutation (18.16) is asynchronous: the
// table's unfinished mutations are polled in system.mutations until none is left.
func (s *Service) delete(ctx context.Context, st statement) error {
	q := s.SQL(st)
	ectx := ctx
	if s.cfg.Lightweight {
		ectx = clickhouse.Context(ctx, clickhouse.WithSettings(clickhouse.Settings{"mutations_sync": 2}))
	}
	if err := s.ch.Exec(ectx, q, st.args...); err != nil {
		return fmt.Errorf("delete from %s: %w", st.table, err)
	}
	// system.mutations has only these columns on 18.16 (no failure reason): a mutation that keeps
	// failing shows as one that never finishes, and the job's step fails when ctx ends. On a cluster
	// the mutation runs on every replica of every shard, each at its own pace: every server of the
	// cluster is asked (remote() per address of system.clusters), so the job is not done while one
	// replica still serves the rows.
	sources := []string{"system.mutations"}
	if l := s.cfg.Layout; l.Clustered() {
		var err error
		if sources, err = s.replicaMutations(ctx, l.Cluster); err != nil {
			return err
		}
	}
	for {
		var pending uint64
		for _, src := range sources {
			var n uint64
			err := s.ch.QueryRow(ctx, "SELECT count() FROM "+src+" WHERE database = ? AND table = ? AND is_done = 0",
				s.cfg.Layout.DB, s.cfg.Layout.LocalName(st.table)).Scan(&n)
			if err != nil {
				return fmt.Errorf("poll mutations of %s: %w", st.table, err)
			}
			pending += n
		}
		if pending == 0 {
			return nil
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(s.cfg.Poll):
		}
	}
}

// replicaMutations names system.mutations of every server of cluster, as remote() table functions.
func (s *Service) replicaMutations(ctx context.Context, cluster string) ([]string, error) {
	rows, err := s.ch.Query(ctx, "SELECT host_address, port FROM system.clusters WHERE cluster = ?", cluster)
	if err != nil {
		return nil, fmt.Errorf("list the servers of cluster %s: %w", cluster, err)
	}
	defer rows.Close()
	var out []string
	for rows.Next() {
		var host string
		var port uint16
		if err := rows.Scan(&host, &port); err != nil {
			return nil, fmt.Errorf("list the servers of cluster %s: %w", cluster, err)
		}
		addr := net.JoinHostPort(host, strconv.Itoa(int(port)))
		out = append(out, "remote('"+strings.ReplaceAll(addr, "'", "")+"', system, mutations)")
	}
	if err := rows.Err(); err != nil {
		return nil, err
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("cluster %s has no servers in system.clusters", cluster)
	}
	return out, nil
}

// count is how many rows the job still has to erase (events; for a tenant, events and increments).
func (s *Service) count(ctx context.Context, j Job) (int64, error) {
	var total int64
	for _, st := range s.statements(j) {
		if st.table == "daily_usage" {
			continue // aggregate rows are not "rows erased"
		}
		var n uint64
		if err := s.ch.QueryRow(ctx, "SELECT count() FROM "+s.cfg.Layout.Table(st.table)+" WHERE "+st.where, st.args...).Scan(&n); err != nil {
			return 0, fmt.Errorf("count %s rows to erase: %w", st.table, err)
		}
		total += int64(n)
	}
	return total, nil
}

// otherStores erases a tenant's rows outside ClickHouse: billed usage, levels and rollup runs in
// Postgres, and (DeleteKeys) its Redis keys.
func (s *Service) otherStores(ctx context.Context, j Job) error {
	for _, q := range []string{
		"DELETE FROM analytics_daily_usage WHERE tenant_id = $1",
		"DELETE FROM usage_levels WHERE tenant_id = $1",
		"DELETE FROM rollup_runs WHERE tenant_id = $1",
	} {
		if _, err := s.pg.Exec(ctx, q, j.TenantID); err != nil {
			return fmt.Errorf("erase postgres rows: %w", err)
		}
	}
	if s.cfg.DeleteKeys != nil {
		if _, err := s.cfg.DeleteKeys(ctx, j.TenantID); err != nil {
			return fmt.Errorf("erase redis keys: %w", err)
		}
	}
	return nil
}
