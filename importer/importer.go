// Package importer copies an existing deployment of the guide's Postgres design (tables
// analytics_events and analytics_daily_usage) into analyticsd, exactly once and resumably.
//
// What goes where:
//   - an event of a UTC day inside the retention window becomes one row of ClickHouse events, with
//     its id, user, source, props, ip and request id (received_at = ts); the events' materialized
//     view counts it into daily_usage as ingest's rows are;
//   - an event of an older day is only counted: per tenant, day and event name into daily_usage;
//   - a row of analytics_daily_usage whose metric is a usage metric (no dot, e.g. api_requests_daily)
//     becomes a usage increment of its day (usage_increments inside the window, daily_usage outside);
//     an event-name row is already counted by its events, and is imported only for an old day whose
//     events the source no longer has;
//   - once ClickHouse holds everything, each imported past day is reconciled into billed usage
//     (Postgres analytics_daily_usage and rollup_runs) by the rollup, through the Bill function the
//     caller wires in — once per day for every tenant, as `analyticsd rollup --date` does — so billed
//     rows are exactly what the nightly rollup would write and its drift check finds nothing to change.
//
// Exactly once: every row that has an id (events, and increments, whose id is a name-based UUID of
// the source tenant, day and metric) is inserted only when ClickHouse does not already hold its id for
// that tenant and time range, so an insert whose acknowledgement was lost is not repeated. Aggregates
// have no id; their (tenant, day) is recorded in Postgres as 'inserting' with the day's daily_usage
// before and what the insert adds, per metric, and a resumed import reads daily_usage again to tell
// whether that insert landed — first, whichever side of the window the day is on by then. A day's
// events are recorded the same way before their first insert: should the day leave the window before
// a resumed run, retention may have dropped them, and daily_usage settles it instead of the id check.
// Progress is kept per source tenant and day in Postgres (import_days, import_tenants). Source rows
// whose ts or date ClickHouse cannot hold (outside UTC days 1970-01-01 to 2105-12-31, or infinite)
// are skipped and counted, like rows without one.
//
// It does not own any table (package schema does), does not decide what is billed (package rollup
// does, through Bill), does not validate events as ingest does (it imports history as it is), and
// does not touch Redis: live quota counters and id claims of ingest are not fed by an import.
package importer

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/ClickHouse/clickhouse-go/v2/lib/driver"
	"github.com/google/uuid"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/analyticsd/analyticsd/erasure"
	"github.com/analyticsd/analyticsd/internal/logger"
	"github.com/analyticsd/analyticsd/tenant"
)

// Tenants is the part of the tenant registry the importer needs; *tenant.Store has it.
type Tenants interface {
	BySlug(ctx context.Context, slug string) (tenant.Tenant, error)
	ByID(ctx context.Context, id uuid.UUID) (tenant.Tenant, error)
	Create(ctx context.Context, slug, name string, fns ...tenant.Then) (tenant.Tenant, error)
}

// Bill reconciles one UTC day into billed usage for every tenant (the rollup).
type Bill func(ctx context.Context, day time.Time) error

// Config is one import.
type Config struct {
	// Source is the Postgres database holding the guide's tables (in its search_path).
	Source *pgxpool.Pool
	// SourceName identifies the source in the checkpoint tables; the same source must keep its name
	// across resumed runs.
	SourceName string
	// CH and DB: analyticsd's ClickHouse and database; PG: analyticsd's Postgres.
	CH driver.Conn
	DB string
	PG *pgxpool.Pool
	// Tenants creates and finds analyticsd tenants; Bill reconciles imported days (nil: not billed).
	Tenants Tenants
	Bill    Bill
	// Map sends source tenants (by id or by the source's slug) to analyticsd slugs. Unmapped tenants go
	// to the slug of the same name (the source's slug, else "t-" and the id's first 12 hex digits).
	Map map[string]string
	// NoCreate refuses to create tenants: every source tenant must map to an existing one.
	NoCreate bool
	// OldBefore is the first UTC day kept as raw events; earlier days are only counted (aggregates).
	OldBefore time.Time
	// Today is the current UTC day: days from it on are stored but not billed (they are still filling).
	Today time.Time
	// Workers is how many source tenants' old days are counted at once (default 2; the window's events
	// of all tenants go in one ordered pass); ChunkRows the most rows one ClickHouse insert carries
	// (default 100,000).
	Workers   int
	ChunkRows int
	// Progress, when set, is told the events done so far and the total, after every insert.
	Progress func(done, total int64)
	Log      *slog.Logger
}

