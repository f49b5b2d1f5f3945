package client_test

// The real analyticsd for these tests: TestMain builds the server from the parent module, migrates the
// local stack (CLICKHOUSE_DSN, POSTGRES_URL, REDIS_URL, CLICKHOUSE_HTTP_URL from
// `deploy/local/stack.sh env`), and starts one server for the examples. Each test makes its own
// tenant and, where it kills or throttles it, its own server. Without the stack the tests that need
// it skip and the examples are not run — unless ANALYTICS_REQUIRE_SERVICES=1, where the run fails.

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// stack is the built server binary and the environment every server and CLI call of the run gets.
type stack struct {
	bin     string
	dir     string   // the run's temporary directory
	env     []string // os.Environ() plus the stack's settings
	chHTTP  string   // ClickHouse's HTTP interface, for counting rows
	chDB    string   // the database analyticsd uses
	servers sync.WaitGroup
}

var (
	theStack *stack
	stackErr error // why there is no stack
)

func required() bool { return os.Getenv("ANALYTICS_REQUIRE_SERVICES") == "1" }

func TestMain(m *testing.M) {
	flag.Parse()
	os.Exit(run(m))
}

func run(m *testing.M) int {
	tmp, err := os.MkdirTemp("", "analyticsd-client-test-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer os.RemoveAll(tmp)
	theStack, stackErr = newStack(tmp)
	if stackErr != nil {
		if required() {
			fmt.Fprintf(os.Stderr, "FAIL: no analyticsd to test against: %v\n(ANALYTICS_REQUIRE_SERVICES=1: run `deploy/local/stack.sh up` and `eval \"$(deploy/local/stack.sh env)\"`)\n", stackErr)
			return 1
		}
		fmt.Fprintf(os.Stderr, "skipping the tests that need a server, and the examples: %v\n", stackErr)
		_ = flag.Set("test.skip", "^Example")
		return m.Run()
	}
	// The examples read ANALYTICS_URL and ANALYTICS_KEY, as an app would.
	slug, _, key, err := theStack.createTenant()
	if err != nil {
		fmt.Fprintf(os.Stderr, "FAIL: create the examples' tenant: %v\n", err)
		return 1
	}
	defer theStack.cli("tenant", "delete", "--tenant", slug, "--yes")
	srv, err := theStack.newServer()
	if err == nil {
		err = srv.start()
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "FAIL: start the examples' server: %v\n", err)
		return 1
	}
	defer srv.stop()
	os.Setenv("ANALYTICS_URL", srv.url)
	os.Setenv("ANALYTICS_KEY", key)
	return m.Run()
}

// newStack checks that the stack's services answer, builds the server and migrates.
func newStack(tmp string) (*stack, error) {
	s := &stack{dir: tmp, chHTTP: os.Getenv("CLICKHOUSE_HTTP_URL")}
	for _, name := range []string{"CLICKHOUSE_DSN", "POSTGRES_URL", "REDIS_URL", "CLICKHOUSE_HTTP_URL"} {
		v := os.Getenv(name)
		if v == "" {
			return nil, fmt.Errorf("%s is not set", name)
		}
		u, err := url.Parse(v)
		if err != nil || u.Host == "" {
			return nil, fmt.Errorf("%s=%q is not a URL", name, v)
		}
		c, err := net.DialTimeout("tcp", u.Host, 2*time.Second)
		if err != nil {
			return nil, fmt.Errorf("%s: %v", name, err)
		}
		c.Close()
		if name == "CLICKHOUSE_DSN" {
			s.chDB = strings.TrimPrefix(u.Path, "/")
		}
	}
	if s.chDB == "" {
		s.chDB = "default"
	}
	s.bin = os.Getenv("ANALYTICSD_BIN") // a server built beforehand, e.g. by CI
	if s.bin == "" {
		s.bin = filepath.Join(tmp, "analyticsd")
		root, err := filepath.Abs("..")
		if err != nil {
			return nil, err
		}
		gobin := filepath.Join(runtime.GOROOT(), "bin", "go")
		if p, err := exec.LookPath("go"); err == nil {
			gobin = p
		}
		build := exec.Command(gobin, "build", "-o", s.bin, "./cmd/analyticsd")
		build.Dir = root
		build.Env = append(os.Environ(), "GOWORK=off")
		if out, err := build.CombinedOutput(); err != nil {
			return nil, fmt.Errorf("build the server (go build ./cmd/analyticsd in %s): %v\n%s", root, err, out)
		}
	}
	s.env = append(os.Environ(), "LOG_LEVEL=warn", "ANALYTICS_METRICS_ADDR=off", "INGEST_FLUSH_INTERVAL=200ms")
	if _, err := s.cli("migrate"); err != nil {
		return nil, err
	}
	return s, nil
}

