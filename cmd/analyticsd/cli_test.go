package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/analyticsd/analyticsd/auth"
	"github.com/analyticsd/analyticsd/internal/testenv"
	"github.com/analyticsd/analyticsd/internal/testenv/fixture"
)

// cliTenant creates tenant slug through the CLI and returns its new key (scopes events:write).
func cliTenant(t *testing.T, getenv func(string) string, slug string) string {
	t.Helper()
	if r := runCmd(t, getenv, "tenant", "create", "--slug", slug); r.code != 0 {
		t.Fatalf("tenant create %s: exit %d: %s", slug, r.code, r.stderr)
	}
	r := runCmd(t, getenv, "apikey", "create", "--tenant", slug, "--scopes", "events:write")
	if r.code != 0 || !auth.LooksLikeKey(r.lastLine()) {
		t.Fatalf("apikey create: exit %d: %s %s", r.code, r.stdout, r.stderr)
	}
	return r.lastLine()
}

func auditCount(t *testing.T, e testenv.Env, action string) int {
	t.Helper()
	var n int
	if err := e.PG.QueryRow(context.Background(), "SELECT count(*) FROM audit_log WHERE action = $1", action).Scan(&n); err != nil {
		t.Fatal(err)
	}
	return n
}

// A leaked key is what an operator holds: revoke accepts the whole key. Revoking twice says the key
// was already revoked and writes no second audit row. Before, the whole key was "not found", and a
// second revoke printed "revoked" again with a second audit row.
func TestCLIRevokeWholeKeyOnce(t *testing.T) {
	e := testenv.Migrated(t)
	getenv := stackEnv(t, e, nil)
	key := cliTenant(t, getenv, "acme")

	r := runCmd(t, getenv, "apikey", "revoke", "--tenant", "acme", "--key", key)
	if r.code != 0 || !strings.Contains(r.stdout, "revoked key") {
		t.Fatalf("revoke by whole key: exit %d, stdout %q, stderr %q; want 0 and revoked", r.code, r.stdout, r.stderr)
	}
	if _, err := auth.NewKeys(e.PG).Verify(context.Background(), key); err == nil {
		t.Error("the key still verifies after revoke")
	}
	r = runCmd(t, getenv, "apikey", "revoke", "--tenant", "acme", "--key", key)
	if r.code != 0 || !strings.Contains(r.stdout, "already revoked") {
		t.Errorf("second revoke: exit %d, stdout %q, stderr %q; want 0 saying it was already revoked", r.code, r.stdout, r.stderr)
	}
	if n := auditCount(t, e, "apikey.revoke"); n != 1 {
		t.Errorf("%d apikey.revoke audit rows after revoking twice, want 1", n)
	}
	if strings.Contains(r.stdout+r.stderr, key[16:]) {
		t.Error("revoke output shows the key's secret")
	}
}

// LAST USED is filled from authentication: a request with the key, then a clean stop of serve (which
// flushes what it recorded in memory), and `apikey list` shows when. Before, last_used_at was never
// written and LAST USED always read "-".
func TestCLILastUsedAfterServe(t *testing.T) {
	e := testenv.Migrated(t)
	addr := freeAddr(t)
	getenv := stackEnv(t, e, map[string]string{"ANALYTICS_ADDR": addr})
	key := cliTenant(t, getenv, "acme")

	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan int, 1)
	var logs bytes.Buffer
	go func() { done <- run(ctx, []string{"serve"}, io.Discard, &logs, getenv) }()
	defer func() { cancel(); <-done }()
	base := "http://" + addr
	waitHealthy(t, base, 15*time.Second)
	if code, _ := postPageView(t, base, key); code != http.StatusAccepted {
		t.Fatalf("ingest with the key: %d, want 202", code)
	}
	cancel()
	if code := <-done; code != 0 {
		t.Fatalf("serve exited %d: %s", code, logs.String())
	}
	done <- 0 // for the deferred wait

	var at *time.Time
	if err := e.PG.QueryRow(context.Background(), "SELECT last_used_at FROM api_keys").Scan(&at); err != nil {
		t.Fatal(err)
	}
	if at == nil {
		t.Fatal("last_used_at is NULL after the key was used and serve stopped")
	}
	r := runCmd(t, getenv, "apikey", "list", "--tenant", "acme")
	if r.code != 0 || !strings.Contains(r.stdout, at.UTC().Format(time.RFC3339)) {
		t.Errorf("apikey list: exit %d, stdout %q; want LAST USED %s", r.code, r.stdout, at.UTC().Format(time.RFC3339))
	}
}

