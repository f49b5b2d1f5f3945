package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"strings"
	"sync"
	"time"

	"github.com/ClickHouse/clickhouse-go/v2/lib/driver"
	"github.com/gofiber/fiber/v2"
	"github.com/gofiber/fiber/v2/middleware/cors"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"

	"github.com/analyticsd/analyticsd/api"
	"github.com/analyticsd/analyticsd/audit"
	"github.com/analyticsd/analyticsd/auth"
	"github.com/analyticsd/analyticsd/dashboards"
	"github.com/analyticsd/analyticsd/dedup"
	"github.com/analyticsd/analyticsd/erasure"
	"github.com/analyticsd/analyticsd/ingest"
	"github.com/analyticsd/analyticsd/internal/clock"
	"github.com/analyticsd/analyticsd/query"
	"github.com/analyticsd/analyticsd/quota"
	"github.com/analyticsd/analyticsd/ratelimit"
	"github.com/analyticsd/analyticsd/retention"
	"github.com/analyticsd/analyticsd/rollup"
	"github.com/analyticsd/analyticsd/schema"
	"github.com/analyticsd/analyticsd/segment"
	"github.com/analyticsd/analyticsd/tenant"
)

// serve runs the HTTP API until ctx is cancelled (SIGINT/SIGTERM), then shuts down in reverse order:
// stop accepting requests, finish in-flight ones, then close ClickHouse, Postgres and Redis.
func serve(ctx context.Context, cfg Config, log *slog.Logger, args []string, _ io.Writer) error {
	if err := flags("serve", args, func(*flag.FlagSet) {}); err != nil {
		return err
	}
	// Whatever is opened or started is pushed at once with the step that closes or stops it. The
	// steps run last pushed first, so serve opens things in the reverse of the order they must close
	// in: the stores first, the HTTP server last. Shutdown runs them one timed step at a time; a
	// start-up error returns here and runs those pushed so far.
	var open unwind
	defer func() {
		if len(open) == 0 {
			return // shut down already
		}
		ctx, cancel := context.WithTimeout(context.Background(), cfg.ShutdownTimeout)
		defer cancel()
		open.run(ctx, func(_ string, fn func() error) { _ = fn() })
	}()
	rdb, err := openRedis(cfg)
	if err != nil {
		return err
	}
	open.push("redis", func(context.Context) error { return rdb.Close() })
	pg, err := openPostgres(ctx, cfg)
	if err != nil {
		return err
	}
	open.push("postgres", func(context.Context) error { pg.Close(); return nil })
	ch, err := openClickHouse(cfg)
	if err != nil {
		return err
	}
	open.push("clickhouse", func(context.Context) error { return ch.Close() })
	// Exports stream on connections fiber no longer tracks (api.Stream): those running may finish
	// before ClickHouse closes under them — but only after the ingest flush, so a slow export client
	// cannot spend the shutdown budget the flush needs. (Pushed here, run after everything pushed
	// below; the service is made further down.)
	var querySvc *query.Service
	open.push("exports", func(ctx context.Context) error {
		if querySvc == nil {
			return nil
		}
		return querySvc.Drain(ctx)
	})

	chVersion, err := checkClickHouse(ctx, &cfg, ch, pg, log)
	var late *lateCheck
	if errors.Is(err, errUnchecked) {
		log.Warn("clickhouse unreachable at start-up; serving, and spooling until it can be checked", "err", err)
		checkCfg := cfg
		late = &lateCheck{log: log.With("component", "clickhouse-check"), every: 5 * time.Second,
			run: func(ctx context.Context) error { _, err := checkClickHouse(ctx, &checkCfg, ch, pg, log); return err }}
		cfg.Writer.Gate = late.Check
	} else if err != nil {
		return err
	}

	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))

	app := api.NewApp(api.Config{BodyLimit: int(cfg.Ingest.Limits.MaxBodyBytes), ReadTimeout: cfg.ReadTimeout,
		WriteTimeout: 5 * time.Minute, IdleTimeout: 2 * time.Minute}, log)
	ingestMetrics := ingest.NewMetrics(reg, cfg.LabelCap)
	counters := quota.NewCounters(rdb, "")
	var claims ingest.Claims
	var idempotency []fiber.Handler
	var evictions *watch // with deduplication on
	if cfg.DedupWindow > 0 {
		store := dedup.NewStore(rdb, "", cfg.DedupWindow, counting(counters))
		var _ ingest.Claims = store
		claims = store
		idempotency = append(idempotency, store.Idempotency(log.With("component", "idempotency")))
		// This instance's liveness mark: a retry of a request it was running when it died is run by
		// another instance within seconds (not 409 for PendingTTL). Kept until the HTTP server has
		// drained (the unwind runs in reverse), not only until the shutdown signal.
		aliveCtx, stopAlive := context.WithCancel(context.WithoutCancel(ctx))
		alive := make(chan struct{})
		go func() { store.KeepAlive(aliveCtx); close(alive) }()
		open.push("idempotency liveness", func(context.Context) error { stopAlive(); <-alive; return nil })
		// Exactly-once needs a Redis that never evicts claims; it may be reconfigured at run time.
		evictions = &watch{name: "redis eviction policy", log: log.With("component", "dedup"),
			check: store.EvictionRisk}
	}
	cfg.Writer.Owner = "analyticsd serve on " + cfg.Addr
	cfg.Writer.Floor = retention.NewFloor(pg, cfg.ClickHouseDB).Get
	writer, err := ingest.NewWriter(cfg.Writer, ch, cfg.ClickHouseDB, claims, ingestMetrics, log.With("component", "ingest"))
	if err != nil {
		return err
	}
	tenants := tenant.NewStore(pg)
	auditLog := audit.New(pg)
	cfg.Quota.AnalyticsDisabled = !cfg.Ingest.Enabled
	quotaSvc := quota.NewService(cfg.Quota, counters, quota.NewLimits(cfg.QuotaDefaults, tenants, 10*time.Second),
		ch, cfg.ClickHouseDB, pg, auditLog, reg, log.With("component", "quota"))
	// Alert webhooks go out from Postgres' outbox; at shutdown the loop stops after the closer below
	// has recorded the queued alerts, and what is not delivered by then waits for any instance.
	hctx, stopHooks := context.WithCancel(context.WithoutCancel(ctx))
	hooked := make(chan struct{})
	go func() { defer close(hooked); quotaSvc.RunWebhooks(hctx) }()
	open.push("alert webhooks", func(context.Context) error { stopHooks(); <-hooked; return nil })
	open.push("quota alerts recorded", func(ctx context.Context) error { quotaSvc.Close(ctx); return nil })
	var _ ingest.Counter = quotaSvc
	ingestSvc := ingest.NewService(cfg.Ingest, writer, quotaSvc, ingestMetrics, log.With("component", "ingest"))
	open.push("live counters", func(context.Context) error { ingestSvc.Close(); return nil })
	var _ quota.Recorder = ingestSvc
	quotaSvc.SetRecorder(ingestSvc)
	// The writer ships once the live counter feed it gives counts back to is wired, and is pushed
	// after that feed so that its flush runs first: shipping may find a row counted live that is a
	// duplicate after all, and the feed must still be there to take its count back.
	writer.Start()
	// Erasure: this instance's presence (heartbeat, acknowledgements of open jobs) is pushed before
	// the flush, so it ends only after the HTTP server drained and the spool was flushed; the job
	// runner stops at the signal (below). A server unreachable at start-up has no known version:
	// erasure uses the mutation every version has (serve must start while ClickHouse is down, and
	// ingest into the spool).
	eraseCfg := erasure.Config{Layout: cfg.Layout(), Lightweight: schema.LightweightDelete(chVersion), DeleteKeys: erasure.RedisKeys(rdb, "")}
	if writer.Durable() {
		eraseCfg.Barrier = erasure.SpoolBarrier(cfg.Writer.Dir, 200*time.Millisecond, 10*time.Minute)
		eraseCfg.Quarantine = writer.ScrubQuarantine
	}
	eraser := erasure.New(eraseCfg, ch, pg, auditLog, log.With("component", "erasure"))
	actx, stopAttending := context.WithCancel(context.WithoutCancel(ctx))
	attended := make(chan struct{})
	go func() { defer close(attended); eraser.Attend(actx) }()
	open.push("erasure presence", func(context.Context) error { stopAttending(); <-attended; return nil })
	open.push("ingest flush", writer.Close)
	// Alerts are recorded off the request path (quota.alertQueue); those found by requests are
	// recorded before the last flush, so that their events still reach the spool. For 5 s at most,
	// out of the flush's budget: one left over is caught up by the next reconciliation of any
	// instance.
	open.push("quota alerts", func(ctx context.Context) error {
		ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		defer cancel()
		quotaSvc.WaitAlerts(ctx)
		return nil
	})
	authn := auth.NewAuthenticator(auth.NewKeys(pg), tenants, cfg.JWT)
	authn.Proxies = cfg.TrustedProxies
	authn.Log = log.With("component", "auth")
	authn.Refusals = cfg.Refusals
	authn.Refusals.Limited = prometheus.NewCounter(prometheus.CounterOpts{Name: "sbh_auth_refusals_limited_total",
		Help: "Requests answered 429 because their address had too many unknown or refused credentials looked up (AUTH_REFUSALS_*)."})
	reg.MustRegister(authn.Refusals.Limited)
	limiter := ratelimit.New(cfg.RateLimit, rdb, "")
	limiter.OnLimited = func(p api.Principal) {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if err := ingestSvc.Emit(ctx, p.TenantID, p.Slug, "apikey.rate_limited", map[string]any{"actor": p.Actor}); err != nil {
			log.Warn("rate-limited event not stored", "tenant", p.Slug, "err", err)
		}
	}

	ops := api.Ops{
		Version:  version,
		Gatherer: reg,
		Checks: []api.Check{
			{Name: "clickhouse", Ping: ch.Ping},
			{Name: "postgres", Ping: pg.Ping},
			{Name: "redis", Ping: func(ctx context.Context) error { return rdb.Ping(ctx).Err() }},
		},
	}
	rollupLog := log.With("component", "rollup")
	reconciler := rollup.NewReconciler(ch, cfg.ClickHouseDB, pg, auditLog, reg, rollupLog, cfg.RetentionDays, nil)
	if late != nil {
		reconciler.Gate = late.Check // POST /rollup too, not only the schedule started below
	}
	scheduler, err := rollup.NewScheduler(reconciler, cfg.Rollup, rollupLog)
	if err != nil {
		return err
	}
	sweeper := rollup.NewSweeper(ch, cfg.Layout(), pg, auditLog, reg, log.With("component", "retention"), cfg.RetentionDays, nil)
	watches := []*watch{{name: "this instance's clock", check: clockCheck(reg, redisTime(rdb)), log: log.With("component", "clock")}}
	if evictions != nil {
		watches = append(watches, evictions)
	}
	for _, w := range watches {
		w.once(ctx)
	}
	ops.Details = func(context.Context) map[string]any {
		st := writer.Stats()
		d := map[string]any{"ingest": st, "rollup": scheduler.Status(), "retention": sweeper.Status()}
		// Warnings, not failures: the instance ingests and ships.
		var warnings []string
		if msg := quarantineWarning(st); msg != "" {
			warnings = append(warnings, msg)
		}
		if msg := damagedWarning(st); msg != "" {
			warnings = append(warnings, msg)
		}
		if late != nil {
			if err := late.Check(context.Background()); err != nil {
				warnings = append(warnings, "nothing is written to clickhouse until its start-up checks pass: "+err.Error())
			}
		}
		for _, w := range watches {
			if msg := w.Warning(); msg != "" {
				warnings = append(warnings, msg)
			}
		}
		if len(warnings) > 0 {
			d["warnings"] = warnings
		}
		return d
	}
	store := query.NewStore(ch, cfg.ClickHouseDB, pg, cfg.QueryTimeout)
	store.SetRetentionDays(cfg.RetentionDays)
	querySvc = query.NewService(cfg.Query, store, auditLog, reg, log.With("component", "query"))
	querySvc.SetZones(tenants)
	if len(cfg.CORSOrigins) > 0 {
		// /v1: analytics.js posts the Segment endpoints from web pages (docs/segment.md).
		app.Use([]string{"/api", "/v1"}, cors.New(cors.Config{
			AllowOrigins:  strings.Join(cfg.CORSOrigins, ","),
			AllowMethods:  "GET,POST,OPTIONS",
			AllowHeaders:  "Authorization,X-Tenant-Slug,Content-Type,Content-Encoding",
			ExposeHeaders: "Retry-After,X-RateLimit-Limit,X-RateLimit-Remaining,X-RateLimit-Reset,X-Export-Row-Limit,X-Export-Truncated,X-Export-Next-Cursor,Link,X-Event-Names-Truncated,Content-Disposition,X-Analytics-Degraded",
			MaxAge:        600,
		}))
	}
	mount(app, ops, authn, limiter, ingestSvc, querySvc, quotaSvc, reconciler, eraser, idempotency...)

	ln, oln, err := listen(cfg)
	if err != nil {
		return err
	}

	// Nothing fails from here on. The background work starts first and the listeners last, so that
	// shutdown stops taking requests before anything they need goes.
	reconciled := make(chan struct{})
	rctx, stopReconciling := context.WithCancel(ctx)
	defer stopReconciling()
	go func() { defer close(reconciled); quotaSvc.RunReconciler(rctx, cfg.Quota.ReconcileEvery) }()
	open.push("quota reconciliation", func(context.Context) error { stopReconciling(); <-reconciled; return nil })
	stopWaiting := whenChecked(ctx, late, func() { scheduler.Start(ctx); sweeper.Start(ctx) })
	ectx, stopErasing := context.WithCancel(ctx)
	erased := make(chan struct{})
	go func() { defer close(erased); eraser.RunJobs(ectx) }()
	open.push("erasure jobs", func(context.Context) error { stopErasing(); <-erased; return nil })
	open.push("rollup and retention jobs", func(context.Context) error { stopWaiting(); scheduler.Stop(); sweeper.Stop(); return nil })
	// API keys' last use: kept in memory per request, written once a minute and at shutdown.
	uctx, stopUsage := context.WithCancel(context.Background())
	usageDone := make(chan struct{})
	go func() { defer close(usageDone); authn.RecordUsage(uctx, time.Minute, log.With("component", "auth")) }()
	open.push("api keys' last use", func(context.Context) error { stopUsage(); <-usageDone; return nil })
	wctx, stopWatching := context.WithCancel(ctx)
	watched := make(chan struct{})
	go func() { defer close(watched); runWatches(wctx, 30*time.Second, watches...) }()
	open.push("clock and redis watch", func(context.Context) error { stopWatching(); <-watched; return nil })
	// The operator listener: /metrics names every tenant and its event names, so it is not on the
	// API's port; loopback unless ANALYTICS_METRICS_ADDR says otherwise.
	if oln != nil {
		opsSrv := &http.Server{Handler: ops.Private(), ReadHeaderTimeout: 10 * time.Second}
		go opsSrv.Serve(oln)
		open.push("operator listener", opsSrv.Shutdown)
		log.Info("operator listener: /metrics, /readiness", "addr", oln.Addr().String())
	}
	log.Info("serving", "addr", ln.Addr().String(), "version", version, "clickhouse_db", cfg.ClickHouseDB)
	served := make(chan error, 1)
	go func() { served <- app.Listener(ln) }()
	open.push("http", app.ShutdownWithContext)

	select {
	case err = <-served:
		// The listener failed on its own; still close everything below.
	case <-ctx.Done():
	}
	log.Info("shutting down", "timeout", cfg.ShutdownTimeout)
	sctx, cancel := context.WithTimeout(context.Background(), cfg.ShutdownTimeout)
	defer cancel()
	open.run(sctx, func(name string, fn func() error) {
		start := time.Now()
		if e := fn(); e != nil {
			log.Error("shutdown step failed", "step", name, "err", e)
			err = errors.Join(err, e)
		}
		log.Info("shutdown step done", "step", name, "took", time.Since(start))
	})
	return err
}

