// Command analyticsd is the analytics service and its admin tool: serve the API, migrate the schema,
// manage tenants and API keys. It only wires packages together; the work happens in them.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"syscall"
	_ "time/tzdata" // zone names (the ClickHouse time-zone check) in images without /usr/share/zoneinfo
)

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

const usage = `analyticsd — multi-tenant event analytics on ClickHouse

Usage:
  analyticsd serve                                   run the HTTP API (ANALYTICS_ADDR, default :8080)
  analyticsd migrate                                 create or update the ClickHouse and Postgres schema
  analyticsd tenant create --slug S [--name N] [--if-not-exists]
  analyticsd tenant list
  analyticsd tenant set-quota --tenant S --metric M (--limit N | --clear)
  analyticsd apikey create --tenant S --scopes events:write,analytics:read[,analytics:admin] [--name N]
  analyticsd apikey list --tenant S
  analyticsd apikey revoke --tenant S --key ID|PREFIX
  analyticsd rollup (--date D | --from D1 --to D2)   reconcile daily usage into Postgres, all tenants
  analyticsd spool status [--dir D] [--json]         what waits in a spool, and its quarantine
  analyticsd spool inspect [--dir D] [--segment N] [--rows] [--json]
  analyticsd spool drain [--dir D] [--timeout 10m]   ship a retired instance's spool (no server may hold it)
  analyticsd spool requeue [--dir D] (--all | --file NAME) [--include-expired]
                                                     ship quarantined rows again once the cause is fixed
  analyticsd healthcheck                             exit 0 when the local server's /healthz answers
  analyticsd version

Configuration comes from the environment; see the README's table.
`

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := run(ctx, os.Args[1:], os.Stdout, os.Stderr, os.Getenv)
	stop()
	os.Exit(code)
}

// errUsage marks a mistake in the command line; run prints the usage and exits 2.
var errUsage = errors.New("usage")

func run(ctx context.Context, args []string, stdout, stderr io.Writer, getenv func(string) string) int {
	if len(args) == 0 || args[0] == "-h" || args[0] == "--help" || args[0] == "help" {
		fmt.Fprint(stderr, usage)
		if len(args) == 0 {
			return 2
		}
		return 0
	}
	if args[0] == "version" {
		fmt.Fprintln(stdout, version)
		return 0
	}
	cfg, err := loadConfig(getenv)
	if err != nil {
		fmt.Fprintln(stderr, err)
		return 1
	}
	log := newLogger(cfg, stderr)
	cmds := map[string]func(context.Context, Config, *slog.Logger, []string, io.Writer) error{
		"serve":       serve,
		"migrate":     migrate,
		"tenant":      tenantCmd,
		"apikey":      apikeyCmd,
		"healthcheck": healthcheck,
		"rollup":      rollupCmd,
		"spool":       spoolCmd,
	}
	cmd, ok := cmds[args[0]]
	if !ok {
		fmt.Fprintf(stderr, "unknown command %q\n\n%s", args[0], usage)
		return 2
	}
	if err := cmd(ctx, cfg, log, args[1:], stdout); err != nil {
		if errors.Is(err, errUsage) || errors.Is(err, flag.ErrHelp) {
			fmt.Fprintf(stderr, "%v\n\n%s", err, usage)
			return 2
		}
		fmt.Fprintf(stderr, "analyticsd %s: %v\n", args[0], err)
		return 1
	}
	return 0
}

func newLogger(cfg Config, w io.Writer) *slog.Logger {
	opts := &slog.HandlerOptions{Level: cfg.LogLevel}
	if cfg.LogFormat == "text" {
		return slog.New(slog.NewTextHandler(w, opts))
	}
	return slog.New(slog.NewJSONHandler(w, opts))
}

// flags parses a subcommand's flags, turning mistakes into errUsage.
func flags(name string, args []string, define func(fs *flag.FlagSet)) error {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	define(fs)
	if err := fs.Parse(args); err != nil {
		return fmt.Errorf("%s: %v: %w", name, err, errUsage)
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("%s: unexpected argument %q: %w", name, fs.Arg(0), errUsage)
	}
	return nil
}
