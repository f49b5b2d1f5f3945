package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"log/slog"

	"github.com/analyticsd/analyticsd/relocate"
)

// moveToClusterCmd copies a single server's analytics database onto the cluster CLICKHOUSE_CLUSTER
// names (after `analyticsd migrate` created its tables), then verifies it: `move-to-cluster --from DSN`.
func moveToClusterCmd(ctx context.Context, cfg Config, _ *slog.Logger, args []string, stdout io.Writer) error {
	var from string
	var asJSON bool
	if err := flags("move-to-cluster", args, func(fs *flag.FlagSet) {
		fs.StringVar(&from, "from", "", "the single server's database, clickhouse://user:password@host:9000/analytics, as the cluster's servers reach it")
		fs.BoolVar(&asJSON, "json", false, "print JSON instead of text")
	}); err != nil {
		return err
	}
	if from == "" {
		return fmt.Errorf("move-to-cluster: --from is required: %w", errUsage)
	}
	src, err := relocate.ParseSource(from)
	if err != nil {
		return fmt.Errorf("move-to-cluster: %v: %w", err, errUsage)
	}
	if cfg.ClickHouseCluster == "" {
		return fmt.Errorf("move-to-cluster: CLICKHOUSE_CLUSTER is not set: point CLICKHOUSE_DSN and CLICKHOUSE_CLUSTER at the cluster and run `analyticsd migrate` first: %w", errUsage)
	}
	ch, err := openClickHouse(cfg)
	if err != nil {
		return err
	}
	defer ch.Close()
	res, err := relocate.Copy(ctx, ch, cfg.Layout(), src)
	if err != nil {
		return fmt.Errorf("move-to-cluster: %w", err)
	}
	if asJSON {
		return printJSON(stdout, res)
	}
	fmt.Fprintf(stdout, "copied %d events and %d increments from %s/%s onto cluster %s, and %d daily totals past retention; %d daily usage totals verified equal\n",
		res.Events, res.Increments, src.Addr, src.DB, cfg.ClickHouseCluster, res.UsageOnly, res.Checked)
	return nil
}
