package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"
	"unicode"
	"unicode/utf8"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/analyticsd/analyticsd/audit"
	"github.com/analyticsd/analyticsd/auth"
	"github.com/analyticsd/analyticsd/erasure"
	"github.com/analyticsd/analyticsd/ingest"
	"github.com/analyticsd/analyticsd/quota"
	"github.com/analyticsd/analyticsd/schema"
	"github.com/analyticsd/analyticsd/tenant"
)

func migrate(ctx context.Context, cfg Config, log *slog.Logger, args []string, stdout io.Writer) error {
	shrink := false
	if err := flags("migrate", args, func(fs *flag.FlagSet) {
		fs.BoolVar(&shrink, "shrink-retention", false, "apply a RETENTION_DAYS below the tables' TTL (deletes the days in between for good)")
	}); err != nil {
		return err
	}
	ch, pg, closeStores, err := openStores(ctx, cfg)
	if err != nil {
		return err
	}
	defer closeStores()
	m := schema.Migrator{CH: ch, PG: pg, DB: cfg.ClickHouseDB, Cluster: cfg.ClickHouseCluster, RetentionDays: cfg.RetentionDays, ShrinkRetention: shrink, Log: log}
	res, err := m.Run(ctx)
	if err != nil {
		return err
	}
	retention := "TTL in the events table"
	if !res.Features.TTL {
		retention = "the retention sweeper (server has no TTL)"
	}
	if res.Retention != "" {
		retention += " (changed " + res.Retention + ")"
	}
	fmt.Fprintf(stdout, "clickhouse %s: database %s, applied %v; postgres applied %v; retention %d days by %s\n",
		res.Server, cfg.ClickHouseDB, res.AppliedClickHouse, res.AppliedPostgres, cfg.RetentionDays, retention)
	return nil
}

// printJSON writes v indented, for --json.
func printJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

// table writes rows under a header, aligned.
func table(w io.Writer, header string, rows [][]string) error {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, header)
	for _, r := range rows {
		fmt.Fprintln(tw, strings.Join(r, "\t"))
	}
	return tw.Flush()
}