// unwind is what serve has opened or started, each with the step that closes or stops it.
type unwind []unwindStep

type unwindStep struct {
	name string
	fn   func(context.Context) error
}

// push adds the step closing what was just opened: it will run before every step pushed earlier.
func (u *unwind) push(name string, fn func(context.Context) error) {
	*u = append(*u, unwindStep{name, fn})
}

// run runs every step once, last pushed first, each through do (which times and logs it, or not),
// and forgets them.
func (u *unwind) run(ctx context.Context, do func(name string, fn func() error)) {
	steps := *u
	*u = nil
	for i := len(steps) - 1; i >= 0; i-- {
		do(steps[i].name, func() error { return steps[i].fn(ctx) })
	}
}

// counting is how dedup's claims count the rows they prove new: in quota's live counters, with
// quota's counting step, in the same Redis script as the claim.
func counting(c *quota.Counters) *dedup.Counting {
	return &dedup.Counting{Keys: c, Lua: quota.CountLua, TTL: quota.CounterTTL}
}

// checkClickHouse refuses a ClickHouse server analyticsd would corrupt data on — one not in UTC, or
// whose tables expire rows after another window than RETENTION_DAYS (migrate applies it) — and sets
// the retention every package uses to the window in force. A server unreachable at start-up is not
// a reason to stay down (ingest keeps spooling): it returns errUnchecked, and serve runs the checks
// later (lateCheck) before anything writes to ClickHouse. It returns the server's version.
func checkClickHouse(ctx context.Context, cfg *Config, ch driver.Conn, pg *pgxpool.Pool, log *slog.Logger) (schema.Version, error) {
	pctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	if err := ch.Ping(pctx); err != nil {
		return schema.Version{}, fmt.Errorf("%w: %v", errUnchecked, err)
	}
	v, err := schema.ServerVersion(ch)
	if err != nil {
		return v, err
	}
	if err := cfg.Layout().CheckLoadBalancing(pctx, ch); err != nil {
		log.Warn("clickhouse cluster misconfigured", "err", err)
	}
	// Its own deadline: a server that accepts and never answers spends its whole dial timeout (5 s).
	rctx, rcancel := context.WithTimeout(ctx, 6*time.Second)
	err = cfg.Layout().CheckReachable(rctx, ch)
	rcancel()
	if err != nil {
		log.Warn("clickhouse cluster servers unreachable", "err", err)
	}
	if err := schema.CheckTimeZone(pctx, ch); err != nil {
		return v, err
	}
	w, err := retention.Effective(pctx, ch, cfg.ClickHouseDB, cfg.Layout().LocalName("events"), cfg.RetentionDays)
	if err != nil {
		return v, err
	}
	cfg.RetentionDays, cfg.Ingest.Limits.RetentionDays, cfg.Writer.RetentionDays = w.Days, w.Days, w.Days
	if err := retention.NewFloor(pg, cfg.ClickHouseDB).Raise(pctx, w.CompleteFrom(time.Time{}, clock.Now())); err != nil {
		log.Warn("retention floor not recorded at start-up", "err", err)
	}
	return v, nil
}