// Mistakes get a short error and a hint to the command's --help, with exit 2; before, every error
// ended in ": usage" followed by the whole help. --help needs no valid configuration.
func TestCLIUsageErrorsAreShortWithHint(t *testing.T) {
	e := testenv.Migrated(t)
	getenv := stackEnv(t, e, nil)
	cliTenant(t, getenv, "acme")
	check := func(hint string, args ...string) {
		t.Helper()
		r := runCmd(t, getenv, args...)
		lines := strings.Split(strings.TrimSpace(r.stderr), "\n")
		if r.code != 2 || len(lines) != 2 || !strings.Contains(r.stderr, "run '"+hint+" --help'") ||
			strings.Contains(r.stderr, "Usage") || strings.Contains(r.stderr, ": usage") {
			t.Errorf("%v: exit %d, stderr %q; want exit 2, one line of error and the hint %q", args, r.code, r.stderr, hint)
		}
	}
	check("analyticsd", "frobnicate")
	check("analyticsd tenant", "tenant")
	check("analyticsd tenant", "tenant", "frob")
	check("analyticsd tenant set-quota", "tenant", "set-quota", "--tenant", "acme", "--metric", "emails_daily", "--limit", "1.5")
	check("analyticsd tenant set-quota", "tenant", "set-quota", "--tenant", "acme", "--metric", "emails_daily")
	check("analyticsd tenant create", "tenant", "create", "--slug", "Bad Slug")
	check("analyticsd apikey list", "apikey", "list", "--bogus")
	check("analyticsd apikey revoke", "apikey", "revoke", "--key", "0123456789ab") // a prefix needs --tenant
	check("analyticsd apikey rotate", "apikey", "rotate", "--tenant", "acme", "--key", "0123456789ab", "--overlap", "-1h")
	check("analyticsd rollup", "rollup", "--date", "yesterday")

	bad := func(k string) string {
		if k == "LOG_LEVEL" {
			return "loud"
		}
		return getenv(k)
	}
	if r := runCmd(t, bad, "tenant", "list"); r.code != 1 || !strings.Contains(r.stderr, "LOG_LEVEL") {
		t.Errorf("invalid configuration: exit %d, stderr %q; want exit 1 naming LOG_LEVEL", r.code, r.stderr)
	}
	if r := runCmd(t, bad, "tenant", "set-quota", "--help"); r.code != 0 || !strings.Contains(r.stdout, "-new-metric") {
		t.Errorf("--help with an invalid configuration: exit %d, stdout %q; want 0 and the flags", r.code, r.stdout)
	}
}

