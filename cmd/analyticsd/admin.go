package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/analyticsd/analyticsd/audit"
	"github.com/analyticsd/analyticsd/auth"
	"github.com/analyticsd/analyticsd/ingest"
	"github.com/analyticsd/analyticsd/schema"
	"github.com/analyticsd/analyticsd/tenant"
)

func migrate(ctx context.Context, cfg Config, log *slog.Logger, args []string, stdout io.Writer) error {
	if err := flags("migrate", args, func(*flag.FlagSet) {}); err != nil {
		return err
	}
	ch, pg, closeStores, err := openStores(ctx, cfg)
	if err != nil {
		return err
	}
	defer closeStores()
	m := schema.Migrator{CH: ch, PG: pg, DB: cfg.ClickHouseDB, RetentionDays: cfg.RetentionDays, Log: log}
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

func tenantCmd(ctx context.Context, cfg Config, _ *slog.Logger, args []string, stdout io.Writer) error {
	if len(args) == 0 {
		return fmt.Errorf("tenant: want create or list: %w", errUsage)
	}
	pg, err := openPostgres(ctx, cfg)
	if err != nil {
		return err
	}
	defer pg.Close()
	store := tenant.NewStore(pg)
	switch args[0] {
	case "create":
		var slug, name string
		var ifNotExists bool
		if err := flags("tenant create", args[1:], func(fs *flag.FlagSet) {
			fs.StringVar(&slug, "slug", "", "tenant slug")
			fs.StringVar(&name, "name", "", "display name")
			fs.BoolVar(&ifNotExists, "if-not-exists", false, "print the existing tenant's id instead of failing")
		}); err != nil {
			return err
		}
		if slug == "" {
			return fmt.Errorf("tenant create: --slug is required: %w", errUsage)
		}
		t, err := store.Create(ctx, slug, name)
		if errors.Is(err, tenant.ErrExists) && ifNotExists {
			t, err = store.BySlug(ctx, slug)
		}
		if err != nil {
			return err
		}
		fmt.Fprintln(stdout, t.ID)
		return nil
	case "set-quota":
		var slug, metric, limit string
		var clear bool
		if err := flags("tenant set-quota", args[1:], func(fs *flag.FlagSet) {
			fs.StringVar(&slug, "tenant", "", "tenant slug")
			fs.StringVar(&metric, "metric", "", "quota metric, e.g. api_requests_daily")
			fs.StringVar(&limit, "limit", "", "the tenant's limit")
			fs.BoolVar(&clear, "clear", false, "remove the override (back to QUOTA_DEFAULTS / built-in)")
		}); err != nil {
			return err
		}
		if slug == "" || metric == "" || (limit == "") == !clear {
			return fmt.Errorf("tenant set-quota: --tenant, --metric and one of --limit N or --clear are required: %w", errUsage)
		}
		if !ingest.ValidMetric(metric) {
			return fmt.Errorf("tenant set-quota: --metric %q: %s: %w", metric, ingest.MetricRule, errUsage)
		}
		var lim *float64
		if !clear {
			v, err := strconv.ParseFloat(limit, 64)
			if err != nil || v < 0 || v > 1e15 {
				return fmt.Errorf("tenant set-quota: --limit %q must be a number from 0 to 1e15: %w", limit, errUsage)
			}
			lim = &v
		}
		t, err := store.SetQuota(ctx, slug, metric, lim)
		if err != nil {
			return err
		}
		if err := audit.New(pg).Record(ctx, audit.Entry{TenantID: t.ID, Actor: "cli", Action: "quota.set", Target: metric,
			Meta: map[string]any{"limit": lim}}); err != nil {
			return err
		}
		fmt.Fprintf(stdout, "tenant %s quota overrides: %v (others from QUOTA_DEFAULTS or built-in; applied within 10 s)\n", t.Slug, t.QuotaOverrides)
		return nil
	case "list":
		if err := flags("tenant list", args[1:], func(*flag.FlagSet) {}); err != nil {
			return err
		}
		ts, err := store.List(ctx)
		if err != nil {
			return err
		}
		w := tabwriter.NewWriter(stdout, 0, 4, 2, ' ', 0)
		fmt.Fprintln(w, "ID\tSLUG\tNAME\tCREATED")
		for _, t := range ts {
			fmt.Fprintf(w, "%s\t%s\t%s\t%s\n", t.ID, t.Slug, t.Name, t.CreatedAt.UTC().Format(time.RFC3339))
		}
		return w.Flush()
	}
	return fmt.Errorf("tenant: unknown action %q: %w", args[0], errUsage)
}

func apikeyCmd(ctx context.Context, cfg Config, _ *slog.Logger, args []string, stdout io.Writer) error {
	if len(args) == 0 {
		return fmt.Errorf("apikey: want create, list or revoke: %w", errUsage)
	}
	var slug, name, scopeList, key string
	if err := flags("apikey "+args[0], args[1:], func(fs *flag.FlagSet) {
		fs.StringVar(&slug, "tenant", "", "tenant slug")
		switch args[0] {
		case "create":
			fs.StringVar(&name, "name", "", "a label for the key")
			fs.StringVar(&scopeList, "scopes", "", "comma-separated scopes")
		case "revoke":
			fs.StringVar(&key, "key", "", "key id or prefix")
		}
	}); err != nil {
		return err
	}
	if slug == "" {
		return fmt.Errorf("apikey %s: --tenant is required: %w", args[0], errUsage)
	}
	pg, err := openPostgres(ctx, cfg)
	if err != nil {
		return err
	}
	defer pg.Close()
	t, err := tenant.NewStore(pg).BySlug(ctx, slug)
	if err != nil {
		return err
	}
	keys, audits := auth.NewKeys(pg), audit.New(pg)
	switch args[0] {
	case "create":
		scopes, err := auth.ParseScopes(scopeList)
		if err != nil {
			return fmt.Errorf("apikey create: --scopes: %v: %w", err, errUsage)
		}
		plain, rec, err := keys.Create(ctx, t.ID, name, scopes)
		if err != nil {
			return err
		}
		if err := audits.Record(ctx, audit.Entry{TenantID: t.ID, Actor: "cli", Action: "apikey.create", Target: rec.Prefix,
			Meta: map[string]any{"scopes": scopes, "name": name}}); err != nil {
			return err
		}
		fmt.Fprintf(stdout, "created key %s (prefix %s) for tenant %s with scopes %v; it is shown once:\n%s\n",
			rec.ID, rec.Prefix, t.Slug, scopes, plain)
		return nil
	case "list":
		ks, err := keys.List(ctx, t.ID)
		if err != nil {
			return err
		}
		w := tabwriter.NewWriter(stdout, 0, 4, 2, ' ', 0)
		fmt.Fprintln(w, "ID\tPREFIX\tNAME\tSCOPES\tCREATED\tLAST USED\tREVOKED")
		for _, k := range ks {
			scopes := make([]string, len(k.Scopes))
			for i, s := range k.Scopes {
				scopes[i] = string(s)
			}
			fmt.Fprintf(w, "%s\t%s\t%s\t%s\t%s\t%s\t%s\n", k.ID, k.Prefix, k.Name, strings.Join(scopes, ","),
				k.CreatedAt.UTC().Format(time.RFC3339), when(k.LastUsedAt), when(k.RevokedAt))
		}
		return w.Flush()
	case "revoke":
		if key == "" {
			return fmt.Errorf("apikey revoke: --key is required: %w", errUsage)
		}
		found, err := keys.Find(ctx, t.ID, key)
		if err != nil {
			return err
		}
		rec, already, err := keys.RevokeID(ctx, found.ID)
		if err != nil {
			return err
		}
		if already {
			fmt.Fprintf(stdout, "key %s (prefix %s) was already revoked at %s; nothing changed\n", rec.ID, rec.Prefix, when(rec.RevokedAt))
			return nil
		}
		if err := audits.Record(ctx, audit.Entry{TenantID: t.ID, Actor: "cli", Action: "apikey.revoke", Target: rec.Prefix}); err != nil {
			return err
		}
		fmt.Fprintf(stdout, "revoked key %s (prefix %s)\n", rec.ID, rec.Prefix)
		return nil
	}
	return fmt.Errorf("apikey: unknown action %q: %w", args[0], errUsage)
}

func when(t *time.Time) string {
	if t == nil {
		return "-"
	}
	return t.UTC().Format(time.RFC3339)
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