// mount registers every route; the OpenAPI test walks the same function. Every API route
// authenticates, then takes the credential's rate-limit token (consume leaves it to its script: one
// Redis round trip); writeMW runs after both on every write (the Idempotency-Key middleware).
func mount(app *fiber.App, ops api.Ops, authn *auth.Authenticator, rl *ratelimit.Limiter, in *ingest.Service, q *query.Service, qs *quota.Service, rc *rollup.Reconciler, er *erasure.Service, writeMW ...fiber.Handler) {
	ops.Register(app)
	api.RegisterOpenAPI(app)
	analytics := app.Group("/api/analytics")
	in.Register(analytics, qs.Levels, append([]fiber.Handler{authn.Require(auth.ScopeEventsWrite, rl.Limit)}, writeMW...)...)
	q.Register(analytics, authn.Require(auth.ScopeAnalyticsRead, rl.Limit))
	qs.Register(analytics, authn.Require(auth.ScopeAnalyticsRead, rl.Limit), authn.Require(auth.ScopeEventsWrite, rl.Defer), writeMW...)
	rc.Register(analytics, authn.Require(auth.ScopeAnalyticsAdmin, rl.Limit))
	er.Register(analytics, authn.Require(auth.ScopeAnalyticsAdmin, rl.Limit))
	segment.New(in).Register(app, authn.Require(auth.ScopeEventsWrite, rl.Limit))
	dashboards.Register(app)
}

