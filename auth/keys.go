// Package auth owns credentials: API keys (created, listed, revoked and verified against hashes in
// Postgres) and, for the HTTP API, turning a request's bearer token and tenant slug into a Principal.
// It does not own tenants (package tenant) or decide what an endpoint needs beyond scopes and roles.
package auth

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
)

// Scope is a permission an API key carries.
type Scope string

const (
	ScopeEventsWrite    Scope = "events:write"
	ScopeAnalyticsRead  Scope = "analytics:read"
	ScopeAnalyticsAdmin Scope = "analytics:admin"
)

// AllScopes lists every scope, in the order they are documented.
var AllScopes = []Scope{ScopeEventsWrite, ScopeAnalyticsRead, ScopeAnalyticsAdmin}

var (
	// ErrInvalidKey: the token is not a key we issued, or it does not match.
	ErrInvalidKey = errors.New("invalid API key")
	// ErrRevokedKey: the key was revoked.
	ErrRevokedKey = errors.New("API key has been revoked")
	// ErrKeyNotFound: no key with that id or prefix belongs to the tenant.
	ErrKeyNotFound = errors.New("API key not found")
)

// ParseScopes reads a comma-separated scope list, rejecting unknown scopes.
func ParseScopes(s string) ([]Scope, error) {
	var out []Scope
	for _, part := range strings.Split(s, ",") {
		sc := Scope(strings.TrimSpace(part))
		if sc == "" {
			continue
		}
		if !slices.Contains(AllScopes, sc) {
			return nil, fmt.Errorf("unknown scope %q: valid scopes are events:write, analytics:read, analytics:admin", sc)
		}
		if !slices.Contains(out, sc) {
			out = append(out, sc)
		}
	}
	if len(out) == 0 {
		return nil, errors.New("at least one scope is required: events:write, analytics:read, analytics:admin")
	}
	return out, nil
}

// Key is an API key's stored record; the secret itself is never stored.
type Key struct {
	ID         uuid.UUID
	TenantID   uuid.UUID
	Name       string
	Prefix     string
	Scopes     []Scope
	CreatedAt  time.Time
	LastUsedAt *time.Time
	RevokedAt  *time.Time
}

// Has reports whether the key carries scope s.
func (k Key) Has(s Scope) bool { return slices.Contains(k.Scopes, s) }

// Keys manages API keys in Postgres.
type Keys struct {
	pg *pgxpool.Pool
}

// NewKeys returns a Keys on pg.
func NewKeys(pg *pgxpool.Pool) *Keys { return &Keys{pg: pg} }

// A key reads "ak_<12 hex prefix>_<43 base64url secret chars>". The prefix finds the row; the SHA-256 of
// the whole key is compared in constant time. Keys carry 256 random bits, so a fast hash is enough:
// there is nothing to brute-force, unlike a password.
const keyPrefix = "ak_"

func hashKey(key string) []byte {
	h := sha256.Sum256([]byte(key))
	return h[:]
}

func splitKey(key string) (prefix string, ok bool) {
	rest, found := strings.CutPrefix(key, keyPrefix)
	if !found {
		return "", false
	}
	prefix, secret, found := strings.Cut(rest, "_")
	if !found || len(prefix) != 12 || len(secret) != 43 {
		return "", false
	}
	if _, err := hex.DecodeString(prefix); err != nil {
		return "", false
	}
	return prefix, true
}

// LooksLikeKey reports whether token has the shape of an API key (as opposed to a JWT).
func LooksLikeKey(token string) bool { return strings.HasPrefix(token, keyPrefix) }

