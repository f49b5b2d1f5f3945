package rollup

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/analyticsd/analyticsd/internal/clock"
	"github.com/analyticsd/analyticsd/internal/logger"
	"github.com/analyticsd/analyticsd/schema"
)

// ParseClock reads a UTC time of day "HH:MM" (e.g. ROLLUP_AT=00:10) as the offset from midnight.
func ParseClock(s string) (time.Duration, error) {
	t, err := time.Parse("15:04", s)
	if err != nil {
		return 0, fmt.Errorf("time of day %q: want HH:MM (UTC), e.g. 00:10", s)
	}
	return time.Duration(t.Hour())*time.Hour + time.Duration(t.Minute())*time.Minute, nil
}

// Status is a background job's state, shown in /readiness details.
type Status struct {
	// OK is false while the last attempt failed (it is being retried).
	OK      bool       `json:"ok"`
	LastRun *time.Time `json:"last_run,omitempty"`
	// LastStatus: "never", "ok", "skipped" (another replica holds the job's lock), "idle" (nothing for
	// this job to do on this server, e.g. the sweeper where tables have a TTL) or "failed".
	LastStatus string     `json:"last_status"`
	LastError  string     `json:"last_error,omitempty"`
	Failures   int        `json:"consecutive_failures"`
	NextRun    *time.Time `json:"next_run,omitempty"`
}

// daily runs job once a day at a UTC time of day, and once at start-up for the latest slot (a replica
// started after 00:10 still does that day's work; the job itself skips what is already done). A failed
// attempt is retried with exponential backoff until it succeeds or the next slot is due.
type daily struct {
	name               string
	at                 time.Duration // offset from UTC midnight
	retryMin, retryMax time.Duration
	now                func() time.Time
	log                *slog.Logger
	job                func(ctx context.Context, slot time.Time) (outcome string, err error)

	mu     sync.Mutex
	status Status
	cancel context.CancelFunc
	done   chan struct{}
}

func newDaily(name string, at, retryMin, retryMax time.Duration, now func() time.Time, log *slog.Logger,
	job func(context.Context, time.Time) (string, error)) *daily {
	return &daily{name: name, at: at, retryMin: retryMin, retryMax: retryMax, now: now, log: log, job: job,
		status: Status{OK: true, LastStatus: "never"}}
}

// prevSlot is the latest scheduled time at or before t.
func (d *daily) prevSlot(t time.Time) time.Time {
	s := Day(t).Add(d.at)
	if s.After(t) {
		s = s.Add(-24 * time.Hour)
	}
	return s
}

// runSlot runs the job for slot and records the outcome.
func (d *daily) runSlot(ctx context.Context, slot time.Time) (string, error) {
	started := d.now().UTC()
	outcome, err := d.job(ctx, slot)
	d.mu.Lock()
	defer d.mu.Unlock()
	d.status.LastRun = &started
	if err != nil {
		d.status.OK, d.status.LastStatus, d.status.LastError = false, "failed", err.Error()
		d.status.Failures++
		return "failed", err
	}
	d.status.OK, d.status.LastStatus, d.status.LastError, d.status.Failures = true, outcome, "", 0
	return outcome, nil
}

func (d *daily) Status() Status {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.status
}

func (d *daily) setNext(t time.Time) {
	t = t.UTC()
	d.mu.Lock()
	d.status.NextRun = &t
	d.mu.Unlock()
}

func (d *daily) start(ctx context.Context) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.done != nil {
		return
	}
	ctx, d.cancel = context.WithCancel(ctx)
	d.done = make(chan struct{})
	go d.loop(ctx)
}

// stop cancels the loop (and a run in progress) and waits for it to end.
func (d *daily) stop() {
	d.mu.Lock()
	cancel, done := d.cancel, d.done
	d.mu.Unlock()
	if cancel == nil {
		return
	}
	cancel()
	<-done
}

