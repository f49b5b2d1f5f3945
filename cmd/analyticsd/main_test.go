package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/analyticsd/analyticsd/auth"
	"github.com/analyticsd/analyticsd/internal/loopback"
	"github.com/analyticsd/analyticsd/internal/testenv"
	"github.com/analyticsd/analyticsd/internal/testenv/fixture"
)

// stackEnv returns a getenv for run() that points at the test's own ClickHouse database and
// Postgres schema, and at Redis through redisAddr when set.
func stackEnv(t *testing.T, e testenv.Env, extra map[string]string) func(string) string {
	t.Helper()
	tg := e.Target
	if tg.ClickHouseDSN == "" {
		tg = testenv.FromEnv(t)
	}
	ch, err := url.Parse(tg.ClickHouseDSN)
	if err != nil {
		t.Fatal(err)
	}
	ch.Path = "/" + e.DB
	pg, err := url.Parse(testenv.PostgresURL(t))
	if err != nil {
		t.Fatal(err)
	}
	q := pg.Query()
	q.Set("search_path", e.PGSchema)
	pg.RawQuery = q.Encode()
	m := map[string]string{
		"CLICKHOUSE_DSN": ch.String(),
		"POSTGRES_URL":   pg.String(),
		"REDIS_URL":      tg.RedisURL,
		"LOG_LEVEL":      "warn",
		// Each server its own operator listener (tests run many at once); tests that read it pass
		// an address.
		"ANALYTICS_METRICS_ADDR": "127.0.0.1:0",
		// The layout the suite runs on (`make test-cluster`: the local cluster).
		"CLICKHOUSE_CLUSTER": tg.Cluster,
	}
	if tg.RedisCluster {
		m["REDIS_CLUSTER"] = "true"
	}
	for k, v := range extra {
		m[k] = v
	}
	return func(k string) string { return m[k] }
}

type result struct {
	code           int
	stdout, stderr string
}

func (r result) lastLine() string {
	lines := strings.Split(strings.TrimSpace(r.stdout), "\n")
	return strings.TrimSpace(lines[len(lines)-1])
}

func runCmd(t *testing.T, getenv func(string) string, args ...string) result {
	t.Helper()
	var out, errOut bytes.Buffer
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	code := run(ctx, args, &out, &errOut, getenv)
	return result{code, out.String(), errOut.String()}
}