// --version and version print the version; `tenant --help` lists every action, set-quota included;
// each action's --help lists its flags and the exit codes. Before, --version was an unknown command
// and the tenant help omitted set-quota.
func TestCLIHelpAndVersion(t *testing.T) {
	getenv := func(string) string { return "" }
	for _, args := range [][]string{{"--version"}, {"version"}} {
		if r := runCmd(t, getenv, args...); r.code != 0 || strings.TrimSpace(r.stdout) != version {
			t.Errorf("%v: exit %d, stdout %q; want %q", args, r.code, r.stdout, version)
		}
	}
	r := runCmd(t, getenv, "tenant", "--help")
	for _, a := range []string{"create", "list", "show", "set-quota", "disable", "enable", "delete"} {
		if r.code != 0 || !strings.Contains(r.stdout, "analyticsd tenant "+a+" ") {
			t.Errorf("tenant --help: exit %d, does not list %q:\n%s", r.code, a, r.stdout)
		}
	}
	r = runCmd(t, getenv, "apikey", "--help")
	for _, a := range []string{"create", "list", "revoke", "rotate"} {
		if r.code != 0 || !strings.Contains(r.stdout, "analyticsd apikey "+a+" ") {
			t.Errorf("apikey --help: exit %d, does not list %q:\n%s", r.code, a, r.stdout)
		}
	}
	for _, args := range [][]string{{"apikey", "rotate", "--help"}, {"help", "apikey", "rotate"}} {
		r = runCmd(t, getenv, args...)
		if r.code != 0 || !strings.Contains(r.stdout, "-overlap duration") || !strings.Contains(r.stdout, "Exit codes") {
			t.Errorf("%v: exit %d, stdout %q; want the flags and the exit codes", args, r.code, r.stdout)
		}
	}
	if r := runCmd(t, getenv, "--help"); r.code != 0 || !strings.Contains(r.stdout, "tenant set-quota") || !strings.Contains(r.stdout, "Exit codes") {
		t.Errorf("--help: exit %d, stdout %q", r.code, r.stdout)
	}
}

// Exit codes mean something: 3 for what does not exist or conflicts, 1 for a runtime failure.
func TestCLIExitCodes(t *testing.T) {
	e := testenv.Migrated(t)
	getenv := stackEnv(t, e, nil)
	key := cliTenant(t, getenv, "acme")
	check := func(code int, want string, args ...string) {
		t.Helper()
		r := runCmd(t, getenv, args...)
		if r.code != code || !strings.Contains(r.stderr, want) {
			t.Errorf("%v: exit %d, stderr %q; want exit %d and %q", args, r.code, r.stderr, code, want)
		}
	}
	check(3, "run 'analyticsd tenant list'", "tenant", "show", "--tenant", "nope")
	check(3, "already exists", "tenant", "create", "--slug", "acme")
	check(3, "run 'analyticsd apikey list --tenant S'", "apikey", "revoke", "--tenant", "acme", "--key", "0123456789ab")
	if r := runCmd(t, getenv, "apikey", "revoke", "--key", key); r.code != 0 {
		t.Fatalf("revoke: exit %d: %s", r.code, r.stderr)
	}
	check(3, "revoked", "apikey", "rotate", "--key", key)
	down := stackEnv(t, e, map[string]string{"POSTGRES_URL": "postgres://analytics:analytics@127.0.0.1:1/analytics?sslmode=disable"})
	if r := runCmd(t, down, "tenant", "list"); r.code != 1 {
		t.Errorf("tenant list with Postgres unreachable: exit %d, stderr %q; want 1", r.code, r.stderr)
	}
}