func (d *daily) loop(ctx context.Context) {
	defer close(d.done)
	slot, runAt := d.prevSlot(d.now()), d.now()
	backoff := d.retryMin
	for {
		d.setNext(runAt)
		if !d.sleepUntil(ctx, runAt) {
			return
		}
		outcome, err := d.runSlot(ctx, slot)
		if ctx.Err() != nil {
			return
		}
		next := slot.Add(24 * time.Hour)
		if err != nil {
			retry := d.now().Add(backoff)
			d.log.Warn(d.name+" failed; retrying", "slot", slot, "retry_at", retry, "err", err)
			backoff = min(backoff*2, d.retryMax)
			if retry.Before(next) {
				runAt = retry
				continue
			}
		}
		if outcome == "skipped" {
			// Another replica held the lock. Look again later: if that replica died mid-run, this one
			// finishes the slot; otherwise the job finds the work done.
			if again := d.now().Add(d.retryMax); again.Before(next) {
				runAt = again
				continue
			}
		}
		backoff = d.retryMin
		// After a long pause (a suspended host), skip to the latest slot rather than replaying each.
		if p := d.prevSlot(d.now()); p.After(next) {
			next = p
		}
		slot, runAt = next, next
	}
}

// sleepUntil waits until the clock reads t, re-reading it at least every minute so a clock that jumps
// (or a test's clock) is followed. It returns false when ctx ends first.
func (d *daily) sleepUntil(ctx context.Context, t time.Time) bool {
	for {
		wait := t.Sub(d.now())
		if wait <= 0 {
			return ctx.Err() == nil
		}
		timer := time.NewTimer(min(wait, time.Minute))
		select {
		case <-ctx.Done():
			timer.Stop()
			return false
		case <-timer.C:
		}
	}
}

// ScheduleConfig shapes the daily rollup.
type ScheduleConfig struct {
	// At is the UTC time of day of the run, "HH:MM" (ROLLUP_AT; default "00:10").
	At string
	// LookbackDays is how many dates each run reconciles: yesterday and the days before it, so late
	// events are picked up (ROLLUP_LOOKBACK_DAYS; default 3: yesterday, D-2 and D-3).
	LookbackDays int
	// RetryMin and RetryMax bound the backoff after a failed run: RetryMin, doubling, at most RetryMax
	// (defaults 1 min and 30 min).
	RetryMin, RetryMax time.Duration
	// RunTimeout bounds one scheduled run, all its dates together (default 30 min).
	RunTimeout time.Duration
	// DriftEvery is how often, between daily runs, billed dates are compared with ClickHouse and the
	// ones late events changed are reconciled again (ROLLUP_DRIFT_INTERVAL; default 5 min; negative:
	// only at the daily run).
	DriftEvery time.Duration
	// Now is the clock (default time.Now).
	Now func() time.Time
}

// DefaultScheduleConfig returns the documented defaults; NewScheduler gives them to the fields left
// zero.
func DefaultScheduleConfig() ScheduleConfig {
	return ScheduleConfig{
		At:           "00:10",
		LookbackDays: 3,
		RetryMin:     time.Minute,
		RetryMax:     30 * time.Minute,
		RunTimeout:   30 * time.Minute,
		DriftEvery:   5 * time.Minute,
	}
}

// Scheduler runs the daily rollup. Any number of replicas may run one: a run takes a Postgres advisory
// lock first (an instance that does not get it skips), and skips each date a replica has already
// reconciled for the same slot.
type Scheduler struct {
	r   *Reconciler
	cfg ScheduleConfig
	d   *daily
	log *slog.Logger

	driftCancel context.CancelFunc
	driftDone   chan struct{}
}