// quarantineWarning is /readiness' warning for a spool quarantine that is not empty: its rows wait for
// an operator. It counts files, not rows: a record this release cannot decode is quarantined as it is,
// with no rows it could count, and a warning on rows alone never showed it.
func quarantineWarning(st ingest.Stats) string {
	if st.QuarantinedFiles == 0 {
		return ""
	}
	return fmt.Sprintf("%d files (%d rows, not counting records this release cannot read) in the spool's quarantine: "+
		"ClickHouse kept refusing them, or they could not be read; see `analyticsd spool status`, then `analyticsd spool requeue --all` once fixed",
		st.QuarantinedFiles, st.QuarantinedRows)
}

// damagedWarning is /readiness' warning for damaged stretches kept from spool segments: rows in them
// may be lost, and nothing but an operator can look at them.
func damagedWarning(st ingest.Stats) string {
	if st.DamagedFiles == 0 {
		return ""
	}
	return fmt.Sprintf("%d damaged stretches of spool segments kept apart (the disk or a copy damaged them; rows in them may be lost): "+
		"see `analyticsd spool status`, inspect them, then delete them", st.DamagedFiles)
}

// errUnchecked: ClickHouse could not be reached to be checked.
var errUnchecked = errors.New("clickhouse unreachable: its time zone and retention are not checked yet")

