//go:build chaos

package chaos

import (
	"bytes"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"math/rand/v2"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/ClickHouse/clickhouse-go/v2"
	"github.com/google/uuid"

	"github.com/analyticsd/analyticsd/auth"
	"github.com/analyticsd/analyticsd/internal/loopback"
	"github.com/analyticsd/analyticsd/internal/testenv"
	"github.com/analyticsd/analyticsd/tenant"
)

var long = flag.Bool("long", false, "full-length faults (make chaos): 30 s outages, 5 restarts, 10 kills")

// Result is one fault's accounting.
type Result struct {
	Fault      string  `json:"fault"`
	Acked      int     `json:"acknowledged"`
	Found      int     `json:"found"`
	Lost       int     `json:"lost"`
	Duplicated int     `json:"duplicated"`
	Refused    int     `json:"refused_503"`
	RecoverS   float64 `json:"recover_seconds"`
	MaxRSSMiB  float64 `json:"max_rss_mib,omitempty"`
	Note       string  `json:"note,omitempty"`
}

type system struct {
	t      *testing.T
	env    testenv.Env
	bin    string
	vars   map[string]string
	cmd    *exec.Cmd
	stderr *bytes.Buffer
	base   string
	ops    string // the operator listener: detailed /readiness, /metrics
	key    string
	tenant uuid.UUID
	client *http.Client
}

// build compiles analyticsd for the test, with extra build tags (testclock: a clock that
// ANALYTICS_TEST_CLOCK_OFFSET shifts).
func build(t *testing.T, tags ...string) string {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "analyticsd")
	if out, err := exec.Command("go", "build", "-tags", strings.Join(tags, ","), "-o", bin, "../cmd/analyticsd").CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	return bin
}

// freeAddr picks an address for an instance to listen on (package loopback says why not ":0").
func freeAddr(t *testing.T) string {
	addr, err := loopback.Addr()
	if err != nil {
		t.Fatal(err)
	}
	return addr
}

func newSystem(t *testing.T, bin string, extra map[string]string) *system {
	t.Helper()
	s := &system{t: t, env: testenv.Migrated(t), bin: bin, client: &http.Client{Timeout: 10 * time.Second}}
	ctx := context.Background()
	tn, err := tenant.NewStore(s.env.PG).Create(ctx, "chaos", "")
	if err != nil {
		t.Fatal(err)
	}
	s.tenant = tn.ID
	if s.key, _, err = auth.NewKeys(s.env.PG).Create(ctx, tn.ID, "load", auth.AllScopes); err != nil {
		t.Fatal(err)
	}
	ch, _ := url.Parse(testenv.ClickHouseDSN(t))
	ch.Path = "/" + s.env.DB
	pg, _ := url.Parse(testenv.PostgresURL(t))
	q := pg.Query()
	q.Set("search_path", s.env.PGSchema)
	pg.RawQuery = q.Encode()
	s.vars = map[string]string{
		"CLICKHOUSE_DSN": ch.String(), "POSTGRES_URL": pg.String(), "REDIS_URL": testenv.RedisURL(t),
		"ANALYTICS_ADDR": freeAddr(t), "ANALYTICS_METRICS_ADDR": freeAddr(t), "ANALYTICS_SPOOL_DIR": t.TempDir(), "INGEST_FLUSH_INTERVAL": "200ms",
		"LOG_LEVEL": "error", "RATE_LIMIT_RPS": "0", "PATH": os.Getenv("PATH"),
	}
	if c := testenv.Cluster(); c != "" {
		s.vars["CLICKHOUSE_CLUSTER"] = c
	}
	if testenv.RedisCluster() {
		s.vars["REDIS_CLUSTER"] = "true"
	}
	for k, v := range extra {
		s.vars[k] = v
	}
	s.start()
	t.Cleanup(func() {
		if s.cmd != nil {
			s.cmd.Process.Kill()
			s.cmd.Wait()
		}
	})
	return s
}

