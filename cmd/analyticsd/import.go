package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/schollz/progressbar/v3"
	"golang.org/x/term"

	"github.com/analyticsd/analyticsd/audit"
	"github.com/analyticsd/analyticsd/importer"
	"github.com/analyticsd/analyticsd/internal/clock"
	"github.com/analyticsd/analyticsd/retention"
	"github.com/analyticsd/analyticsd/rollup"
	"github.com/analyticsd/analyticsd/tenant"
)

// progressOut is where the import's progress goes: stderr, so stdout keeps the report (and --json
// stays parseable). Tests replace it.
var progressOut io.Writer = os.Stderr

// importCmd imports a Postgres database holding the guide's tables (package importer), then verifies
// the counts per tenant and day on both sides. Interrupted, it resumes when run again.
func importCmd(ctx context.Context, cfg Config, log *slog.Logger, args []string, stdout io.Writer) error {
	var (
		sourceURL, sourceName, progress string
		workers, chunkRows              int
		noCreate, verifyOnly, asJSON    bool
		mapping                         = map[string]string{}
	)
	if err := flags("import", args, func(fs *flag.FlagSet) {
		fs.StringVar(&sourceURL, "source", "", "Postgres URL of the database holding analytics_events and analytics_daily_usage (required)")
		fs.StringVar(&sourceName, "source-name", "", "the source's name in the checkpoint (default: host:port/database[/search_path] of --source)")
		fs.Func("map", "SRC=SLUG: import source tenant SRC (its id or slug) into analyticsd tenant SLUG (repeatable)", func(v string) error {
			src, slug, ok := strings.Cut(v, "=")
			if !ok || src == "" || !tenant.ValidSlug(slug) {
				return fmt.Errorf("want SRC=SLUG with a valid analyticsd slug, got %q", v)
			}
			mapping[src] = slug
			return nil
		})
		fs.BoolVar(&noCreate, "no-create", false, "never create tenants: every source tenant must map to an existing one")
		fs.IntVar(&workers, "workers", 2, "source tenants whose days older than retention are counted at once")
		fs.IntVar(&chunkRows, "chunk-rows", 100_000, "rows per ClickHouse insert")
		fs.BoolVar(&verifyOnly, "verify-only", false, "only compare the source with analyticsd (changes nothing)")
		fs.StringVar(&progress, "progress", "auto", "auto (a bar on a terminal, lines otherwise), bar, lines or off")
		fs.BoolVar(&asJSON, "json", false, "print the report as JSON")
	}); err != nil {
		return err
	}
	switch {
	case sourceURL == "":
		return fmt.Errorf("import: --source is required: %w", errUsage)
	case workers < 1 || workers > 64:
		return fmt.Errorf("import: --workers=%d: want 1 to 64: %w", workers, errUsage)
	case chunkRows < 1000 || chunkRows > 1_000_000:
		return fmt.Errorf("import: --chunk-rows=%d: want 1000 to 1000000: %w", chunkRows, errUsage)
	case progress != "auto" && progress != "bar" && progress != "lines" && progress != "off":
		return fmt.Errorf("import: --progress=%q: want auto, bar, lines or off: %w", progress, errUsage)
	}
	srcCfg, err := pgxpool.ParseConfig(sourceURL)
	if err != nil {
		return fmt.Errorf("import: --source: %v: %w", err, errUsage)
	}
	if sourceName == "" {
		sourceName = defaultSourceName(srcCfg)
	}
	srcCfg.ConnConfig.ConnectTimeout = 5 * time.Second
	src, err := pgxpool.NewWithConfig(ctx, srcCfg)
	if err != nil {
		return fmt.Errorf("open the source database: %w", err)
	}
	defer src.Close()
	ch, pg, closeStores, err := openStores(ctx, cfg)
	if err != nil {
		return err
	}
	defer closeStores()

	window, err := retention.Effective(ctx, ch, cfg.ClickHouseDB, cfg.Layout().LocalName("events"), cfg.RetentionDays)
	if err != nil {
		return fmt.Errorf("import: %w", err)
	}
	now := clock.Now()
	// The rollup logs every run at info; one per imported day would bury the progress display.
	rlog := slog.New(atLeast{log.Handler(), slog.LevelWarn}).With("component", "rollup")
	rec := rollup.NewReconciler(ch, cfg.ClickHouseDB, pg, audit.New(pg), nil, rlog, cfg.RetentionDays, nil)
	ic := importer.Config{
		Source: src, SourceName: sourceName, CH: ch, DB: cfg.ClickHouseDB, PG: pg,
		Tenants: auditedTenants{tenant.NewStore(pg), audit.New(pg), sourceName},
		Bill: func(ctx context.Context, day time.Time) error {
			_, err := rec.RunDate(ctx, day, rollup.AllTenants(), "import")
			return err
		},
		Map: mapping, NoCreate: noCreate,
		OldBefore: window.CompleteFrom(time.Time{}, now), Today: retention.Day(now),
		Workers: workers, ChunkRows: chunkRows, Log: log,
	}
	report := struct {
		Import       *importer.Result       `json:"import,omitempty"`
		Verification *importer.Verification `json:"verification,omitempty"`
	}{}
	if !verifyOnly {
		bar := newImportProgress(progress, progressOut)
		ic.Progress = bar.set
		im, err := importer.New(ic)
		if err != nil {
			return err
		}
		res, err := im.Run(ctx)
		bar.finish(err == nil)
		if err != nil {
			if errors.Is(err, context.Canceled) {
				return fmt.Errorf("interrupted; run the same command again to resume: %w", err)
			}
			return err
		}
		report.Import = &res
		if !asJSON {
			printImport(stdout, res)
		}
	}
	im, err := importer.New(ic)
	if err != nil {
		return err
	}
	v, err := im.Verify(ctx)
	if err != nil {
		return err
	}
	report.Verification = &v
	if asJSON {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		if err := enc.Encode(report); err != nil {
			return err
		}
	} else {
		printVerification(stdout, v)
	}
	if !v.OK() {
		return fmt.Errorf("verification: %d counts differ between the source and analyticsd", len(v.Diffs))
	}
	return nil
}

