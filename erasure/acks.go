package erasure

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
)

// Every instance that ingests holds events in its own spool (acknowledged to clients, not yet in
// ClickHouse) and in its own quarantine (refused by ClickHouse). A job must not delete before each of
// them shipped what it held, or those rows land after the delete and survive it. So each instance
// registers in erasure_instances (a heartbeat every Stale/4 from Attend) and acknowledges each open job
// in erasure_acks once its Barrier passed (every row it acknowledged before that is in ClickHouse or
// in its quarantine) and its Scrubber removed the job's rows from its quarantine. A job deletes only
// when every live instance — heartbeat younger than Stale — has acknowledged it; an instance that
// starts meanwhile is live and waited for too. A dead instance is not waited for: its spool ships
// when it restarts or when an operator runs `analyticsd spool drain`, after the job; the README says
// to run the erasure again then (a re-run is harmless).

// beat registers this instance, or renews its heartbeat.
func (s *Service) beat(ctx context.Context) error {
	if _, err := s.pg.Exec(ctx, `INSERT INTO erasure_instances (id, exact_user_ids) VALUES ($1, true)
		ON CONFLICT (id) DO UPDATE SET heartbeat_at = now(), exact_user_ids = true`, s.cfg.Instance); err != nil {
		return fmt.Errorf("register erasure instance %s: %w", s.cfg.Instance, err)
	}
	return nil
}

// ForgetAfter is how long an instance that never left the register (killed, OOM, its machine lost)
// stays in it after its last heartbeat. It is waited for only within Stale; the row is kept a while
// longer so that an operator reading the register can see which instance stopped without leaving.
const ForgetAfter = 24 * time.Hour

// forget removes instances whose heartbeat stopped more than ForgetAfter ago: each crash leaves a
// row (instance ids are per process), which would otherwise stay forever.
func (s *Service) forget(ctx context.Context) error {
	if _, err := s.pg.Exec(ctx, "DELETE FROM erasure_instances WHERE heartbeat_at < now() - make_interval(secs => $1)",
		ForgetAfter.Seconds()); err != nil {
		return fmt.Errorf("forget silent erasure instances: %w", err)
	}
	return nil
}

// Leave removes this instance from the register (shutdown): jobs stop waiting for it at once rather
// than after Stale.
func (s *Service) Leave(ctx context.Context) error {
	_, err := s.pg.Exec(ctx, "DELETE FROM erasure_instances WHERE id = $1", s.cfg.Instance)
	return err
}

// Acknowledge renews this instance's heartbeat, forgets instances silent for ForgetAfter, and
// acknowledges every open job it has not yet: one pass. Attend calls it every Poll × 4 (and renews
// the heartbeat on its own meanwhile).
func (s *Service) Acknowledge(ctx context.Context) error {
	if err := s.beat(ctx); err != nil {
		return err
	}
	if err := s.forget(ctx); err != nil {
		return err
	}
	rows, err := s.pg.Query(ctx, `SELECT id, tenant_id, kind, user_id, user_bytes FROM erasure_jobs j
		WHERE status IN ('queued', 'running') AND step IN ('', 'counted')
		AND NOT EXISTS (SELECT 1 FROM erasure_acks a WHERE a.job_id = j.id AND a.instance = $1)
		ORDER BY created_at`, s.cfg.Instance)
	if err != nil {
		return fmt.Errorf("list erasure jobs to acknowledge: %w", err)
	}
	jobs, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (Job, error) {
		var j Job
		var exact []byte
		err := r.Scan(&j.ID, &j.TenantID, &j.Kind, &j.UserID, &exact)
		j.UserID = exactUserID(j.UserID, exact)
		return j, err
	})
	if err != nil {
		return fmt.Errorf("list erasure jobs to acknowledge: %w", err)
	}
	var errs []error
	for _, j := range jobs {
		if err := s.ack(ctx, j); err != nil {
			errs = append(errs, fmt.Errorf("acknowledge erasure job %s: %w", j.ID, err))
		}
	}
	return errors.Join(errs...)
}