// set-quota takes only known quota metrics (built-in, QUOTA_DEFAULTS, QUOTA_EVENT_MAP targets, the
// tenant's overrides) unless --new-metric says the operator means it, only whole non-negative
// limits, and prints a table (or JSON), not Go map syntax. Setting the same limit again changes
// nothing and is not audited again. Before, "typo_daily" and 1.5 were stored and the output was
// "map[...]".
func TestCLISetQuota(t *testing.T) {
	e := testenv.Migrated(t)
	getenv := stackEnv(t, e, map[string]string{
		"QUOTA_DEFAULTS":  `{"reports_daily":10}`,
		"QUOTA_EVENT_MAP": `{"order.paid":"orders_daily","email.sent":"emails_daily"}`,
	})
	cliTenant(t, getenv, "acme")
	set := func(args ...string) result {
		t.Helper()
		return runCmd(t, getenv, append([]string{"tenant", "set-quota", "--tenant", "acme"}, args...)...)
	}
	for _, limit := range []string{"1.5", "-1", "1e3", "abc", "1000000000000001"} {
		if r := set("--metric", "emails_daily", "--limit", limit); r.code != 2 || !strings.Contains(r.stderr, "whole number") {
			t.Errorf("--limit %s: exit %d, stderr %q; want exit 2 asking for a whole number", limit, r.code, r.stderr)
		}
	}
	r := set("--metric", "typo_daily", "--limit", "5")
	if r.code != 2 || !strings.Contains(r.stderr, "not a known quota metric") || !strings.Contains(r.stderr, "orders_daily") || !strings.Contains(r.stderr, "--new-metric") {
		t.Errorf("unknown metric: exit %d, stderr %q; want exit 2 listing the known metrics and --new-metric", r.code, r.stderr)
	}
	for _, m := range []string{"builds_daily", "reports_daily", "orders_daily", "storage_gb"} {
		if r := set("--metric", m, "--limit", "7"); r.code != 0 {
			t.Errorf("known metric %s: exit %d, stderr %q", m, r.code, r.stderr)
		}
	}
	r = set("--metric", "emails_daily", "--limit", "100")
	if r.code != 0 || strings.Contains(r.stdout, "map[") || !strings.Contains(r.stdout, "METRIC") ||
		!regexpMatch(`emails_daily\s+100\s+override`, r.stdout) || !regexpMatch(`api_requests_daily\s+100000\s+built-in`, r.stdout) ||
		!regexpMatch(`reports_daily\s+7\s+override`, r.stdout) {
		t.Errorf("set-quota output: exit %d, stdout %q; want a table of every limit and its source", r.code, r.stdout)
	}
	if r := set("--metric", "emails_daily", "--limit", "100"); r.code != 0 || !strings.Contains(r.stdout, "nothing changed") {
		t.Errorf("same limit again: exit %d, stdout %q; want nothing changed", r.code, r.stdout)
	}
	if n := auditCount(t, e, "quota.set"); n != 5 {
		t.Errorf("%d quota.set audit rows, want 5 (one per change)", n)
	}
	if r := set("--metric", "typo_daily", "--limit", "5", "--new-metric"); r.code != 0 {
		t.Errorf("--new-metric: exit %d, stderr %q", r.code, r.stderr)
	}
	// Now an override, typo_daily is known for this tenant: it can be changed and cleared.
	if r := set("--metric", "typo_daily", "--clear"); r.code != 0 || !strings.Contains(r.stdout, "removed") {
		t.Errorf("--clear: exit %d, stdout %q", r.code, r.stdout)
	}
	r = set("--metric", "emails_daily", "--clear", "--json")
	var out struct {
		Tenant, Metric string
		Limit          *float64
		Changed        bool
		Quotas         []quotaLimit
	}
	if err := json.Unmarshal([]byte(r.stdout), &out); err != nil || out.Tenant != "acme" || out.Limit != nil || !out.Changed || len(out.Quotas) < 6 {
		t.Errorf("--json: %v, %+v from %q", err, out, r.stdout)
	}
	for _, q := range out.Quotas {
		if q.Metric == "emails_daily" && (q.Limit != 5000 || q.Source != "built-in") {
			t.Errorf("emails_daily after --clear: %+v, want 5000 from built-in", q)
		}
	}
	r = runCmd(t, getenv, "tenant", "show", "--tenant", "acme")
	if r.code != 0 || !regexpMatch(`builds_daily\s+7\s+override`, r.stdout) || !strings.Contains(r.stdout, "active") {
		t.Errorf("tenant show: exit %d, stdout %q", r.code, r.stdout)
	}
}

func regexpMatch(re, s string) bool { return regexp.MustCompile(re).MatchString(s) }

