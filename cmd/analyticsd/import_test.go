package main

import (
	"bytes"
	"context"
	"fmt"
	"net/url"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/analyticsd/analyticsd/internal/testenv"
)

// importSource creates a Postgres schema holding the guide's tables verbatim (importer/testdata) and
// n events of two tenants over the last 100 days, and returns its pool and its URL.
func importSource(t *testing.T, n int) (*pgxpool.Pool, string) {
	t.Helper()
	ctx := context.Background()
	src, schemaName := testenv.Postgres(t)
	guide, err := os.ReadFile("../../importer/testdata/guide_schema.sql")
	if err != nil {
		t.Fatal(err)
	}
	for _, stmt := range []string{
		"CREATE TABLE tenants (id uuid PRIMARY KEY, slug text)",
		string(guide),
		"INSERT INTO tenants (id, slug) VALUES ('1a1a1a1a-0000-4000-8000-000000000001', 'shop'), ('1a1a1a1a-0000-4000-8000-000000000002', 'blog')",
	} {
		if _, err := src.Exec(ctx, stmt); err != nil {
			t.Fatalf("source: %v", err)
		}
	}
	if _, err := src.Exec(ctx, `INSERT INTO analytics_events (id, tenant_id, user_id, source, event, ts, props)
SELECT gen_random_uuid(), (ARRAY['1a1a1a1a-0000-4000-8000-000000000001', '1a1a1a1a-0000-4000-8000-000000000002']::uuid[])[1 + i % 2],
       'u' || (i % 50), 'app', (ARRAY['auth.user.login', 'apikey.request', 'email.sent'])[1 + i % 3],
       (date_trunc('day', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC') - make_interval(days => 1 + i % 100, secs => i % 86000),
       jsonb_build_object('i', i)
FROM generate_series(1, $1::int) AS i`, n); err != nil {
		t.Fatalf("seed: %v", err)
	}
	if _, err := src.Exec(ctx, `INSERT INTO analytics_daily_usage (tenant_id, date, metric, count)
SELECT tenant_id, (ts AT TIME ZONE 'UTC')::date, 'api_requests_daily', count(*) FROM analytics_events GROUP BY 1, 2`); err != nil {
		t.Fatalf("seed usage: %v", err)
	}
	u, err := url.Parse(testenv.PostgresURL(t))
	if err != nil {
		t.Fatal(err)
	}
	q := u.Query()
	q.Set("search_path", schemaName)
	u.RawQuery = q.Encode()
	return src, u.String()
}