// defaultSourceName names a source by where it is, never by its credentials.
func defaultSourceName(c *pgxpool.Config) string {
	name := fmt.Sprintf("%s:%d/%s", c.ConnConfig.Host, c.ConnConfig.Port, c.ConnConfig.Database)
	if sp := c.ConnConfig.RuntimeParams["search_path"]; sp != "" {
		name += "/" + sp
	}
	return name
}

func printImport(w io.Writer, r importer.Result) {
	for _, t := range r.Tenants {
		how := "existing"
		if t.Created {
			how = "created"
		}
		fmt.Fprintf(w, "tenant %s -> %s (%s, %s)\n", t.Source, t.Slug, t.ID, how)
	}
	stored := r.Duration - r.BillDuration
	rate := 0.0
	if s := stored.Seconds(); s > 0 {
		rate = float64(r.Inserted+r.Aggregated) / s
	}
	fmt.Fprintf(w, "imported %d source events in %s (%.0f events/s): %d inserted, %d already present, %d older than retention counted into daily usage; %d usage increments\n",
		r.SourceEvents, stored.Round(time.Millisecond), rate, r.Inserted, r.Present, r.Aggregated, r.Increments)
	fmt.Fprintf(w, "tenant-days: %d stored, %d billed (rollup, %s), %d done by an earlier run\n", r.DaysStored, r.DaysBilled,
		r.BillDuration.Round(time.Millisecond), r.DaysSkipped)
	if r.Skipped > 0 {
		fmt.Fprintf(w, "skipped %d source events without tenant_id or a ts ClickHouse can hold (UTC days 1970-01-01 to 2105-12-31)\n", r.Skipped)
	}
	if r.SkippedUsage > 0 {
		fmt.Fprintf(w, "skipped %d analytics_daily_usage rows without tenant_id, metric or a date ClickHouse can hold\n", r.SkippedUsage)
	}
}

func printVerification(w io.Writer, v importer.Verification) {
	for i, u := range v.NotImported {
		if i == 10 {
			fmt.Fprintf(w, "... and %d more not imported\n", len(v.NotImported)-10)
			break
		}
		fmt.Fprintf(w, "not imported: source tenant %s %s %s=%d (an event count inside the retention window without its events)\n", u.Tenant, u.Day, u.Metric, u.Count)
	}
	for i, d := range v.SourceDisagrees {
		if i == 10 {
			fmt.Fprintf(w, "... and %d more where the source disagrees with itself\n", len(v.SourceDisagrees)-10)
			break
		}
		fmt.Fprintf(w, "note: source analytics_daily_usage %s %s %s is %d but it has %d such events; analyticsd counts the events\n", d.Tenant, d.Day, d.Metric, d.Source, d.Got)
	}
	if v.OK() {
		fmt.Fprintf(w, "verified: %d source events over %d tenant-days agree with ClickHouse and billed usage\n", v.Events, v.TenantDays)
		return
	}
	fmt.Fprintf(w, "verification FAILED: %d counts differ (tenant date metric: source, analyticsd side):\n", len(v.Diffs))
	for i, d := range v.Diffs {
		if i == 50 {
			fmt.Fprintf(w, "... and %d more\n", len(v.Diffs)-50)
			break
		}
		fmt.Fprintln(w, "  "+d.String())
	}
}