// waitStatus polls until a request with key gets want, up to 10 s (twice the documented 5 s), and
// returns the status and body it got.
func waitStatus(t *testing.T, base, key string, want int) (int, string) {
	t.Helper()
	var code int
	var body string
	testenv.Eventually(t, 10*time.Second, func() error {
		if code, body = postPageView(t, base, key); code != want {
			return fmt.Errorf("got %d %s, want %d", code, body, want)
		}
		return nil
	})
	return code, body
}

// postPageView sends one page.view event with key and returns the status and the body.
func postPageView(t *testing.T, base, key string) (int, string) {
	t.Helper()
	r := fixture.At(t, base).Do(t, fixture.Request{Method: http.MethodPost, Path: "/api/analytics/events", Key: key,
		Body: []byte(`{"event":"page.view","user_id":"u1"}`), Header: map[string]string{"Content-Type": "application/json"}})
	return r.Status, r.Raw
}

// serveForTest runs serve in process until the test ends and returns its base URL.
func serveForTest(t *testing.T, e testenv.Env) (string, func(string) string) {
	t.Helper()
	getenv := stackEnv(t, e, map[string]string{"ANALYTICS_ADDR": freeAddr(t)})
	return serveInProcess(t, getenv), getenv
}

// A disabled tenant's key gets 403 tenant_disabled from a running server within its 5 s cache, and
// works again once enabled; delete asks for the slug (a wrong answer deletes nothing), says what it
// removes and keeps, and the key is refused afterwards. None of these existed before.
func TestCLIDisableEnableDelete(t *testing.T) {
	e := testenv.Migrated(t)
	base, getenv := serveForTest(t, e)
	key := cliTenant(t, getenv, "acme")
	cliTenant(t, getenv, "other")
	if code, body := waitStatus(t, base, key, 202); code != 202 {
		t.Fatalf("ingest before: %d %s", code, body)
	}
	if r := runCmd(t, getenv, "tenant", "disable", "--tenant", "acme"); r.code != 0 || !strings.Contains(r.stdout, "403") {
		t.Fatalf("disable: exit %d, stdout %q, stderr %q", r.code, r.stdout, r.stderr)
	}
	if r := runCmd(t, getenv, "tenant", "disable", "--tenant", "acme"); r.code != 0 || !strings.Contains(r.stdout, "already disabled") {
		t.Errorf("disable twice: exit %d, stdout %q; want already disabled", r.code, r.stdout)
	}
	if code, body := waitStatus(t, base, key, 403); code != 403 || !strings.Contains(body, "tenant_disabled") {
		t.Errorf("ingest of a disabled tenant: %d %s; want 403 tenant_disabled within 10 s", code, body)
	}
	r := runCmd(t, getenv, "tenant", "list", "--json")
	var ts []tenantJSON
	if err := json.Unmarshal([]byte(r.stdout), &ts); err != nil || len(ts) != 2 || ts[0].Slug != "acme" || ts[0].Status != "disabled" || ts[1].Status != "active" {
		t.Errorf("tenant list --json: %v, %+v", err, ts)
	}
	if r := runCmd(t, getenv, "tenant", "enable", "--tenant", "acme"); r.code != 0 {
		t.Fatalf("enable: exit %d: %s", r.code, r.stderr)
	}
	if code, body := waitStatus(t, base, key, 202); code != 202 {
		t.Errorf("ingest after enable: %d %s; want 202 within 10 s", code, body)
	}
	if n := auditCount(t, e, "tenant.disable") + auditCount(t, e, "tenant.enable"); n != 2 {
		t.Errorf("%d disable/enable audit rows, want 2", n)
	}

	stdin = strings.NewReader("acm\n")
	r = runCmd(t, getenv, "tenant", "delete", "--tenant", "acme")
	if r.code != 2 || !strings.Contains(r.stderr, "ClickHouse") || !strings.Contains(r.stderr, "nothing was deleted") {
		t.Errorf("delete with a wrong confirmation: exit %d, stderr %q; want exit 2, the plan, and nothing deleted", r.code, r.stderr)
	}
	if r := runCmd(t, getenv, "tenant", "show", "--tenant", "acme"); r.code != 0 {
		t.Fatalf("the tenant is gone after a refused confirmation: %s", r.stderr)
	}
	stdin = strings.NewReader("acme\n")
	t.Cleanup(func() { stdin = os.Stdin })
	r = runCmd(t, getenv, "tenant", "delete", "--tenant", "acme")
	if r.code != 0 || !strings.Contains(r.stdout, "1 API keys") || !strings.Contains(r.stdout, "audit log") || !strings.Contains(r.stdout, "ClickHouse") {
		t.Errorf("delete: exit %d, stdout %q; want what was removed and kept", r.code, r.stdout)
	}
	if r := runCmd(t, getenv, "tenant", "show", "--tenant", "acme"); r.code != 3 {
		t.Errorf("show after delete: exit %d, want 3", r.code)
	}
	if code, body := waitStatus(t, base, key, 401); code != 401 {
		t.Errorf("ingest after delete: %d %s; want 401 within 10 s", code, body)
	}
	if r := runCmd(t, getenv, "tenant", "delete", "--tenant", "other", "--yes", "--json"); r.code != 0 || !strings.Contains(r.stdout, `"api_keys_removed": 1`) {
		t.Errorf("delete --yes --json: exit %d, stdout %q", r.code, r.stdout)
	}
	if n := auditCount(t, e, "tenant.delete"); n != 2 {
		t.Errorf("%d tenant.delete audit rows, want 2", n)
	}
}

