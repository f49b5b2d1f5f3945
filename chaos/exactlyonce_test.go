//go:build chaos

package chaos

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"net/http"
	"os"
	"os/exec"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/analyticsd/analyticsd/internal/testenv"
	"github.com/analyticsd/analyticsd/quota"
)

// sibling starts another analyticsd on the same stores, tenant and key: its own address and spool,
// and extra settings of its own.
func (s *system) sibling(t *testing.T, extra ...map[string]string) *system {
	t.Helper()
	c := &system{t: t, env: s.env, bin: s.bin, key: s.key, tenant: s.tenant, client: s.client, vars: map[string]string{}}
	for k, v := range s.vars {
		c.vars[k] = v
	}
	for _, e := range extra {
		for k, v := range e {
			c.vars[k] = v
		}
	}
	c.vars["ANALYTICS_ADDR"], c.vars["ANALYTICS_METRICS_ADDR"], c.vars["ANALYTICS_SPOOL_DIR"] = freeAddr(t), freeAddr(t), t.TempDir()
	c.start()
	t.Cleanup(func() {
		if c.cmd != nil {
			c.cmd.Process.Kill()
			c.cmd.Wait()
		}
	})
	return c
}

// command runs an analyticsd subcommand with the system's environment.
func (s *system) command(args ...string) *exec.Cmd {
	cmd := exec.Command(s.bin, args...)
	dieWithTest(cmd)
	for k, v := range s.vars {
		cmd.Env = append(cmd.Env, k+"="+v)
	}
	return cmd
}

// stormEvent is one logical event a client wants stored; user_id names it (events sent without an
// id get theirs from the server). Half the requests are on yesterday's date, so the rollup can bill
// them; the other half on today's, so the quota API answers for them (user ids start "y-" or "t-").
type stormEvent struct {
	user string
	id   string // "" for events sent without one
}

// today tells whether the event is one of today's.
func (e stormEvent) today() bool { return strings.HasPrefix(e.user, "t-") }

// storm is a retrying client load over several instances: after 10% of the 202s it acts as if the
// response had timed out and sends again — the same request to another instance, or, for half of the
// requests with ids, its events split and re-batched with new ones — and after a failure (a killed
// instance, a 503, a 409 while the first attempt still runs) it tries again until one answers —
// also after the storm stops: a request abandoned after a failure may have been stored without its
// 202 reaching the client (a kill -9 between the spool's append and the response), and a real
// client retries it. Requests without ids carry an Idempotency-Key.
type storm struct {
	systems   []*system
	yesterday string // the storm's timestamps, RFC 3339
	today     string

	mu       sync.Mutex
	acked    map[string]bool // user ids of events acknowledged at least once
	sent     int             // requests sent, retries included
	retried  int             // requests sent again after a 202
	given    int             // requests given up on: no 202 within sendPatience
	statuses map[int]int
	stop     chan struct{}
	wg       sync.WaitGroup
}

func newStorm(systems []*system, workers int) *storm {
	now := time.Now().UTC()
	st := &storm{systems: systems, yesterday: now.Add(-24 * time.Hour).Format(time.RFC3339), today: now.Format(time.RFC3339),
		acked: map[string]bool{}, statuses: map[int]int{}, stop: make(chan struct{})}
	for w := 0; w < workers; w++ {
		st.wg.Add(1)
		go st.worker(w)
	}
	return st
}

// events returns n new events, all on today's date or all on yesterday's.
func (st *storm) events(n int) []stormEvent {
	prefix := "y-"
	if rand.IntN(2) == 0 {
		prefix = "t-"
	}
	out := make([]stormEvent, n)
	for i := range out {
		out[i] = stormEvent{user: prefix + uuid.NewString()}
	}
	return out
}

// sendPatience bounds how long send retries one request: long enough for a retry to take over a
// killed instance's pending Idempotency-Key (dedup's holder mark expires 8 s after its last beat).
const sendPatience = 90 * time.Second

