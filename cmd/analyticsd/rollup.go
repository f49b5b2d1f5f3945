package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"time"

	"github.com/analyticsd/analyticsd/audit"
	"github.com/analyticsd/analyticsd/internal/clock"
	"github.com/analyticsd/analyticsd/rollup"
)

// maxBackfillDays bounds one `rollup --from --to` invocation.
const maxBackfillDays = 400

// rollupCmd reconciles dates for every tenant: `rollup --date D`, or `rollup --from D1 --to D2` (both
// inclusive) for backfills, printing one line per date. A failed date does not stop the others; the
// command fails at the end, naming them.
func rollupCmd(ctx context.Context, cfg Config, log *slog.Logger, args []string, stdout io.Writer) error {
	var date, from, to string
	if err := flags("rollup", args, func(fs *flag.FlagSet) {
		fs.StringVar(&date, "date", "", "the UTC day to reconcile, YYYY-MM-DD")
		fs.StringVar(&from, "from", "", "first UTC day of a backfill, YYYY-MM-DD")
		fs.StringVar(&to, "to", "", "last UTC day of a backfill (inclusive), YYYY-MM-DD")
	}); err != nil {
		return err
	}
	days, err := rollupDays(date, from, to, clock.Now())
	if err != nil {
		return fmt.Errorf("rollup: %v: %w", err, errUsage)
	}
	ch, pg, closeStores, err := openStores(ctx, cfg)
	if err != nil {
		return err
	}
	defer closeStores()
	r := rollup.NewReconciler(ch, cfg.ClickHouseDB, pg, audit.New(pg), nil, log.With("component", "rollup"), cfg.RetentionDays, nil)
	var failed []string
	for _, day := range days {
		if ctx.Err() != nil {
			return fmt.Errorf("rollup: interrupted before %s: %w", day.Format(time.DateOnly), ctx.Err())
		}
		res, err := r.RunDate(ctx, day, rollup.AllTenants(), "cli")
		if err != nil {
			fmt.Fprintf(stdout, "%s failed: %v\n", day.Format(time.DateOnly), err)
			failed = append(failed, day.Format(time.DateOnly))
			continue
		}
		check := "raw checked"
		if !res.RawChecked {
			check = "outside retention, aggregate only"
		}
		fmt.Fprintf(stdout, "%s tenants=%d metrics=%d rows=%d changed=%d repaired=%d skipped_tenants=%d %s in %s\n",
			res.Date, res.Tenants, res.Metrics, res.Rows, res.Changed, res.Repaired, res.SkippedTenants, check,
			(time.Duration(res.DurationMS) * time.Millisecond).String())
	}
	if len(failed) > 0 {
		return fmt.Errorf("%d of %d dates failed: %v", len(failed), len(days), failed)
	}
	return nil
}

// rollupDays turns --date or --from/--to into the UTC days to reconcile, oldest first.
func rollupDays(date, from, to string, now time.Time) ([]time.Time, error) {
	parse := func(name, v string) (time.Time, error) {
		d, err := time.Parse(time.DateOnly, v)
		if err != nil {
			return d, fmt.Errorf("--%s=%q: want a date YYYY-MM-DD (UTC)", name, v)
		}
		if !d.Before(rollup.Day(now)) {
			return d, fmt.Errorf("--%s=%s is not a past day: today (UTC) is still being counted", name, v)
		}
		return d, nil
	}
	switch {
	case date != "" && (from != "" || to != ""):
		return nil, errors.New("give --date, or --from and --to, not both")
	case date != "":
		d, err := parse("date", date)
		return []time.Time{d}, err
	case from == "" || to == "":
		return nil, errors.New("give --date D, or --from D1 --to D2")
	}
	first, err := parse("from", from)
	if err != nil {
		return nil, err
	}
	last, err := parse("to", to)
	if err != nil {
		return nil, err
	}
	if last.Before(first) {
		return nil, fmt.Errorf("--from %s is after --to %s", from, to)
	}
	var days []time.Time
	for d := first; !d.After(last); d = d.AddDate(0, 0, 1) {
		if len(days) == maxBackfillDays {
			return nil, fmt.Errorf("--from %s --to %s spans more than %d days; split the backfill", from, to, maxBackfillDays)
		}
		days = append(days, d)
	}
	return days, nil
}