func TestTenantAndKeyCLI(t *testing.T) {
	e := testenv.Migrated(t)
	getenv := stackEnv(t, e, nil)
	ctx := context.Background()

	r := runCmd(t, getenv, "tenant", "create", "--slug", "acme", "--name", "Acme Inc")
	if r.code != 0 {
		t.Fatalf("tenant create: exit %d: %s", r.code, r.stderr)
	}
	id, err := uuid.Parse(r.lastLine())
	if err != nil {
		t.Fatalf("tenant create: last line %q is not a uuid", r.lastLine())
	}
	if r := runCmd(t, getenv, "tenant", "create", "--slug", "acme"); r.code == 0 || !strings.Contains(r.stderr, "already exists") {
		t.Errorf("duplicate tenant: exit %d, stderr %q; want failure saying it exists", r.code, r.stderr)
	}
	if r := runCmd(t, getenv, "tenant", "create", "--slug", "acme", "--if-not-exists"); r.code != 0 || r.lastLine() != id.String() {
		t.Errorf("--if-not-exists: exit %d, last line %q, want %s", r.code, r.lastLine(), id)
	}
	if r := runCmd(t, getenv, "tenant", "create", "--slug", "Bad Slug"); r.code == 0 {
		t.Error("invalid slug accepted")
	}

	r = runCmd(t, getenv, "apikey", "create", "--tenant", "acme", "--scopes", "events:write,analytics:read", "--name", "ci")
	if r.code != 0 {
		t.Fatalf("apikey create: exit %d: %s", r.code, r.stderr)
	}
	key := r.lastLine()
	if !auth.LooksLikeKey(key) {
		t.Fatalf("apikey create: last line %q is not a key", key)
	}
	if r := runCmd(t, getenv, "apikey", "create", "--tenant", "acme", "--scopes", "events:write,root"); r.code != 2 || !strings.Contains(r.stderr, "root") {
		t.Errorf("unknown scope: exit %d, stderr %q; want exit 2 naming the scope", r.code, r.stderr)
	}

	// Only a hash is stored: the plaintext appears in no column.
	var found int
	if err := e.PG.QueryRow(ctx, "SELECT count(*) FROM api_keys WHERE position($1 in (api_keys::text)) > 0 OR encode(hash, 'escape') = $1", key).Scan(&found); err != nil {
		t.Fatal(err)
	}
	if found != 0 {
		t.Error("the plaintext key is stored in api_keys")
	}

	keys := auth.NewKeys(e.PG)
	rec, err := keys.Verify(ctx, key)
	if err != nil {
		t.Fatalf("verify new key: %v", err)
	}
	if rec.TenantID != id || !rec.Has(auth.ScopeEventsWrite) || !rec.Has(auth.ScopeAnalyticsRead) || rec.Has(auth.ScopeAnalyticsAdmin) {
		t.Errorf("verified key: got %+v, want tenant %s with events:write and analytics:read", rec, id)
	}
	last := "A"
	if strings.HasSuffix(key, "A") {
		last = "B"
	}
	if _, err := keys.Verify(ctx, key[:len(key)-1]+last); !errors.Is(err, auth.ErrInvalidKey) {
		t.Errorf("tampered key: got %v, want ErrInvalidKey", err)
	}

	if r := runCmd(t, getenv, "apikey", "list", "--tenant", "acme"); r.code != 0 || !strings.Contains(r.stdout, rec.Prefix) || strings.Contains(r.stdout, key) {
		t.Errorf("apikey list: exit %d, stdout %q; want the prefix and never the key", r.code, r.stdout)
	}
	if r := runCmd(t, getenv, "apikey", "revoke", "--tenant", "acme", "--key", rec.Prefix); r.code != 0 {
		t.Fatalf("apikey revoke: exit %d: %s", r.code, r.stderr)
	}
	if _, err := keys.Verify(ctx, key); !errors.Is(err, auth.ErrRevokedKey) {
		t.Errorf("revoked key: got %v, want ErrRevokedKey", err)
	}
	var audits int
	if err := e.PG.QueryRow(ctx, "SELECT count(*) FROM audit_log WHERE tenant_id = $1 AND action IN ('apikey.create', 'apikey.revoke')", id).Scan(&audits); err != nil {
		t.Fatal(err)
	}
	if audits != 2 {
		t.Errorf("audit_log has %d key changes, want 2", audits)
	}
}

func TestMigrateCommand(t *testing.T) {
	e := testenv.Migrated(t)
	getenv := stackEnv(t, e, nil)
	r := runCmd(t, getenv, "migrate")
	if r.code != 0 {
		t.Fatalf("migrate: exit %d: %s", r.code, r.stderr)
	}
	if !strings.Contains(r.stdout, "applied []") {
		t.Errorf("migrate on a migrated database: %q, want nothing applied", r.stdout)
	}
}

// freeAddr picks an address for a server to listen on (package loopback says why not ":0").
func freeAddr(t *testing.T) string {
	t.Helper()
	addr, err := loopback.Addr()
	if err != nil {
		t.Fatal(err)
	}
	return addr
}

type readiness struct {
	Status string                    `json:"status"`
	Down   []string                  `json:"down"`
	Checks map[string]map[string]any `json:"checks"`
	Raw    string                    `json:"-"`
}

// getReadiness reads the operator listener's detailed /readiness.
func getReadiness(t *testing.T, base string) (int, readiness) {
	t.Helper()
	code, raw := get(t, base+"/readiness")
	var r readiness
	if err := json.Unmarshal([]byte(raw), &r); err != nil {
		t.Fatalf("%s: %v", raw, err)
	}
	r.Raw = raw
	return code, r
}