// NewScheduler returns a Scheduler running r; it does nothing until Start.
func NewScheduler(r *Reconciler, cfg ScheduleConfig, log *slog.Logger) (*Scheduler, error) {
	d := DefaultScheduleConfig()
	if cfg.At == "" {
		cfg.At = d.At
	}
	at, err := ParseClock(cfg.At)
	if err != nil {
		return nil, fmt.Errorf("rollup schedule: %w", err)
	}
	if cfg.LookbackDays == 0 {
		cfg.LookbackDays = d.LookbackDays
	}
	if cfg.LookbackDays < 1 || cfg.LookbackDays > 90 {
		return nil, fmt.Errorf("rollup schedule: look-back of %d days: want 1 to 90", cfg.LookbackDays)
	}
	if cfg.RetryMin <= 0 {
		cfg.RetryMin = d.RetryMin
	}
	if cfg.RetryMax < cfg.RetryMin {
		cfg.RetryMax = max(d.RetryMax, cfg.RetryMin)
	}
	if cfg.RunTimeout <= 0 {
		cfg.RunTimeout = d.RunTimeout
	}
	if cfg.DriftEvery == 0 {
		cfg.DriftEvery = d.DriftEvery
	}
	if cfg.Now == nil {
		cfg.Now = clock.Now
	}
	log = logger.Or(log)
	s := &Scheduler{r: r, cfg: cfg, log: log}
	s.d = newDaily("rollup", at, cfg.RetryMin, cfg.RetryMax, cfg.Now, log, s.runSlot)
	return s, nil
}

// Start runs the schedule in the background until Stop or ctx ends. The latest slot runs at once.
// Between slots, every DriftEvery, billed dates that late events changed are reconciled again.
func (s *Scheduler) Start(ctx context.Context) {
	s.d.start(ctx)
	if s.cfg.DriftEvery <= 0 || s.r.retentionDays <= 0 {
		return
	}
	dctx, cancel := context.WithCancel(ctx)
	s.driftCancel, s.driftDone = cancel, make(chan struct{})
	go func() {
		defer close(s.driftDone)
		t := time.NewTicker(s.cfg.DriftEvery)
		defer t.Stop()
		for {
			select {
			case <-dctx.Done():
				return
			case <-t.C:
			}
			if n, err := s.RerunDrifted(dctx); err != nil {
				s.log.Warn("rollup: drift check failed; it runs again", "err", err)
			} else if n > 0 {
				s.log.Info("rollup: billed dates changed by late events reconciled again", "dates", n)
			}
		}
	}()
}

// Stop ends the schedule, cancelling a run in progress, and waits for it.
func (s *Scheduler) Stop() {
	s.d.stop()
	if s.driftCancel != nil {
		s.driftCancel()
		<-s.driftDone
	}
}

// RerunDrifted reconciles again every billed date up to yesterday that ClickHouse's counts no
// longer match (late events), under the schedule's lock, and returns how many it ran. Another
// replica holding the lock makes it a no-op.
func (s *Scheduler) RerunDrifted(ctx context.Context) (int, error) {
	ctx, cancel := context.WithTimeout(ctx, s.cfg.RunTimeout)
	defer cancel()
	unlock, ok, err := tryLock(ctx, s.r.pg, "analyticsd.rollup.scheduler."+s.r.db)
	if err != nil || !ok {
		return 0, err
	}
	defer unlock()
	today := Day(s.cfg.Now())
	return s.rerunDrifted(ctx, today.AddDate(0, 0, -s.r.retentionDays), today.AddDate(0, 0, -1), nil, "drift")
}

// rerunDrifted reconciles again the billed dates in [first, last] that changed, newest first, at
// most maxDriftedPerSlot of them. With a slot (the nightly pass) a date already reconciled for it is
// skipped.
func (s *Scheduler) rerunDrifted(ctx context.Context, first, last time.Time, slot *time.Time, trigger string) (int, error) {
	if last.Before(first) {
		return 0, nil
	}
	drifted, err := s.r.Drifted(ctx, first, last)
	if err != nil {
		return 0, fmt.Errorf("rollup: %w", err)
	}
	if len(drifted) > maxDriftedPerSlot {
		s.log.Warn("rollup: more billed dates changed than one run re-runs; the rest wait for the next",
			"changed", len(drifted), "rerun", maxDriftedPerSlot)
		drifted = drifted[len(drifted)-maxDriftedPerSlot:]
	}
	if len(drifted) > 0 {
		s.log.Info("rollup: late data changed billed dates; reconciling them again", "dates", len(drifted),
			"oldest", drifted[0].Format(time.DateOnly))
	}
	var errs []error
	for _, day := range drifted {
		var err error
		if slot != nil {
			err = s.runDate(ctx, day, *slot)
		} else {
			_, err = s.r.run(ctx, day, AllTenants(), trigger, nil)
		}
		if err != nil {
			errs = append(errs, err)
		}
	}
	return len(drifted), errors.Join(errs...)
}