// Create issues a new key for tenantID and returns it with its record; the plaintext is shown only here.
func (k *Keys) Create(ctx context.Context, tenantID uuid.UUID, name string, scopes []Scope) (string, Key, error) {
	var p [6]byte
	var s [32]byte
	if _, err := rand.Read(p[:]); err != nil {
		return "", Key{}, err
	}
	if _, err := rand.Read(s[:]); err != nil {
		return "", Key{}, err
	}
	prefix := hex.EncodeToString(p[:])
	plain := keyPrefix + prefix + "_" + base64.RawURLEncoding.EncodeToString(s[:])
	rec := Key{ID: uuid.New(), TenantID: tenantID, Name: name, Prefix: prefix, Scopes: scopes}
	err := k.pg.QueryRow(ctx,
		"INSERT INTO api_keys (id, tenant_id, name, prefix, hash, scopes) VALUES ($1, $2, $3, $4, $5, $6) RETURNING created_at",
		rec.ID, tenantID, name, prefix, hashKey(plain), scopeStrings(scopes)).Scan(&rec.CreatedAt)
	if err != nil {
		return "", Key{}, fmt.Errorf("create api key for tenant %s: %w", tenantID, err)
	}
	return plain, rec, nil
}

func scopeStrings(s []Scope) []string {
	out := make([]string, len(s))
	for i, v := range s {
		out[i] = string(v)
	}
	return out
}

const keyColumns = "id, tenant_id, name, prefix, scopes, created_at, last_used_at, revoked_at"

func scanKey(row pgx.Row, extra ...any) (Key, error) {
	var k Key
	var scopes []string
	dest := append([]any{&k.ID, &k.TenantID, &k.Name, &k.Prefix, &scopes, &k.CreatedAt, &k.LastUsedAt, &k.RevokedAt}, extra...)
	if err := row.Scan(dest...); err != nil {
		return Key{}, err
	}
	for _, s := range scopes {
		k.Scopes = append(k.Scopes, Scope(s))
	}
	return k, nil
}

// Verify checks a presented key and returns its record. Unknown, malformed and mismatching keys all
// give ErrInvalidKey, so a caller learns nothing about which part was wrong.
func (k *Keys) Verify(ctx context.Context, plain string) (Key, error) {
	prefix, ok := splitKey(plain)
	if !ok {
		return Key{}, ErrInvalidKey
	}
	var stored []byte
	rec, err := scanKey(k.pg.QueryRow(ctx, "SELECT "+keyColumns+", hash FROM api_keys WHERE prefix = $1", prefix), &stored)
	if errors.Is(err, pgx.ErrNoRows) {
		return Key{}, ErrInvalidKey
	}
	if err != nil {
		return Key{}, fmt.Errorf("verify api key %s: %w", prefix, err)
	}
	if subtle.ConstantTimeCompare(stored, hashKey(plain)) != 1 {
		return Key{}, ErrInvalidKey
	}
	if rec.RevokedAt != nil {
		return Key{}, ErrRevokedKey
	}
	return rec, nil
}

// List returns the tenant's keys, newest first, revoked ones included.
func (k *Keys) List(ctx context.Context, tenantID uuid.UUID) ([]Key, error) {
	rows, err := k.pg.Query(ctx, "SELECT "+keyColumns+" FROM api_keys WHERE tenant_id = $1 ORDER BY created_at DESC", tenantID)
	if err != nil {
		return nil, fmt.Errorf("list api keys: %w", err)
	}
	defer rows.Close()
	var out []Key
	for rows.Next() {
		rec, err := scanKey(rows)
		if err != nil {
			return nil, fmt.Errorf("list api keys: %w", err)
		}
		out = append(out, rec)
	}
	return out, rows.Err()
}

// Revoke marks the tenant's key, named by id or prefix, revoked. Revoking twice is not an error.
func (k *Keys) Revoke(ctx context.Context, tenantID uuid.UUID, idOrPrefix string) (Key, error) {
	col := "prefix"
	if _, err := uuid.Parse(idOrPrefix); err == nil {
		col = "id::text"
	}
	rec, err := scanKey(k.pg.QueryRow(ctx,
		"UPDATE api_keys SET revoked_at = coalesce(revoked_at, now()) WHERE tenant_id = $1 AND "+col+" = $2 RETURNING "+keyColumns,
		tenantID, idOrPrefix))
	if errors.Is(err, pgx.ErrNoRows) {
		return Key{}, fmt.Errorf("%w: %q", ErrKeyNotFound, idOrPrefix)
	}
	if err != nil {
		return Key{}, fmt.Errorf("revoke api key %q: %w", idOrPrefix, err)
	}
	return rec, nil
}