// lateCheck runs the start-up checks of a ClickHouse that was unreachable at start-up once it can
// be reached, before anything writes to it: until they pass, the writer keeps rows in the spool and
// the rollup and retention jobs wait. (Before, they were skipped for the life of the process, and a
// server outside UTC, or with another TTL, was written to and swept as if it had passed.) A check
// that fails for good — the server's zone, its TTL — keeps failing, logged and shown in /readiness
// (warnings, and the writer's last error); serve never writes to such a server.
type lateCheck struct {
	run   func(context.Context) error
	log   *slog.Logger
	every time.Duration

	mu      sync.Mutex
	passed  bool
	err     error
	at      time.Time
	running bool
}

// Check reports the checks' last result at once (errUnchecked before the first), starting a run in
// the background when none is running and the last began at least every ago; once they passed,
// nil. It never waits for a run: a flusher asking it holds up shutdown otherwise.
func (l *lateCheck) Check(context.Context) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.passed {
		return nil
	}
	if !l.running && (l.at.IsZero() || time.Since(l.at) >= l.every) {
		l.running, l.at = true, time.Now()
		go l.runOnce()
	}
	if l.err == nil {
		return errUnchecked
	}
	return l.err
}

func (l *lateCheck) runOnce() {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	err := l.run(ctx)
	switch {
	case err == nil:
		l.log.Info("clickhouse reachable: time zone and retention checked; writing to it")
	case errors.Is(err, errUnchecked):
		l.log.Warn("clickhouse still unreachable: rows stay in the spool until it is checked", "err", err)
	default:
		l.log.Error("clickhouse refused: nothing is written to it until this is fixed", "err", err)
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	l.running, l.passed, l.err = false, err == nil, err
}

// whenChecked calls start once l's checks pass (at once when l is nil), trying every l.every until
// ctx ends; the returned function stops the waiting, and waits for it.
func whenChecked(ctx context.Context, l *lateCheck, start func()) (stop func()) {
	if l == nil {
		start()
		return func() {}
	}
	ctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() {
		defer close(done)
		t := time.NewTicker(l.every)
		defer t.Stop()
		for l.Check(ctx) != nil {
			select {
			case <-ctx.Done():
				return
			case <-t.C:
			}
		}
		start()
	}()
	return func() { cancel(); <-done }
}