// send posts evs until an instance acknowledges them (true), or gives up after sendPatience (false).
func (st *storm) send(evs []stormEvent, key string, first int) bool {
	body := make([]map[string]any, len(evs))
	for i, e := range evs {
		ts := st.yesterday
		if e.today() {
			ts = st.today
		}
		body[i] = map[string]any{"event": "apikey.request", "source": "api", "user_id": e.user, "ts": ts, "props": map[string]any{"i": i}}
		if e.id != "" {
			body[i]["id"] = e.id
		}
	}
	b, _ := json.Marshal(body)
	deadline := time.Now().Add(sendPatience)
	for try := 0; ; try++ {
		s := st.systems[(first+try)%len(st.systems)]
		req, _ := http.NewRequest(http.MethodPost, s.base+"/api/analytics/events", bytes.NewReader(b))
		req.Header.Set("Authorization", "Bearer "+s.key)
		if key != "" {
			req.Header.Set("Idempotency-Key", key)
		}
		resp, err := s.client.Do(req)
		st.mu.Lock()
		st.sent++
		code := -1
		if err == nil {
			code = resp.StatusCode
			resp.Body.Close()
		}
		st.statuses[code]++
		if code == http.StatusAccepted {
			for _, e := range evs {
				st.acked[e.user] = true
			}
		}
		st.mu.Unlock()
		if code == http.StatusAccepted {
			return true
		}
		if time.Now().After(deadline) {
			st.mu.Lock()
			st.given++
			st.mu.Unlock()
			return false
		}
		time.Sleep(time.Duration(50+rand.IntN(200)) * time.Millisecond)
	}
}

func (st *storm) worker(w int) {
	defer st.wg.Done()
	for n := 0; ; n++ {
		select {
		case <-st.stop:
			return
		default:
		}
		evs := st.events(50)
		key := ""
		if rand.IntN(10) < 3 {
			key = uuid.NewString()
		} else {
			for i := range evs {
				evs[i].id = uuid.NewString()
			}
		}
		first := w + n
		if !st.send(evs, key, first) || rand.IntN(10) != 0 {
			time.Sleep(100 * time.Millisecond)
			continue
		}
		// The client saw a timeout instead of the 202: it sends again.
		st.mu.Lock()
		st.retried++
		st.mu.Unlock()
		if key != "" || rand.IntN(2) == 0 {
			st.send(evs, key, first+1) // the same request, to another instance
			continue
		}
		half := len(evs) / 2
		st.send(append(evs[:half:half], st.withIDs(st.events(10))...), "", first+1)
		st.send(append(evs[half:], st.withIDs(st.events(10))...), "", first+2)
	}
}

func (st *storm) withIDs(evs []stormEvent) []stormEvent {
	for i := range evs {
		evs[i].id = uuid.NewString()
	}
	return evs
}

func (st *storm) halt() {
	close(st.stop)
	st.wg.Wait()
}

