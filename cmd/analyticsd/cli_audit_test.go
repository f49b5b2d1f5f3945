package main

import (
	"context"
	"encoding/json"
	"strings"
	"sync"
	"testing"

	"github.com/analyticsd/analyticsd/auth"
	"github.com/analyticsd/analyticsd/internal/testenv"
)

// failAudit makes every audit_log insert of action fail, as a full disk, a lost connection or a
// statement timeout would, until the test heals it.
func failAudit(t *testing.T, e testenv.Env, action string) (heal func()) {
	t.Helper()
	ctx := context.Background()
	s := `"` + e.PGSchema + `"`
	for _, q := range []string{
		`CREATE FUNCTION ` + s + `.test_fail_audit() RETURNS trigger LANGUAGE plpgsql AS $$
			BEGIN IF NEW.action = '` + action + `' THEN RAISE EXCEPTION 'audit insert failed'; END IF; RETURN NEW; END $$`,
		`CREATE TRIGGER test_fail_audit BEFORE INSERT ON ` + s + `.audit_log FOR EACH ROW EXECUTE FUNCTION ` + s + `.test_fail_audit()`,
	} {
		if _, err := e.PG.Exec(ctx, q); err != nil {
			t.Fatal(err)
		}
	}
	return func() {
		t.Helper()
		for _, q := range []string{`DROP TRIGGER test_fail_audit ON ` + s + `.audit_log`, `DROP FUNCTION ` + s + `.test_fail_audit()`} {
			if _, err := e.PG.Exec(ctx, q); err != nil {
				t.Fatal(err)
			}
		}
	}
}

// listKeys returns the tenant's keys as `apikey list --json` prints them.
func listKeys(t *testing.T, getenv func(string) string, slug string) []keyJSON {
	t.Helper()
	r := runCmd(t, getenv, "apikey", "list", "--tenant", slug, "--json")
	var ks []keyJSON
	if err := json.Unmarshal([]byte(r.stdout), &ks); err != nil {
		t.Fatalf("apikey list: exit %d, %v: %s %s", r.code, err, r.stdout, r.stderr)
	}
	return ks
}

// A change and its audit row commit together. Before, the audit row was written after the change
// committed: a revoke whose audit insert failed exited 1 with the key revoked, and running it again
// said "already revoked" — no apikey.revoke row, ever; a rotate whose audit insert failed exited 1
// without printing the new key, which stayed live with nobody having seen it, and the old key expiring.
func TestCLIChangeCommitsOnlyWithItsAuditRow(t *testing.T) {
	e := testenv.Migrated(t)
	getenv := stackEnv(t, e, nil)
	key := cliTenant(t, getenv, "audit-together")
	keys := auth.NewKeys(e.PG)

	heal := failAudit(t, e, "apikey.revoke")
	if r := runCmd(t, getenv, "apikey", "revoke", "--key", key); r.code == 0 || !strings.Contains(r.stderr, "audit insert failed") {
		t.Errorf("revoke with the audit failing: exit %d, stderr %q; want a failure naming it", r.code, r.stderr)
	}
	if _, err := keys.Verify(context.Background(), key); err != nil {
		t.Errorf("the revoke failed, yet the key is refused: %v", err)
	}
	heal()
	if r := runCmd(t, getenv, "apikey", "revoke", "--key", key); r.code != 0 || !strings.Contains(r.stdout, "revoked key") {
		t.Errorf("revoke again: exit %d, stdout %q, stderr %q; want it revoked now", r.code, r.stdout, r.stderr)
	}
	if n := auditCount(t, e, "apikey.revoke"); n != 1 {
		t.Errorf("%d apikey.revoke audit rows, want 1", n)
	}

	key = cliTenant(t, getenv, "audit-rotate")
	heal = failAudit(t, e, "apikey.rotate")
	if r := runCmd(t, getenv, "apikey", "rotate", "--key", key, "--overlap", "1h"); r.code == 0 || strings.Contains(r.stdout, "ak_") {
		t.Errorf("rotate with the audit failing: exit %d, stdout %q; want a failure printing no key", r.code, r.stdout)
	}
	heal()
	if ks := listKeys(t, getenv, "audit-rotate"); len(ks) != 1 || ks[0].Status != "active" {
		t.Errorf("after a failed rotate: keys %+v; want the one key, active and not expiring", ks)
	}

	heal = failAudit(t, e, "tenant.set_timezone")
	r := runCmd(t, getenv, "tenant", "set-timezone", "--tenant", "audit-rotate", "--zone", "Asia/Kolkata")
	heal()
	if zone := runCmd(t, getenv, "tenant", "list", "--json").stdout; r.code == 0 || strings.Contains(zone, "Asia/Kolkata") {
		t.Errorf("set-timezone with the audit failing: exit %d; tenants %s; want a failure and the zone unchanged", r.code, zone)
	}
}