// refuseErasing refuses an import into tenants with an erasure queued or running: its rows would race
// the erasure's delete, and those inserted after it would escape it — an erased user's events put
// back, or a tenant erasure's "all of the tenant's data" left holding the import.
func (im *Importer) refuseErasing(ctx context.Context, tenants []TenantResult) error {
	open, err := erasure.TenantsWithOpenErasures(ctx, im.cfg.PG)
	if err != nil {
		return err
	}
	var slugs []string
	for _, t := range tenants {
		if slices.Contains(open, t.ID) {
			slugs = append(slugs, t.Slug)
		}
	}
	if len(slugs) > 0 {
		return fmt.Errorf("tenants %s have an erasure queued or running; an import now would race its delete and could put back what it erases. "+
			"Run the import again once `analyticsd erase status` says the job is done (this run imported nothing)", strings.Join(slugs, ", "))
	}
	return nil
}

// Result is what Run did.
type Result struct {
	Tenants []TenantResult `json:"tenants"`
	// SourceEvents counts analytics_events rows with a tenant and a ts ClickHouse can hold (UTC days
	// 1970-01-01 to 2105-12-31); Skipped those without. SkippedUsage counts analytics_daily_usage rows
	// with a count but without a tenant, a metric or such a date.
	SourceEvents int64 `json:"source_events"`
	Skipped      int64 `json:"skipped_events"`
	SkippedUsage int64 `json:"skipped_usage_rows"`
	// Inserted: event rows this run wrote to ClickHouse events; Present: rows it found already there;
	// Aggregated: old events this run counted into daily_usage; Increments: usage rows it wrote.
	Inserted   int64 `json:"inserted"`
	Present    int64 `json:"already_present"`
	Aggregated int64 `json:"aggregated"`
	Increments int64 `json:"increments"`
	// DaysStored and DaysBilled count (tenant, day) units this run completed; DaysSkipped those a
	// previous run had completed.
	DaysStored  int `json:"days_stored"`
	DaysBilled  int `json:"days_billed"`
	DaysSkipped int `json:"days_skipped"`
	// NotImported lists event-name rows of analytics_daily_usage that could not be kept: inside the
	// window without their events (the rollup counts events, not such rows).
	NotImported []UsageRow `json:"not_imported,omitempty"`
	// Duration is the whole run; BillDuration the part spent billing, after ClickHouse had everything.
	Duration       time.Duration `json:"-"`
	DurationMS     int64         `json:"duration_ms"`
	BillDuration   time.Duration `json:"-"`
	BillDurationMS int64         `json:"bill_duration_ms"`
}

// TenantResult is one source tenant and where it went.
type TenantResult struct {
	Source  uuid.UUID `json:"source_tenant_id"`
	ID      uuid.UUID `json:"tenant_id"`
	Slug    string    `json:"slug"`
	Created bool      `json:"created"`
}

// UsageRow is one row of the source's analytics_daily_usage.
type UsageRow struct {
	Tenant uuid.UUID `json:"tenant_id"`
	Day    string    `json:"date"`
	Metric string    `json:"metric"`
	Count  int64     `json:"count"`
}

// ErrUndottedNames: the source has events whose name has no dot, which analyticsd would read as
// usage metrics; the import refuses it whole.
var ErrUndottedNames = errors.New("event names without a dot")

// ErrMapping: the tenant mapping cannot be applied (no such tenant with NoCreate, two source tenants
// onto one, or a mapping that differs from the one a previous run recorded).
var ErrMapping = errors.New("tenant mapping")

