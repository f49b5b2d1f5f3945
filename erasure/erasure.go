// Package erasure owns data-subject and offboarding erasure: deleting every stored event of one user
// of one tenant (GDPR/CCPA), or all of one tenant's events, increments and aggregates. A request is a
// job in Postgres (erasure_jobs) with an id and a status (queued, running, done, failed); any
// instance's runner takes it, a job whose runner died is taken over, and every step is safe to run
// again, so a restart mid-way only repeats work. A job that keeps failing is retried MaxAttempts
// times with a growing backoff and then marked failed with its last error; the same request can be
// sent again (the new job finishes what the failed one left half done).
//
// What a user's erasure removes: the user's rows of the events table (user_id, props, ip, request_id
// with them), on every shard (Layout), and the user's rows in every instance's spool quarantine. What
// it keeps: aggregates without personal data — daily_usage, billed usage in Postgres, the live
// counters in Redis — with their counts: the rows it deletes are recorded in the erasure ledger
// (ledger.go) first, and the rollup and the quota reconciler add the ledger to their raw counts. Redis
// holds no user ids: event-id claims and Idempotency-Key records expire with the dedup window. No
// statement it sends to ClickHouse holds the user id (ZooKeeper's DDL queue and query_log outlive the
// job): rows are selected by SHA256(user_id) and deleted by their event ids.
//
// It does not own the spools: before deleting in ClickHouse a job waits until every live instance
// (erasure_instances, heartbeat within Stale) has acknowledged it — its spool has shipped what it held
// when it acknowledged (Barrier) and its quarantine holds none of the rows (Scrubber). Events the
// user sends after the job finished are stored as usual: nothing remembers the erased rows.
package erasure

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"
	"unicode/utf8"

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
	// ErrBadUserID: the user id is empty, longer than 255 bytes or not UTF-8: no event can hold it.
	ErrBadUserID = errors.New("user id must be 1 to 255 bytes of UTF-8 text (what an event's user_id can hold)")
	// ErrOlderInstances: the user id holds NUL bytes, and an instance of a release that cannot erase
	// such an id is live (0015_erasure_instances_exact_ids.sql).
	ErrOlderInstances = errors.New("an instance of an older release is running, which cannot erase a user id with NUL bytes; erase it once every instance runs this release")
)

// Job is one erasure request and how far it got.
type Job struct {
	ID         uuid.UUID  `json:"id"`
	TenantID   uuid.UUID  `json:"tenant_id"`
	Kind       string     `json:"kind"`
	UserID     string     `json:"user_id,omitempty"` // blanked once done or failed
	exact      bool       // UserID came from user_bytes: it holds NUL bytes
	Status     string     `json:"status"`
	Step       string     `json:"step,omitempty"`
	RowsErased int64      `json:"rows_erased"`
	Attempts   int        `json:"attempts"`
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
	// Instance names this process among the instances that acknowledge jobs (default host-pid-random).
	Instance string
	// Poll is how often a mutation's progress, acknowledgements and the job queue are looked at
	// (default 500ms).
	Poll time.Duration
	// Stale is how long a running job's heartbeat, or an instance's, may be silent before the job is
	// taken over, or the instance is no longer waited for (default 1 min).
	Stale time.Duration
	// MaxAttempts bounds how often a job is tried before it is failed (default 8). Backoff is the wait
	// after the first failed attempt, doubling after each further one up to 10 min (default 30 s):
	// with the defaults a job fails after about 35 min of attempts plus their own durations.
	MaxAttempts int
	Backoff     time.Duration
	// AttemptTimeout bounds one attempt (default 1 h): a mutation that never finishes (on 18.16 a
	// failing mutation looks like that: system.mutations has no failure reason) fails the attempt.
	AttemptTimeout time.Duration
	// AckWait is how long a job waits for every live instance's acknowledgement in one attempt
	// (default 15 min: the spool barrier itself waits up to 10 min for ClickHouse).
	AckWait time.Duration
	// RoundRows is how many rows one delete of a user's erasure takes (default 4,500): each round is
	// one ALTER … DELETE naming its rows' ids, ~180 KB of SQL, under max_query_size (256 KiB), which
	// the servers of a cluster apply again when they run the statement from the DDL queue. On 18.16
	// each round's mutation rewrites the parts holding its rows (~7 s among 10M events here).
	RoundRows int
}

