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
	"slices"
	"strings"
	"syscall"
	_ "time/tzdata" // zone names (the ClickHouse time-zone check) in images without /usr/share/zoneinfo

	"github.com/analyticsd/analyticsd/auth"
	"github.com/analyticsd/analyticsd/tenant"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

// stdin is where `tenant delete` reads its confirmation; tests replace it.
var stdin io.Reader = os.Stdin

// Exit codes: documented in the usage and in the README, so scripts can tell the cases apart.
const (
	exitOK       = 0 // done, including a repeated action that changed nothing ("already revoked")
	exitFailure  = 1 // a runtime failure: invalid configuration, a store unreachable, a query failed
	exitUsage    = 2 // the command line is wrong: unknown command, action or flag, a bad or missing value
	exitNotFound = 3 // the tenant or key does not exist, or the action conflicts with its state
)

const exitCodes = `Exit codes: 0 ok (also when nothing needed doing), 1 runtime failure, 2 usage error,
3 not found or conflict (no such tenant or key, slug taken, key revoked or expired).`

// command is one line of the usage: the words after "analyticsd", its flags and what it does.
type command struct {
	name, flags, what string
}

// commands is the whole command line, in the order the usage lists it. Actions of tenant, apikey and
// spool are listed by `analyticsd <group> --help`, and each has its own --help with its flags.
var commands = []command{
	{"serve", "", "run the HTTP API (ANALYTICS_ADDR, default :8080)"},
	{"migrate", "[--shrink-retention]", "create or update the ClickHouse and Postgres schema"},
	{"move-to-cluster", "--from DSN [--json]", "copy a single server's database onto CLICKHOUSE_CLUSTER (after migrate), then verify it"},
	{"tenant create", "--slug S [--name N] [--if-not-exists] [--json]", "register a tenant; prints its id last"},
	{"tenant list", "[--json]", "every tenant and its status"},
	{"tenant show", "--tenant S [--json]", "one tenant: status and each quota limit with its source"},
	{"tenant set-quota", "--tenant S --metric M (--limit N | --clear) [--new-metric] [--json]",
		"set or clear the tenant's limit of a known quota metric (N: a whole number)"},
	{"tenant set-timezone", "--tenant S --zone Z [--json]", "the IANA zone whose midnight starts the tenant's days in reads (quotas stay UTC)"},
	{"tenant disable", "--tenant S [--json]", "refuse its API keys and JWTs with 403 within 5 s; keeps everything"},
	{"tenant enable", "--tenant S [--json]", "accept them again"},
	{"tenant delete", "--tenant S [--yes] [--json]", "delete the tenant and its keys and usage in Postgres (asks first)"},
	{"apikey create", "--tenant S --scopes events:write,analytics:read[,analytics:admin] [--name N] [--json]",
		"issue a key; prints it last, once"},
	{"apikey list", "--tenant S [--json]", "the tenant's keys: status, last use, expiry; never the secret"},
	{"apikey revoke", "[--tenant S] --key ID|PREFIX|KEY [--json]", "revoke a key; the whole key needs no --tenant"},
	{"apikey rotate", "[--tenant S] --key ID|PREFIX|KEY [--overlap 24h] [--name N] [--json]",
		"new key, same tenant and scopes; the old one expires after the overlap"},
	{"rollup", "(--date D | --from D1 --to D2)", "reconcile daily usage into Postgres, all tenants"},
	{"import", "--source URL [--map SRC=SLUG]... [--no-create] [--verify-only] [--json]",
		"import the guide's Postgres tables (resumable), then verify counts per tenant and day"},
	{"erase user", "--tenant S --user U [--wait D] [--run] [--json]", "erase every stored event of one user (a job; prints its id and status)"},
	{"erase tenant", "--tenant S [--yes] [--wait D] [--run] [--json]", "erase all of a tenant's events, increments and aggregates (asks first)"},
	{"erase status", "--tenant S --job ID [--json]", "an erasure job: queued, running or done, and rows erased"},
	{"spool status", "[--dir D] [--json]", "what waits in a spool, and its quarantine"},
	{"spool inspect", "[--dir D] [--segment N] [--rows] [--json]", "per segment; --rows prints the rows"},
	{"spool drain", "[--dir D] [--timeout 10m] [--json]", "ship a retired instance's spool (no server may hold it)"},
	{"spool requeue", "[--dir D] (--all | --file NAME) [--include-expired] [--json]", "ship quarantined rows again once the cause is fixed"},
	{"healthcheck", "", "exit 0 when the local server's /healthz answers"},
	{"version", "", "print the version (also --version)"},
}

