package main

import (
	"bytes"
	"context"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/analyticsd/analyticsd/auth"
	"github.com/analyticsd/analyticsd/internal/testenv"
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
	for deadline := time.Now().Add(15 * time.Second); ; time.Sleep(30 * time.Millisecond) {
		if resp, err := http.Get(base + "/healthz"); err == nil {
			resp.Body.Close()
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("serve did not start")
		}
	}
	req, _ := http.NewRequest(http.MethodPost, base+"/api/analytics/events", strings.NewReader(`{"event":"page.view","user_id":"u1"}`))
	req.Header.Set("Authorization", "Bearer "+key)
	req.Header.Set("Content-Type", "application/json")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusAccepted {
		t.Fatalf("ingest with the key: %d, want 202", resp.StatusCode)
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