// Status reports the last run and the next one.
func (s *Scheduler) Status() Status { return s.d.Status() }

// RunOnce runs the latest slot (the most recent scheduled time at or before now) immediately, exactly
// as the schedule would, and records it in Status.
func (s *Scheduler) RunOnce(ctx context.Context) error {
	_, err := s.d.runSlot(ctx, s.d.prevSlot(s.cfg.Now()))
	return err
}

// Dates returns the dates slot reconciles, newest first: the day before slot's day and LookbackDays-1
// more.
func (s *Scheduler) Dates(slot time.Time) []time.Time {
	day := Day(slot)
	out := make([]time.Time, s.cfg.LookbackDays)
	for i := range out {
		out[i] = day.AddDate(0, 0, -(i + 1))
	}
	return out
}

func (s *Scheduler) runSlot(ctx context.Context, slot time.Time) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, s.cfg.RunTimeout)
	defer cancel()
	unlock, ok, err := tryLock(ctx, s.r.pg, "analyticsd.rollup.scheduler."+s.r.db)
	if err != nil {
		return "", fmt.Errorf("rollup schedule: %w", err)
	}
	if !ok {
		s.log.Info("rollup: another replica holds the schedule lock; skipping", "slot", slot)
		return "skipped", nil
	}
	defer unlock()
	// A run left 'running' by a process that died is marked as such; it never counted as reconciled.
	if _, err := s.r.pg.Exec(ctx, "UPDATE rollup_runs SET status = 'failed', finished_at = now(), "+
		"error = 'abandoned: the process running it stopped' WHERE status = 'running' AND started_at < now() - interval '6 hours'"); err != nil {
		s.log.Warn("rollup: mark abandoned runs", "err", err)
	}
	var errs []error
	dates := s.Dates(slot)
	for _, day := range dates {
		if err := s.runDate(ctx, day, slot); err != nil {
			errs = append(errs, err)
		}
	}
	// Older dates are billed already; re-run the ones late data has changed since. Ingest accepts
	// timestamps up to RETENTION_DAYS old, so that is how far back a billed day can change.
	if s.r.retentionDays > 0 {
		first := Day(slot).AddDate(0, 0, -s.r.retentionDays)
		last := dates[len(dates)-1].AddDate(0, 0, -1)
		if _, err := s.rerunDrifted(ctx, first, last, &slot, "scheduler"); err != nil {
			errs = append(errs, err)
		}
	}
	if err := errors.Join(errs...); err != nil {
		return "", err
	}
	return "ok", nil
}

// maxDriftedPerSlot bounds how many changed billed dates one slot reconciles again (newest first), so a
// flood of late data cannot stretch a run past its timeout.
const maxDriftedPerSlot = 31

// runDate reconciles day for every tenant unless a replica already did for this slot.
func (s *Scheduler) runDate(ctx context.Context, day, slot time.Time) error {
	date := day.Format(time.DateOnly)
	var done bool
	if err := s.r.pg.QueryRow(ctx, "SELECT EXISTS (SELECT 1 FROM rollup_runs WHERE date = $1::date AND scheduled_for = $2 "+
		"AND tenant_id IS NULL AND status = 'ok')", date, slot).Scan(&done); err != nil {
		return fmt.Errorf("rollup %s: read rollup_runs: %w", date, err)
	}
	if done {
		return nil
	}
	res, err := s.r.run(ctx, day, AllTenants(), "scheduler", &slot)
	if err != nil {
		return err
	}
	// The 15-minute slots local days are read from: counted in where a view write missed rows, as the
	// run above repaired daily_usage (never lowered: an erasure leaves them above the raw rows). A
	// failure here leaves reads in a zone short, not billing: it is logged, and the next slot tries again.
	if res.RawChecked { // the day is inside the raw window: its raw rows are whole
		if err := schema.FillQuarterHoursDay(ctx, s.r.ch, schema.Layout{DB: s.r.db}, day, s.r.SettleDelay); err != nil {
			s.log.Warn("rollup: usage_quarter_hour not checked", "date", date, "err", err)
		}
	}
	return nil
}
