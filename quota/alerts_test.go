package quota

import (
	"context"
	"fmt"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/analyticsd/analyticsd/audit"
	"github.com/analyticsd/analyticsd/dedup"
	"github.com/analyticsd/analyticsd/erasure"
	"github.com/analyticsd/analyticsd/ingest"
	"github.com/analyticsd/analyticsd/internal/testenv"
)

// The request whose counting crosses a threshold does not wait for the alert to be recorded, and an
// alert Postgres could not take waits for it, then fires once. With Postgres answering slowly
// (every chunk held a second), a consume crossing 80 % and 100 % of its limit answered only after
// both audit inserts (6.1 s), and an ingest request lost its 100 % alert (its feed's 1 s context
// spent); with Postgres down, an alert was recorded without its row and fired again once Postgres
// was back (8 alert events for 4 alerts).
func TestAlertsDoNotHoldTheCrossingRequest(t *testing.T) {
	t.Parallel()
	h := newHarness(t)
	ctx := context.Background()
	slowPG, proxy := proxiedPostgres(t, h)
	limits := map[string]float64{"builds_daily": 2, "api_requests_daily": 2}
	s := NewService(Config{Enabled: true, EventMetrics: ingest.DefaultEventMetrics()}, NewCounters(h.env.Redis, h.env.Prefix),
		NewLimits(limits, h.tenants, time.Millisecond), h.env.CH, h.env.DB, slowPG, audit.New(slowPG), nil, nil)
	svc := ingest.NewService(ingest.Config{Enabled: true, Limits: ingest.DefaultLimits(), CounterEvery: 5 * time.Millisecond}, h.writer, s, ingest.NewMetrics(nil, 0), nil)
	t.Cleanup(svc.Close)
	s.SetRecorder(svc)
	t.Cleanup(func() { s.Close(context.Background()) })
	app := h.app(t, s, svc)
	// The day's counters are reconciled once, before Postgres slows (that reads the erasure ledger).
	for _, m := range []string{"builds_daily", "api_requests_daily"} {
		if _, err := s.State(ctx, h.tenant.ID, m); err != nil {
			t.Fatal(err)
		}
	}

	proxy.SetDelay(time.Second)
	start := time.Now()
	if res, err := s.Consume(ctx, h.tenant.ID, "builds_daily", 2); err != nil || !res.Allowed {
		t.Fatalf("consume: %+v, %v", res, err)
	}
	if d := time.Since(start); d > 900*time.Millisecond {
		t.Errorf("the consume crossing 80 %% and 100 %% took %v: it waited for the alerts", d.Round(time.Millisecond))
	}
	start = time.Now()
	body := `[` + strings.TrimSuffix(strings.Repeat(`{"event":"apikey.request"},`, 3), ",") + `]`
	if st, _, m := call(t, app, http.MethodPost, "/api/analytics/events", h.keyW, body); st != 202 {
		t.Fatalf("ingest: %d %v", st, m)
	}
	if d := time.Since(start); d > 900*time.Millisecond {
		t.Errorf("the ingest request crossing 80 %% and 100 %% took %v: it waited for the alerts", d.Round(time.Millisecond))
	}
	// Postgres goes down: what the queue still holds cannot be claimed.
	proxy.SetDown(true)
	s.WaitAlerts(ctx)
	proxy.SetDelay(0)
	proxy.SetDown(false)
	reconcileAlerts(t, s)
	if got, err := auditedAlerts(h); err != nil || got != "[api_requests_daily quota.exceeded api_requests_daily quota.warning builds_daily quota.exceeded builds_daily quota.warning]" {
		t.Errorf("audit_log's alerts: %v, %v; want each of the four once", got, err)
	}
	h.writer.Close(ctx)
	if n, err := alertEvents(h); err != nil || n != 4 {
		t.Errorf("alert events: %d (%v), want 4: each alert once", n, err)
	}
}

// bothAPIAlerts is auditedAlerts of api_requests_daily's two alerts, each once.
const bothAPIAlerts = "[api_requests_daily quota.exceeded api_requests_daily quota.warning]"

