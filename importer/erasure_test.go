package importer

import (
	"context"
	"strings"
	"testing"

	"github.com/google/uuid"
)

// An import into a tenant with an erasure queued or running races the erasure's delete: rows inserted
// after it escape it, and an erased user's events come back. Before, the import went ahead (found by
// review); it now refuses such tenants, having imported nothing, and goes ahead once the job is done.
func TestAnImportWaitsForTheTenantsErasures(t *testing.T) {
	src := sourceDB(t, 0, 1)
	e, cfg := setup(t, src)
	ctx := context.Background()
	day := cfg.Today.AddDate(0, 0, -1)
	addEvents(t, src, acme, "email.sent", day, 2)
	im, _ := New(cfg)
	first, err := im.Run(ctx)
	if err != nil {
		t.Fatal(err)
	}
	dst := dstOf(t, first, acme)
	job := uuid.New()
	if _, err := e.PG.Exec(ctx, "INSERT INTO erasure_jobs (id, tenant_id, kind, status, user_id, actor) VALUES ($1, $2, 'user', 'queued', 'u1', 'test')", job, dst); err != nil {
		t.Fatal(err)
	}
	addEvents(t, src, acme, "email.sent", day.AddDate(0, 0, -1), 3)
	before := count(t, e, "SELECT count() FROM "+e.DB+".events WHERE tenant_id = ?", dst)
	im, _ = New(cfg)
	if _, err := im.Run(ctx); err == nil || !strings.Contains(err.Error(), "erasure") || !strings.Contains(err.Error(), first.Tenants[0].Slug) {
		t.Errorf("import into a tenant with a queued erasure: %v; want it refused naming the tenant", err)
	}
	if n := count(t, e, "SELECT count() FROM "+e.DB+".events WHERE tenant_id = ?", dst); n != before {
		t.Errorf("the refused import stored %d events", n-before)
	}
	if _, err := e.PG.Exec(ctx, "UPDATE erasure_jobs SET status = 'done', finished_at = now() WHERE id = $1", job); err != nil {
		t.Fatal(err)
	}
	im, _ = New(cfg)
	if _, err := im.Run(ctx); err != nil {
		t.Fatalf("import once the erasure is done: %v", err)
	}
	if n := count(t, e, "SELECT count() FROM "+e.DB+".events WHERE tenant_id = ?", dst); n != before+3 {
		t.Errorf("after the erasure: %d events, want %d", n, before+3)
	}
}