// Importer runs imports.
type Importer struct {
	cfg Config
	log *slog.Logger
	cp  *checkpoint
}

// New checks cfg and returns an Importer.
func New(cfg Config) (*Importer, error) {
	var errs []error
	if cfg.Source == nil || cfg.CH == nil || cfg.PG == nil || cfg.Tenants == nil {
		errs = append(errs, errors.New("importer: Source, CH, PG and Tenants are required"))
	}
	if cfg.SourceName == "" {
		errs = append(errs, errors.New("importer: SourceName is required"))
	}
	if cfg.DB == "" {
		errs = append(errs, errors.New("importer: DB is required"))
	}
	if cfg.OldBefore.IsZero() || cfg.Today.IsZero() {
		errs = append(errs, errors.New("importer: OldBefore and Today are required"))
	}
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	if cfg.Workers < 1 {
		cfg.Workers = 2
	}
	if cfg.ChunkRows < 1 {
		cfg.ChunkRows = 100_000
	}
	log := logger.Or(cfg.Log).With("component", "import", "source", cfg.SourceName)
	return &Importer{cfg: cfg, log: log, cp: &checkpoint{pg: cfg.PG, source: cfg.SourceName, db: cfg.DB}}, nil
}

// Run imports everything the checkpoint does not show as done, then returns what it did. It holds a
// Postgres advisory lock for its whole duration: one import runs at a time.
func (im *Importer) Run(ctx context.Context) (Result, error) {
	start := time.Now()
	var res Result
	unlock, err := im.cp.lock(ctx)
	if err != nil {
		return res, err
	}
	defer unlock()
	if err := awaitEarlierInserts(ctx, im.cfg.CH, im.cfg.DB, im.log); err != nil {
		return res, err
	}
	p, err := readPlan(ctx, im.cfg.Source)
	if err != nil {
		return res, err
	}
	res.SourceEvents, res.Skipped, res.SkippedUsage = p.events, p.skipped, p.skippedUsage
	if err := p.undottedErr(); err != nil {
		return res, err
	}
	tenants, err := im.mapTenants(ctx, p)
	if err != nil {
		return res, err
	}
	for _, t := range tenants {
		res.Tenants = append(res.Tenants, t)
	}
	sort.Slice(res.Tenants, func(i, j int) bool { return res.Tenants[i].Slug < res.Tenants[j].Slug })
	if err := im.refuseErasing(ctx, res.Tenants); err != nil {
		return res, err
	}

	var (
		mu       sync.Mutex
		done     int64
		firstErr error
	)
	progress := func(n int64) {
		mu.Lock()
		done += n
		d := done
		mu.Unlock()
		if im.cfg.Progress != nil {
			im.cfg.Progress(d, p.events)
		}
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	work := make(chan uuid.UUID)
	recent := map[uuid.UUID][]time.Time{}
	var wg sync.WaitGroup
	for range im.cfg.Workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for src := range work {
				tr, err := im.importTenant(ctx, p, src, tenants[src].ID, progress)
				mu.Lock()
				res.add(tr)
				recent[src] = tr.recent
				if err != nil && firstErr == nil {
					firstErr = fmt.Errorf("import source tenant %s: %w", src, err)
					cancel()
				}
				mu.Unlock()
			}
		}()
	}
	for _, src := range p.tenantIDs() {
		select {
		case work <- src:
		case <-ctx.Done():
		}
	}
	close(work)
	wg.Wait()
	if firstErr == nil && ctx.Err() != nil {
		firstErr = ctx.Err()
	}
	if firstErr == nil {
		var tr tenantRun
		firstErr = im.importRecent(ctx, p, tenants, recent, &tr, progress)
		res.add(tr)
	}
	if firstErr == nil {
		billStart := time.Now()
		res.DaysBilled, firstErr = im.bill(ctx, tenants)
		res.BillDuration = time.Since(billStart)
		res.BillDurationMS = res.BillDuration.Milliseconds()
	}
	res.Duration = time.Since(start)
	res.DurationMS = res.Duration.Milliseconds()
	return res, firstErr
}