// Service queues and runs erasure jobs.
type Service struct {
	cfg   Config
	ch    driver.Conn
	pg    *pgxpool.Pool
	audit *audit.Log
	log   *slog.Logger
	ackMu sync.Mutex // one barrier and scrub at a time: the runner's and the acker's
}

// New returns a Service. auditLog may be nil (tests).
func New(cfg Config, ch driver.Conn, pg *pgxpool.Pool, auditLog *audit.Log, log *slog.Logger) *Service {
	if cfg.Poll <= 0 {
		cfg.Poll = 500 * time.Millisecond
	}
	if cfg.Stale <= 0 {
		cfg.Stale = time.Minute
	}
	if cfg.MaxAttempts <= 0 {
		cfg.MaxAttempts = 8
	}
	if cfg.Backoff <= 0 {
		cfg.Backoff = 30 * time.Second
	}
	if cfg.AttemptTimeout <= 0 {
		cfg.AttemptTimeout = time.Hour
	}
	if cfg.AckWait <= 0 {
		cfg.AckWait = 15 * time.Minute
	}
	if cfg.RoundRows <= 0 {
		cfg.RoundRows = 4500
	}
	if cfg.Instance == "" {
		host, _ := os.Hostname()
		cfg.Instance = fmt.Sprintf("%s-%d-%s", host, os.Getpid(), uuid.NewString()[:8])
	}
	return &Service{cfg: cfg, ch: ch, pg: pg, audit: auditLog, log: logger.Or(log)}
}

// UserDigest is hex SHA-256 of the user id alone: what ClickHouse compares SHA256(user_id) with, so
// that no statement sent to ClickHouse carries the id itself.
func UserDigest(user string) string {
	h := sha256.Sum256([]byte(user))
	return hex.EncodeToString(h[:])
}

// EraseUser queues the erasure of every event of user in tenant.
func (s *Service) EraseUser(ctx context.Context, tenant uuid.UUID, user, actor string) (Job, error) {
	if user == "" || len(user) > 255 || !utf8.ValidString(user) {
		return Job{}, ErrBadUserID
	}
	if strings.Contains(user, "\x00") {
		var older []string
		rows, err := s.pg.Query(ctx, `SELECT id FROM erasure_instances
			WHERE NOT exact_user_ids AND heartbeat_at > now() - make_interval(secs => $1) ORDER BY id`, s.cfg.Stale.Seconds())
		if err != nil {
			return Job{}, fmt.Errorf("read the instance register: %w", err)
		}
		if older, err = pgx.CollectRows(rows, pgx.RowTo[string]); err != nil {
			return Job{}, fmt.Errorf("read the instance register: %w", err)
		}
		if len(older) > 0 {
			return Job{}, fmt.Errorf("%w (%s)", ErrOlderInstances, strings.Join(older, ", "))
		}
	}
	return s.submit(ctx, Job{TenantID: tenant, Kind: KindUser, UserID: user, userHash: audit.UserHash(tenant, user)}, actor)
}

// EraseTenant queues the erasure of all of tenant's events, increments and aggregates. The caller
// has had the request confirmed.
func (s *Service) EraseTenant(ctx context.Context, tenant uuid.UUID, actor string) (Job, error) {
	return s.submit(ctx, Job{TenantID: tenant, Kind: KindTenant}, actor)
}