// Rotating a key that is rotated already is refused. Before, a second rotation — two operators at
// once, or a retry after lost output — left a second replacement key that never expires, live, and
// possibly seen by nobody.
func TestCLIConcurrentRotationsLeaveOneReplacement(t *testing.T) {
	e := testenv.Migrated(t)
	getenv := stackEnv(t, e, nil)
	key := cliTenant(t, getenv, "rotate-once")
	var wg sync.WaitGroup
	results := make([]result, 3)
	for i := range results {
		wg.Go(func() { results[i] = runCmd(t, getenv, "apikey", "rotate", "--key", key) })
	}
	wg.Wait()
	ok := 0
	for _, r := range results {
		switch {
		case r.code == 0:
			ok++
		case !strings.Contains(r.stderr, "cannot be rotated"):
			t.Errorf("a refused rotation: exit %d, stderr %q; want it to say the key cannot be rotated", r.code, r.stderr)
		}
	}
	active := 0
	for _, k := range listKeys(t, getenv, "rotate-once") {
		if k.Status == "active" {
			active++
		}
	}
	if ok != 1 || active != 1 {
		t.Errorf("%d of 3 concurrent rotations succeeded, %d active keys; want 1 and 1", ok, active)
	}
}

// An error never echoes a key's secret, however it was pasted. Before, only a perfectly shaped key
// was redacted: one with a space, a newline or "Bearer " around it, one passed without --key, or one
// given as --tenant was printed whole on stderr.
func TestCLIErrorsNeverEchoAKey(t *testing.T) {
	e := testenv.Migrated(t)
	getenv := stackEnv(t, e, nil)
	key := cliTenant(t, getenv, "redact")
	secret := key[len("ak_")+12+1:]
	for _, args := range [][]string{
		{"apikey", "revoke", "--tenant", "nobody", "--key", key + " "},
		{"apikey", "revoke", "--tenant", "nobody", "--key", "x" + key},
		{"apikey", "revoke", "--tenant", "redact", "--key", key + "x"},
		{"apikey", "revoke", key},
		{"apikey", "revoke", "--tenant", key, "--key", "0123456789ab"},
		{"apikey", "list", "--tenant", key},
		{"apikey", "revoke", "--key=" + key, "--bogus"},
	} {
		r := runCmd(t, getenv, args...)
		if r.code == 0 || strings.Contains(r.stdout+r.stderr, secret) {
			t.Errorf("%q: exit %d, stderr %q; want a failure that does not show the key's secret", args, r.code, r.stderr)
		}
	}
	// Pasted with its line end or "Bearer ", the key still names itself.
	for _, ref := range []string{key + "\n", "Bearer " + key} {
		if r := runCmd(t, getenv, "apikey", "revoke", "--key", ref); r.code != 0 || strings.Contains(r.stdout+r.stderr, secret) {
			t.Errorf("revoke --key %q: exit %d, stdout %q, stderr %q; want the key revoked, its secret not shown", ref, r.code, r.stdout, r.stderr)
		}
	}
}

