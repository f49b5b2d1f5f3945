// Package tenant owns the tenant registry in Postgres: creating, disabling and deleting tenants,
// finding them by slug or id, and their per-tenant quota overrides. It knows nothing of credentials
// (package auth) or events; deleting a tenant removes the Postgres rows that reference it through
// their foreign keys, and nothing in ClickHouse or Redis.
package tenant

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"regexp"
	"strings"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
)

var (
	// ErrNotFound: no tenant has that slug or id.
	ErrNotFound = errors.New("tenant not found")
	// ErrExists: the slug is taken.
	ErrExists = errors.New("tenant slug already exists")
	// ErrDisabled: the tenant exists but an operator disabled it; its credentials are refused.
	ErrDisabled = errors.New("tenant is disabled")
	// ErrBadSlug: the slug is not lowercase letters, digits and dashes.
	ErrBadSlug = errors.New("tenant slug must be 1-63 lowercase letters, digits or dashes, starting with a letter or digit")
	// ErrBadTimeZone: the zone is not an IANA time zone name.
	ErrBadTimeZone = errors.New("time zone must be an IANA zone name such as Europe/Berlin, Asia/Kolkata or UTC")
)

// LoadTimeZone validates an IANA zone name and returns its location. Only canonical-looking names
// are taken (zoneName): "Local", "" and "localtime" name whatever zone the server happens to run in
// (on Debian localtime is a link to /etc/localtime), not one the tenant chose; "right/..." zones
// count leap seconds; paths ("./UTC", "Etc//UTC") and the tz database's internal files
// ("posixrules") are no zone names (found by review: all of them loaded).
func LoadTimeZone(name string) (*time.Location, error) {
	if len(name) > 64 || !zoneName.MatchString(name) || name == "Local" || name == "localtime" || name == "posixrules" ||
		strings.HasPrefix(name, "right/") || strings.HasPrefix(name, "posix/") {
		return nil, fmt.Errorf("%w: %q", ErrBadTimeZone, name)
	}
	loc, err := time.LoadLocation(name)
	if err != nil {
		return nil, fmt.Errorf("%w: %q", ErrBadTimeZone, name)
	}
	return loc, nil
}

var slugRe = regexp.MustCompile(`^[a-z0-9][a-z0-9-]{0,62}$`)

// zoneName is the shape of an IANA zone name: components of letters, digits, '_', '+' and '-', each
// starting with a letter or digit, joined by single slashes (Europe/Berlin, Etc/GMT+12,
// America/Argentina/Buenos_Aires, EST5EDT).
var zoneName = regexp.MustCompile(`^[A-Za-z][A-Za-z0-9_+-]*(/[A-Za-z0-9][A-Za-z0-9_+-]*)*$`)

// ValidSlug reports whether s is an acceptable tenant slug.
func ValidSlug(s string) bool { return slugRe.MatchString(s) }

// Tenant is one customer of analyticsd; all of its data is keyed by ID.
type Tenant struct {
	ID             uuid.UUID
	Slug           string
	Name           string
	QuotaOverrides map[string]float64
	CreatedAt      time.Time
	DisabledAt     *time.Time // set while an operator has the tenant disabled
	// TimeZone is the IANA zone whose local midnight starts the tenant's days in reads ("UTC" unless
	// set). Quotas and billed usage stay per UTC day.
	TimeZone string
}

// Disabled reports whether an operator disabled the tenant.
func (t Tenant) Disabled() bool { return t.DisabledAt != nil }

// Store reads and writes tenants.
type Store struct {
	pg *pgxpool.Pool
}

// Then runs inside the transaction of a change to a tenant, with the tenant after it, and only when
// something changed: the change commits only with what Then writes (the audit row of who made it).
// Written after the commit, as it first was, a failed audit write left the change made, the command
// failed, and its rerun found nothing to change and so nothing to audit (found by review).
type Then func(ctx context.Context, tx pgx.Tx, t Tenant) error

// then runs fns in tx.
func then(ctx context.Context, tx pgx.Tx, t Tenant, fns []Then) error {
	for _, f := range fns {
		if err := f(ctx, tx, t); err != nil {
			return err
		}
	}
	return nil
}

// NewStore returns a Store on pg.
func NewStore(pg *pgxpool.Pool) *Store { return &Store{pg: pg} }