func (s *system) start() {
	s.t.Helper()
	s.cmd = exec.Command(s.bin, "serve")
	dieWithTest(s.cmd)
	for k, v := range s.vars {
		s.cmd.Env = append(s.cmd.Env, k+"="+v)
	}
	s.stderr = &bytes.Buffer{}
	s.cmd.Stderr = s.stderr
	if err := s.cmd.Start(); err != nil {
		s.t.Fatal(err)
	}
	s.base, s.ops = "http://"+s.vars["ANALYTICS_ADDR"], "http://"+s.vars["ANALYTICS_METRICS_ADDR"]
	deadline := time.Now().Add(30 * time.Second)
	for {
		if resp, err := http.Get(s.base + "/healthz"); err == nil {
			resp.Body.Close()
			return
		}
		if time.Now().After(deadline) {
			s.t.Fatalf("analyticsd did not start:\n%s", s.stderr.String())
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// dieWithTest has the kernel kill cmd when the test binary dies: a test that times out or panics
// must not leave a server behind holding ports and writing to a test database.
func dieWithTest(cmd *exec.Cmd) {
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
}

func (s *system) kill9() {
	s.cmd.Process.Signal(syscall.SIGKILL)
	s.cmd.Wait()
}

// stack runs deploy/local/stack.sh (stop-service / start-service).
func stack(t *testing.T, args ...string) {
	t.Helper()
	out, err := exec.Command("../deploy/local/stack.sh", args...).CombinedOutput()
	if err != nil {
		t.Fatalf("stack.sh %v: %v\n%s", args, err, out)
	}
}

// load posts batches of 100 unique events from a few workers (about 1,000 events/s each) until stopped, recording every id that
// got a 202 (acknowledged) and every 503 (refused, never acknowledged).
type load struct {
	mu      sync.Mutex
	acked   []string
	refused int
	other   map[int]int
	stop    chan struct{}
	wg      sync.WaitGroup
}

func (s *system) startLoad(workers int) *load {
	l := &load{stop: make(chan struct{}), other: map[int]int{}}
	for w := 0; w < workers; w++ {
		l.wg.Add(1)
		go func() {
			defer l.wg.Done()
			for {
				select {
				case <-l.stop:
					return
				default:
				}
				batch := make([]map[string]any, 100)
				ids := make([]string, len(batch))
				for i := range batch {
					ids[i] = uuid.NewString()
					batch[i] = map[string]any{"id": ids[i], "event": "apikey.request", "source": "api", "user_id": "u" + strconv.Itoa(i),
						"props": map[string]any{"path": "/v1/items", "status": 200, "ms": i}}
				}
				body, _ := json.Marshal(batch)
				req, _ := http.NewRequest(http.MethodPost, s.base+"/api/analytics/events", bytes.NewReader(body))
				req.Header.Set("Authorization", "Bearer "+s.key)
				req.Header.Set("Content-Type", "application/json")
				resp, err := s.client.Do(req)
				if err != nil {
					time.Sleep(50 * time.Millisecond)
					continue
				}
				resp.Body.Close()
				l.mu.Lock()
				switch resp.StatusCode {
				case http.StatusAccepted:
					l.acked = append(l.acked, ids...)
				case http.StatusServiceUnavailable:
					l.refused++
					if resp.Header.Get("Retry-After") == "" {
						l.other[-503]++
					}
				default:
					l.other[resp.StatusCode]++
				}
				l.mu.Unlock()
				time.Sleep(100 * time.Millisecond) // steady load: ~1,000 events/s per worker
			}
		}()
	}
	return l
}

func (l *load) halt() {
	close(l.stop)
	l.wg.Wait()
}

// drained waits until analyticsd reports an empty spool and buffer, returning how long it took.
func (s *system) drained(timeout time.Duration) time.Duration {
	s.t.Helper()
	start := time.Now()
	for {
		resp, err := http.Get(s.ops + "/readiness")
		if err == nil {
			var r struct {
				Ingest struct {
					Pending  int `json:"pending_segments"`
					Buffered int `json:"buffered_rows"`
				} `json:"ingest"`
			}
			json.NewDecoder(resp.Body).Decode(&r)
			resp.Body.Close()
			if r.Ingest.Pending == 0 && r.Ingest.Buffered == 0 {
				return time.Since(start)
			}
		}
		if time.Since(start) > timeout {
			s.t.Fatalf("spool not drained after %s", timeout)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// account compares every acknowledged id with ClickHouse.
func (s *system) account(name string, l *load, recover time.Duration) Result {
	s.t.Helper()
	s.drained(3 * time.Minute)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	// On a cluster a read right after a whole shard came back may reach the replica that has not yet
	// fetched what the other one took in (both were behind, so the lag setting cannot skip it): read
	// again, for up to 30 s, until every acknowledged id is there, and say when it took more than one
	// read. A row that was lost never appears.
	start := time.Now()
	for read := 1; ; read++ {
		r := s.readBack(ctx, name, l, recover)
		if r.Lost == 0 || time.Since(start) > 30*time.Second {
			if read > 1 {
				r.Note = strings.TrimSpace(r.Note + fmt.Sprintf(" every acknowledged row readable only at read %d, after %.1fs", read, time.Since(start).Seconds()))
			}
			return r
		}
		time.Sleep(time.Second)
	}
}

// readBack reads the load's tenant's event ids once and counts the acknowledged ones found.
func (s *system) readBack(ctx context.Context, name string, l *load, recover time.Duration) Result {
	s.t.Helper()
	seen := map[string]int{}
	var rows interface {
		Next() bool
		Scan(...any) error
		Close() error
	}
	var err error
	for i := 0; i < 30; i++ { // ClickHouse may still be coming back
		if rows, err = s.env.CH.Query(ctx, "SELECT toString(id) FROM "+s.env.DB+".events WHERE tenant_id = ? AND event = 'apikey.request'", s.tenant); err == nil {
			break
		}
		time.Sleep(time.Second)
	}
	if err != nil {
		s.t.Fatal(err)
	}
	for rows.Next() {
		var id string
		if err := rows.Scan(&id); err != nil {
			s.t.Fatal(err)
		}
		seen[id]++
	}
	rows.Close()
	r := Result{Fault: name, Acked: len(l.acked), Refused: l.refused, RecoverS: recover.Round(10 * time.Millisecond).Seconds()}
	for _, id := range l.acked {
		if seen[id] == 0 {
			r.Lost++
		} else {
			r.Found++
		}
	}
	for _, n := range seen {
		if n > 1 {
			r.Duplicated += n - 1
		}
	}
	if len(l.other) > 0 {
		r.Note = fmt.Sprintf("other statuses: %v", l.other)
	}
	return r
}

func (s *system) rssMiB() float64 {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", s.cmd.Process.Pid))
	if err != nil {
		return 0
	}
	for _, line := range strings.Split(string(b), "\n") {
		if strings.HasPrefix(line, "VmRSS:") {
			kb, _ := strconv.Atoi(strings.Fields(line)[1])
			return float64(kb) / 1024
		}
	}
	return 0
}

func pick(short, full time.Duration) time.Duration {
	if *long {
		return full
	}
	return short
}

func count(short, full int) int {
	if *long {
		return full
	}
	return short
}

// checker records each fault's Result in results, logs it, and fails the test unless every
// acknowledged event was found exactly once.
func checker(t *testing.T, results *[]Result) func(Result) {
	return func(r Result) {
		t.Helper()
		*results = append(*results, r)
		t.Logf("%-34s acked %7d found %7d lost %d dup %d refused %4d recover %.2fs %s", r.Fault, r.Acked, r.Found, r.Lost, r.Duplicated, r.Refused, r.RecoverS, r.Note)
		if r.Lost != 0 || r.Duplicated != 0 || r.Acked == 0 || r.Found != r.Acked {
			t.Errorf("%s: acked %d, found %d, lost %d, duplicated %d", r.Fault, r.Acked, r.Found, r.Lost, r.Duplicated)
		}
	}
}

func TestFaults(t *testing.T) {
	if !testenv.Required() && os.Getenv("CLICKHOUSE_DSN") == "" {
		t.Skip("needs the local stack: run make chaos")
	}
	bin := build(t)
	var results []Result
	check := checker(t, &results)

	t.Run("clickhouse stopped", func(t *testing.T) {
		s := newSystem(t, bin, nil)
		l := s.startLoad(4)
		time.Sleep(time.Second)
		stack(t, "stop-service", "clickhouse")
		time.Sleep(pick(5*time.Second, 30*time.Second))
		stack(t, "start-service", "clickhouse")
		rec := s.drained(3 * time.Minute)
		l.halt()
		check(s.account("clickhouse stopped "+pick(5*time.Second, 30*time.Second).String(), l, rec))
	})

	t.Run("clickhouse restarted repeatedly", func(t *testing.T) {
		s := newSystem(t, bin, nil)
		l := s.startLoad(4)
		n := count(2, 5)
		for i := 0; i < n; i++ {
			time.Sleep(time.Second)
			stack(t, "stop-service", "clickhouse")
			stack(t, "start-service", "clickhouse")
		}
		rec := s.drained(3 * time.Minute)
		l.halt()
		check(s.account(fmt.Sprintf("clickhouse restarted %d×", n), l, rec))
	})

	t.Run("analyticsd kill -9", func(t *testing.T) {
		s := newSystem(t, bin, nil)
		n := count(3, 10)
		var all load
		for i := 0; i < n; i++ {
			l := s.startLoad(4)
			time.Sleep(time.Duration(300+rand.IntN(1500)) * time.Millisecond)
			s.kill9()
			l.halt()
			all.acked = append(all.acked, l.acked...)
			all.refused += l.refused
			s.start()
		}
		start := time.Now()
		s.drained(3 * time.Minute)
		all.other = map[int]int{}
		check(s.account(fmt.Sprintf("analyticsd kill -9 %d×", n), &all, time.Since(start)))
	})

	t.Run("redis stopped", func(t *testing.T) {
		s := newSystem(t, bin, nil)
		l := s.startLoad(4)
		time.Sleep(time.Second)
		stack(t, "stop-service", "redis")
		time.Sleep(pick(3*time.Second, 15*time.Second))
		// Quotas answer degraded from ClickHouse meanwhile.
		resp, err := s.get("/api/analytics/quotas/api_requests_daily")
		if err != nil || !strings.Contains(resp, `"degraded":true`) {
			t.Errorf("quota with redis down: %v %s, want degraded", err, resp)
		}
		stack(t, "start-service", "redis")
		start := time.Now()
		rec := s.drained(time.Minute)
		l.halt()
		r := s.account("redis stopped", l, rec)
		s.quotaHealed(t, "redis returned")
		r.RecoverS = time.Since(start).Round(10 * time.Millisecond).Seconds()
		check(r)
	})

	t.Run("postgres stopped", func(t *testing.T) {
		s := newSystem(t, bin, nil)
		if _, err := s.get("/api/analytics/events?limit=1"); err != nil { // warm the key cache
			t.Fatal(err)
		}
		l := s.startLoad(4)
		time.Sleep(time.Second)
		stack(t, "stop-service", "postgres")
		time.Sleep(pick(3*time.Second, 20*time.Second))
		if resp, err := s.get("/api/analytics/events?limit=5"); err != nil || !strings.Contains(resp, `"success":true`) {
			t.Errorf("event query with postgres down: %v %.200s", err, resp)
		}
		if resp, err := s.get("/api/analytics/usage?metric=apikey.request"); err != nil || !strings.Contains(resp, `"degraded":true`) {
			t.Errorf("usage with postgres down: %v %.200s, want days from ClickHouse marked degraded", err, resp)
		}
		stack(t, "start-service", "postgres")
		rec := s.drained(time.Minute)
		l.halt()
		check(s.account("postgres stopped", l, rec))
	})

	t.Run("spool full", func(t *testing.T) {
		// A body limit within the spool: a spool smaller than one request is refused at start.
		s := newSystem(t, bin, map[string]string{"INGEST_MAX_SPOOL_MB": "1", "INGEST_MAX_BODY_BYTES": "1048576"})
		l := s.startLoad(4)
		stack(t, "stop-service", "clickhouse")
		deadline := time.Now().Add(30 * time.Second)
		for {
			l.mu.Lock()
			refused := l.refused
			l.mu.Unlock()
			if refused > 10 {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("no 503 after the 1 MiB spool should have filled (refused %d)", refused)
			}
			time.Sleep(100 * time.Millisecond)
		}
		stack(t, "start-service", "clickhouse")
		rec := s.drained(3 * time.Minute)
		l.halt()
		r := s.account("spool full (1 MiB cap)", l, rec)
		if r.Refused == 0 || l.other[-503] > 0 {
			t.Errorf("spool full: %d refusals (%d without Retry-After)", r.Refused, l.other[-503])
		}
		check(r)
	})

	t.Run("clickhouse slowed", func(t *testing.T) {
		opts, err := clickhouse.ParseDSN(testenv.ClickHouseDSN(t))
		if err != nil {
			t.Fatal(err)
		}
		proxy := testenv.NewProxy(t, opts.Addr[0])
		s := newSystem(t, bin, map[string]string{"INGEST_MAX_SPOOL_MB": "4", "INGEST_MAX_BODY_BYTES": "4194304", "INGEST_MAX_BUFFERED_ROWS": "20000"})
		// Re-point analyticsd at ClickHouse through the proxy.
		s.kill9()
		u, _ := url.Parse(s.vars["CLICKHOUSE_DSN"])
		u.Host = proxy.Addr
		s.vars["CLICKHOUSE_DSN"] = u.String()
		s.start()
		base := s.rssMiB()
		l := s.startLoad(6)
		proxy.SetDelay(300 * time.Millisecond)
		var maxRSS float64
		end := time.Now().Add(pick(8*time.Second, 30*time.Second))
		for time.Now().Before(end) {
			maxRSS = max(maxRSS, s.rssMiB())
			time.Sleep(200 * time.Millisecond)
		}
		proxy.SetDelay(0)
		rec := s.drained(3 * time.Minute)
		l.halt()
		r := s.account("clickhouse slowed (300 ms/chunk)", l, rec)
		r.MaxRSSMiB = maxRSS
		r.Note = strings.TrimSpace(r.Note + fmt.Sprintf(" rss %.0f→%.0f MiB", base, maxRSS))
		if maxRSS-base > 512 {
			t.Errorf("memory grew by %.0f MiB while ClickHouse was slow; want it bounded", maxRSS-base)
		}
		check(r)
	})

	mode := "short"
	if *long {
		mode = "long"
	}
	os.MkdirAll("../test-output", 0o755)
	b, _ := json.MarshalIndent(results, "", "  ")
	os.WriteFile("../test-output/chaos-"+mode+".json", b, 0o644)
}

// quotaHealed waits (45 s at most) until the tenant's live counter equals what ClickHouse stored today:
// after Redis lost it, it converges from ClickHouse (seed, then top-ups for rows that were still in
// the spool when it was seeded).
func (s *system) quotaHealed(t *testing.T, after string) {
	t.Helper()
	var stored uint64
	if err := s.env.CH.QueryRow(context.Background(), "SELECT count() FROM "+s.env.DB+".events WHERE tenant_id = ? AND event = 'apikey.request' AND ts >= toDateTime(toDate(now()))", s.tenant).Scan(&stored); err != nil {
		t.Fatal(err)
	}
	want := fmt.Sprintf(`"current":%d,`, stored)
	deadline := time.Now().Add(45 * time.Second)
	for {
		resp, _ := s.get("/api/analytics/quotas/api_requests_daily")
		if strings.Contains(resp, want) {
			return
		}
		if time.Now().After(deadline) {
			t.Errorf("quota after %s: %.300s, want current %d (ClickHouse's count today)", after, resp, stored)
			return
		}
		time.Sleep(200 * time.Millisecond)
	}
}

func (s *system) get(path string) (string, error) { return s.getAs(s.key, path) }

// getAs GETs path with key (another tenant's, say).
func (s *system) getAs(key, path string) (string, error) {
	req, _ := http.NewRequest(http.MethodGet, s.base+path, nil)
	req.Header.Set("Authorization", "Bearer "+key)
	resp, err := s.client.Do(req)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	var b bytes.Buffer
	b.ReadFrom(resp.Body)
	return b.String(), nil
}