// A key's id names it in any form uuid parsing takes. Before, it was compared as text: the id in upper
// case, in braces or as a urn was "not found".
func TestCLIKeyIDInAnyUUIDForm(t *testing.T) {
	e := testenv.Migrated(t)
	getenv := stackEnv(t, e, nil)
	cliTenant(t, getenv, "uuid-forms")
	ks := listKeys(t, getenv, "uuid-forms")
	if len(ks) != 1 {
		t.Fatalf("keys %+v, want one", ks)
	}
	id := ks[0].ID.String()
	for _, ref := range []string{strings.ToUpper(id), "{" + id + "}", "urn:uuid:" + id} {
		if r := runCmd(t, getenv, "apikey", "revoke", "--tenant", "uuid-forms", "--key", ref); r.code != 0 {
			t.Errorf("revoke --key %s: exit %d, stderr %q; want the key found", ref, r.code, r.stderr)
		}
	}
}

// hookReader runs fn on its first Read, then reads from r.
type hookReader struct {
	fn   func()
	done bool
	r    *strings.Reader
}

func (h *hookReader) Read(p []byte) (int, error) {
	if !h.done {
		h.done = true
		h.fn()
	}
	return h.r.Read(p)
}

// `tenant delete` deletes the tenant it showed at the prompt, or nothing. Before, it deleted by slug
// after the prompt: when the slug was deleted and created again meanwhile, typing it deleted the new
// tenant, whose id was never shown, and the audit row named the old one.
func TestCLIDeleteDeletesOnlyTheTenantShown(t *testing.T) {
	e := testenv.Migrated(t)
	getenv := stackEnv(t, e, nil)
	cliTenant(t, getenv, "del-race")
	var newKey string
	old := stdin
	t.Cleanup(func() { stdin = old })
	stdin = &hookReader{r: strings.NewReader("del-race\n"), fn: func() {
		if r := runCmd(t, getenv, "tenant", "delete", "--tenant", "del-race", "--yes"); r.code != 0 {
			t.Fatalf("concurrent delete: %d %s", r.code, r.stderr)
		}
		newKey = cliTenant(t, getenv, "del-race")
	}}
	r := runCmd(t, getenv, "tenant", "delete", "--tenant", "del-race")
	if r.code == 0 {
		t.Errorf("delete after the tenant shown was replaced: exit 0, stdout %q; want a failure", r.stdout)
	}
	if _, err := auth.NewKeys(e.PG).Verify(context.Background(), newKey); err != nil {
		t.Errorf("the re-created tenant del-race (never shown at the prompt) was deleted, its key with it: %v", err)
	}
	if n := auditCount(t, e, "tenant.delete"); n != 1 {
		t.Errorf("%d tenant.delete audit rows, want 1 (the concurrent delete's)", n)
	}
}

// A --name that is not printable text is a bad value (exit 2) naming the flag. Before, a NUL or
// invalid UTF-8 reached Postgres and exited 1 with the driver's error, and a newline or an escape
// sequence was stored, to rewrite the terminal of whoever lists it.
func TestCLIBadNameIsAUsageError(t *testing.T) {
	e := testenv.Migrated(t)
	getenv := stackEnv(t, e, nil)
	cliTenant(t, getenv, "named")
	for _, name := range []string{"a\x00b", "a\xffb", "a\nb", "a\x1b[2Jb", strings.Repeat("n", maxLabel+1)} {
		for _, args := range [][]string{
			{"tenant", "create", "--slug", "bad-name", "--name", name},
			{"apikey", "create", "--tenant", "named", "--scopes", "events:write", "--name", name},
		} {
			if r := runCmd(t, getenv, args...); r.code != exitUsage || !strings.Contains(r.stderr, "--name") {
				t.Errorf("%s --name %q: exit %d, stderr %q; want 2 naming --name", args[:2], name, r.code, r.stderr)
			}
		}
	}
	if r := runCmd(t, getenv, "tenant", "create", "--slug", "good-name", "--name", "Zürich GmbH — 東京"); r.code != 0 {
		t.Errorf("a name in several scripts: exit %d, stderr %q; want it accepted", r.code, r.stderr)
	}
}