// Create registers a tenant. The name defaults to the slug.
func (s *Store) Create(ctx context.Context, slug, name string, fns ...Then) (Tenant, error) {
	if !ValidSlug(slug) {
		return Tenant{}, fmt.Errorf("%w: %q", ErrBadSlug, slug)
	}
	if name == "" {
		name = slug
	}
	t := Tenant{ID: uuid.New(), Slug: slug, Name: name, QuotaOverrides: map[string]float64{}, TimeZone: "UTC"}
	err := pgx.BeginFunc(ctx, s.pg, func(tx pgx.Tx) error {
		if err := tx.QueryRow(ctx, "INSERT INTO tenants (id, slug, name) VALUES ($1, $2, $3) RETURNING created_at",
			t.ID, t.Slug, t.Name).Scan(&t.CreatedAt); err != nil {
			return err
		}
		return then(ctx, tx, t, fns)
	})
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) && pgErr.Code == "23505" {
		return Tenant{}, fmt.Errorf("%w: %q", ErrExists, slug)
	}
	if err != nil {
		return Tenant{}, fmt.Errorf("create tenant %q: %w", slug, err)
	}
	return t, nil
}

const columns = "id, slug, name, quota_overrides, created_at, disabled_at, time_zone"

func scan(row pgx.Row) (Tenant, error) {
	var t Tenant
	var overrides []byte
	if err := row.Scan(&t.ID, &t.Slug, &t.Name, &overrides, &t.CreatedAt, &t.DisabledAt, &t.TimeZone); err != nil {
		return Tenant{}, err
	}
	if err := json.Unmarshal(overrides, &t.QuotaOverrides); err != nil {
		return Tenant{}, fmt.Errorf("tenant %s: decode quota_overrides: %w", t.Slug, err)
	}
	return t, nil
}

// BySlug finds a tenant by slug.
func (s *Store) BySlug(ctx context.Context, slug string) (Tenant, error) {
	if !ValidSlug(slug) {
		// Not echoed: what is typed where a slug belongs is, often enough, an API key (found by review).
		return Tenant{}, fmt.Errorf("%w: that is not a tenant slug (lowercase letters, digits and dashes, at most 63)", ErrNotFound)
	}
	t, err := scan(s.pg.QueryRow(ctx, "SELECT "+columns+" FROM tenants WHERE slug = $1", slug))
	if errors.Is(err, pgx.ErrNoRows) {
		return Tenant{}, fmt.Errorf("%w: %q", ErrNotFound, slug)
	}
	if err != nil {
		return Tenant{}, fmt.Errorf("find tenant %q: %w", slug, err)
	}
	return t, nil
}

// ByID finds a tenant by id.
func (s *Store) ByID(ctx context.Context, id uuid.UUID) (Tenant, error) {
	t, err := scan(s.pg.QueryRow(ctx, "SELECT "+columns+" FROM tenants WHERE id = $1", id))
	if errors.Is(err, pgx.ErrNoRows) {
		return Tenant{}, fmt.Errorf("%w: %s", ErrNotFound, id)
	}
	if err != nil {
		return Tenant{}, fmt.Errorf("find tenant %s: %w", id, err)
	}
	return t, nil
}

// List returns every tenant, by slug.
func (s *Store) List(ctx context.Context) ([]Tenant, error) {
	rows, err := s.pg.Query(ctx, "SELECT "+columns+" FROM tenants ORDER BY slug")
	if err != nil {
		return nil, fmt.Errorf("list tenants: %w", err)
	}
	defer rows.Close()
	var out []Tenant
	for rows.Next() {
		t, err := scan(rows)
		if err != nil {
			return nil, fmt.Errorf("list tenants: %w", err)
		}
		out = append(out, t)
	}
	return out, rows.Err()
}

// SetQuota sets (limit non-nil) or removes (nil) the tenant's override of one metric's limit.
// previous is the override before (nil when there was none); changed is false when it already was as
// asked. The tenant's row is locked while it is compared, so two concurrent changes each see the
// other's result.
func (s *Store) SetQuota(ctx context.Context, slug, metric string, limit *float64, fns ...Then) (t Tenant, previous *float64, changed bool, err error) {
	err = pgx.BeginFunc(ctx, s.pg, func(tx pgx.Tx) error {
		before, err := scan(tx.QueryRow(ctx, "SELECT "+columns+" FROM tenants WHERE slug = $1 FOR UPDATE", slug))
		if err != nil {
			return err
		}
		prev, had := before.QuotaOverrides[metric]
		if had {
			previous = &prev
		}
		if changed = (limit == nil && had) || (limit != nil && (!had || prev != *limit)); !changed {
			t = before
			return nil
		}
		if limit == nil {
			t, err = scan(tx.QueryRow(ctx, "UPDATE tenants SET quota_overrides = quota_overrides - $2 WHERE id = $1 RETURNING "+columns, before.ID, metric))
		} else {
			t, err = scan(tx.QueryRow(ctx, "UPDATE tenants SET quota_overrides = quota_overrides || jsonb_build_object($2::text, $3::float8) WHERE id = $1 RETURNING "+columns,
				before.ID, metric, *limit))
		}
		if err != nil {
			return err
		}
		return then(ctx, tx, t, fns)
	})
	if errors.Is(err, pgx.ErrNoRows) {
		return Tenant{}, nil, false, fmt.Errorf("%w: %q", ErrNotFound, slug)
	}
	if err != nil {
		return Tenant{}, nil, false, fmt.Errorf("set quota %s for tenant %q: %w", metric, slug, err)
	}
	return t, previous, changed, nil
}