// usageOf lists the commands whose name starts with prefix ("" for all), one per line, the
// description beside the flags when it fits and under them when not.
func usageOf(prefix string) string {
	var b strings.Builder
	for _, c := range commands {
		if prefix != "" && c.name != prefix && !strings.HasPrefix(c.name, prefix+" ") {
			continue
		}
		line := "  analyticsd " + strings.TrimSpace(c.name+" "+c.flags)
		if len(line) < 56 {
			fmt.Fprintf(&b, "%-56s %s\n", line, c.what)
		} else {
			fmt.Fprintf(&b, "%s\n%-56s %s\n", line, "", c.what)
		}
	}
	return b.String()
}

func usage() string {
	return "analyticsd — multi-tenant event analytics on ClickHouse\n\nUsage:\n" + usageOf("") +
		"\nRun 'analyticsd <command> --help' for one command's flags. Configuration comes from the\n" +
		"environment; see the README's table.\n\n" + exitCodes + "\n"
}

// actions lists the action words of a command that takes one (tenant, apikey, spool); nil for others.
func actions(group string) []string {
	var out []string
	for _, c := range commands {
		if g, a, ok := strings.Cut(c.name, " "); ok && g == group {
			out = append(out, a)
		}
	}
	return out
}

func isHelp(arg string) bool {
	return arg == "-h" || arg == "-help" || arg == "--help" || arg == "help"
}

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := run(ctx, os.Args[1:], os.Stdout, os.Stderr, os.Getenv)
	stop()
	os.Exit(code)
}

// errUsage marks a mistake in the command line: run prints it with a hint to the command's --help
// and exits 2. Wrap it last ("...: %w"); run drops its text.
var errUsage = errors.New("usage")

// helpRequest is flags' answer to -h/--help: run prints the command's usage and flags, and exits 0.
type helpRequest struct{ fs *flag.FlagSet }

func (helpRequest) Error() string { return "help requested" }