// The retry storm: two instances, clients retrying, re-batching and sending Idempotency-Keys, through
// a ClickHouse restart and a kill -9 of one instance. Every acknowledged event must be stored once and
// counted once everywhere it is counted: events, daily_usage, the live counter, and Postgres after
// the rollup.
func TestRetryStorm(t *testing.T) {
	if !testenv.Required() && os.Getenv("CLICKHOUSE_DSN") == "" {
		t.Skip("needs the local stack: run make chaos")
	}
	bin := build(t)
	a := newSystem(t, bin, nil)
	b := a.sibling(t)
	st := newStorm([]*system{a, b}, count(4, 6))
	time.Sleep(pick(2*time.Second, 10*time.Second))
	stack(t, "stop-service", "clickhouse")
	time.Sleep(pick(2*time.Second, 10*time.Second))
	stack(t, "start-service", "clickhouse")
	time.Sleep(time.Second)
	a.kill9()
	time.Sleep(pick(time.Second, 5*time.Second))
	a.start()
	time.Sleep(pick(2*time.Second, 10*time.Second))
	st.halt()
	start := time.Now()
	a.drained(3 * time.Minute)
	b.drained(3 * time.Minute)
	recover := time.Since(start)

	ctx := context.Background()
	perUser := map[string]uint64{}
	rows, err := a.env.CH.Query(ctx, "SELECT user_id, count() FROM "+a.env.DB+".events WHERE tenant_id = ? GROUP BY user_id", a.tenant)
	if err != nil {
		t.Fatal(err)
	}
	for rows.Next() {
		var u string
		var n uint64
		rows.Scan(&u, &n)
		perUser[u] = n
	}
	rows.Close()
	r := Result{Fault: "retry storm, 2 instances", Acked: len(st.acked), RecoverS: recover.Round(10 * time.Millisecond).Seconds()}
	for u := range st.acked {
		if perUser[u] == 0 {
			r.Lost++
		} else {
			r.Found++
		}
	}
	for _, n := range perUser {
		if n > 1 {
			r.Duplicated += int(n - 1)
		}
	}
	r.Note = fmt.Sprintf("%d requests (%d sent again after a 202, %d given up), statuses %v", st.sent, st.retried, st.given, st.statuses)
	t.Logf("%+v", r)
	if st.given > 0 {
		// Its events may be stored without being acknowledged, so the per-day totals below would differ.
		t.Errorf("%d requests got no 202 in %v of retries from two healthy instances", st.given, sendPatience)
	}
	if r.Lost != 0 || r.Duplicated != 0 || r.Acked == 0 || r.Found != r.Acked || st.retried == 0 {
		t.Errorf("retry storm: acked %d, found %d, lost %d, duplicated %d, retried %d", r.Acked, r.Found, r.Lost, r.Duplicated, st.retried)
	}
	if st.statuses[http.StatusUnprocessableEntity] > 0 {
		t.Errorf("%d requests refused 422: a retry sent the same key with another body", st.statuses[http.StatusUnprocessableEntity])
	}

	// Counted once everywhere it is counted, per day: acknowledged, stored (events), daily_usage, and
	// for yesterday what the rollup bills, for today what the quota API of each instance says (it
	// rebuilds the live counter from ClickHouse when a fault made it drop it). The raw Redis key is
	// not compared: after such a drop it holds only what was counted since.
	var ackedY, ackedT, storedY, storedT int64
	for u := range st.acked {
		if strings.HasPrefix(u, "t-") {
			ackedT++
		} else {
			ackedY++
		}
	}
	for u, n := range perUser {
		if strings.HasPrefix(u, "t-") {
			storedT += int64(n)
		} else {
			storedY += int64(n)
		}
	}
	usage := func(d time.Time) int64 {
		var n int64
		if err := a.env.CH.QueryRow(ctx, "SELECT toInt64(sum(count)) FROM "+a.env.DB+".daily_usage WHERE tenant_id = ? AND metric = 'apikey.request' AND date = toDate(?)",
			a.tenant, d).Scan(&n); err != nil {
			t.Fatal(err)
		}
		return n
	}
	yesterday, _ := time.Parse(time.RFC3339, st.yesterday)
	today, _ := time.Parse(time.RFC3339, st.today)
	yesterday, today = yesterday.Truncate(24*time.Hour), today.Truncate(24*time.Hour)
	out, err := a.command("rollup", "--date", yesterday.Format("2006-01-02")).CombinedOutput()
	if err != nil {
		t.Fatalf("rollup: %v\n%s", err, out)
	}
	var billed int64
	if err := a.env.PG.QueryRow(ctx, "SELECT count FROM analytics_daily_usage WHERE tenant_id = $1 AND date = $2 AND metric = 'apikey.request'",
		a.tenant, yesterday.Format("2006-01-02")).Scan(&billed); err != nil {
		t.Fatalf("billed row: %v", err)
	}
	t.Logf("yesterday: acknowledged %d, stored %d, daily_usage %d, billed %d", ackedY, storedY, usage(yesterday), billed)
	if ackedY == 0 || storedY != ackedY || usage(yesterday) != ackedY || billed != ackedY {
		t.Errorf("yesterday: acknowledged %d, stored %d, daily_usage %d, billed %d: want all equal", ackedY, storedY, usage(yesterday), billed)
	}
	if !time.Now().UTC().Truncate(24 * time.Hour).Equal(today) {
		t.Logf("the storm's today ended at midnight UTC: its live quota is no longer served, not compared")
	}
	// The live counter is exact at once when nothing failed; after the storm's faults (a kill -9, a
	// ClickHouse restart) the promise is convergence within 60 s of the faults healing (README,
	// "Convergence"), so it is polled for up to 75 s, and how long it took is logged. (A CI run on a
	// loaded machine read 16,290 of 16,940 at once: 13 requests' rows not yet counted.)
	explained := false // the counter and both instances' metrics are logged once, for whichever reads short first
	for _, s := range []*system{a, b} {
		var q struct {
			Data struct {
				Current  float64 `json:"current"`
				Degraded bool    `json:"degraded"`
			} `json:"data"`
		}
		var first float64
		polled := time.Now()
		for try := 0; ; try++ {
			body, err := s.get("/api/analytics/quotas/api_requests_daily")
			if err == nil {
				err = json.Unmarshal([]byte(body), &q)
			}
			if err != nil {
				t.Fatalf("quota of %s: %v %s", s.base, err, body)
			}
			if try == 0 {
				first = q.Data.Current
				if int64(first) != ackedT && !explained {
					explainQuota(t, []*system{a, b}, today)
					explained = true
				}
			}
			if int64(q.Data.Current) == ackedT || time.Since(polled) > 75*time.Second {
				break
			}
			time.Sleep(time.Second)
		}
		t.Logf("today: acknowledged %d, stored %d, daily_usage %d, quota current %v at %s (first read %v; %.1f s to converge)",
			ackedT, storedT, usage(today), q.Data.Current, s.base, first, time.Since(polled).Seconds())
		if ackedT == 0 || storedT != ackedT || usage(today) != ackedT || (time.Now().UTC().Truncate(24*time.Hour).Equal(today) && (int64(q.Data.Current) != ackedT || q.Data.Degraded)) {
			t.Errorf("today: acknowledged %d, stored %d, daily_usage %d, quota current %v (degraded %v) at %s: want all equal",
				ackedT, storedT, usage(today), q.Data.Current, q.Data.Degraded, s.base)
		}
	}
	writeResult(t, r)
}