// rotate: the whole key needs no --tenant; the new key has the same tenant and scopes and is printed
// last; the old one is "expiring" with its expiry in the list, then refused once it passed.
func TestCLIRotate(t *testing.T) {
	e := testenv.Migrated(t)
	base, getenv := serveForTest(t, e)
	key := cliTenant(t, getenv, "acme")
	r := runCmd(t, getenv, "apikey", "rotate", "--key", key, "--overlap", "2s")
	if r.code != 0 || !auth.LooksLikeKey(r.lastLine()) || r.lastLine() == key {
		t.Fatalf("rotate: exit %d, stdout %q, stderr %q", r.code, r.stdout, r.stderr)
	}
	fresh := r.lastLine()
	r = runCmd(t, getenv, "apikey", "list", "--tenant", "acme", "--json")
	var ks []keyJSON
	if err := json.Unmarshal([]byte(r.stdout), &ks); err != nil || len(ks) != 2 {
		t.Fatalf("apikey list --json: %v, %q", err, r.stdout)
	}
	if ks[0].Status != "active" || ks[1].Status != "expiring" || ks[1].ExpiresAt == nil ||
		strings.Join(ks[0].Scopes, ",") != "events:write" || ks[0].Key != "" || strings.Contains(r.stdout, key[16:]) {
		t.Errorf("keys after rotate: %+v; want the new one active with the same scopes, the old one expiring, no secrets", ks)
	}
	if code, body := waitStatus(t, base, fresh, 202); code != 202 {
		t.Errorf("new key: %d %s", code, body)
	}
	if code, body := waitStatus(t, base, key, 401); code != 401 || !strings.Contains(body, "expired") {
		t.Errorf("old key after the overlap: %d %s; want 401 saying it expired", code, body)
	}
	if n := auditCount(t, e, "apikey.rotate"); n != 1 {
		t.Errorf("%d apikey.rotate audit rows, want 1", n)
	}
	if r := runCmd(t, getenv, "apikey", "list", "--tenant", "acme"); r.code != 0 || !strings.Contains(r.stdout, "expired") || !strings.Contains(r.stdout, "EXPIRES") {
		t.Errorf("apikey list: exit %d, stdout %q; want a table with the old key expired", r.code, r.stdout)
	}
}