func run(ctx context.Context, args []string, stdout, stderr io.Writer, getenv func(string) string) int {
	if len(args) == 0 {
		fmt.Fprint(stderr, usage())
		return exitUsage
	}
	switch args[0] {
	case "-h", "-help", "--help":
		fmt.Fprint(stdout, usage())
		return exitOK
	case "help": // analyticsd help [command [action]]
		if len(args) == 1 {
			fmt.Fprint(stdout, usage())
			return exitOK
		}
		args = append(slices.Clone(args[1:]), "--help")
	case "version", "-version", "--version", "-v":
		fmt.Fprintln(stdout, version)
		return exitOK
	}
	fail := func(path, msg string) int {
		fmt.Fprintf(stderr, "analyticsd: %s\nrun '%s --help'\n", msg, strings.TrimSpace("analyticsd "+path))
		return exitUsage
	}
	cmds := map[string]func(context.Context, Config, *slog.Logger, []string, io.Writer) error{
		"serve":   serve,
		"migrate": migrate,
		"tenant": func(ctx context.Context, cfg Config, _ *slog.Logger, a []string, out io.Writer) error {
			return tenantCmd(ctx, cfg, a, out, stderr)
		},
		"apikey": apikeyCmd,
		"erase": func(ctx context.Context, cfg Config, log *slog.Logger, a []string, out io.Writer) error {
			return eraseCmd(ctx, cfg, log, a, out, stderr)
		},
		"healthcheck":     healthcheck,
		"rollup":          rollupCmd,
		"spool":           spoolCmd,
		"import":          importCmd,
		"move-to-cluster": moveToClusterCmd,
	}
	cmd, ok := cmds[args[0]]
	if !ok {
		return fail("", fmt.Sprintf("unknown command %q", args[0]))
	}
	path := args[0]
	if acts := actions(args[0]); len(acts) > 0 {
		switch {
		case len(args) == 1:
			return fail(path, fmt.Sprintf("%s: want an action: %s", path, strings.Join(acts, ", ")))
		case isHelp(args[1]):
			fmt.Fprintf(stdout, "Usage:\n%s\nRun 'analyticsd %s <action> --help' for one action's flags.\n\n%s\n", usageOf(path), path, exitCodes)
			return exitOK
		case !slices.Contains(acts, args[1]):
			return fail(path, fmt.Sprintf("%s: unknown action %q; actions: %s", path, args[1], strings.Join(acts, ", ")))
		}
		path += " " + args[1]
	}
	// --help needs no valid configuration: the command parses its flags before it uses any.
	wantsHelp := slices.ContainsFunc(args[1:], func(a string) bool { return a == "-h" || a == "-help" || a == "--help" })
	cfg, err := loadConfig(getenv)
	if err != nil && !wantsHelp {
		fmt.Fprintln(stderr, err)
		return exitFailure
	}
	log := newLogger(cfg, stderr)
	err = cmd(ctx, cfg, log, args[1:], stdout)
	var help helpRequest
	switch {
	case err == nil:
		return exitOK
	case errors.As(err, &help):
		printHelp(stdout, path, help.fs)
		return exitOK
	case errors.Is(err, errUsage):
		return fail(path, strings.TrimSuffix(err.Error(), ": "+errUsage.Error()))
	case errors.Is(err, tenant.ErrBadSlug):
		return fail(path, path+": "+err.Error())
	}
	fmt.Fprintf(stderr, "analyticsd %s: %v\n", path, err)
	switch {
	case errors.Is(err, tenant.ErrNotFound):
		fmt.Fprintln(stderr, "run 'analyticsd tenant list' to see the tenants")
		return exitNotFound
	case errors.Is(err, auth.ErrKeyNotFound):
		fmt.Fprintln(stderr, "run 'analyticsd apikey list --tenant S' to see a tenant's keys")
		return exitNotFound
	case errors.Is(err, tenant.ErrExists), errors.Is(err, auth.ErrNotRotatable):
		return exitNotFound
	}
	return exitFailure
}

// printHelp is one command's --help: its line of the usage, its flags, and the exit codes.
func printHelp(w io.Writer, path string, fs *flag.FlagSet) {
	fmt.Fprintf(w, "Usage:\n%s\n", usageOf(path))
	n := 0
	fs.VisitAll(func(*flag.Flag) { n++ })
	if n > 0 {
		fmt.Fprintln(w, "Flags:")
		fs.SetOutput(w)
		fs.PrintDefaults()
		fmt.Fprintln(w)
	}
	fmt.Fprintln(w, exitCodes)
}

func newLogger(cfg Config, w io.Writer) *slog.Logger {
	opts := &slog.HandlerOptions{Level: cfg.LogLevel}
	if cfg.LogFormat == "text" {
		return slog.New(slog.NewTextHandler(w, opts))
	}
	return slog.New(slog.NewJSONHandler(w, opts))
}

// flags parses a subcommand's flags, turning mistakes into errUsage and -h/--help into a
// helpRequest. A command parses its flags before it opens any store, so both answer at once.
func flags(name string, args []string, define func(fs *flag.FlagSet)) error {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	define(fs)
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return helpRequest{fs}
		}
		return fmt.Errorf("%s: %v: %w", name, auth.RedactKeys(err.Error()), errUsage)
	}
	if fs.NArg() > 0 {
		// Redacted: a key passed without its flag would otherwise be echoed whole.
		return fmt.Errorf("%s: unexpected argument %q: %w", name, auth.RedactKeys(fs.Arg(0)), errUsage)
	}
	return nil
}
