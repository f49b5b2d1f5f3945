package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/analyticsd/analyticsd/auth"
	"github.com/analyticsd/analyticsd/internal/testenv"
	"github.com/analyticsd/analyticsd/internal/testenv/fixture"
)

// buildBinary compiles analyticsd once per test binary run.
var buildOnce struct {
	sync.Once
	path string
	err  error
}

func binary(t *testing.T) string {
	t.Helper()
	buildOnce.Do(func() {
		dir, err := os.MkdirTemp("", "analyticsd-bin")
		if err != nil {
			buildOnce.err = err
			return
		}
		buildOnce.path = filepath.Join(dir, "analyticsd")
		out, err := exec.Command("go", "build", "-o", buildOnce.path, ".").CombinedOutput()
		if err != nil {
			buildOnce.err = fmt.Errorf("go build: %v\n%s", err, out)
		}
	})
	if buildOnce.err != nil {
		t.Fatal(buildOnce.err)
	}
	return buildOnce.path
}

type proc struct {
	cmd    *exec.Cmd
	base   string
	ops    string      // the operator listener, when the test gave it an address
	stderr *syncBuffer // written by the child while tests read it
}

func startServer(t *testing.T, getenv func(string) string, names []string) *proc {
	t.Helper()
	cmd := exec.Command(binary(t), "serve")
	// Killed by the kernel if the test binary dies first (a timeout, a panic): no server outlives it.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	for _, n := range names {
		cmd.Env = append(cmd.Env, n+"="+getenv(n))
	}
	stderr := &syncBuffer{}
	cmd.Stderr = stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	p := &proc{cmd: cmd, base: "http://" + getenv("ANALYTICS_ADDR"), ops: "http://" + getenv("ANALYTICS_METRICS_ADDR"), stderr: stderr}
	t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
	waitHealthy(t, p.base, 20*time.Second, stderr.String)
	return p
}

// The headline promise, against the real binary: kill -9 analyticsd at random moments under load,
// restart it, and every event that got a 202 is in ClickHouse exactly once.
func TestKill9UnderLoadLosesNothing(t *testing.T) {
	e := testenv.Migrated(t)
	ctx := context.Background()
	tn := fixture.Tenant(t, e.PG, "crashy")
	key, _ := fixture.Key(t, e.PG, tn.ID, "load", auth.ScopeEventsWrite)
	getenv := stackEnv(t, e, map[string]string{
		"ANALYTICS_ADDR":        freeAddr(t),
		"ANALYTICS_SPOOL_DIR":   t.TempDir(),
		"INGEST_FLUSH_INTERVAL": "100ms",
		"INGEST_BATCH_ROWS":     "2000",
		"LOG_LEVEL":             "error",
	})
	names := []string{"ANALYTICS_ADDR", "ANALYTICS_METRICS_ADDR", "ANALYTICS_SPOOL_DIR", "INGEST_FLUSH_INTERVAL", "INGEST_BATCH_ROWS", "LOG_LEVEL", "CLICKHOUSE_DSN", "POSTGRES_URL", "REDIS_URL"}

	var mu sync.Mutex
	var acked []string
	client := &http.Client{Timeout: 5 * time.Second}
	load := func(base string, stop <-chan struct{}, wg *sync.WaitGroup) {
		defer wg.Done()
		for {
			select {
			case <-stop:
				return
			default:
			}
			batch := make([]map[string]any, 100)
			ids := make([]string, len(batch))
			for i := range batch {
				ids[i] = uuid.NewString()
				batch[i] = map[string]any{"id": ids[i], "event": "apikey.request", "source": "api", "props": map[string]any{"path": "/v1/x", "n": i}}
			}
			body, _ := json.Marshal(batch)
			req, _ := http.NewRequest(http.MethodPost, base+"/api/analytics/events", bytes.NewReader(body))
			req.Header.Set("Authorization", "Bearer "+key)
			req.Header.Set("Content-Type", "application/json")
			resp, err := client.Do(req)
			if err != nil {
				continue // not acknowledged: the process is gone
			}
			resp.Body.Close()
			if resp.StatusCode == http.StatusAccepted {
				mu.Lock()
				acked = append(acked, ids...)
				mu.Unlock()
			}
		}
	}

	for round := 0; round < 3; round++ {
		p := startServer(t, getenv, names)
		stop := make(chan struct{})
		var wg sync.WaitGroup
		for i := 0; i < 4; i++ {
			wg.Add(1)
			go load(p.base, stop, &wg)
		}
		time.Sleep(time.Duration(300+rand.IntN(900)) * time.Millisecond) // not a poll: a random moment to kill at
		if err := p.cmd.Process.Signal(syscall.SIGKILL); err != nil {
			t.Fatal(err)
		}
		_ = p.cmd.Wait()
		close(stop)
		wg.Wait()
	}
	if len(acked) == 0 {
		t.Fatal("no request was acknowledged; the load never ran")
	}
	// A last start replays the spool; a graceful stop flushes the rest.
	p := startServer(t, getenv, names)
	if err := p.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if err := p.cmd.Wait(); err != nil {
		t.Fatalf("graceful stop: %v\n%s", err, p.stderr.String())
	}

	want := map[string]bool{}
	for _, id := range acked {
		want[id] = true
	}
	rows, err := e.CH.Query(ctx, "SELECT toString(id) FROM "+e.DB+".events WHERE tenant_id = ?", tn.ID)
	if err != nil {
		t.Fatal(err)
	}
	defer rows.Close()
	seen := map[string]int{}
	for rows.Next() {
		var id string
		if err := rows.Scan(&id); err != nil {
			t.Fatal(err)
		}
		seen[id]++
	}
	lost, dup := 0, 0
	for id := range want {
		if seen[id] == 0 {
			lost++
		}
	}
	for _, n := range seen {
		if n > 1 {
			dup += n - 1
		}
	}
	t.Logf("acknowledged %d events over 3 kill -9 rounds; stored %d distinct; lost %d; duplicated %d", len(want), len(seen), lost, dup)
	if lost > 0 {
		t.Errorf("%d acknowledged events lost", lost)
	}
	if dup > 0 {
		t.Errorf("%d duplicate rows after replay", dup)
	}
}