// cli runs `analyticsd args...` with the stack's environment and returns its stdout.
func (s *stack) cli(args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, s.bin, args...)
	cmd.Env = s.env
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return "", fmt.Errorf("analyticsd %s: %v: %s", strings.Join(args, " "), err, stderr.String())
	}
	return stdout.String(), nil
}

func lastLine(s string) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	return strings.TrimSpace(lines[len(lines)-1])
}

func randomHex(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

// createTenant makes a tenant with a random slug and a key with events:write and analytics:read.
func (s *stack) createTenant() (slug, id, key string, err error) {
	slug = "goclient-" + randomHex(6)
	out, err := s.cli("tenant", "create", "--slug", slug)
	if err != nil {
		return "", "", "", err
	}
	id = lastLine(out)
	out, err = s.cli("apikey", "create", "--tenant", slug, "--scopes", "events:write,analytics:read", "--name", "go-client-test")
	if err != nil {
		return "", "", "", err
	}
	return slug, id, lastLine(out), nil
}

// tenant is a test's own tenant.
type tenant struct {
	slug, id, key string
}

// needStack returns the run's stack, or skips (fails with ANALYTICS_REQUIRE_SERVICES=1) without one.
func needStack(t *testing.T) *stack {
	t.Helper()
	if theStack == nil {
		if required() {
			t.Fatalf("no analyticsd to test against: %v", stackErr)
		}
		t.Skipf("no analyticsd to test against: %v", stackErr)
	}
	return theStack
}

// newTenant makes a tenant for t, deleted (in Postgres) when t ends, after t's servers stopped.
func newTenant(t *testing.T) tenant {
	t.Helper()
	s := needStack(t)
	slug, id, key, err := s.createTenant()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if _, err := s.cli("tenant", "delete", "--tenant", slug, "--yes"); err != nil {
			t.Logf("delete tenant %s: %v", slug, err)
		}
	})
	return tenant{slug, id, key}
}

// server is one analyticsd process, restartable on the same address and spool.
type server struct {
	s      *stack
	addr   string
	url    string
	spool  string
	extra  []string
	mu     sync.Mutex
	cmd    *exec.Cmd
	exited chan struct{}
	log    *lockedBuffer
}

// newServer picks a free loopback port and a spool directory for a server; extra env overrides the
// stack's.
func (s *stack) newServer(extra ...string) (*server, error) {
	addr, err := freeAddr()
	if err != nil {
		return nil, err
	}
	spool, err := os.MkdirTemp(s.dir, "spool-")
	if err != nil {
		return nil, err
	}
	return &server{s: s, addr: addr, url: "http://" + addr, spool: spool, extra: extra, log: &lockedBuffer{}}, nil
}

// startServer starts a server for t, stopped (gracefully: its spool shipped) when t ends.
func startServer(t *testing.T, extra ...string) *server {
	t.Helper()
	sv, err := needStack(t).newServer(extra...)
	if err == nil {
		err = sv.start()
	}
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(sv.stop)
	return sv
}

// start runs `analyticsd serve` and waits until /healthz answers.
func (sv *server) start() error {
	sv.mu.Lock()
	defer sv.mu.Unlock()
	cmd := exec.Command(sv.s.bin, "serve")
	cmd.Env = append(append(append([]string{}, sv.s.env...), "ANALYTICS_ADDR="+sv.addr, "ANALYTICS_SPOOL_DIR="+sv.spool), sv.extra...)
	cmd.Stdout, cmd.Stderr = sv.log, sv.log
	dieWithTest(cmd)
	if err := cmd.Start(); err != nil {
		return err
	}
	exited := make(chan struct{})
	sv.s.servers.Add(1)
	go func() {
		defer sv.s.servers.Done()
		_ = cmd.Wait()
		close(exited)
	}()
	sv.cmd, sv.exited = cmd, exited
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		select {
		case <-exited:
			return fmt.Errorf("analyticsd serve on %s exited at start:\n%s", sv.addr, sv.log.String())
		default:
		}
		resp, err := http.Get(sv.url + "/healthz")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
		}
		time.Sleep(50 * time.Millisecond)
	}
	return fmt.Errorf("analyticsd serve on %s: /healthz did not answer within 30 s:\n%s", sv.addr, sv.log.String())
}

// kill ends the process with SIGKILL, as a crash would: what it holds in its spool is replayed by the
// next start.
func (sv *server) kill() {
	sv.mu.Lock()
	defer sv.mu.Unlock()
	if sv.cmd == nil {
		return
	}
	_ = sv.cmd.Process.Kill()
	<-sv.exited
	sv.cmd = nil
}

// stop ends the process with SIGTERM, which ships everything in its spool, and waits for it.
func (sv *server) stop() {
	sv.mu.Lock()
	defer sv.mu.Unlock()
	if sv.cmd == nil {
		return
	}
	_ = sv.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-sv.exited:
	case <-time.After(60 * time.Second):
		_ = sv.cmd.Process.Kill()
		<-sv.exited
	}
	sv.cmd = nil
}