// SetTimeZone sets the tenant's time zone after validating it (LoadTimeZone). changed is false when
// the tenant already had that zone.
func (s *Store) SetTimeZone(ctx context.Context, slug, zone string, fns ...Then) (t Tenant, changed bool, err error) {
	if _, err := LoadTimeZone(zone); err != nil {
		return Tenant{}, false, err
	}
	err = pgx.BeginFunc(ctx, s.pg, func(tx pgx.Tx) error {
		before, err := scan(tx.QueryRow(ctx, "SELECT "+columns+" FROM tenants WHERE slug = $1 FOR UPDATE", slug))
		if err != nil {
			return err
		}
		if changed = before.TimeZone != zone; !changed {
			t = before
			return nil
		}
		if t, err = scan(tx.QueryRow(ctx, "UPDATE tenants SET time_zone = $2 WHERE id = $1 RETURNING "+columns, before.ID, zone)); err != nil {
			return err
		}
		return then(ctx, tx, t, fns)
	})
	if errors.Is(err, pgx.ErrNoRows) {
		return Tenant{}, false, fmt.Errorf("%w: %q", ErrNotFound, slug)
	}
	if err != nil {
		return Tenant{}, false, fmt.Errorf("set time zone of tenant %q: %w", slug, err)
	}
	return t, changed, nil
}

// TimeZone returns the zone of the tenant with id ("UTC" unless one was set). Reads call it through a
// short cache (package query).
func (s *Store) TimeZone(ctx context.Context, id uuid.UUID) (string, error) {
	var zone string
	err := s.pg.QueryRow(ctx, "SELECT time_zone FROM tenants WHERE id = $1", id).Scan(&zone)
	if errors.Is(err, pgx.ErrNoRows) {
		return "", fmt.Errorf("%w: %s", ErrNotFound, id)
	}
	if err != nil {
		return "", fmt.Errorf("read time zone of tenant %s: %w", id, err)
	}
	return zone, nil
}

// SetDisabled disables (true) or enables (false) the tenant. changed is false when it already was in
// that state: doing it twice is not an error, and the first disabling's time is kept.
func (s *Store) SetDisabled(ctx context.Context, slug string, disabled bool, fns ...Then) (t Tenant, changed bool, err error) {
	err = pgx.BeginFunc(ctx, s.pg, func(tx pgx.Tx) error {
		before, err := scan(tx.QueryRow(ctx, "SELECT "+columns+" FROM tenants WHERE slug = $1 FOR UPDATE", slug))
		if err != nil {
			return err
		}
		if before.Disabled() == disabled {
			t = before
			return nil
		}
		changed = true
		if t, err = scan(tx.QueryRow(ctx,
			"UPDATE tenants SET disabled_at = CASE WHEN $2 THEN now() END WHERE id = $1 RETURNING "+columns, before.ID, disabled)); err != nil {
			return err
		}
		return then(ctx, tx, t, fns)
	})
	if errors.Is(err, pgx.ErrNoRows) {
		return Tenant{}, false, fmt.Errorf("%w: %q", ErrNotFound, slug)
	}
	if err != nil {
		return Tenant{}, false, fmt.Errorf("set tenant %q disabled=%v: %w", slug, disabled, err)
	}
	return t, changed, nil
}

// Delete removes the tenant with id and, through their foreign keys, every Postgres row that belongs
// to it: API keys, daily usage, usage levels and its own rollup runs. The audit log (no foreign key)
// keeps its entries. Raw events and increments in ClickHouse and counters in Redis are not touched
// here. By id, not slug: a caller that showed a tenant and asked to confirm must delete that one, not
// another created under its slug meanwhile (found by review).
func (s *Store) Delete(ctx context.Context, id uuid.UUID, fns ...Then) (t Tenant, err error) {
	err = pgx.BeginFunc(ctx, s.pg, func(tx pgx.Tx) error {
		if t, err = scan(tx.QueryRow(ctx, "DELETE FROM tenants WHERE id = $1 RETURNING "+columns, id)); err != nil {
			return err
		}
		return then(ctx, tx, t, fns)
	})
	if errors.Is(err, pgx.ErrNoRows) {
		return Tenant{}, fmt.Errorf("%w: %s", ErrNotFound, id)
	}
	if err != nil {
		return Tenant{}, fmt.Errorf("delete tenant %s: %w", id, err)
	}
	return t, nil
}