// A second serve on a spool another one holds refuses to start, naming both.
func TestSharedSpoolRefused(t *testing.T) {
	if !testenv.Required() && os.Getenv("CLICKHOUSE_DSN") == "" {
		t.Skip("needs the local stack: run make chaos")
	}
	bin := build(t)
	a := newSystem(t, bin, nil)
	// A binary without the lock would serve forever: give it 30 s to refuse.
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, a.bin, "serve")
	dieWithTest(cmd)
	for k, v := range a.vars {
		if k == "ANALYTICS_ADDR" || k == "ANALYTICS_METRICS_ADDR" {
			v = freeAddr(t)
		}
		cmd.Env = append(cmd.Env, k+"="+v)
	}
	out, err := cmd.CombinedOutput()
	if err == nil || !strings.Contains(string(out), a.vars["ANALYTICS_SPOOL_DIR"]) || !strings.Contains(string(out), fmt.Sprintf("pid %d", a.cmd.Process.Pid)) {
		t.Fatalf("second serve on the spool: %v\n%s", err, out)
	}
	writeResult(t, Result{Fault: "second serve on one spool", Note: "refused: " + firstLine(string(out))})
}

func firstLine(s string) string {
	if i := strings.IndexByte(s, '\n'); i >= 0 {
		return s[:i]
	}
	return s
}

// A poison segment among good ones: rows ClickHouse refuses for good do not hold up the rest. Good
// events land within seconds; the refused ones go to the quarantine, counted, and land once requeued.
func TestPoisonSegmentAmongGoodOnes(t *testing.T) {
	if !testenv.Required() && os.Getenv("CLICKHOUSE_DSN") == "" {
		t.Skip("needs the local stack: run make chaos")
	}
	bin := build(t)
	s := newSystem(t, bin, nil)
	ctx := context.Background()
	if err := s.env.CH.Exec(ctx, "ALTER TABLE "+s.env.DB+".events ADD COLUMN poison UInt8 DEFAULT throwIf(event = 'poison.pill')"); err != nil {
		t.Fatal(err)
	}
	l := s.startLoad(4)
	var poisoned []string
	var lag time.Duration
	for i := 0; i < count(5, 20); i++ {
		id := uuid.NewString()
		body := fmt.Sprintf(`[{"id":%q,"event":"poison.pill"},{"event":"a.good","user_id":"marker-%d"}]`, id, i)
		req, _ := http.NewRequest(http.MethodPost, s.base+"/api/analytics/events", strings.NewReader(body))
		req.Header.Set("Authorization", "Bearer "+s.key)
		sent := time.Now()
		resp, err := s.client.Do(req)
		if err != nil || resp.StatusCode != 202 {
			t.Fatalf("poison request: %v %v", err, resp)
		}
		resp.Body.Close()
		poisoned = append(poisoned, id)
		// The good event next to it lands within seconds.
		for {
			var n uint64
			s.env.CH.QueryRow(ctx, "SELECT count() FROM "+s.env.DB+".events WHERE tenant_id = ? AND user_id = ?", s.tenant, fmt.Sprintf("marker-%d", i)).Scan(&n)
			if n == 1 {
				lag = max(lag, time.Since(sent))
				break
			}
			if time.Since(sent) > 30*time.Second {
				t.Fatalf("a good event next to a poisoned one not stored after 30 s")
			}
			time.Sleep(50 * time.Millisecond)
		}
		time.Sleep(500 * time.Millisecond)
	}
	l.halt()
	rec := s.drained(time.Minute)
	r := s.account("poison segment among good ones", l, rec)
	var st struct {
		Ingest struct {
			Rows int `json:"quarantined_rows"`
		} `json:"ingest"`
	}
	deadline := time.Now().Add(30 * time.Second)
	for st.Ingest.Rows < len(poisoned) && time.Now().Before(deadline) {
		resp, err := http.Get(s.ops + "/readiness")
		if err == nil {
			json.NewDecoder(resp.Body).Decode(&st)
			resp.Body.Close()
		}
		time.Sleep(200 * time.Millisecond)
	}
	if st.Ingest.Rows != len(poisoned) {
		t.Errorf("quarantined %d rows, want the %d poisoned", st.Ingest.Rows, len(poisoned))
	}
	if err := s.env.CH.Exec(ctx, "ALTER TABLE "+s.env.DB+".events DROP COLUMN poison"); err != nil {
		t.Fatal(err)
	}
	if out, err := s.command("spool", "requeue", "--all").CombinedOutput(); err != nil {
		t.Fatalf("requeue: %v\n%s", err, out)
	}
	var n uint64
	s.env.CH.QueryRow(ctx, "SELECT count() FROM "+s.env.DB+".events WHERE tenant_id = ? AND event = 'poison.pill'", s.tenant).Scan(&n)
	if int(n) != len(poisoned) {
		t.Errorf("after requeue: %d poisoned events stored, want %d", n, len(poisoned))
	}
	r.Note = fmt.Sprintf("%d rows quarantined then requeued; good events beside them stored within %.1f s", len(poisoned), lag.Seconds())
	t.Logf("%+v", r)
	if r.Lost != 0 || r.Duplicated != 0 || r.Found != r.Acked {
		t.Errorf("%+v", r)
	}
	writeResult(t, r)
}