// `analyticsd import`: usage errors, an import that verifies, a re-run that adds nothing, a
// verification that fails (exit 1) naming the difference, and --no-create (exit 3).
func TestImportCommand(t *testing.T) {
	e := testenv.Migrated(t)
	getenv := stackEnv(t, e, nil)
	src, srcURL := importSource(t, 3000)
	var progress bytes.Buffer
	progressOut = &progress
	t.Cleanup(func() { progressOut = os.Stderr })

	if r := runCmd(t, getenv, "import", "--help"); r.code != 0 || !strings.Contains(r.stdout, "--source") {
		t.Errorf("import --help: exit %d, %q", r.code, r.stdout)
	}
	if r := runCmd(t, getenv, "import"); r.code != 2 || !strings.Contains(r.stderr, "--source is required") {
		t.Errorf("import without --source: exit %d, %q; want 2", r.code, r.stderr)
	}
	if r := runCmd(t, getenv, "import", "--source", srcURL, "--map", "blog=Not A Slug"); r.code != 2 {
		t.Errorf("import with a bad --map: exit %d, %q; want 2", r.code, r.stderr)
	}

	r := runCmd(t, getenv, "import", "--source", srcURL, "--map", "blog=the-blog", "--chunk-rows", "1000")
	if r.code != 0 {
		t.Fatalf("import: exit %d\nstdout: %s\nstderr: %s", r.code, r.stdout, r.stderr)
	}
	for _, want := range []string{"-> shop (", "-> the-blog (", "imported 3000 source events", "verified: 3000 source events"} {
		if !strings.Contains(r.stdout, want) {
			t.Errorf("import output lacks %q:\n%s", want, r.stdout)
		}
	}
	var audited int
	if err := e.PG.QueryRow(context.Background(), "SELECT count(*) FROM audit_log WHERE actor = 'import' AND action = 'tenant.create'").Scan(&audited); err != nil || audited != 2 {
		t.Errorf("audited tenant creations: %d (%v), want 2", audited, err)
	}
	if !strings.Contains(progress.String(), "import: 3000 of 3000 events (100%)") {
		t.Errorf("progress lines: %q, want a last line at 100%%", progress.String())
	}

	r = runCmd(t, getenv, "import", "--source", srcURL, "--map", "blog=the-blog")
	if r.code != 0 || !strings.Contains(r.stdout, ": 0 inserted, 0 already present, 0 older than retention") {
		t.Errorf("re-run: exit %d, %s; want nothing imported", r.code, r.stdout)
	}

	day := time.Now().UTC().AddDate(0, 0, -2).Format(time.DateOnly)
	if _, err := src.Exec(context.Background(), "INSERT INTO analytics_events (id, tenant_id, event, ts) VALUES (gen_random_uuid(), '1a1a1a1a-0000-4000-8000-000000000001', 'email.sent', $1::date + interval '1 hour')", day); err != nil {
		t.Fatal(err)
	}
	r = runCmd(t, getenv, "import", "--source", srcURL, "--verify-only")
	if r.code != 1 || !strings.Contains(r.stdout, "verification FAILED") || !strings.Contains(r.stdout, "shop "+day+" email.sent: source ") {
		t.Errorf("verify after a source change: exit %d\n%s\n%s; want 1 naming shop %s email.sent", r.code, r.stdout, r.stderr, day)
	}

	r = runCmd(t, getenv, "import", "--source", srcURL, "--source-name", "another", "--no-create")
	if r.code != 3 || !strings.Contains(r.stderr, "creating tenants is off") {
		t.Errorf("--no-create with an unknown tenant: exit %d, %q; want 3", r.code, r.stderr)
	}
}

// kill -9 of the real binary in the middle of an import, then the same command again: the import
// completes, verifies, and a third run adds nothing.
func TestImportKilledAndResumed(t *testing.T) {
	e := testenv.Migrated(t)
	getenv := stackEnv(t, e, nil)
	_, srcURL := importSource(t, 30000)
	names := []string{"CLICKHOUSE_DSN", "POSTGRES_URL", "REDIS_URL", "LOG_LEVEL"}

	cmd := exec.Command(binary(t), "import", "--source", srcURL, "--chunk-rows", "1000", "--workers", "1", "--progress", "off")
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	for _, n := range names {
		cmd.Env = append(cmd.Env, n+"="+getenv(n))
	}
	stderr := &syncBuffer{}
	cmd.Stderr = stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	ctx := context.Background()
	stored := func() int {
		var n int
		_ = e.PG.QueryRow(ctx, "SELECT count(*) FROM import_days WHERE state <> 'inserting'").Scan(&n)
		return n
	}
	testenv.Eventually(t, 60*time.Second, func() error {
		select {
		case err := <-exited:
			t.Fatalf("the import ended before it was killed: %v\n%s", err, stderr.String())
		default:
		}
		if n := stored(); n < 20 {
			return fmt.Errorf("the import stored %d tenant-days, waiting for 20", n)
		}
		return nil
	})
	if err := cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	<-exited
	t.Logf("killed after %d tenant-days", stored())

	r := runCmd(t, getenv, "import", "--source", srcURL, "--progress", "off")
	if r.code != 0 || !strings.Contains(r.stdout, "verified: 30000 source events") {
		t.Fatalf("resumed import: exit %d\n%s\n%s", r.code, r.stdout, r.stderr)
	}
	t.Log(strings.TrimSpace(r.stdout))
	r = runCmd(t, getenv, "import", "--source", srcURL, "--progress", "off")
	if r.code != 0 || !strings.Contains(r.stdout, ": 0 inserted,") || !strings.Contains(r.stdout, "0 older than retention") {
		t.Errorf("third run: exit %d\n%s; want nothing imported", r.code, r.stdout)
	}
}
