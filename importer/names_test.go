package importer

import (
	"context"
	"errors"
	"strings"
	"testing"
)

// analyticsd tells a usage metric from an event name by the dot, and its daily usage holds both: a
// source event named builds_daily would be billed as that usage metric. Before, the import stored
// and counted such events as they were (found by review); it now refuses the source, naming them,
// having imported nothing — tenants included — and goes ahead once they are renamed.
func TestAnImportRefusesEventNamesWithoutADot(t *testing.T) {
	src := sourceDB(t, 0, 1)
	e, cfg := setup(t, src)
	ctx := context.Background()
	day := cfg.Today.AddDate(0, 0, -1)
	addEvents(t, src, acme, "builds_daily", day, 3)
	addEvents(t, src, acme, "Signup Completed", day, 1)
	addEvents(t, src, acme, "email.sent", day, 2)
	im, _ := New(cfg)
	_, err := im.Run(ctx)
	if !errors.Is(err, ErrUndottedNames) || !strings.Contains(err.Error(), `"builds_daily"`) || !strings.Contains(err.Error(), `"Signup Completed"`) ||
		!strings.Contains(err.Error(), "4 events") {
		t.Fatalf("import of a source with undotted event names: %v; want ErrUndottedNames naming both and their 4 events", err)
	}
	if n := count(t, e, "SELECT count() FROM "+e.DB+".events"); n != 0 {
		t.Errorf("the refused import stored %d events", n)
	}
	if n := count(t, e, "SELECT count() FROM "+e.DB+".daily_usage WHERE metric = 'builds_daily'"); n != 0 {
		t.Errorf("the refused import counted builds_daily as usage: %d rows", n)
	}
	var tenants int
	if err := e.PG.QueryRow(ctx, "SELECT count(*) FROM tenants").Scan(&tenants); err != nil || tenants != 0 {
		t.Errorf("the refused import created %d tenants (%v)", tenants, err)
	}
	if _, err := src.Exec(ctx, "UPDATE analytics_events SET event = 'legacy.' || event WHERE strpos(event, '.') = 0"); err != nil {
		t.Fatal(err)
	}
	im, _ = New(cfg)
	res, err := im.Run(ctx)
	if err != nil {
		t.Fatalf("import once renamed: %v", err)
	}
	dst := dstOf(t, res, acme)
	if n := count(t, e, "SELECT count() FROM "+e.DB+".events WHERE tenant_id = ? AND event = 'legacy.builds_daily'", dst); n != 3 {
		t.Errorf("renamed events stored: %d, want 3", n)
	}
}