// writeResult appends a result to test-output/chaos-exactly-once-<mode>.json.
func writeResult(t *testing.T, r Result) {
	mode := "short"
	if *long {
		mode = "long"
	}
	os.MkdirAll("../test-output", 0o755)
	path := "../test-output/chaos-exactly-once-" + mode + ".json"
	var all []Result
	if b, err := os.ReadFile(path); err == nil {
		json.Unmarshal(b, &all)
	}
	all = append(all, r)
	b, _ := json.MarshalIndent(all, "", "  ")
	os.WriteFile(path, b, 0o644)
}

// explainQuota logs, when a storm's live quota reads short, where the count is missing: per received
// minute, what was counted live, ClickHouse's count the last reconciliation applied and ClickHouse's
// count now; and each instance's claim, counter-feed and duplicate counters (a's since its restart).
func explainQuota(t *testing.T, systems []*system, today time.Time) {
	s := systems[0]
	ctx := context.Background()
	c := quota.NewCounters(s.env.Redis, "")
	live, _ := s.env.Redis.HGetAll(ctx, c.LiveKey(s.tenant, "api_requests_daily", today)).Result()
	base, _ := s.env.Redis.HGetAll(ctx, c.BaseKey(s.tenant, "api_requests_daily", today)).Result()
	counter, _ := s.env.Redis.Get(ctx, c.Key(s.tenant, "api_requests_daily", today)).Result()
	stored := map[string]uint64{}
	rows, err := s.env.CH.Query(ctx, "SELECT toString(intDiv(toUInt32(received_at), 60)) AS m, count() FROM "+s.env.DB+
		".events WHERE tenant_id = ? AND ts >= ? AND ts < ? GROUP BY m", s.tenant, today, today.Add(24*time.Hour))
	if err != nil {
		t.Logf("stored rows per minute: %v", err)
	} else {
		for rows.Next() {
			var m string
			var n uint64
			rows.Scan(&m, &n)
			stored[m] = n
		}
		rows.Close()
	}
	var sumLive, sumMax int64
	for m, n := range stored {
		var l, b int64
		fmt.Sscan(live[m], &l)
		fmt.Sscan(base[m], &b)
		sumLive += l
		sumMax += max(l, b)
		if l != int64(n) {
			t.Logf("minute %s: live %d, reconciled clickhouse %d, clickhouse now %d", m, l, b, n)
		}
	}
	t.Logf("counter %s; sum of live %d, of max(live, reconciled) %d over %d minutes", counter, sumLive, sumMax, len(stored))
	for _, sys := range systems {
		body, err := http.Get(sys.ops + "/metrics")
		if err != nil {
			continue
		}
		var buf bytes.Buffer
		buf.ReadFrom(body.Body)
		body.Body.Close()
		for _, line := range strings.Split(buf.String(), "\n") {
			for _, name := range []string{"sbh_ingest_claim_errors_total", "sbh_ingest_counter_errors_total", "sbh_ingest_duplicates_total"} {
				if strings.HasPrefix(line, name) {
					t.Logf("%s: %s", sys.base, line)
				}
			}
		}
	}
}
