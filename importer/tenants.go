package importer

import (
	"context"
	"errors"
	"fmt"

	"github.com/google/uuid"

	"github.com/analyticsd/analyticsd/tenant"
)

// mapTenants decides the analyticsd tenant of every source tenant, creating the missing ones unless
// NoCreate, and records the choice so resumed runs keep it.
func (im *Importer) mapTenants(ctx context.Context, p *plan) (map[uuid.UUID]TenantResult, error) {
	recorded, err := im.cp.tenantMap(ctx)
	if err != nil {
		return nil, err
	}
	used := map[string]bool{}
	explicit := func(src uuid.UUID) (string, bool) {
		if s, ok := im.cfg.Map[src.String()]; ok {
			used[src.String()] = true
			return s, true
		}
		if slug, ok := p.slugs[src]; ok {
			if s, ok := im.cfg.Map[slug]; ok {
				used[slug] = true
				return s, true
			}
		}
		return "", false
	}
	out := map[uuid.UUID]TenantResult{}
	owner := map[uuid.UUID]uuid.UUID{}
	for _, src := range p.tenantIDs() {
		slug, isExplicit := explicit(src)
		if !isExplicit {
			slug = slugFor(src, p.slugs[src])
		}
		var tr TenantResult
		if id, ok := recorded[src]; ok {
			t, err := im.cfg.Tenants.ByID(ctx, id)
			if err != nil {
				return nil, fmt.Errorf("%w: source tenant %s went to tenant %s in an earlier run: %w", ErrMapping, src, id, err)
			}
			if isExplicit && t.Slug != slug {
				return nil, fmt.Errorf("%w: source tenant %s was imported into %q by an earlier run, not %q; keep the earlier mapping or import under another --source-name",
					ErrMapping, src, t.Slug, slug)
			}
			tr = TenantResult{Source: src, ID: t.ID, Slug: t.Slug}
		} else {
			t, err := im.cfg.Tenants.BySlug(ctx, slug)
			created := false
			switch {
			case errors.Is(err, tenant.ErrNotFound) && im.cfg.NoCreate:
				return nil, fmt.Errorf("%w: source tenant %s has no analyticsd tenant %q and creating tenants is off: %w", ErrMapping, src, slug, err)
			case errors.Is(err, tenant.ErrNotFound):
				t, err = im.cfg.Tenants.Create(ctx, slug, slug)
				if errors.Is(err, tenant.ErrExists) { // created meanwhile
					t, err = im.cfg.Tenants.BySlug(ctx, slug)
				} else {
					created = err == nil
				}
			}
			if err != nil {
				return nil, fmt.Errorf("tenant for source tenant %s: %w", src, err)
			}
			if err := im.cp.recordTenant(ctx, src, t.ID, created); err != nil {
				return nil, err
			}
			tr = TenantResult{Source: src, ID: t.ID, Slug: t.Slug, Created: created}
			if created {
				im.log.Info("created tenant", "slug", t.Slug, "id", t.ID, "source_tenant", src)
			}
		}
		if prev, ok := owner[tr.ID]; ok {
			return nil, fmt.Errorf("%w: source tenants %s and %s both go to %q; map them to different tenants", ErrMapping, prev, src, tr.Slug)
		}
		owner[tr.ID] = src
		out[src] = tr
	}
	for k := range im.cfg.Map {
		if !used[k] {
			return nil, fmt.Errorf("%w: the mapping names %q, which is neither the id nor the slug of a tenant with data in the source", ErrMapping, k)
		}
	}
	return out, nil
}
