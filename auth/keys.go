// Package auth owns credentials: API keys (created, listed, rotated, revoked and verified against
// hashes in Postgres, their last use recorded) and, for the HTTP API, turning a request's bearer token and tenant slug into a Principal.
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
	"regexp"
	"slices"
	"strconv"
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
	// ErrExpiredKey: the key's expiry (set when it was rotated) has passed.
	ErrExpiredKey = errors.New("API key has expired")
	// ErrKeyNotFound: no key with that id, prefix or value belongs to the tenant.
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
	ExpiresAt  *time.Time // set on a key replaced by `apikey rotate`: the end of its overlap
}

// Expired reports whether the key's expiry has passed at now.
func (k Key) Expired(now time.Time) bool { return k.ExpiresAt != nil && !now.Before(*k.ExpiresAt) }

// Status is the key's state at now: "active", "revoked", "expired", or "expiring" (rotated, still
// inside its overlap).
func (k Key) Status(now time.Time) string {
	switch {
	case k.RevokedAt != nil:
		return "revoked"
	case k.Expired(now):
		return "expired"
	case k.ExpiresAt != nil:
		return "expiring"
	}
	return "active"
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

// IsWholeKey reports whether s has the full shape of an API key (prefix and secret), as opposed to a
// key's id or prefix.
func IsWholeKey(s string) bool { _, ok := splitKey(s); return ok }

// LooksLikeKey reports whether token has the shape of an API key (as opposed to a JWT).
func LooksLikeKey(token string) bool { return strings.HasPrefix(token, keyPrefix) }

// Then runs inside the transaction of a change to a key, with the key after it, and only when
// something changed: the change commits only with what Then writes (the audit row of who made it).
// Written after the commit, as it first was, a failed audit write left a key revoked with no record,
// or a rotation's new key live while the command failed without printing it (found by review).
type Then func(ctx context.Context, tx pgx.Tx, k Key) error

// Create issues a new key for tenantID and returns it with its record; the plaintext is shown only here.
func (k *Keys) Create(ctx context.Context, tenantID uuid.UUID, name string, scopes []Scope, fns ...Then) (plain string, rec Key, err error) {
	err = pgx.BeginFunc(ctx, k.pg, func(tx pgx.Tx) error {
		if plain, rec, err = insertKey(ctx, tx, tenantID, name, scopes); err != nil {
			return err
		}
		return then(ctx, tx, rec, fns)
	})
	if err != nil {
		return "", Key{}, err
	}
	return plain, rec, nil
}

// then runs fns in tx.
func then(ctx context.Context, tx pgx.Tx, k Key, fns []Then) error {
	for _, f := range fns {
		if err := f(ctx, tx, k); err != nil {
			return err
		}
	}
	return nil
}

// insertKey makes a key and stores its hash through db (the pool, or a transaction).
func insertKey(ctx context.Context, db interface {
	QueryRow(context.Context, string, ...any) pgx.Row
}, tenantID uuid.UUID, name string, scopes []Scope) (string, Key, error) {
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
	err := db.QueryRow(ctx,
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

const keyColumns = "id, tenant_id, name, prefix, scopes, created_at, last_used_at, revoked_at, expires_at"

func scanKey(row pgx.Row, extra ...any) (Key, error) {
	var k Key
	var scopes []string
	dest := append([]any{&k.ID, &k.TenantID, &k.Name, &k.Prefix, &scopes, &k.CreatedAt, &k.LastUsedAt, &k.RevokedAt, &k.ExpiresAt}, extra...)
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
	if rec.Expired(time.Now()) {
		return Key{}, ErrExpiredKey
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

// Find returns the key named by ref: its id, its prefix, or the whole key (what an operator holds
// when a key leaked; it is matched by prefix and hash, like Verify). tenantID limits the search to
// one tenant; uuid.Nil searches every tenant, which only the whole key may do.
func (k *Keys) Find(ctx context.Context, tenantID uuid.UUID, ref string) (Key, error) {
	q := "SELECT " + keyColumns + ", hash FROM api_keys WHERE prefix = $1"
	arg := ref
	prefix, whole := splitKey(ref)
	switch {
	case whole:
		arg = prefix
	case tenantID == uuid.Nil:
		return Key{}, fmt.Errorf("find api key %s: a key id or prefix needs its tenant (--tenant)", redact(ref))
	default:
		if id, err := uuid.Parse(ref); err == nil {
			// The parsed id: upper case, braces and urn:uuid: name the same key (as text they
			// matched none, found by review).
			q = "SELECT " + keyColumns + ", hash FROM api_keys WHERE id = $1"
			arg = id.String()
		}
	}
	var stored []byte
	rec, err := scanKey(k.pg.QueryRow(ctx, q, arg), &stored)
	if errors.Is(err, pgx.ErrNoRows) || (err == nil && tenantID != uuid.Nil && rec.TenantID != tenantID) ||
		(err == nil && whole && subtle.ConstantTimeCompare(stored, hashKey(ref)) != 1) {
		return Key{}, fmt.Errorf("%w: %s", ErrKeyNotFound, redact(ref))
	}
	if err != nil {
		return Key{}, fmt.Errorf("find api key %s: %w", redact(ref), err)
	}
	return rec, nil
}

// redact names a whole key by its public prefix only, so the secret reaches no log or error message.
// Anything else that holds a key's shape — a key pasted with a space or a newline after it, or after
// "Bearer " — is cut after the prefix too: such input is a leaked key far more often than not, and it
// was echoed whole (found by review).
func redact(ref string) string {
	if prefix, ok := splitKey(ref); ok {
		return "with prefix " + prefix
	}
	return strconv.Quote(RedactKeys(ref))
}

// keyShape finds something shaped like an API key: "ak_", 12 hex digits, "_" and what follows up to
// a space or a quote.
var keyShape = regexp.MustCompile(`(ak_[0-9a-fA-F]{12}_)[^\s"']*`)

// RedactKeys returns s with each key-shaped run cut after its prefix ("ak_<12 hex>_…"), for a message
// that echoes what an operator typed.
func RedactKeys(s string) string { return keyShape.ReplaceAllString(s, "${1}…") }

// Revoke marks the tenant's key named by ref (id, prefix or the whole key, see Find) revoked.
// Revoking twice is not an error; RevokeID says whether anything changed.
func (k *Keys) Revoke(ctx context.Context, tenantID uuid.UUID, ref string) (Key, error) {
	found, err := k.Find(ctx, tenantID, ref)
	if err != nil {
		return Key{}, err
	}
	rec, _, err := k.RevokeID(ctx, found.ID)
	return rec, err
}

// RevokeID marks the key with id revoked. Revoking twice is not an error: already reports that the
// key was revoked before (its first revocation time is kept), so a caller audits only a real change.
func (k *Keys) RevokeID(ctx context.Context, id uuid.UUID, fns ...Then) (rec Key, already bool, err error) {
	err = pgx.BeginFunc(ctx, k.pg, func(tx pgx.Tx) error {
		before, err := scanKey(tx.QueryRow(ctx, "SELECT "+keyColumns+" FROM api_keys WHERE id = $1 FOR UPDATE", id))
		if err != nil {
			return err
		}
		if before.RevokedAt != nil {
			rec, already = before, true
			return nil
		}
		if rec, err = scanKey(tx.QueryRow(ctx, "UPDATE api_keys SET revoked_at = now() WHERE id = $1 RETURNING "+keyColumns, id)); err != nil {
			return err
		}
		return then(ctx, tx, rec, fns)
	})
	if errors.Is(err, pgx.ErrNoRows) {
		return Key{}, false, fmt.Errorf("%w: %s", ErrKeyNotFound, id)
	}
	if err != nil {
		return Key{}, false, fmt.Errorf("revoke api key %s: %w", id, err)
	}
	return rec, already, nil
}

// RotateThen is Then for a rotation: it sees the new key and the old one after it.
type RotateThen func(ctx context.Context, tx pgx.Tx, newKey, oldKey Key) error

// ErrNotRotatable: the key is revoked, expired or rotated already; create a new one instead.
var ErrNotRotatable = errors.New("API key cannot be rotated")

// Rotate issues a new key with the old key's tenant, scopes and name (unless name is set) and makes
// the old key expire after overlap, so clients can move to the new one without an outage. A revoked
// or expired key is not rotated, nor one that expires already (rotated before, or created to expire):
// a second rotation, two operators at once or a retry after lost output, left a second replacement
// key live, never expiring, which nobody may have seen (found by review). Its fns run in the
// rotation's transaction, as a Then does.
func (k *Keys) Rotate(ctx context.Context, id uuid.UUID, name string, overlap time.Duration, fns ...RotateThen) (plain string, newKey, oldKey Key, err error) {
	if overlap < 0 {
		return "", Key{}, Key{}, fmt.Errorf("rotate api key %s: negative overlap %s", id, overlap)
	}
	err = pgx.BeginFunc(ctx, k.pg, func(tx pgx.Tx) error {
		old, err := scanKey(tx.QueryRow(ctx, "SELECT "+keyColumns+" FROM api_keys WHERE id = $1 FOR UPDATE", id))
		if err != nil {
			return err
		}
		if st := old.Status(time.Now()); st == "revoked" || st == "expired" {
			return fmt.Errorf("%w: key %s (prefix %s) is %s", ErrNotRotatable, old.ID, old.Prefix, st)
		}
		if old.ExpiresAt != nil {
			return fmt.Errorf("%w: key %s (prefix %s) expires already, at %s (rotated before?): its replacement is the key to rotate, "+
				"or revoke it and create a new one", ErrNotRotatable, old.ID, old.Prefix, old.ExpiresAt.UTC().Format(time.RFC3339))
		}
		if name == "" {
			name = old.Name
		}
		if plain, newKey, err = insertKey(ctx, tx, old.TenantID, name, old.Scopes); err != nil {
			return err
		}
		if oldKey, err = scanKey(tx.QueryRow(ctx,
			"UPDATE api_keys SET expires_at = now() + make_interval(secs => $2) WHERE id = $1 RETURNING "+keyColumns,
			id, overlap.Seconds())); err != nil {
			return err
		}
		for _, f := range fns {
			if err := f(ctx, tx, newKey, oldKey); err != nil {
				return err
			}
		}
		return nil
	})
	switch {
	case errors.Is(err, pgx.ErrNoRows):
		return "", Key{}, Key{}, fmt.Errorf("%w: %s", ErrKeyNotFound, id)
	case err != nil && !errors.Is(err, ErrNotRotatable):
		return "", Key{}, Key{}, fmt.Errorf("rotate api key %s: %w", id, err)
	}
	return plain, newKey, oldKey, err
}

// MarkUsed sets last_used_at of keys ids[i] to ats[i], never moving it back (instances flush in any
// order).
func (k *Keys) MarkUsed(ctx context.Context, ids []uuid.UUID, ats []time.Time) error {
	_, err := k.pg.Exec(ctx, `UPDATE api_keys AS k SET last_used_at = u.at
		FROM unnest($1::uuid[], $2::timestamptz[]) AS u(id, at)
		WHERE k.id = u.id AND (k.last_used_at IS NULL OR k.last_used_at < u.at)`, ids, ats)
	if err != nil {
		return fmt.Errorf("mark %d api keys used: %w", len(ids), err)
	}
	return nil
}