// publicReadiness reads the API listener's /readiness: each dependency up or down.
func publicReadiness(t *testing.T, base string) (int, string, map[string]string) {
	t.Helper()
	code, raw := get(t, base+"/readiness")
	var r struct {
		Checks map[string]string `json:"checks"`
	}
	if err := json.Unmarshal([]byte(raw), &r); err != nil {
		t.Fatalf("%s: %v", raw, err)
	}
	return code, raw, r.Checks
}

func get(t *testing.T, url string) (int, string) {
	t.Helper()
	r := fixture.At(t, url).Get(t, "", "", "")
	return r.Status, r.Raw
}

// serve, end to end: healthz, metrics, readiness following a dependency that goes away and comes
// back (Redis through a proxy the test cuts), and a graceful stop on cancel. The API port says only
// up or down per dependency and has no /metrics (it named every tenant and its event names there
// before); the operator listener has both in full.
func TestServeReadiness(t *testing.T) {
	e := testenv.Migrated(t)
	ru, err := url.Parse(testenv.RedisURL(t))
	if err != nil {
		t.Fatal(err)
	}
	proxy := testenv.NewProxy(t, ru.Host)
	ru.Host = proxy.Addr
	addr, opsAddr := freeAddr(t), freeAddr(t)
	getenv := stackEnv(t, e, map[string]string{"REDIS_URL": ru.String(), "ANALYTICS_ADDR": addr, "ANALYTICS_METRICS_ADDR": opsAddr})

	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan int, 1)
	var stderr bytes.Buffer
	go func() { done <- run(ctx, []string{"serve"}, &bytes.Buffer{}, &stderr, getenv) }()
	base := "http://" + addr
	waitHealthy(t, base, 15*time.Second, stderr.String)

	ops := "http://" + opsAddr
	if code, r := getReadiness(t, ops); code != 200 || r.Status != "ready" || len(r.Checks) != 3 || !strings.Contains(r.Raw, `"ingest"`) {
		t.Fatalf("readiness with everything up: %d %+v, want 200 ready with 3 checks and the ingest details", code, r)
	}
	if code, raw, checks := publicReadiness(t, base); code != 200 || len(checks) != 3 || checks["redis"] != "up" || strings.Contains(raw, "latency") || strings.Contains(raw, "ingest") {
		t.Errorf("public readiness with everything up: %d %s, want 200 and up per dependency, nothing more", code, raw)
	}
	proxy.SetDown(true)
	if code, r := getReadiness(t, ops); code != 503 || len(r.Down) != 1 || r.Down[0] != "redis" || r.Checks["redis"]["error"] == nil {
		t.Errorf("readiness with redis cut: %d %+v, want 503 naming redis with its error", code, r)
	}
	time.Sleep(1100 * time.Millisecond) // not a poll: the public answer is at most a second old
	if code, raw, checks := publicReadiness(t, base); code != 503 || checks["redis"] != "down" || strings.Contains(raw, "error") || strings.Contains(raw, "127.0.0.1") {
		t.Errorf("public readiness with redis cut: %d %s, want 503, redis down, and no internal error text", code, raw)
	}
	proxy.SetDown(false)
	if code, r := getReadiness(t, ops); code != 200 {
		t.Errorf("readiness after redis returned: %d %+v, want 200", code, r)
	}

	if code, body := get(t, base+"/metrics"); code != 404 {
		t.Errorf("/metrics on the API port: %d %.200s, want 404: it names every tenant", code, body)
	}
	if code, body := get(t, ops+"/metrics"); code != 200 || !strings.Contains(body, "go_goroutines") || !strings.Contains(body, "sbh_") {
		t.Errorf("/metrics on the operator listener: %d, want 200 with Go runtime and analyticsd metrics", code)
	}

	cancel()
	select {
	case code := <-done:
		if code != 0 {
			t.Errorf("serve exited %d after cancel; stderr: %s", code, stderr.String())
		}
	case <-time.After(20 * time.Second):
		t.Fatal("serve did not stop within 20s of cancel")
	}
}