func when(t *time.Time) string {
	if t == nil {
		return "-"
	}
	return t.UTC().Format(time.RFC3339)
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

func formatLimit(v float64) string { return strconv.FormatFloat(v, 'f', -1, 64) }

// tenantJSON is a tenant as --json prints it.
type tenantJSON struct {
	ID             uuid.UUID          `json:"id"`
	Slug           string             `json:"slug"`
	Name           string             `json:"name"`
	Status         string             `json:"status"` // active or disabled
	CreatedAt      time.Time          `json:"created_at"`
	DisabledAt     *time.Time         `json:"disabled_at"`
	QuotaOverrides map[string]float64 `json:"quota_overrides"`
	TimeZone       string             `json:"time_zone"`
}

func tenantView(t tenant.Tenant) tenantJSON {
	status := "active"
	if t.Disabled() {
		status = "disabled"
	}
	o := t.QuotaOverrides
	if o == nil {
		o = map[string]float64{}
	}
	return tenantJSON{ID: t.ID, Slug: t.Slug, Name: t.Name, Status: status, CreatedAt: t.CreatedAt, DisabledAt: t.DisabledAt, QuotaOverrides: o,
		TimeZone: t.TimeZone}
}

// quotaLimit is one metric's limit for a tenant and where it comes from.
type quotaLimit struct {
	Metric string  `json:"metric"`
	Limit  float64 `json:"limit"`
	Source string  `json:"source"` // built-in, QUOTA_DEFAULTS or override
}

// quotaLimits resolves the tenant's limits as quota.Limits does (built-in < QUOTA_DEFAULTS < the
// tenant's override), saying which one each comes from.
func quotaLimits(cfg Config, t tenant.Tenant) []quotaLimit {
	by := map[string]quotaLimit{}
	for m, v := range quota.BuiltinLimits() {
		by[m] = quotaLimit{m, v, "built-in"}
	}
	for m, v := range cfg.QuotaDefaults {
		by[m] = quotaLimit{m, v, "QUOTA_DEFAULTS"}
	}
	for m, v := range t.QuotaOverrides {
		by[m] = quotaLimit{m, v, "override"}
	}
	out := make([]quotaLimit, 0, len(by))
	for _, m := range quota.Metrics(quota.BuiltinLimits()) {
		out = append(out, by[m])
		delete(by, m)
	}
	rest := make([]string, 0, len(by))
	for m := range by {
		rest = append(rest, m)
	}
	slices.Sort(rest)
	for _, m := range rest {
		out = append(out, by[m])
	}
	return out
}

// knownMetrics are the metrics a quota can be set for without --new-metric: the built-in quotas,
// QUOTA_DEFAULTS, the daily metrics events count toward (QUOTA_EVENT_MAP or its default), and the
// tenant's existing overrides — as this process's environment sees them.
func knownMetrics(cfg Config, t tenant.Tenant) []string {
	set := map[string]bool{}
	for m := range quota.BuiltinLimits() {
		set[m] = true
	}
	for m := range cfg.QuotaDefaults {
		set[m] = true
	}
	for _, m := range cfg.Ingest.EventMetrics {
		set[m] = true
	}
	for m := range t.QuotaOverrides {
		set[m] = true
	}
	out := make([]string, 0, len(set))
	for m := range set {
		out = append(out, m)
	}
	slices.Sort(out)
	return out
}

func printQuotas(w io.Writer, limits []quotaLimit) error {
	rows := make([][]string, len(limits))
	for i, q := range limits {
		rows[i] = []string{q.Metric, formatLimit(q.Limit), q.Source}
	}
	return table(w, "METRIC\tLIMIT\tSOURCE", rows)
}

// maxLimit bounds a quota limit: float64 (how limits travel) holds every whole number up to it exactly.
const maxLimit = 1_000_000_000_000_000

// tenantCmd runs `analyticsd tenant <action>`; stderr takes the delete confirmation prompt.
func tenantCmd(ctx context.Context, cfg Config, args []string, stdout, stderr io.Writer) error {
	if len(args) == 0 {
		return fmt.Errorf("tenant: want an action: %w", errUsage)
	}
	action := args[0]
	name := "tenant " + action
	var slug, display, metric, limit, zone string
	var ifNotExists, clear, newMetric, yes, asJSON bool
	if err := flags(name, args[1:], func(fs *flag.FlagSet) {
		switch action {
		case "create":
			fs.StringVar(&slug, "slug", "", "tenant slug: lowercase letters, digits and dashes (required)")
			fs.StringVar(&display, "name", "", "display name (default: the slug)")
			fs.BoolVar(&ifNotExists, "if-not-exists", false, "print the existing tenant's id instead of failing")
		case "list":
		default:
			fs.StringVar(&slug, "tenant", "", "the tenant's slug (required)")
		}
		switch action {
		case "set-quota":
			fs.StringVar(&metric, "metric", "", "quota metric, e.g. api_requests_daily (required)")
			fs.StringVar(&limit, "limit", "", "the tenant's limit: a whole number from 0 to 1000000000000000")
			fs.BoolVar(&clear, "clear", false, "remove the override (back to QUOTA_DEFAULTS or the built-in limit)")
			fs.BoolVar(&newMetric, "new-metric", false, "allow a metric that is not a known quota metric yet")
		case "delete":
			fs.BoolVar(&yes, "yes", false, "do not ask: delete without typing the slug")
		case "set-timezone":
			fs.StringVar(&zone, "zone", "", "IANA time zone whose midnight starts the tenant's days, e.g. Europe/Berlin, Asia/Kolkata, UTC (required)")
		}
		fs.BoolVar(&asJSON, "json", false, "print JSON instead of text")
	}); err != nil {
		return err
	}
	flagName := "--tenant"
	if action == "create" {
		flagName = "--slug"
	}
	if action != "list" && slug == "" {
		return fmt.Errorf("%s: %s is required: %w", name, flagName, errUsage)
	}
	if err := checkLabel(name, "--name", display); err != nil {
		return err
	}
	var lim *float64
	if action == "set-quota" {
		if metric == "" || (limit == "") == !clear {
			return fmt.Errorf("%s: --metric and one of --limit N or --clear are required: %w", name, errUsage)
		}
		if !ingest.ValidMetric(metric) {
			return fmt.Errorf("%s: --metric %q: %s: %w", name, metric, ingest.MetricRule, errUsage)
		}
		if !clear {
			n, err := strconv.ParseUint(limit, 10, 64)
			if err != nil || n > maxLimit {
				return fmt.Errorf("%s: --limit %q: want a whole number from 0 to %d: %w", name, limit, uint64(maxLimit), errUsage)
			}
			v := float64(n)
			lim = &v
		}
	}

	if action == "set-timezone" {
		if zone == "" {
			return fmt.Errorf("%s: --zone is required: %w", name, errUsage)
		}
		if _, err := tenant.LoadTimeZone(zone); err != nil {
			return fmt.Errorf("%s: --zone: %v: %w", name, err, errUsage)
		}
	}

	pg, err := openPostgres(ctx, cfg)
	if err != nil {
		return err
	}
	defer pg.Close()
	store := tenant.NewStore(pg)
	switch action {
	case "set-timezone":
		t, changed, err := store.SetTimeZone(ctx, slug, zone, tenantAudit(func(t tenant.Tenant) audit.Entry {
			return audit.Entry{TenantID: t.ID, Actor: "cli", Action: "tenant.set_timezone", Target: zone}
		}))
		if err != nil {
			return err
		}
		if asJSON {
			return printJSON(stdout, struct {
				Tenant   string `json:"tenant"`
				TimeZone string `json:"time_zone"`
				Changed  bool   `json:"changed"`
			}{t.Slug, t.TimeZone, changed})
		}
		if !changed {
			fmt.Fprintf(stdout, "tenant %s already has time zone %s; nothing changed\n", t.Slug, zone)
			return nil
		}
		fmt.Fprintf(stdout, "tenant %s: time zone %s; reads use it within 10 s (quotas stay per UTC day)\n", t.Slug, zone)
		return nil

	case "create":
		t, err := store.Create(ctx, slug, display, tenantAudit(func(t tenant.Tenant) audit.Entry {
			return audit.Entry{TenantID: t.ID, Actor: "cli", Action: "tenant.create", Target: t.Slug}
		}))
		if errors.Is(err, tenant.ErrExists) && ifNotExists {
			t, err = store.BySlug(ctx, slug)
		}
		if err != nil {
			return err
		}
		if asJSON {
			return printJSON(stdout, tenantView(t))
		}
		fmt.Fprintln(stdout, t.ID)
		return nil

	case "list":
		ts, err := store.List(ctx)
		if err != nil {
			return err
		}
		if asJSON {
			out := make([]tenantJSON, len(ts))
			for i, t := range ts {
				out[i] = tenantView(t)
			}
			return printJSON(stdout, out)
		}
		rows := make([][]string, len(ts))
		for i, t := range ts {
			rows[i] = []string{t.ID.String(), t.Slug, t.Name, tenantView(t).Status, t.CreatedAt.UTC().Format(time.RFC3339)}
		}
		return table(stdout, "ID\tSLUG\tNAME\tSTATUS\tCREATED", rows)

	case "show":
		t, err := store.BySlug(ctx, slug)
		if err != nil {
			return err
		}
		limits := quotaLimits(cfg, t)
		if asJSON {
			return printJSON(stdout, struct {
				tenantJSON
				Quotas []quotaLimit `json:"quotas"`
			}{tenantView(t), limits})
		}
		status := "active"
		if t.Disabled() {
			status = "disabled since " + when(t.DisabledAt)
		}
		fmt.Fprintf(stdout, "tenant   %s (%s)\nid       %s\nstatus   %s\ncreated  %s\nzone     %s\n\n", t.Slug, t.Name, t.ID, status, when(&t.CreatedAt), t.TimeZone)
		return printQuotas(stdout, limits)

	case "set-quota":
		t, err := store.BySlug(ctx, slug)
		if err != nil {
			return err
		}
		known := knownMetrics(cfg, t)
		if !newMetric && !slices.Contains(known, metric) {
			return fmt.Errorf("%s: %q is not a known quota metric (known: %s); pass --new-metric to give a tenant a quota on a metric no default has: %w",
				name, metric, strings.Join(known, ", "), errUsage)
		}
		var previous *float64
		t, previous, changed, err := store.SetQuota(ctx, slug, metric, lim, tenantAudit(func(t tenant.Tenant) audit.Entry {
			meta := map[string]any{"limit": lim}
			if previous != nil {
				meta["previous"] = *previous
			}
			return audit.Entry{TenantID: t.ID, Actor: "cli", Action: "quota.set", Target: metric, Meta: meta}
		}))
		if err != nil {
			return err
		}
		limits := quotaLimits(cfg, t)
		if asJSON {
			return printJSON(stdout, struct {
				Tenant  string       `json:"tenant"`
				Metric  string       `json:"metric"`
				Limit   *float64     `json:"limit"` // the override; null when cleared
				Changed bool         `json:"changed"`
				Quotas  []quotaLimit `json:"quotas"`
			}{t.Slug, metric, lim, changed, limits})
		}
		switch {
		case !changed && clear:
			fmt.Fprintf(stdout, "tenant %s has no override of %s; nothing changed\n", t.Slug, metric)
		case !changed:
			fmt.Fprintf(stdout, "tenant %s already has %s = %s; nothing changed\n", t.Slug, metric, formatLimit(*lim))
		case clear:
			fmt.Fprintf(stdout, "tenant %s: override of %s removed; servers apply it within 10 s\n", t.Slug, metric)
		default:
			fmt.Fprintf(stdout, "tenant %s: %s = %s; servers apply it within 10 s\n", t.Slug, metric, formatLimit(*lim))
		}
		fmt.Fprintln(stdout)
		return printQuotas(stdout, limits)

	case "disable", "enable":
		t, changed, err := store.SetDisabled(ctx, slug, action == "disable", tenantAudit(func(t tenant.Tenant) audit.Entry {
			return audit.Entry{TenantID: t.ID, Actor: "cli", Action: "tenant." + action, Target: t.Slug}
		}))
		if err != nil {
			return err
		}
		if asJSON {
			return printJSON(stdout, struct {
				tenantJSON
				Changed bool `json:"changed"`
			}{tenantView(t), changed})
		}
		switch {
		case !changed && action == "disable":
			fmt.Fprintf(stdout, "tenant %s was already disabled (since %s); nothing changed\n", t.Slug, when(t.DisabledAt))
		case !changed:
			fmt.Fprintf(stdout, "tenant %s is not disabled; nothing changed\n", t.Slug)
		case action == "disable":
			fmt.Fprintf(stdout, "tenant %s disabled: every server refuses its API keys and JWTs with 403 within 5 s.\n"+
				"Its keys, quotas and data are kept; undo with 'analyticsd tenant enable --tenant %s'.\n", t.Slug, t.Slug)
		default:
			fmt.Fprintf(stdout, "tenant %s enabled: its API keys and JWTs work again within 5 s\n", t.Slug)
		}
		return nil

	case "delete":
		return deleteTenant(ctx, pg, store, slug, yes, asJSON, stdout, stderr)
	}
	return fmt.Errorf("tenant: unknown action %q: %w", action, errUsage)
}

// deleteTenant says what deleting the tenant removes and keeps, asks for its slug unless yes, and
// deletes it.
func deleteTenant(ctx context.Context, pg *pgxpool.Pool, store *tenant.Store, slug string, yes, asJSON bool, stdout, stderr io.Writer) error {
	t, err := store.BySlug(ctx, slug)
	if err != nil {
		return err
	}
	keys, err := auth.NewKeys(pg).List(ctx, t.ID)
	if err != nil {
		return err
	}
	removes := []string{
		fmt.Sprintf("the tenant and its %d API keys (refused within 5 s on every server)", len(keys)),
		"its daily usage, usage levels and rollup runs",
	}
	keeps := []string{
		"the audit log (this deletion is recorded there)",
		"raw events, usage increments and daily aggregates in ClickHouse: run `analyticsd erase tenant` first to erase them; " +
			"otherwise they age out after RETENTION_DAYS (aggregates stay), and a new tenant with the same slug gets a new id and never sees them",
		"live quota counters in Redis (they expire within 48 h)",
	}
	plan := func(w io.Writer, removed, kept string) {
		fmt.Fprintf(w, "%s from Postgres:\n  - %s\n%s:\n  - %s\n", removed, strings.Join(removes, "\n  - "), kept, strings.Join(keeps, "\n  - "))
	}
	if !yes {
		plan(stderr, fmt.Sprintf("Deleting tenant %s (%s) removes", t.Slug, t.ID), "It keeps")
		fmt.Fprint(stderr, "Type the tenant's slug to confirm: ")
		line, err := bufio.NewReader(stdin).ReadString('\n')
		if err != nil {
			fmt.Fprintln(stderr)
		}
		if got := strings.TrimSpace(line); got != t.Slug {
			return fmt.Errorf("tenant delete: confirmation %q is not the slug %q; nothing was deleted (type the slug, or pass --yes): %w", got, t.Slug, errUsage)
		}
	}
	if _, err := store.Delete(ctx, t.ID, tenantAudit(func(t tenant.Tenant) audit.Entry {
		return audit.Entry{TenantID: t.ID, Actor: "cli", Action: "tenant.delete", Target: t.Slug, Meta: map[string]any{"api_keys": len(keys), "name": t.Name}}
	})); err != nil {
		return err
	}
	if asJSON {
		return printJSON(stdout, struct {
			Deleted tenantJSON `json:"deleted"`
			APIKeys int        `json:"api_keys_removed"`
			Removed []string   `json:"removed"`
			Kept    []string   `json:"kept"`
		}{tenantView(t), len(keys), removes, keeps})
	}
	plan(stdout, fmt.Sprintf("Deleted tenant %s (%s). Removed", t.Slug, t.ID), "Kept")
	return nil
}

// keyJSON is an API key as --json prints it; Key (the secret) only right after create or rotate.
type keyJSON struct {
	ID         uuid.UUID  `json:"id"`
	TenantID   uuid.UUID  `json:"tenant_id"`
	Tenant     string     `json:"tenant"`
	Prefix     string     `json:"prefix"`
	Name       string     `json:"name"`
	Scopes     []string   `json:"scopes"`
	Status     string     `json:"status"` // active, expiring, expired or revoked
	CreatedAt  time.Time  `json:"created_at"`
	LastUsedAt *time.Time `json:"last_used_at"`
	ExpiresAt  *time.Time `json:"expires_at"`
	RevokedAt  *time.Time `json:"revoked_at"`
	Key        string     `json:"key,omitempty"`
}

func keyView(k auth.Key, slug string, now time.Time) keyJSON {
	scopes := make([]string, len(k.Scopes))
	for i, s := range k.Scopes {
		scopes[i] = string(s)
	}
	return keyJSON{ID: k.ID, TenantID: k.TenantID, Tenant: slug, Prefix: k.Prefix, Name: k.Name, Scopes: scopes,
		Status: k.Status(now), CreatedAt: k.CreatedAt, LastUsedAt: k.LastUsedAt, ExpiresAt: k.ExpiresAt, RevokedAt: k.RevokedAt}
}

// maxOverlap bounds `apikey rotate --overlap`: a rotation is meant to end.
const maxOverlap = 30 * 24 * time.Hour

func apikeyCmd(ctx context.Context, cfg Config, _ *slog.Logger, args []string, stdout io.Writer) error {
	if len(args) == 0 {
		return fmt.Errorf("apikey: want an action: %w", errUsage)
	}
	action := args[0]
	name := "apikey " + action
	var slug, label, scopeList, ref string
	var asJSON bool
	overlap := 24 * time.Hour
	if err := flags(name, args[1:], func(fs *flag.FlagSet) {
		switch action {
		case "create", "list":
			fs.StringVar(&slug, "tenant", "", "the tenant's slug (required)")
		default:
			fs.StringVar(&slug, "tenant", "", "the tenant's slug (required unless --key is the whole key)")
			fs.StringVar(&ref, "key", "", "the key: its id, its prefix, or the whole key (required)")
		}
		switch action {
		case "create":
			fs.StringVar(&label, "name", "", "a label for the key")
			fs.StringVar(&scopeList, "scopes", "", "comma-separated scopes: events:write, analytics:read, analytics:admin (required)")
		case "rotate":
			fs.StringVar(&label, "name", "", "a label for the new key (default: the old key's)")
			fs.DurationVar(&overlap, "overlap", overlap, "how long the old key keeps working, 0 to 720h")
		}
		fs.BoolVar(&asJSON, "json", false, "print JSON instead of text")
	}); err != nil {
		return err
	}
	if err := checkLabel(name, "--name", label); err != nil {
		return err
	}
	// A key pasted with the line end or the "Bearer " before it still names the key.
	ref = strings.TrimPrefix(strings.TrimSpace(ref), "Bearer ")
	var scopes []auth.Scope
	switch action {
	case "create", "list":
		if slug == "" {
			return fmt.Errorf("%s: --tenant is required: %w", name, errUsage)
		}
		if action == "create" {
			var err error
			if scopes, err = auth.ParseScopes(scopeList); err != nil {
				return fmt.Errorf("%s: --scopes: %v: %w", name, err, errUsage)
			}
		}
	case "revoke", "rotate":
		if ref == "" {
			return fmt.Errorf("%s: --key is required (its id, prefix or the whole key): %w", name, errUsage)
		}
		if slug == "" && !auth.IsWholeKey(ref) {
			return fmt.Errorf("%s: --tenant is required when --key is an id or a prefix: %w", name, errUsage)
		}
		if overlap < 0 || overlap > maxOverlap {
			return fmt.Errorf("%s: --overlap %s: want 0 to 720h: %w", name, overlap, errUsage)
		}
	default:
		return fmt.Errorf("apikey: unknown action %q: %w", action, errUsage)
	}

	pg, err := openPostgres(ctx, cfg)
	if err != nil {
		return err
	}
	defer pg.Close()
	tenants, keys := tenant.NewStore(pg), auth.NewKeys(pg)
	var t tenant.Tenant
	if slug != "" {
		if t, err = tenants.BySlug(ctx, slug); err != nil {
			return err
		}
	}
	var target auth.Key
	if ref != "" {
		if target, err = keys.Find(ctx, t.ID, ref); err != nil {
			return err
		}
		if t.ID == uuid.Nil {
			if t, err = tenants.ByID(ctx, target.TenantID); err != nil {
				return err
			}
		}
	}
	now := time.Now()
	switch action {
	case "create":
		plain, rec, err := keys.Create(ctx, t.ID, label, scopes, keyAudit(func(k auth.Key) audit.Entry {
			return audit.Entry{TenantID: t.ID, Actor: "cli", Action: "apikey.create", Target: k.Prefix, Meta: map[string]any{"scopes": scopes, "name": label}}
		}))
		if err != nil {
			return err
		}
		if asJSON {
			v := keyView(rec, t.Slug, now)
			v.Key = plain
			return printJSON(stdout, v)
		}
		fmt.Fprintf(stdout, "created key %s (prefix %s) for tenant %s with scopes %s; it is shown once:\n%s\n",
			rec.ID, rec.Prefix, t.Slug, strings.Join(keyView(rec, "", now).Scopes, ","), plain)
		return nil

	case "list":
		ks, err := keys.List(ctx, t.ID)
		if err != nil {
			return err
		}
		views := make([]keyJSON, len(ks))
		rows := make([][]string, len(ks))
		for i, k := range ks {
			views[i] = keyView(k, t.Slug, now)
			rows[i] = []string{k.ID.String(), k.Prefix, orDash(k.Name), strings.Join(views[i].Scopes, ","), views[i].Status,
				when(&k.CreatedAt), when(k.LastUsedAt), when(k.ExpiresAt), when(k.RevokedAt)}
		}
		if asJSON {
			return printJSON(stdout, views)
		}
		return table(stdout, "ID\tPREFIX\tNAME\tSCOPES\tSTATUS\tCREATED\tLAST USED\tEXPIRES\tREVOKED", rows)

	case "revoke":
		rec, already, err := keys.RevokeID(ctx, target.ID, keyAudit(func(k auth.Key) audit.Entry {
			return audit.Entry{TenantID: t.ID, Actor: "cli", Action: "apikey.revoke", Target: k.Prefix}
		}))
		if err != nil {
			return err
		}
		if asJSON {
			return printJSON(stdout, struct {
				keyJSON
				AlreadyRevoked bool `json:"already_revoked"`
			}{keyView(rec, t.Slug, now), already})
		}
		if already {
			fmt.Fprintf(stdout, "key %s (prefix %s) of tenant %s was already revoked at %s; nothing changed\n", rec.ID, rec.Prefix, t.Slug, when(rec.RevokedAt))
			return nil
		}
		fmt.Fprintf(stdout, "revoked key %s (prefix %s) of tenant %s; every server refuses it within 5 s\n", rec.ID, rec.Prefix, t.Slug)
		return nil

	case "rotate":
		plain, nk, old, err := keys.Rotate(ctx, target.ID, label, overlap, func(ctx context.Context, tx pgx.Tx, nk, old auth.Key) error {
			return audit.RecordIn(ctx, tx, audit.Entry{TenantID: t.ID, Actor: "cli", Action: "apikey.rotate", Target: old.Prefix,
				Meta: map[string]any{"new_prefix": nk.Prefix, "overlap": overlap.String(), "old_expires_at": when(old.ExpiresAt)}})
		})
		if err != nil {
			return err
		}
		if asJSON {
			nv := keyView(nk, t.Slug, now)
			nv.Key = plain
			return printJSON(stdout, struct {
				Old keyJSON `json:"old"`
				New keyJSON `json:"new"`
			}{keyView(old, t.Slug, now), nv})
		}
		fmt.Fprintf(stdout, "rotated key %s (prefix %s) of tenant %s: it keeps working until %s, then expires.\n"+
			"new key %s (prefix %s) with scopes %s; it is shown once:\n%s\n",
			old.ID, old.Prefix, t.Slug, when(old.ExpiresAt), nk.ID, nk.Prefix, strings.Join(keyView(nk, "", now).Scopes, ","), plain)
		return nil
	}
	return fmt.Errorf("apikey: unknown action %q: %w", action, errUsage)
}

// healthcheck lets a container without curl probe the server: it GETs /healthz on the local port.
func healthcheck(ctx context.Context, cfg Config, _ *slog.Logger, args []string, stdout io.Writer) error {
	if err := flags("healthcheck", args, func(*flag.FlagSet) {}); err != nil {
		return err
	}
	_, port, err := net.SplitHostPort(cfg.Addr)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, 3*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://127.0.0.1:"+port+"/healthz", nil)
	if err != nil {
		return err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("/healthz answered %s", resp.Status)
	}
	fmt.Fprintln(stdout, "ok")
	return nil
}

// eraseCmd runs `analyticsd erase <user|tenant|status>`: it queues an erasure job (the servers' runners
// run it; --run runs it here instead, for when no server is up — drain their spools first), and with
// --wait follows it until it is done. `erase tenant` asks for the slug unless --yes.
func eraseCmd(ctx context.Context, cfg Config, log *slog.Logger, args []string, stdout io.Writer, stderr io.Writer) error {
	if len(args) == 0 {
		return fmt.Errorf("erase: want an action: %w", errUsage)
	}
	action := args[0]
	name := "erase " + action
	var slug, user, jobID string
	var wait time.Duration
	var run, yes, asJSON bool
	if err := flags(name, args[1:], func(fs *flag.FlagSet) {
		fs.StringVar(&slug, "tenant", "", "the tenant's slug (required)")
		switch action {
		case "user":
			fs.StringVar(&user, "user", "", "the user_id whose events are erased (required)")
		case "tenant":
			fs.BoolVar(&yes, "yes", false, "do not ask: erase without typing the slug")
		case "status":
			fs.StringVar(&jobID, "job", "", "the job's id (required)")
		}
		if action != "status" {
			fs.DurationVar(&wait, "wait", 0, "follow the job until it is done, at most this long (0: only queue it)")
			fs.BoolVar(&run, "run", false, "run the job in this process (no server running; their spools drained)")
		}
		fs.BoolVar(&asJSON, "json", false, "print JSON instead of text")
	}); err != nil {
		return err
	}
	switch {
	case slug == "":
		return fmt.Errorf("%s: --tenant is required: %w", name, errUsage)
	case action == "user" && (user == "" || len(user) > 255):
		return fmt.Errorf("%s: --user is required (1 to 255 bytes): %w", name, errUsage)
	case action == "status" && jobID == "":
		return fmt.Errorf("%s: --job is required: %w", name, errUsage)
	}
	ch, pg, closeStores, err := openStores(ctx, cfg)
	if err != nil {
		return err
	}
	defer closeStores()
	t, err := tenant.NewStore(pg).BySlug(ctx, slug)
	if err != nil {
		return err
	}
	ecfg := erasure.Config{Layout: cfg.Layout()}
	if run {
		v, err := schema.ServerVersion(ch)
		if err != nil {
			return err
		}
		ecfg.Lightweight = schema.LightweightDelete(v)
		// Whatever this command queued, its runner takes the oldest open job, which may be another
		// tenant's erasure: it must be able to finish every step of it, Redis keys included.
		rdb, err := openRedis(cfg)
		if err != nil {
			return err
		}
		defer rdb.Close()
		ecfg.DeleteKeys = erasure.RedisKeys(rdb, "")
	}
	svc := erasure.New(ecfg, ch, pg, audit.New(pg), log.With("component", "erasure"))
	var j erasure.Job
	switch action {
	case "status":
		id, err := uuid.Parse(jobID)
		if err != nil {
			return fmt.Errorf("%s: --job %q is not a job id: %w", name, jobID, errUsage)
		}
		if j, err = svc.Get(ctx, t.ID, id); err != nil {
			return err
		}
	case "user":
		if j, err = svc.EraseUser(ctx, t.ID, user, "cli"); err != nil {
			return err
		}
	case "tenant":
		if !yes {
			fmt.Fprintf(stderr, "Erasing all data of tenant %s (%s) removes its events, usage increments and daily aggregates in ClickHouse,\n"+
				"its billed usage, usage levels and rollup runs in Postgres, and its keys in Redis (live counters, id claims).\n"+
				"The tenant, its API keys and the audit log stay. It cannot be undone.\nType the tenant's slug to confirm: ", t.Slug, t.ID)
			line, err := bufio.NewReader(stdin).ReadString('\n')
			if err != nil {
				fmt.Fprintln(stderr)
			}
			if got := strings.TrimSpace(line); got != t.Slug {
				return fmt.Errorf("%s: confirmation %q is not the slug %q; nothing was erased (type the slug, or pass --yes): %w", name, got, t.Slug, errUsage)
			}
		}
		if j, err = svc.EraseTenant(ctx, t.ID, "cli"); err != nil {
			return err
		}
	}
	ended := func() bool { return j.Status == erasure.StatusDone || j.Status == erasure.StatusFailed }
	if run && action != "status" {
		// A failed attempt is retried after its backoff (erasure.Config's defaults: 8 attempts, from
		// 30 s doubling to 10 min), until the job is done or failed for good.
		for !ended() {
			if _, err := svc.RunOne(ctx); err != nil {
				fmt.Fprintf(stderr, "%s: %v\n", name, err)
			}
			if j, err = svc.Get(ctx, t.ID, j.ID); err != nil {
				return err
			}
			if !ended() {
				select {
				case <-ctx.Done():
					return ctx.Err()
				case <-time.After(time.Second):
				}
			}
		}
	} else if wait > 0 {
		wctx, cancel := context.WithTimeout(ctx, wait)
		defer cancel()
		for !ended() {
			select {
			case <-wctx.Done():
				return fmt.Errorf("%s: job %s is still %s after %s (step %q); follow it with `analyticsd erase status --tenant %s --job %s`",
					name, j.ID, j.Status, wait, j.Step, t.Slug, j.ID)
			case <-time.After(500 * time.Millisecond):
			}
			if j, err = svc.Get(ctx, t.ID, j.ID); err != nil {
				return err
			}
		}
	}
	if asJSON {
		return printJSON(stdout, j)
	}
	fmt.Fprintf(stdout, "erasure %s of tenant %s: %s", j.ID, t.Slug, j.Status)
	switch {
	case j.Status == erasure.StatusDone:
		fmt.Fprintf(stdout, ", %d rows erased", j.RowsErased)
	case j.Status == erasure.StatusFailed:
		fmt.Fprintf(stdout, " after %d attempts: %s; send the request again once the cause is fixed", j.Attempts, j.Error)
	case j.Error != "":
		fmt.Fprintf(stdout, " (attempt %d failed: %s; retried)", j.Attempts, j.Error)
	}
	fmt.Fprintln(stdout)
	if j.Status == erasure.StatusFailed && action != "status" {
		return fmt.Errorf("%s: job %s failed: %s", name, j.ID, j.Error)
	}
	return nil
}

// tenantAudit writes the audit row entry makes in the transaction of a tenant's change (tenant.Then),
// so that the change commits only with it.
func tenantAudit(entry func(tenant.Tenant) audit.Entry) tenant.Then {
	return func(ctx context.Context, tx pgx.Tx, t tenant.Tenant) error { return audit.RecordIn(ctx, tx, entry(t)) }
}

// keyAudit is tenantAudit for a key's change (auth.Then).
func keyAudit(entry func(auth.Key) audit.Entry) auth.Then {
	return func(ctx context.Context, tx pgx.Tx, k auth.Key) error { return audit.RecordIn(ctx, tx, entry(k)) }
}

// maxLabel bounds a tenant's display name and a key's label, in characters: they are shown in lists
// and the dashboard, not documents.
const maxLabel = 200

// checkLabel refuses a --name that is not text a list can show: invalid UTF-8 (Postgres refuses it
// with an error that named no flag), a control character (a NUL, a newline or an escape sequence that
// rewrites the operator's terminal when listed), or one over maxLabel characters (found by review).
func checkLabel(cmd, flagName, v string) error {
	if !utf8.ValidString(v) {
		return fmt.Errorf("%s: %s is not valid UTF-8: %w", cmd, flagName, errUsage)
	}
	if n := utf8.RuneCountInString(v); n > maxLabel {
		return fmt.Errorf("%s: %s has %d characters, at most %d are kept: %w", cmd, flagName, n, maxLabel, errUsage)
	}
	if i := strings.IndexFunc(v, unicode.IsControl); i >= 0 {
		return fmt.Errorf("%s: %s has a control character (%U) at byte %d; use printable text: %w", cmd, flagName, []rune(v[i:])[0], i, errUsage)
	}
	return nil
}