// alertEvents counts the harness tenant's alert events in ClickHouse.
func alertEvents(h *harness) (uint64, error) {
	var n uint64
	err := h.env.CH.QueryRow(context.Background(), "SELECT count() FROM "+h.env.DB+".events WHERE tenant_id = ? AND event LIKE 'quota.%'", h.tenant.ID).Scan(&n)
	return n, err
}

// reconcileAlerts runs a reconciliation round and waits for the alerts it queued.
func reconcileAlerts(t *testing.T, s *Service) {
	t.Helper()
	if _, err := s.ReconcileOnce(context.Background()); err != nil {
		t.Fatal(err)
	}
	s.WaitAlerts(context.Background())
}

// auditedAlerts lists the harness tenant's alerts in audit_log, as "[metric action ...]" sorted.
func auditedAlerts(h *harness) (string, error) {
	rows, err := h.env.PG.Query(context.Background(), "SELECT target, action FROM audit_log WHERE tenant_id = $1 AND action LIKE 'quota.%' ORDER BY target, action", h.tenant.ID)
	if err != nil {
		return "", err
	}
	defer rows.Close()
	var got []string
	for rows.Next() {
		var target, action string
		if err := rows.Scan(&target, &action); err != nil {
			return "", err
		}
		got = append(got, target+" "+action)
	}
	return fmt.Sprint(got), rows.Err()
}

// A threshold the counter passes without a live crossing fires at the next reconciliation: here five
// rows stored and never counted live (their counts lost to a fault) take api_requests_daily past
// both thresholds of its limit of 4. Before, only a live crossing fired, and these never did.
func TestThresholdPassedByReconciliationFires(t *testing.T) {
	t.Parallel()
	h := newHarness(t)
	s := h.service(t, Config{Enabled: true}, map[string]float64{"api_requests_daily": 4}, nil)
	ctx := context.Background()
	insertEvents(t, h, time.Now().UTC().Truncate(time.Second), 5)
	if st, err := s.ReconcileOnce(ctx); err != nil || !st.Ran {
		t.Fatalf("reconcile: %+v, %v", st, err)
	}
	s.WaitAlerts(ctx)
	got, err := auditedAlerts(h)
	if want := bothAPIAlerts; err != nil || got != want {
		t.Fatalf("alerts after the reconciliation: %v, %v; want %s", got, err, want)
	}
	// The next rounds find them fired.
	for range 2 {
		if _, err := s.ReconcileOnce(ctx); err != nil {
			t.Fatal(err)
		}
	}
	s.WaitAlerts(ctx)
	if got, err := auditedAlerts(h); err != nil || got != bothAPIAlerts {
		t.Fatalf("alerts after two more rounds: %v, %v; want each once", got, err)
	}
}

// An alert fires once per day even when Redis loses its marks: the tenant's counter restarts from
// its live counts and crosses the thresholds again. Before, the second crossing fired both alerts a
// second time (four audit rows, four alert events, four webhooks); now the quota_alerts row of the
// first firing holds them back, the reconciliation's catch-up too.
func TestAlertFiresOnceWhenRedisLosesItsMarks(t *testing.T) {
	t.Parallel()
	h := newHarness(t)
	s := h.service(t, Config{Enabled: true}, map[string]float64{"api_requests_daily": 2}, nil)
	app := h.app(t, s, h.ingest)
	ctx := context.Background()
	send := func() {
		t.Helper()
		var evs []string
		for range 3 {
			evs = append(evs, fmt.Sprintf(`{"event":"apikey.request","id":%q}`, uuid.New()))
		}
		if st, _, m := call(t, app, http.MethodPost, "/api/analytics/events", h.keyW, "["+strings.Join(evs, ",")+"]"); st != 202 {
			t.Fatalf("ingest: %d %v", st, m)
		}
	}
	want := bothAPIAlerts
	send()
	testenv.Eventually(t, 10*time.Second, func() error {
		if got, err := auditedAlerts(h); err != nil || got != want {
			return fmt.Errorf("alerts after the first crossing: %v, %v; want %s", got, err, want)
		}
		return nil
	})
	waitStored(t, h, 5) // three requests and the two alert events
	iter := h.env.Redis.Scan(ctx, 0, h.env.Prefix+"*", 1000).Iterator()
	for iter.Next(ctx) {
		h.env.Redis.Del(ctx, iter.Val())
	}
	send()
	waitStored(t, h, 8)
	reconcileAlerts(t, s)
	time.Sleep(200 * time.Millisecond) // a second firing, before, was on the request path; give a queued one time
	s.WaitAlerts(ctx)
	if got, err := auditedAlerts(h); err != nil || got != want {
		t.Fatalf("alerts after Redis lost its marks and the counter crossed again: %v, %v; want %s", got, err, want)
	}
	var fired int
	if err := h.env.PG.QueryRow(ctx, "SELECT count(*) FROM quota_alerts WHERE tenant_id = $1", h.tenant.ID).Scan(&fired); err != nil || fired != 2 {
		t.Errorf("quota_alerts rows: %d, %v; want 2", fired, err)
	}
}