// importProgress shows the import's progress: a bar with rate and ETA on a terminal, a plain line
// every 5 s elsewhere (logs, CI), nothing with --progress=off.
type importProgress struct {
	bar *progressbar.ProgressBar
	w   io.Writer

	mu          sync.Mutex
	start, last time.Time
	done, total int64
}

func newImportProgress(mode string, w io.Writer) *importProgress {
	if mode == "auto" {
		mode = "lines"
		if f, ok := w.(*os.File); ok && term.IsTerminal(int(f.Fd())) {
			mode = "bar"
		}
	}
	p := &importProgress{start: time.Now()}
	p.last = p.start // the first line after 5 s
	switch mode {
	case "bar":
		p.bar = progressbar.NewOptions64(-1,
			progressbar.OptionSetWriter(w),
			progressbar.OptionSetDescription("importing events"),
			progressbar.OptionShowCount(),
			progressbar.OptionShowIts(),
			progressbar.OptionSetItsString("events"),
			progressbar.OptionSetPredictTime(true),
			progressbar.OptionThrottle(200*time.Millisecond),
			progressbar.OptionOnCompletion(func() { fmt.Fprintln(w) }),
		)
	case "lines":
		p.w = w
	}
	return p
}

func (p *importProgress) set(done, total int64) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if done > p.done {
		p.done = done
	}
	if p.bar != nil {
		if total != p.total {
			p.total = total
			p.bar.ChangeMax64(total)
		}
		_ = p.bar.Set64(p.done)
		return
	}
	p.total = total
	if p.w != nil && time.Since(p.last) >= 5*time.Second {
		p.last = time.Now()
		p.line()
	}
}

// line prints "import: 500000 of 1000000 events (50%), 81234 events/s, ETA 6s".
func (p *importProgress) line() {
	elapsed := time.Since(p.start).Seconds()
	rate := float64(p.done) / max(elapsed, 0.001)
	pct, eta := 100.0, "0s"
	if p.total > 0 {
		pct = 100 * float64(p.done) / float64(p.total)
		if rate > 0 {
			eta = time.Duration(float64(p.total-p.done) / rate * float64(time.Second)).Round(time.Second).String()
		}
	}
	fmt.Fprintf(p.w, "import: %d of %d events (%.0f%%), %.0f events/s, ETA %s\n", p.done, p.total, pct, rate, eta)
}

// finish ends the display: the bar full when the import completed, left where it stopped otherwise.
func (p *importProgress) finish(completed bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	switch {
	case p.bar != nil && completed:
		_ = p.bar.Finish()
	case p.bar != nil:
		_ = p.bar.Exit()
		fmt.Fprintln(progressOut)
	case p.w != nil:
		p.line()
	}
}

// auditedTenants is the tenant registry with each creation audited, as `tenant create` does.
type auditedTenants struct {
	*tenant.Store
	audits *audit.Log
	source string
}

func (a auditedTenants) Create(ctx context.Context, slug, name string, fns ...tenant.Then) (tenant.Tenant, error) {
	return a.Store.Create(ctx, slug, name, append(fns, tenantAudit(func(t tenant.Tenant) audit.Entry {
		return audit.Entry{TenantID: t.ID, Actor: "import", Action: "tenant.create", Target: t.Slug, Meta: map[string]any{"source": a.source}}
	}))...)
}

// atLeast passes on records of level or above only.
type atLeast struct {
	slog.Handler
	level slog.Level
}

func (h atLeast) Enabled(ctx context.Context, l slog.Level) bool {
	return l >= h.level && h.Handler.Enabled(ctx, l)
}

func (h atLeast) WithAttrs(as []slog.Attr) slog.Handler {
	return atLeast{h.Handler.WithAttrs(as), h.level}
}
func (h atLeast) WithGroup(name string) slog.Handler {
	return atLeast{h.Handler.WithGroup(name), h.level}
}
