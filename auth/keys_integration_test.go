package auth_test

import (
	"context"
	"errors"
	"strings"
	"testing"

	"github.com/google/uuid"

	"github.com/analyticsd/analyticsd/auth"
	"github.com/analyticsd/analyticsd/internal/testenv"
	"github.com/analyticsd/analyticsd/internal/testenv/fixture"
)

// An operator names a key by id, by prefix, or by the whole key (what leaked); the whole key is
// matched by its hash, so a forged secret with a real prefix finds nothing. Before, only id and
// prefix were accepted and a whole key was "not found".
func TestFindKeyByIDPrefixOrWholeKey(t *testing.T) {
	t.Parallel()
	env := testenv.Migrated(t)
	ctx := context.Background()
	acme, other := fixture.Tenant(t, env.PG, "acme"), fixture.Tenant(t, env.PG, "other")
	keys := auth.NewKeys(env.PG)
	plain, rec := fixture.Key(t, env.PG, acme.ID, "ci", auth.ScopeEventsWrite)
	forged := plain[:len(plain)-1] + map[bool]string{true: "B", false: "A"}[strings.HasSuffix(plain, "A")]
	check := func(name string, tenantID uuid.UUID, ref string, found bool) {
		t.Helper()
		got, err := keys.Find(ctx, tenantID, ref)
		switch {
		case found && (err != nil || got.ID != rec.ID):
			t.Errorf("%s: got %v, %v; want key %s", name, got.ID, err, rec.ID)
		case !found && err == nil:
			t.Errorf("%s: found %s, want no key", name, got.ID)
		case err != nil && strings.Contains(err.Error(), plain[16:]):
			t.Errorf("%s: error %q shows the key's secret", name, err)
		}
	}
	check("id", acme.ID, rec.ID.String(), true)
	check("prefix", acme.ID, rec.Prefix, true)
	check("whole key", acme.ID, plain, true)
	check("whole key, no tenant given", uuid.Nil, plain, true)
	check("whole key, another tenant", other.ID, plain, false)
	check("prefix, another tenant", other.ID, rec.Prefix, false)
	check("prefix, no tenant given", uuid.Nil, rec.Prefix, false)
	check("forged secret with the real prefix", acme.ID, forged, false)
	check("unknown prefix", acme.ID, "0123456789ab", false)
}

// Revoking twice changes nothing the second time and says so, so the caller audits once. Before,
// the second revoke looked like the first.
func TestRevokeTwiceReportsAlreadyRevoked(t *testing.T) {
	t.Parallel()
	env := testenv.Migrated(t)
	ctx := context.Background()
	keys := auth.NewKeys(env.PG)
	plain, rec := fixture.Key(t, env.PG, fixture.Tenant(t, env.PG, "acme").ID, "", auth.ScopeEventsWrite)
	first, already, err := keys.RevokeID(ctx, rec.ID)
	if err != nil || already || first.RevokedAt == nil {
		t.Fatalf("first revoke: %+v already=%v err=%v; want revoked now", first, already, err)
	}
	second, already, err := keys.RevokeID(ctx, rec.ID)
	if err != nil || !already || second.RevokedAt == nil || !second.RevokedAt.Equal(*first.RevokedAt) {
		t.Errorf("second revoke: %+v already=%v err=%v; want already revoked, at the first time", second, already, err)
	}
	if _, err := keys.Verify(ctx, plain); !errors.Is(err, auth.ErrRevokedKey) {
		t.Errorf("verify a revoked key: %v, want ErrRevokedKey", err)
	}
	if _, _, err := keys.RevokeID(ctx, uuid.New()); !errors.Is(err, auth.ErrKeyNotFound) {
		t.Errorf("revoke an unknown id: %v, want ErrKeyNotFound", err)
	}
	if _, _, _, err := keys.Rotate(ctx, rec.ID, "", 0); !errors.Is(err, auth.ErrNotRotatable) {
		t.Errorf("rotate a revoked key: %v, want ErrNotRotatable", err)
	}
}
