// Package audit appends to the audit_log table in Postgres: exports, rollups, quota alerts and key
// changes, each with who did it and to what. It never reads the log back for the product's own logic.
package audit

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"strings"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
)

// UserHash is how the audit log names a user, the log outliving a user's erasure: hex SHA-256 of
// tenant, NUL, user id. Entries carry it, never the user id (an erasure's, an export's filter).
func UserHash(tenant uuid.UUID, user string) string {
	h := sha256.New()
	h.Write(tenant[:])
	h.Write([]byte{0})
	h.Write([]byte(user))
	return hex.EncodeToString(h.Sum(nil))
}

// Entry is one audited action. TenantID is uuid.Nil for actions not tied to one tenant.
type Entry struct {
	TenantID uuid.UUID
	Actor    string // "apikey:<prefix>", "jwt:<sub>", "cli", "scheduler"
	Action   string // e.g. "apikey.create", "export.csv", "rollup.run"
	Target   string
	Meta     map[string]any
}

// Log writes entries.
type Log struct {
	pg *pgxpool.Pool
}

// New returns a Log on pg.
func New(pg *pgxpool.Pool) *Log { return &Log{pg: pg} }

// Execer runs a statement: the pool, or a transaction an entry is written in with other changes.
type Execer interface {
	Exec(ctx context.Context, sql string, args ...any) (pgconn.CommandTag, error)
}

// Record appends e.
func (l *Log) Record(ctx context.Context, e Entry) error { return RecordIn(ctx, l.pg, e) }

// RecordIn appends e through q (e.g. a transaction that must commit only with it).
func RecordIn(ctx context.Context, q Execer, e Entry) error {
	meta := map[string]any{}
	for k, v := range e.Meta {
		if s, ok := v.(string); ok {
			v = clean(s)
		}
		meta[clean(k)] = v
	}
	b, err := json.Marshal(meta)
	if err != nil {
		return fmt.Errorf("audit %s: encode meta: %w", e.Action, err)
	}
	var tenant *uuid.UUID
	if e.TenantID != uuid.Nil {
		tenant = &e.TenantID
	}
	if _, err := q.Exec(ctx,
		"INSERT INTO audit_log (tenant_id, actor, action, target, meta) VALUES ($1, $2, $3, $4, $5)",
		tenant, clean(e.Actor), clean(e.Action), clean(e.Target), b); err != nil {
		return fmt.Errorf("audit %s: %w", e.Action, err)
	}
	return nil
}

// clean makes s storable in Postgres text and jsonb, which refuse NUL characters: a hostile filter
// value must not make an audited action fail.
func clean(s string) string {
	return strings.ReplaceAll(strings.ToValidUTF8(s, "\uFFFD"), "\x00", "\uFFFD")
}