// The queue records alerts in the order they were found, one at a time; wait returns once those
// found so far are recorded; after close, an alert is recorded before push returns.
func TestAlertQueueOrderWaitAndClose(t *testing.T) {
	var q alertQueue
	release := make(chan struct{})
	var mu sync.Mutex
	var got []int
	record := func(a alert) {
		<-release
		mu.Lock()
		got = append(got, a.pct)
		mu.Unlock()
	}
	start := time.Now()
	for pct := range 5 {
		q.push(alert{pct: pct}, record)
	}
	if d := time.Since(start); d > time.Second {
		t.Fatalf("push waited %v for the recording", d)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	q.wait(ctx) // nothing recorded yet: returns when ctx ends
	cancel()
	mu.Lock()
	if len(got) != 0 {
		t.Fatalf("recorded %v before the recorder was released", got)
	}
	mu.Unlock()
	close(release)
	q.wait(context.Background())
	mu.Lock()
	if fmt.Sprint(got) != "[0 1 2 3 4]" {
		t.Fatalf("recorded %v; want [0 1 2 3 4], in order", got)
	}
	mu.Unlock()
	q.close(context.Background())
	q.push(alert{pct: 5}, record)
	mu.Lock()
	defer mu.Unlock()
	if fmt.Sprint(got) != "[0 1 2 3 4 5]" {
		t.Fatalf("after close, push returned before recording: %v", got)
	}
}

// An instance set an alert's Redis mark and died before recording it (or its SET NX timed out
// after Redis applied it, or shutdown gave up on its queue). Before, the mark made every later
// decision and catch-up skip the alert, which never fired; now the catch-up asks Postgres.
func TestAMarkWithoutItsRecordStillFires(t *testing.T) {
	t.Parallel()
	h := newHarness(t)
	s := h.service(t, Config{Enabled: true}, map[string]float64{"api_requests_daily": 4}, nil)
	ctx := context.Background()
	today := time.Now().UTC().Truncate(24 * time.Hour)
	for _, pct := range []string{"80", "100"} { // the dead instance's decisions
		if _, err := s.counters.MarkOnce(ctx, h.tenant.ID, "api_requests_daily:"+pct, today); err != nil {
			t.Fatal(err)
		}
	}
	insertEvents(t, h, time.Now().UTC().Truncate(time.Second), 5)
	reconcileAlerts(t, s)
	if got, err := auditedAlerts(h); err != nil || got != bothAPIAlerts {
		t.Fatalf("after a reconciliation of a counter at 5 of 4 with both marks set: %v, %v; want both alerts", got, err)
	}
}

// A consume crossing its limit at 23:59:59.5 whose alert is decided after midnight files the alert
// under its own day. Before, it took the next day's name, and the next day's real crossing found it
// taken and never fired.
func TestAConsumeCrossingJustBeforeMidnightFilesItUnderItsDay(t *testing.T) {
	t.Parallel()
	h := newHarness(t)
	s := h.service(t, Config{Enabled: true}, map[string]float64{"builds_daily": 2}, nil)
	ctx := context.Background()
	d := time.Now().UTC().Truncate(24 * time.Hour).Add(5 * 24 * time.Hour) // a day no other test uses
	var mu sync.Mutex
	calls := 0
	s.now = func() time.Time {
		mu.Lock()
		defer mu.Unlock()
		calls++
		if calls == 1 { // the consume's own time
			return d.Add(24*time.Hour - 500*time.Millisecond)
		}
		return d.Add(24*time.Hour + time.Duration(calls)*time.Millisecond)
	}
	for range 2 { // the crossing on d, then the one on d+1
		if res, err := s.Consume(ctx, h.tenant.ID, "builds_daily", 2); err != nil || !res.Allowed {
			t.Fatal(res, err)
		}
		s.WaitAlerts(ctx)
	}
	rows, err := h.env.PG.Query(ctx, "SELECT day::text || '/' || threshold FROM quota_alerts WHERE tenant_id = $1 ORDER BY 1", h.tenant.ID)
	if err != nil {
		t.Fatal(err)
	}
	got, err := pgx.CollectRows(rows, pgx.RowTo[string])
	next := d.Add(24 * time.Hour).Format(time.DateOnly)
	if want := fmt.Sprint([]string{d.Format(time.DateOnly) + "/100", d.Format(time.DateOnly) + "/80", next + "/100", next + "/80"}); err != nil || fmt.Sprint(got) != want {
		t.Errorf("quota_alerts: %v (%v); want %v", got, err, want)
	}
}

// An alert whose audit row cannot be written is not marked recorded: the audit row and the record
// commit together, and the alert fires again once its claim is stale — its event, whose id derives
// from the alert, only once. Before, the record was marked anyway and the audit row never written.
func TestAnAlertNotAuditedFiresAgainWithItsEventOnce(t *testing.T) {
	t.Parallel()
	h := newHarness(t)
	ctx := context.Background()
	s := h.service(t, Config{Enabled: true}, map[string]float64{"builds_daily": 2}, nil)
	if _, err := h.env.PG.Exec(ctx, "ALTER TABLE audit_log RENAME TO audit_log_away"); err != nil {
		t.Fatal(err)
	}
	if res, err := s.Consume(ctx, h.tenant.ID, "builds_daily", 2); err != nil || !res.Allowed {
		t.Fatal(res, err)
	}
	s.WaitAlerts(ctx)
	if _, err := h.env.PG.Exec(ctx, "ALTER TABLE audit_log_away RENAME TO audit_log"); err != nil {
		t.Fatal(err)
	}
	var recorded int
	if err := h.env.PG.QueryRow(ctx, "SELECT count(*) FROM quota_alerts WHERE tenant_id = $1 AND recorded_at IS NOT NULL", h.tenant.ID).Scan(&recorded); err != nil || recorded != 0 {
		t.Fatalf("%d alerts marked recorded (%v) though their audit rows failed, want 0", recorded, err)
	}
	// Two minutes later: the claims are stale.
	if _, err := h.env.PG.Exec(ctx, "UPDATE quota_alerts SET claimed_at = claimed_at - interval '3 minutes' WHERE tenant_id = $1", h.tenant.ID); err != nil {
		t.Fatal(err)
	}
	reconcileAlerts(t, s)
	h.writer.Close(ctx)
	if got, err := auditedAlerts(h); err != nil || got != "[builds_daily quota.exceeded builds_daily quota.warning]" {
		t.Errorf("audit: %v, %v; want each alert once", got, err)
	}
	if n, err := alertEvents(h); err != nil || n != 2 {
		t.Errorf("alert events: %d (%v), want 2: fired twice, stored once", n, err)
	}
}

// While a tenant erasure is queued or running, no alert of the tenant is recorded (its event would
// outlive the erasure); once it has ended, the catch-up fires what the counters still pass.
func TestNoAlertFiresDuringATenantErasure(t *testing.T) {
	t.Parallel()
	h := newHarness(t)
	ctx := context.Background()
	s := h.service(t, Config{Enabled: true}, map[string]float64{"builds_daily": 2}, nil)
	er := erasure.New(erasure.Config{Layout: h.env.Layout()}, h.env.CH, h.env.PG, audit.New(h.env.PG), nil)
	if _, err := er.EraseTenant(ctx, h.tenant.ID, "test"); err != nil {
		t.Fatal(err)
	}
	if res, err := s.Consume(ctx, h.tenant.ID, "builds_daily", 2); err != nil || !res.Allowed {
		t.Fatal(res, err)
	}
	s.WaitAlerts(ctx)
	var rows int
	if err := h.env.PG.QueryRow(ctx, "SELECT count(*) FROM quota_alerts WHERE tenant_id = $1", h.tenant.ID).Scan(&rows); err != nil || rows != 0 {
		t.Errorf("quota_alerts rows during the erasure: %d (%v), want 0", rows, err)
	}
	if got, err := auditedAlerts(h); err != nil || got != "[]" {
		t.Errorf("alerts audited during the erasure: %v, %v; want none", got, err)
	}
}

// An alert found by the shutdown's last flush (rows counted only when shipped: a claim that failed
// at request time, or memory durability) has its event refused by the closing writer. Before, its
// quota_alerts row was kept and the alert never fired again: the audit row and webhook went out,
// the tenant's event never. Now the claim is released and the next reconciliation, by any
// instance, fires it whole.
func TestAnAlertFoundByTheLastFlushFiresLater(t *testing.T) {
	t.Parallel()
	h := newHarness(t)
	ctx := context.Background()
	claims := dedup.NewStore(h.env.Redis, h.env.Prefix, time.Hour, &dedup.Counting{Keys: NewCounters(h.env.Redis, h.env.Prefix), Lua: CountLua, TTL: CounterTTL})
	w, err := ingest.NewWriter(ingest.WriterConfig{Durability: ingest.DurabilityMemory, FlushInterval: time.Hour, BatchRows: 1_000_000}, h.env.CH, h.env.DB, claims, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	limits := map[string]float64{"api_requests_daily": 2}
	s := NewService(Config{Enabled: true, EventMetrics: ingest.DefaultEventMetrics()}, NewCounters(h.env.Redis, h.env.Prefix),
		NewLimits(limits, h.tenants, time.Millisecond), h.env.CH, h.env.DB, h.env.PG, audit.New(h.env.PG), nil, nil)
	svc := ingest.NewService(ingest.Config{Enabled: true, Limits: ingest.DefaultLimits()}, w, s, ingest.NewMetrics(nil, 0), nil)
	w.Start()
	s.SetRecorder(svc)
	app := h.app(t, s, svc)
	var evs []string
	for range 3 {
		evs = append(evs, fmt.Sprintf(`{"event":"apikey.request","id":%q}`, uuid.New()))
	}
	if st, _, m := call(t, app, http.MethodPost, "/api/analytics/events", h.keyW, "["+strings.Join(evs, ",")+"]"); st != 202 {
		t.Fatalf("ingest: %d %v", st, m)
	}
	// serve's shutdown, from "quota alerts" on.
	sctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	s.WaitAlerts(sctx)
	w.Close(sctx)
	svc.Close()
	s.Close(sctx)
	if n, _ := alertEvents(h); n != 0 {
		t.Fatalf("%d alert events stored by a closed writer; the test needs them refused", n)
	}
	// Another instance's reconciliation.
	other := h.service(t, Config{Enabled: true}, limits, nil)
	reconcileAlerts(t, other)
	h.writer.Close(ctx)
	if n, _ := alertEvents(h); n != 2 {
		t.Errorf("after another instance's reconciliation: %d alert events, want 2", n)
	}
	if got, err := auditedAlerts(h); err != nil || got != bothAPIAlerts {
		t.Errorf("audit: %v, %v; want each alert once", got, err)
	}
}

// proxiedPostgres is a pool on the test's Postgres schema through a proxy the test can slow down.
func proxiedPostgres(t *testing.T, h *harness) (*pgxpool.Pool, *testenv.Proxy) {
	t.Helper()
	u, err := url.Parse(testenv.PostgresURL(t))
	if err != nil {
		t.Fatal(err)
	}
	proxy := testenv.NewProxy(t, u.Host)
	u.Host = proxy.Addr
	q := u.Query()
	q.Set("search_path", h.env.PGSchema)
	u.RawQuery = q.Encode()
	pool, err := pgxpool.New(context.Background(), u.String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(pool.Close)
	if err := pool.Ping(context.Background()); err != nil { // a connection made before any delay
		t.Fatal(err)
	}
	return pool, proxy
}

// The queue holds an alert once per day: the same threshold of two days is two alerts.
func TestAlertQueueKeepsEachDayApart(t *testing.T) {
	var q alertQueue
	release := make(chan struct{})
	var mu sync.Mutex
	var got []string
	record := func(a alert) {
		<-release
		mu.Lock()
		got = append(got, a.day.Format(time.DateOnly))
		mu.Unlock()
	}
	d := time.Date(2026, 11, 30, 0, 0, 0, 0, time.UTC)
	a := alert{metric: "builds_daily", pct: 80, day: d}
	b := a
	b.day = d.Add(24 * time.Hour)
	for _, x := range []alert{a, b, a, b} {
		q.push(x, record)
	}
	close(release)
	q.wait(context.Background())
	mu.Lock()
	defer mu.Unlock()
	if fmt.Sprint(got) != "[2026-11-30 2026-12-01]" {
		t.Errorf("recorded %v; want each day's alert once", got)
	}
}

// refusingRecorder refuses every alert event, as a closing writer does.
type refusingRecorder struct{ Recorder }

func (refusingRecorder) EmitOnce(context.Context, uuid.UUID, string, string, string, map[string]any) error {
	return fmt.Errorf("refused: the writer is closing")
}

// A level's alert (storage_gb, set rather than counted) is not lost: crossing 80 % with Redis
// unreachable fires it (before: "not decided", and no catch-up for levels ever fired it), and one
// whose recording failed (its event refused) is fired by another instance's reconciliation
// (before: its claim was deleted and nothing owed it). A level going down and up again the same day
// fires nothing twice.
func TestALevelAlertIsNotLost(t *testing.T) {
	t.Parallel()
	h := newHarness(t)
	ctx := context.Background()
	rdb, proxy := testenv.CuttableRedis(t)
	limits := map[string]float64{"storage_gb": 100}
	s := h.service(t, Config{Enabled: true}, limits, rdb)
	other := h.service(t, Config{Enabled: true}, limits, nil)

	proxy.SetDown(true)
	if err := s.SetLevel(ctx, h.tenant.ID, "storage_gb", 90); err != nil {
		t.Fatal(err)
	}
	s.WaitAlerts(ctx)
	proxy.SetDown(false)
	reconcileAlerts(t, other)
	if got, err := auditedAlerts(h); err != nil || got != "[storage_gb quota.warning]" {
		t.Fatalf("alerts after crossing 80 %% with Redis down: %v, %v; want the warning", got, err)
	}

	s.SetRecorder(refusingRecorder{})
	// Down, up again (80 % fired today already), past 100 % (its event refused), and down again
	// before the catch-up: the alert must say what it crossed (120), not the level now (found by
	// review: it said 50 of 100 for "quota.exceeded").
	for _, v := range []float64{50, 95, 120, 60} {
		if err := s.SetLevel(ctx, h.tenant.ID, "storage_gb", v); err != nil {
			t.Fatal(err)
		}
	}
	s.WaitAlerts(ctx)
	if got, err := auditedAlerts(h); err != nil || got != "[storage_gb quota.warning]" {
		t.Fatalf("alerts with the event refused: %v, %v; want the 100 %% one not recorded yet", got, err)
	}
	reconcileAlerts(t, other)
	reconcileAlerts(t, other)
	if got, err := auditedAlerts(h); err != nil || got != "[storage_gb quota.exceeded storage_gb quota.warning]" {
		t.Errorf("alerts after another instance's reconciliation: %v, %v; want each once", got, err)
	}
	var current, limit float64
	if err := h.env.PG.QueryRow(ctx, `SELECT (meta->>'current')::float8, (meta->>'limit')::float8 FROM audit_log
		WHERE tenant_id = $1 AND action = 'quota.exceeded'`, h.tenant.ID).Scan(&current, &limit); err != nil || current != 120 || limit != 100 {
		t.Errorf("the caught-up alert says %v of %v (%v); want the crossing's 120 of 100", current, limit, err)
	}
	h.writer.Close(ctx)
	if n, err := alertEvents(h); err != nil || n != 2 {
		t.Errorf("alert events: %d (%v), want 2", n, err)
	}
}