// lockedBuffer is a server's output, written by the process while tests read it.
type lockedBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *lockedBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *lockedBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// storedCounts counts, straight from ClickHouse, how many rows the tenant has of each event id
// (of the events named name). Stop the tenant's servers first so their spools have shipped.
func storedCounts(t *testing.T, ten tenant, name string) map[string]int {
	t.Helper()
	s := needStack(t)
	q := fmt.Sprintf("SELECT toString(id), count() FROM %s.events WHERE tenant_id = toUUID('%s') AND event = '%s' GROUP BY id FORMAT TabSeparated",
		s.chDB, ten.id, name)
	resp, err := http.Post(s.chHTTP+"/", "text/plain", strings.NewReader(q))
	if err != nil {
		t.Fatalf("count rows in ClickHouse: %v", err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(resp.Body)
		t.Fatalf("count rows in ClickHouse: %s: %s", resp.Status, b)
	}
	counts := map[string]int{}
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		var id string
		var n int
		if _, err := fmt.Sscanf(sc.Text(), "%s\t%d", &id, &n); err != nil {
			t.Fatalf("ClickHouse row %q: %v", sc.Text(), err)
		}
		counts[id] = n
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	return counts
}

// checkExactlyOnce fails t unless every id in want is stored exactly once and no other id of the
// event name is stored at all.
func checkExactlyOnce(t *testing.T, ten tenant, name string, want []string) {
	t.Helper()
	got := storedCounts(t, ten, name)
	wanted := make(map[string]bool, len(want))
	missing, twice := 0, 0
	for _, id := range want {
		wanted[id] = true
		switch n := got[id]; {
		case n == 0:
			missing++
			if missing <= 3 {
				t.Errorf("event %s: not stored", id)
			}
		case n > 1:
			twice++
			if twice <= 3 {
				t.Errorf("event %s: stored %d times, want once", id, n)
			}
		}
	}
	extra := 0
	for id := range got {
		if !wanted[id] {
			extra++
		}
	}
	if missing+twice+extra > 0 || len(got) != len(want) {
		t.Errorf("%s: %d ids stored, want %d: %d missing, %d stored more than once, %d never tracked", name, len(got), len(want), missing, twice, extra)
	}
}

// apiEvents pages through GET /api/analytics/events of the last two days for the events named name
// and returns how many times each id was listed.
func apiEvents(t *testing.T, sv *server, key, name string) map[string]int {
	t.Helper()
	counts := map[string]int{}
	cursor := ""
	for {
		q := url.Values{"event": {name}, "limit": {"1000"}, "from": {time.Now().UTC().AddDate(0, 0, -1).Format(time.DateOnly)}}
		if cursor != "" {
			q.Set("cursor", cursor)
		}
		req, _ := http.NewRequest(http.MethodGet, sv.url+"/api/analytics/events?"+q.Encode(), nil)
		req.Header.Set("Authorization", "Bearer "+key)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatalf("GET /api/analytics/events: %v", err)
		}
		var page struct {
			Data struct {
				Events []struct {
					ID string `json:"id"`
				} `json:"events"`
				HasMore    bool    `json:"has_more"`
				NextCursor *string `json:"next_cursor"`
			} `json:"data"`
		}
		err = json.NewDecoder(resp.Body).Decode(&page)
		resp.Body.Close()
		if err != nil || resp.StatusCode != http.StatusOK {
			t.Fatalf("GET /api/analytics/events: %s, %v", resp.Status, err)
		}
		for _, e := range page.Data.Events {
			counts[e.ID]++
		}
		if !page.Data.HasMore || page.Data.NextCursor == nil {
			return counts
		}
		cursor = *page.Data.NextCursor
	}
}

// eventually polls cond every 100 ms until it holds or timeout passes, then fails t with msg().
func eventually(t *testing.T, timeout time.Duration, cond func() bool, msg func() string) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("after %s: %s", timeout, msg())
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// Ports for servers come from just below Linux's default ephemeral range (32768 up). A port the kernel
// picked (":0") and the test let go can be handed to any outgoing connection as its local port before
// the server binds it, or while a killed server is down before restarting on it; ports outside the
// range go only to listeners. (The parent module's internal/loopback does the same, reading the
// range; this module depends on nothing, so it keeps its own copy.)
var (
	portMu   sync.Mutex
	nextPort = 30000 + int(time.Now().UnixNano()%2768)
)

func freeAddr() (string, error) {
	portMu.Lock()
	defer portMu.Unlock()
	for range 2768 {
		port := nextPort
		nextPort = 30000 + (nextPort-30000+1)%2768
		if l, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", port)); err == nil {
			addr := l.Addr().String()
			l.Close()
			return addr, nil
		}
	}
	return "", fmt.Errorf("no free loopback port in 30000–32767")
}