// ack runs this instance's barrier and quarantine scrub for j and records the acknowledgement, unless
// it is recorded already.
func (s *Service) ack(ctx context.Context, j Job) error {
	s.ackMu.Lock()
	defer s.ackMu.Unlock()
	var done bool
	if err := s.pg.QueryRow(ctx, "SELECT EXISTS (SELECT 1 FROM erasure_acks WHERE job_id = $1 AND instance = $2)",
		j.ID, s.cfg.Instance).Scan(&done); err != nil {
		return fmt.Errorf("read acknowledgement: %w", err)
	}
	if done {
		return nil
	}
	if s.cfg.Barrier != nil {
		if err := s.cfg.Barrier(ctx); err != nil {
			return fmt.Errorf("wait for the spool to ship: %w", err)
		}
	}
	// After the barrier: what the spool set aside while it shipped is in the quarantine now.
	// A crash between the scrub and the insert under-counts rows_erased by what it removed.
	scrubbed := 0
	if s.cfg.Quarantine != nil {
		user := ""
		if j.Kind == KindUser {
			user = j.UserID
		}
		n, err := s.cfg.Quarantine(ctx, j.TenantID, user)
		if err != nil {
			return fmt.Errorf("scrub the quarantine: %w", err)
		}
		scrubbed = n
	}
	if _, err := s.pg.Exec(ctx, `INSERT INTO erasure_acks (job_id, instance, scrubbed) VALUES ($1, $2, $3)
		ON CONFLICT (job_id, instance) DO NOTHING`, j.ID, s.cfg.Instance, scrubbed); err != nil {
		return fmt.Errorf("record acknowledgement: %w", err)
	}
	return nil
}

// waitAcks acknowledges j for this instance, then waits (at most AckWait) until every live instance
// has, and returns the rows their scrubs removed. For an id with NUL bytes (j.exact), a live
// instance of a release that reads ids as text counts as not acknowledged, whatever it recorded: it
// scrubbed its quarantine by the padded user_id, which matches nothing (found by review: an older
// pod restarted mid-rollout, after the request passed EraseUser's check, let the job end with the
// user's quarantined rows on its disk). The attempt then fails after AckWait and is retried.
func (s *Service) waitAcks(ctx context.Context, j Job) (int64, error) {
	if err := s.ack(ctx, j); err != nil {
		return 0, err
	}
	deadline := time.Now().Add(s.cfg.AckWait)
	for {
		var missing []string
		rows, err := s.pg.Query(ctx, `SELECT i.id FROM erasure_instances i
			WHERE i.heartbeat_at > now() - make_interval(secs => $2)
			AND (($3 AND NOT i.exact_user_ids)
				OR NOT EXISTS (SELECT 1 FROM erasure_acks a WHERE a.job_id = $1 AND a.instance = i.id)) ORDER BY i.id`,
			j.ID, s.cfg.Stale.Seconds(), j.exact)
		if err == nil {
			missing, err = pgx.CollectRows(rows, pgx.RowTo[string])
		}
		if err != nil {
			return 0, fmt.Errorf("read acknowledgements: %w", err)
		}
		if len(missing) == 0 {
			return s.scrubbed(ctx, j.ID)
		}
		if time.Now().After(deadline) {
			return 0, fmt.Errorf("instances %s have not shipped their spools within %s (is ClickHouse up for them?)",
				strings.Join(missing, ", "), s.cfg.AckWait)
		}
		select {
		case <-ctx.Done():
			return 0, fmt.Errorf("wait for instances %s to ship their spools: %w", strings.Join(missing, ", "), ctx.Err())
		case <-time.After(s.cfg.Poll):
		}
	}
}

// scrubbed is the rows every instance's scrub removed from its quarantine for job id.
func (s *Service) scrubbed(ctx context.Context, id uuid.UUID) (int64, error) {
	var n int64
	if err := s.pg.QueryRow(ctx, "SELECT coalesce(sum(scrubbed), 0)::bigint FROM erasure_acks WHERE job_id = $1", id).Scan(&n); err != nil {
		return 0, fmt.Errorf("read acknowledgements: %w", err)
	}
	return n, nil
}