func (s *Service) submit(ctx context.Context, j Job, actor string) (Job, error) {
	j.ID, j.Status = uuid.New(), StatusQueued
	// An id with NUL bytes is kept as it is in user_bytes (user_id cannot hold NUL: 0012). Only such
	// ids: for every other one the row is what releases before 0012 read and can finish (0014
	// refuses to end a job that holds bytes), so a rolling upgrade changes nothing for them.
	var exact []byte
	if j.Kind == KindUser && strings.Contains(j.UserID, "\x00") {
		exact = []byte(j.UserID)
	}
	err := s.pg.QueryRow(ctx, `INSERT INTO erasure_jobs (id, tenant_id, kind, user_id, user_bytes, user_hash, status, actor)
		VALUES ($1, $2, $3, $4, $5, $6, 'queued', $7) RETURNING created_at`,
		j.ID, j.TenantID, j.Kind, shownUserID(j.UserID), exact, j.userHash, actor).Scan(&j.CreatedAt)
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

const jobColumns = "id, tenant_id, kind, user_id, user_bytes, user_hash, status, step, rows_erased, attempts, error, created_at, started_at, finished_at"

func scanJob(row pgx.Row) (Job, error) {
	var j Job
	var exact []byte
	err := row.Scan(&j.ID, &j.TenantID, &j.Kind, &j.UserID, &exact, &j.userHash, &j.Status, &j.Step, &j.RowsErased, &j.Attempts, &j.Error,
		&j.CreatedAt, &j.StartedAt, &j.FinishedAt)
	j.UserID, j.exact = exactUserID(j.UserID, exact), exact != nil
	return j, err
}

// shownUserID is what user_id (text, which cannot hold NUL) keeps of user: the id itself, or for
// an id with NUL bytes its quoted form padded past 255 bytes. A release before 0012 reads only
// user_id, and no event's user_id is that long, so such a release running the job erases nothing
// (never the events of another id, as "user\uFFFDnul" for "user\x00nul" would be) and cannot
// finish it (0014): this release does.
func shownUserID(user string) string {
	if !strings.Contains(user, "\x00") {
		return user
	}
	return fmt.Sprintf("%-256s", strconv.Quote(user))
}

// exactUserID is a job's user id: user_bytes when set, else user_id (a job an older release queued).
func exactUserID(text string, exact []byte) string {
	if exact != nil {
		return string(exact)
	}
	return text
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

// Run is Attend and RunJobs on one context: it takes and runs jobs until ctx ends, while this instance
// is registered and acknowledges every open job; on return the instance has left the register.
func (s *Service) Run(ctx context.Context) {
	attended := make(chan struct{})
	go func() { defer close(attended); s.Attend(ctx) }()
	s.RunJobs(ctx)
	<-attended
}

// RunJobs takes and runs jobs until ctx ends, looking for new ones every Poll × 4.
func (s *Service) RunJobs(ctx context.Context) {
	for ctx.Err() == nil {
		ran, err := s.RunOne(ctx)
		if err != nil && ctx.Err() == nil {
			s.log.Warn("erasure job failed", "err", err)
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

// Attend keeps this instance registered (a heartbeat every Stale/4, on its own: an acknowledgement
// waiting on this instance's spool — up to 10 minutes while ClickHouse is down for it — must not let
// the heartbeat go stale, or other instances' jobs would stop waiting for it and delete before its
// rows ship) and acknowledges every open job, also while a job of its own waits for another instance.
// When ctx ends it leaves the register, so no job waits for it. Serve ends it only after the HTTP
// server has drained and the spool has been flushed: a job queued just before a shutdown must still
// wait for what this instance acknowledged.
func (s *Service) Attend(ctx context.Context) {
	beaten := make(chan struct{})
	go func() {
		defer close(beaten)
		for {
			if err := s.beat(ctx); err != nil && ctx.Err() == nil {
				s.log.Warn("erasure: instance heartbeat not renewed; retried", "err", err)
			}
			select {
			case <-ctx.Done():
				return
			case <-time.After(s.cfg.Stale / 4):
			}
		}
	}()
	for ctx.Err() == nil {
		if err := s.Acknowledge(ctx); err != nil && ctx.Err() == nil {
			s.log.Warn("erasure jobs not acknowledged; retried", "err", err)
		}
		select {
		case <-ctx.Done():
		case <-time.After(min(s.cfg.Poll*4, s.cfg.Stale/4)):
		}
	}
	<-beaten
	lctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
	defer cancel()
	if err := s.Leave(lctx); err != nil {
		s.log.Warn("erasure: instance not deregistered; jobs wait for it until its heartbeat is stale", "err", err)
	}
}

// RunOne takes the oldest queued job, or a running one whose runner went silent (or whose backoff
// after a failed attempt is over), and runs it to the end. ran is false when there was none.
//
// RunOne alone does not register the instance (Run does): a process that only runs jobs, such as
// `analyticsd erase --run`, holds no spool for other jobs to wait for.
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
// it finished. "counted" and "quarantine" are steps of jobs queued by earlier versions.
const (
	stepAcked   = "spool"        // every live instance's spool shipped and quarantine scrubbed
	stepDeleted = "clickhouse"   // the delete ran and finished
	stepOther   = "other-stores" // Postgres and Redis (tenant erasure)
)

var stepOrder = map[string]int{"": 0, "counted": 1, stepAcked: 2, stepDeleted: 3, "quarantine": 4, stepOther: 5}

// run runs one attempt of j. A failed attempt leaves the job running with its error and attempt
// count, taken again after the backoff, until the MaxAttempts-th fails it for good.
func (s *Service) run(ctx context.Context, j Job) error {
	beat, stop := context.WithCancel(ctx)
	defer stop()
	go s.heartbeat(beat, j.ID)
	actx, cancel := context.WithTimeout(ctx, s.cfg.AttemptTimeout)
	err := s.steps(actx, &j)
	cancel()
	if err == nil {
		return nil
	}
	err = fmt.Errorf("erasure job %s at step %q: %w", j.ID, j.Step, err)
	if ctx.Err() != nil {
		// This process is stopping, not the job failing: another runner takes it once the heartbeat
		// is stale, and the attempt is not counted.
		return err
	}
	wctx := context.WithoutCancel(ctx)
	msg := excerpt.Of(err.Error(), 500)
	if errors.Is(err, errImportRunning) {
		// Not a failure: the job is taken again after Backoff, its attempts untouched, however long
		// the import runs.
		s.retryLater(wctx, j, msg, s.cfg.Backoff)
		return fmt.Errorf("%w; taken again in %s", err, s.cfg.Backoff)
	}
	j.Attempts++
	if j.Attempts >= s.cfg.MaxAttempts {
		if _, uerr := s.pg.Exec(wctx, `UPDATE erasure_jobs SET status = 'failed', error = $2, attempts = $3, user_id = '',
			user_bytes = NULL, finished_at = now() WHERE id = $1`, j.ID, msg, j.Attempts); uerr != nil {
			s.log.Warn("erasure job state not saved", "job", j.ID, "err", uerr)
			return err
		}
		s.log.Error("erasure job failed for good", "job", j.ID, "attempts", j.Attempts, "err", err)
		if aerr := s.record(wctx, j, "erasure", "erasure.failed", map[string]any{"attempts": j.Attempts, "error": msg}); aerr != nil {
			s.log.Warn("erasure failure not audited", "job", j.ID, "err", aerr)
		}
		return err
	}
	wait := s.cfg.Backoff << min(j.Attempts-1, 16)
	wait = min(wait, max(10*time.Minute, s.cfg.Backoff))
	s.retryLater(wctx, j, msg, wait)
	return fmt.Errorf("%w (attempt %d of %d; retried in %s)", err, j.Attempts, s.cfg.MaxAttempts, wait)
}

// retryLater saves j's error and attempts and leaves it to be taken again after wait: its heartbeat
// is set to go stale then.
func (s *Service) retryLater(ctx context.Context, j Job, msg string, wait time.Duration) {
	if _, err := s.pg.Exec(ctx, `UPDATE erasure_jobs SET error = $2, attempts = $3,
		heartbeat_at = now() - make_interval(secs => $4) + make_interval(secs => $5) WHERE id = $1`,
		j.ID, msg, j.Attempts, s.cfg.Stale.Seconds(), wait.Seconds()); err != nil {
		s.log.Warn("erasure job state not saved", "job", j.ID, "err", err)
	}
}

func (s *Service) heartbeat(ctx context.Context, id uuid.UUID) {
	t := time.NewTicker(s.cfg.Stale / 4)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			_, _ = s.pg.Exec(ctx, "UPDATE erasure_jobs SET heartbeat_at = greatest(heartbeat_at, now()) WHERE id = $1 AND status = 'running'", id)
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
	if stepOrder[j.Step] < stepOrder[stepAcked] {
		scrubbed, err := s.waitAcks(ctx, *j)
		if err != nil {
			return err
		}
		j.RowsErased = scrubbed
		if err := s.setStep(ctx, j, stepAcked); err != nil {
			return err
		}
	}
	// A job for an id with NUL bytes runs its delete whatever step it shows: an instance of an
	// older release (started after the job was queued: a rollback) may have saved "clickhouse"
	// after deleting nothing, the id it reads being user_id's padded form (found by review). The
	// delete is idempotent.
	if stepOrder[j.Step] < stepOrder[stepDeleted] || j.exact {
		// Only a delete waits for imports: a job past it has no work left in ClickHouse, and asking
		// ClickHouse anyway failed such a job for good while ClickHouse was down (found by review).
		if err := s.noImportRunning(ctx); err != nil {
			return err
		}
		if j.Kind == KindUser {
			if err := s.eraseUserRows(ctx, j); err != nil {
				return err
			}
		} else if err := s.eraseTenantRows(ctx, j); err != nil {
			return err
		}
		if err := s.setStep(ctx, j, stepDeleted); err != nil {
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
	if _, err := s.pg.Exec(ctx, `UPDATE erasure_jobs SET status = 'done', user_id = '', user_bytes = NULL, error = '', finished_at = now()
		WHERE id = $1`, j.ID); err != nil {
		return fmt.Errorf("finish: %w", err)
	}
	j.Status, j.UserID = StatusDone, ""
	return s.record(ctx, *j, "erasure", "erasure.done", map[string]any{"rows_erased": j.RowsErased})
}

// ImportLock is the Postgres advisory lock (hashtext of it) an import into ClickHouse database db
// holds for its whole run (package importer). An erasure does not delete while it is held.
func ImportLock(db string) string { return "analyticsd.import." + db }

// ImportQueryIDPrefix begins the ClickHouse query id of every insert of an import into db (package
// importer), so a resumed import waits for (and stops) its own database's inserts only, and an
// erasure does not delete while one runs (an import killed mid-insert releases its lock at once, and
// its insert may still commit). A database name is a plain identifier (letters, digits, '_'), so the
// '-' after it ends it: no database's prefix starts another's.
func ImportQueryIDPrefix(db string) string { return "analyticsd-import-" + db + "-" }

// errImportRunning: an import into the job's database is running, so the delete waits.
var errImportRunning = errors.New("an import into this ClickHouse database is running (or its last insert is); the delete waits for it to end")

// noImportRunning returns errImportRunning while an import into the job's database holds its lock,
// or an insert of one is still running on ClickHouse. An import checks for open erasures of its
// tenants only when it starts (after taking the lock), and rows it inserted after this job's delete
// would escape it: an erased user's events came back (found by review). Together the two checks
// leave no gap: the job is open before it looks, and an import that takes the lock later sees the
// job and refuses its tenant.
func (s *Service) noImportRunning(ctx context.Context) error {
	var free bool
	// A transaction-level shared lock in a statement of its own: taken and released at once, held by
	// nobody, and refused only while an import holds it exclusively.
	if err := s.pg.QueryRow(ctx, "SELECT pg_try_advisory_xact_lock_shared(hashtext($1))", ImportLock(s.cfg.Layout.DB)).Scan(&free); err != nil {
		return fmt.Errorf("look for a running import: %w", err)
	}
	if !free {
		return errImportRunning
	}
	// A killed import's lock is gone, but its last insert may still be running and commit after the
	// delete (found by review). On a cluster, an insert runs on the server it was sent to and, as the
	// shards' parts of it, on others: each server is asked, for initial queries and their parts.
	conns := []driver.Conn{s.ch}
	if s.cfg.Layout.Shards != nil {
		live, err := s.everyServer(ctx, "events")
		if err != nil {
			return err
		}
		defer schema.CloseAll(live)
		for _, l := range live {
			conns = append(conns, l.Conn)
		}
	}
	prefix := ImportQueryIDPrefix(s.cfg.Layout.DB)
	for _, c := range conns {
		var n uint64
		if err := c.QueryRow(ctx, "SELECT count() FROM system.processes WHERE startsWith(query_id, ?) OR startsWith(initial_query_id, ?)",
			prefix, prefix).Scan(&n); err != nil {
			return fmt.Errorf("look for an import's insert still running: %w", err)
		}
		if n > 0 {
			return errImportRunning
		}
	}
	return nil
}

// eraseTenantRows deletes all of the tenant's rows of every table. The aggregates go too, so nothing
// needs recording; rows_erased adds the raw rows found before the delete to those scrubbed.
func (s *Service) eraseTenantRows(ctx context.Context, j *Job) error {
	n, err := s.countTenant(ctx, j.TenantID)
	if err != nil {
		return err
	}
	for _, st := range s.statements(*j) {
		if err := s.delete(ctx, st); err != nil {
			return err
		}
	}
	if left, err := s.countTenant(ctx, j.TenantID); err != nil {
		return err
	} else if left != 0 {
		return fmt.Errorf("%d rows still found after the delete", left)
	}
	scrubbed, err := s.scrubbed(ctx, j.ID)
	if err != nil {
		return err
	}
	j.RowsErased = scrubbed + n
	return nil
}

// statement is one delete: the table (its local name on a cluster) and the predicate with its args.
type statement struct {
	table string
	where string
	args  []any
}

// tenantTables are the ClickHouse tables holding a tenant's rows, all of which a tenant's erasure
// deletes, in this order. aggregate marks Summing/Aggregating tables: servers with lightweight deletes
// still get a mutation for them (DELETE FROM needs a plain MergeTree's _row_exists), and their rows are
// not raw rows erased. A new table that holds tenant rows gets a line here.
var tenantTables = []struct {
	name      string
	aggregate bool
}{
	{"events", false},
	{"usage_increments", false},
	{"daily_usage", true},
	{"usage_quarter_hour", true},
}

// statements are a tenant erasure's deletes, one per table of tenantTables.
func (s *Service) statements(j Job) []statement {
	var out []statement
	for _, t := range tenantTables {
		out = append(out, statement{t.name, "tenant_id = ?", []any{j.TenantID}})
	}
	return out
}

// SQL renders a statement for the server: a lightweight DELETE where it has one, else an ALTER …
// DELETE mutation; on a cluster on every shard's local table.
func (s *Service) SQL(st statement) string {
	l := s.cfg.Layout
	if s.lightweight(st) {
		return "DELETE FROM " + l.Local(st.table) + l.OnCluster() + " WHERE " + st.where
	}
	return "ALTER TABLE " + l.Local(st.table) + l.OnCluster() + " " + mutation(st)
}

// lightweight reports whether st goes as a lightweight DELETE rather than a mutation.
func (s *Service) lightweight(st statement) bool { return s.cfg.Lightweight && !isAggregate(st.table) }

// mutation is st's ALTER command.
func mutation(st statement) string { return "DELETE WHERE " + st.where }

func isAggregate(table string) bool {
	for _, t := range tenantTables {
		if t.name == table {
			return t.aggregate
		}
	}
	return false
}

// delete runs one statement and waits until it is applied.
func (s *Service) delete(ctx context.Context, st statement) error {
	servers := []schema.Live{{Addr: "the server", Conn: s.ch}}
	var marks map[string]string
	if l := s.cfg.Layout; l.Clustered() {
		live, err := s.everyServer(ctx, st.table)
		if err != nil {
			return err
		}
		defer schema.CloseAll(live)
		servers = live
		if !s.cfg.Lightweight {
			// A replica shows no unfinished mutation before it has even fetched this one from the
			// shard's log (one just back, or behind): the delete is confirmed on a server only once
			// it lists a mutation of the table newer than the newest it had before.
			if marks, err = newestMutations(ctx, servers, l.DB, l.LocalName(st.table)); err != nil {
				return err
			}
		}
	}
	if err := s.issue(ctx, st); err != nil {
		return err
	}
	return s.settle(ctx, st.table, servers, marks)
}

// everyServer connects to every server of the cluster; one that cannot be reached fails the attempt
// (the delete could not be confirmed there), which is tried again later.
func (s *Service) everyServer(ctx context.Context, table string) ([]schema.Live, error) {
	l := s.cfg.Layout
	if l.Shards == nil {
		return nil, fmt.Errorf("delete from %s: a cluster layout without Shards cannot reach each server", table)
	}
	live, down, err := l.Shards.Servers(ctx, s.ch)
	if err != nil {
		return nil, fmt.Errorf("delete from %s: %w", table, err)
	}
	if len(down) > 0 {
		schema.CloseAll(live)
		return nil, fmt.Errorf("delete from %s: it could not be confirmed on servers that do not answer: %s", table, schema.Describe(down))
	}
	return live, nil
}

// newestMutations is each server's newest mutation id of db.table ("" for none). Replicated tables'
// ids are the shard log's zero-padded sequence numbers, so they compare as strings.
func newestMutations(ctx context.Context, servers []schema.Live, db, table string) (map[string]string, error) {
	out := make(map[string]string, len(servers))
	for _, sv := range servers {
		var id string
		if err := sv.QueryRow(ctx, "SELECT max(mutation_id) FROM system.mutations WHERE database = ? AND table = ?", db, table).Scan(&id); err != nil {
			return nil, fmt.Errorf("read the mutations of %s on %s: %w", table, sv.Addr, err)
		}
		out[sv.Addr] = id
	}
	return out, nil
}

// issue sends a delete. A lightweight one returns once applied (mutations_sync); a mutation (18.16)
// returns at once and is waited for by settle.
func (s *Service) issue(ctx context.Context, st statement) error {
	q := s.SQL(st)
	ectx := ctx
	if s.cfg.Lightweight {
		ectx = clickhouse.Context(ctx, clickhouse.WithSettings(clickhouse.Settings{"mutations_sync": 2}))
	}
	if n := querySize(q); n > 0 {
		return fmt.Errorf("delete from %s: %d bytes of SQL exceed what every server parses (RoundRows too large)", st.table, len(q))
	}
	var err error
	if s.lightweight(st) {
		err = s.ch.Exec(ectx, q, st.args...)
	} else {
		// The same statement as q; through Layout.AlterLocal so that servers whose distributed-DDL
		// worker races on a replicated ALTER get it once per shard instead of ON CLUSTER.
		_, err = s.cfg.Layout.AlterLocal(ectx, s.ch, st.table, mutation(st), st.args...)
	}
	if err != nil {
		return fmt.Errorf("delete from %s: %w", st.table, err)
	}
	return nil
}

// settle waits until table has no unfinished mutation on any of servers — and, with marks, until
// each server lists a mutation newer than its mark — polling system.mutations.
func (s *Service) settle(ctx context.Context, table string, servers []schema.Live, marks map[string]string) error {
	// system.mutations has only these columns on 18.16 (no failure reason): a mutation that keeps
	// failing shows as one that never finishes, and the attempt fails at AttemptTimeout. On a cluster
	// the mutation runs on every replica of every shard, each at its own pace: every server is asked,
	// over a connection of its own with the DSN's credentials (Layout.Shards), so the job is not done
	// while one replica still serves the rows.
	for {
		var pending uint64
		for _, sv := range servers {
			var n uint64
			var newest string
			err := sv.QueryRow(ctx, "SELECT countIf(is_done = 0), max(mutation_id) FROM system.mutations WHERE database = ? AND table = ?",
				s.cfg.Layout.DB, s.cfg.Layout.LocalName(table)).Scan(&n, &newest)
			if err != nil {
				return fmt.Errorf("poll mutations of %s on %s: %w", table, sv.Addr, err)
			}
			if mark, ok := marks[sv.Addr]; ok && newest <= mark {
				n++ // not fetched there yet
			}
			pending += n
		}
		if pending == 0 {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("wait for the delete from %s: %w", table, ctx.Err())
		case <-time.After(s.cfg.Poll):
		}
	}
}

// countTenant is how many raw rows (tenantTables that are not aggregates) the tenant still has.
func (s *Service) countTenant(ctx context.Context, tenant uuid.UUID) (int64, error) {
	var total int64
	for _, t := range tenantTables {
		if t.aggregate {
			continue
		}
		var n uint64
		if err := s.ch.QueryRow(ctx, "SELECT count() FROM "+s.cfg.Layout.Table(t.name)+" WHERE tenant_id = ?", tenant).Scan(&n); err != nil {
			return 0, fmt.Errorf("count %s rows to erase: %w", t.name, err)
		}
		total += int64(n)
	}
	return total, nil
}

// otherStores erases a tenant's rows outside ClickHouse: billed usage, levels, rollup runs, the
// erasure ledger's counts and the alerts fired in Postgres, and (DeleteKeys) its Redis keys.
// The Postgres rows go in one transaction: a level set while they go (its value and its owed alert
// written together, quota.SetLevel) is then either erased whole or kept whole. One by one, a level
// set between the deletes of usage_levels and quota_alerts kept its value and lost its alert (found
// by review).
func (s *Service) otherStores(ctx context.Context, j Job) error {
	err := pgx.BeginFunc(ctx, s.pg, func(tx pgx.Tx) error {
		for _, q := range []string{
			"DELETE FROM analytics_daily_usage WHERE tenant_id = $1",
			"DELETE FROM quota_alerts WHERE tenant_id = $1",
			"DELETE FROM usage_levels WHERE tenant_id = $1",
			"DELETE FROM rollup_runs WHERE tenant_id = $1",
			"DELETE FROM erased_usage WHERE tenant_id = $1",
		} {
			if _, err := tx.Exec(ctx, q, j.TenantID); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("erase postgres rows: %w", err)
	}
	if s.cfg.DeleteKeys != nil {
		if _, err := s.cfg.DeleteKeys(ctx, j.TenantID); err != nil {
			return fmt.Errorf("erase redis keys: %w", err)
		}
	}
	return nil
}