// bill reconciles every past day some imported tenant has stored but not billed, oldest first, and
// records those tenant-days as billed.
func (im *Importer) bill(ctx context.Context, tenants map[uuid.UUID]TenantResult) (int, error) {
	if im.cfg.Bill == nil {
		return 0, nil
	}
	pending := map[time.Time][]uuid.UUID{}
	for _, t := range tenants {
		states, err := im.cp.states(ctx, t.ID)
		if err != nil {
			return 0, err
		}
		for d, st := range states {
			if st.state == stateStored && d.Before(im.cfg.Today) {
				pending[d] = append(pending[d], t.ID)
			}
		}
	}
	days := make([]time.Time, 0, len(pending))
	for d := range pending {
		days = append(days, d)
	}
	sort.Slice(days, func(i, j int) bool { return days[i].Before(days[j]) })
	billed := 0
	for _, d := range days {
		if err := im.cfg.Bill(ctx, d); err != nil {
			return billed, fmt.Errorf("bill %s: %w", d.Format(time.DateOnly), err)
		}
		for _, id := range pending[d] {
			if err := im.cp.set(ctx, id, []time.Time{d}, stateBilled); err != nil {
				return billed, err
			}
			billed++
		}
	}
	return billed, nil
}

func (r *Result) add(t tenantRun) {
	r.Inserted += t.inserted
	r.Present += t.present
	r.Aggregated += t.aggregated
	r.Increments += t.increments
	r.DaysStored += t.stored
	r.DaysSkipped += t.skipped
	r.NotImported = append(r.NotImported, t.notImported...)
}

// tenantRun is what importing one source tenant did.
type tenantRun struct {
	inserted, present, aggregated, increments int64
	stored, skipped                           int
	notImported                               []UsageRow
	// recent: the tenant's days inside the window still to import (all tenants' go in one pass).
	recent []time.Time
}

// importTenant stores one source tenant's old days in ClickHouse as aggregates, and returns the days
// inside the window still to import.
func (im *Importer) importTenant(ctx context.Context, p *plan, src, dst uuid.UUID, progress func(int64)) (tenantRun, error) {
	var tr tenantRun
	states, err := im.cp.states(ctx, dst)
	if err != nil {
		return tr, err
	}
	var old, recent, unsettled []time.Time
	for _, d := range p.days[src] {
		switch st := states[d]; {
		case st.state == stateBilled || (st.state == stateStored && !d.Before(im.cfg.Today)):
			tr.skipped++
			progress(p.eventsOn(src, d))
		case st.state == stateStored:
			// stored by an earlier run; billed after the ClickHouse work
			tr.skipped++
			progress(p.eventsOn(src, d))
		case st.state == stateInserting && (!st.events || d.Before(im.cfg.OldBefore)):
			// An interrupted insert no id check can settle: aggregates have no ids (whichever side of
			// the window the day is on now: RETENTION_DAYS may have grown), and the events of a day
			// that has left the window since may have been dropped by retention. daily_usage keeps
			// the counts of both.
			unsettled = append(unsettled, d)
		case d.Before(im.cfg.OldBefore):
			old = append(old, d)
		default:
			recent = append(recent, d)
		}
	}
	if len(unsettled) > 0 {
		redo, err := im.settle(ctx, p, src, dst, unsettled, states, &tr, progress)
		if err != nil {
			return tr, err
		}
		for _, d := range redo {
			if d.Before(im.cfg.OldBefore) {
				old = append(old, d)
			} else {
				recent = append(recent, d)
			}
		}
		sort.Slice(old, func(i, j int) bool { return old[i].Before(old[j]) })
	}
	if len(old) > 0 {
		if err := im.importOld(ctx, p, src, dst, old, &tr, progress); err != nil {
			return tr, err
		}
	}
	tr.recent = recent
	return tr, nil
}
