package main

import (
	"context"
	"strings"
	"testing"

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
