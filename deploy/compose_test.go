// Package deploy_test checks docker-compose.yml, the Dockerfile and the files they mount, as the
// Compose specification's own loader (github.com/compose-spec/compose-go/v2, the loader Docker
// Compose v2 uses) reads them. There is no Docker engine on the build machines, so this is where a
// compose change is proven: what each service publishes and on which host address, which passwords
// must be set, which variables reach analyticsd, and that every image is pinned.
package deploy_test

import (
	"context"
	"encoding/xml"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"sort"
	"strings"
	"testing"

	"github.com/compose-spec/compose-go/v2/cli"
	"github.com/compose-spec/compose-go/v2/types"
	"go.yaml.in/yaml/v3"
)

const (
	root        = ".."
	composeFile = "../docker-compose.yml"
	envExample  = "../.env.example"
)

// requiredPasswords are the variables compose refuses to start without: each guards something a
// default value would leave open (Postgres, Grafana's admin, ClickHouse's read-only user).
var requiredPasswords = []string{"POSTGRES_PASSWORD", "CLICKHOUSE_RO_PASSWORD", "GRAFANA_ADMIN_PASSWORD"}

// passwords returns a value for every required password, distinct so a test can tell them apart.
func passwords() map[string]string {
	out := map[string]string{}
	for _, name := range requiredPasswords {
		out[name] = "test-" + strings.ToLower(strings.ReplaceAll(name, "_", "-"))
	}
	return out
}

// load reads docker-compose.yml as `docker compose` does with exactly env as the shell environment
// (the test's own environment is never consulted) and the given env files as .env.
func load(t *testing.T, env map[string]string, envFiles ...string) (*types.Project, error) {
	t.Helper()
	var list []string
	for k, v := range env {
		list = append(list, k+"="+v)
	}
	opts := []cli.ProjectOptionsFn{cli.WithWorkingDirectory(root), cli.WithEnv(list)}
	if len(envFiles) > 0 {
		// Only explicit files: WithEnvFiles() without arguments would read a developer's own ../.env.
		opts = append(opts, cli.WithEnvFiles(envFiles...))
	}
	opts = append(opts, cli.WithDotEnv)
	o, err := cli.NewProjectOptions([]string{composeFile}, opts...)
	if err != nil {
		t.Fatal(err)
	}
	return o.LoadProject(context.Background())
}

func mustLoad(t *testing.T, env map[string]string, envFiles ...string) *types.Project {
	t.Helper()
	p, err := load(t, env, envFiles...)
	if err != nil {
		t.Fatalf("docker-compose.yml does not load: %v", err)
	}
	return p
}

func service(t *testing.T, p *types.Project, name string) types.ServiceConfig {
	t.Helper()
	s, ok := p.Services[name]
	if !ok {
		t.Fatalf("docker-compose.yml has no service %s", name)
	}
	return s
}

func TestComposeLoads(t *testing.T) {
	p := mustLoad(t, passwords())
	if p.Name != "analyticsd" {
		t.Errorf("project name %q, want analyticsd", p.Name)
	}
	var names []string
	for n := range p.Services {
		names = append(names, n)
	}
	sort.Strings(names)
	want := []string{"analyticsd", "clickhouse", "grafana", "migrate", "postgres", "prometheus", "redis"}
	if !slices.Equal(names, want) {
		t.Errorf("services %v, want %v", names, want)
	}
}

// published renders a service's ports as host-address:published->target, "*" for all interfaces.
func published(s types.ServiceConfig) []string {
	var out []string
	for _, p := range s.Ports {
		host := p.HostIP
		if host == "" {
			host = "*"
		}
		out = append(out, fmt.Sprintf("%s:%s->%d/%s", host, p.Published, p.Target, p.Protocol))
	}
	sort.Strings(out)
	return out
}

// Only the API is on every interface (it authenticates every request with API keys or JWTs).
// Grafana and Prometheus are on loopback: Prometheus has no authentication at all, and Grafana's
// data source reads every tenant's events, so Grafana is operator access. ClickHouse, Postgres,
// Redis and analyticsd's operator listener stay on the compose network.
func TestComposePublishedPorts(t *testing.T) {
	check := func(name string, env map[string]string, want map[string][]string) {
		t.Helper()
		p := mustLoad(t, env)
		for _, s := range p.Services {
			got := published(s)
			if !slices.Equal(got, want[s.Name]) {
				t.Errorf("%s: %s publishes %v, want %v", name, s.Name, got, want[s.Name])
			}
			if s.NetworkMode == "host" {
				t.Errorf("%s: %s uses the host network, which publishes every port it listens on", name, s.Name)
			}
		}
	}
	defaults := map[string][]string{
		"analyticsd": {"*:8080->8080/tcp"},
		"grafana":    {"127.0.0.1:3000->3000/tcp"},
		"prometheus": {"127.0.0.1:9090->9090/tcp"},
	}
	check("defaults", passwords(), defaults)

	// Widening Grafana is a deliberate choice, made with one variable.
	env := passwords()
	env["GRAFANA_BIND_ADDR"] = "0.0.0.0"
	widened := map[string][]string{
		"analyticsd": defaults["analyticsd"],
		"grafana":    {"0.0.0.0:3000->3000/tcp"},
		"prometheus": defaults["prometheus"],
	}
	check("GRAFANA_BIND_ADDR=0.0.0.0", env, widened)
}

// Without each password compose fails before anything starts, naming the variable; an empty
// value counts as missing. The same holds when .env.example is copied to .env unedited.
func TestComposeRequiresPasswords(t *testing.T) {
	for _, name := range requiredPasswords {
		for _, value := range []string{"<unset>", ""} {
			env := passwords()
			if value == "<unset>" {
				delete(env, name)
			} else {
				env[name] = value
			}
			_, err := load(t, env)
			if err == nil {
				t.Errorf("%s=%s: docker-compose.yml loads; want it refused", name, value)
				continue
			}
			if !strings.Contains(err.Error(), "required variable "+name) {
				t.Errorf("%s=%s: error %q does not name the variable", name, value, err)
			}
		}
	}

	if _, err := os.Stat(envExample); err != nil {
		t.Fatalf(".env.example: %v", err)
	}
	if _, err := load(t, nil, envExample); err == nil || !strings.Contains(err.Error(), "required variable ") {
		t.Errorf("with an unedited .env.example: got %v, want a required-variable error", err)
	}
	// Passwords from the shell take precedence over .env, as in docker compose.
	mustLoad(t, passwords(), envExample)
}

// The passwords reach the services that need them, and nothing falls back to a built-in one.
func TestComposePasswordsReachServices(t *testing.T) {
	pw := passwords()
	p := mustLoad(t, pw)
	env := func(svc, key string) string {
		t.Helper()
		v := service(t, p, svc).Environment[key]
		if v == nil {
			t.Errorf("%s: %s is not set", svc, key)
			return ""
		}
		return *v
	}
	checks := []struct{ svc, key, want string }{
		{"postgres", "POSTGRES_PASSWORD", pw["POSTGRES_PASSWORD"]},
		{"grafana", "GF_SECURITY_ADMIN_PASSWORD", pw["GRAFANA_ADMIN_PASSWORD"]},
		// The provisioned data source logs in with it, and ClickHouse reads the same variable
		// (users.d: <password from_env="CLICKHOUSE_RO_PASSWORD"/>).
		{"grafana", "CLICKHOUSE_RO_PASSWORD", pw["CLICKHOUSE_RO_PASSWORD"]},
		{"clickhouse", "CLICKHOUSE_RO_PASSWORD", pw["CLICKHOUSE_RO_PASSWORD"]},
	}
	for _, c := range checks {
		if got := env(c.svc, c.key); got != c.want {
			t.Errorf("%s: %s=%q, want %q", c.svc, c.key, got, c.want)
		}
	}
	for _, svc := range []string{"migrate", "analyticsd"} {
		want := "postgres://analytics:" + pw["POSTGRES_PASSWORD"] + "@postgres:5432/analytics?sslmode=disable"
		if got := env(svc, "POSTGRES_URL"); got != want {
			t.Errorf("%s: POSTGRES_URL=%q, want %q", svc, got, want)
		}
	}
}

// The read-only ClickHouse user's password comes from the environment, never from the file.
func TestClickHouseReadOnlyPasswordFromEnv(t *testing.T) {
	raw, err := os.ReadFile(filepath.Join(root, "deploy", "clickhouse", "users.d", "analyticsd.xml"))
	if err != nil {
		t.Fatal(err)
	}
	var doc struct {
		Users struct {
			RO struct {
				Password *struct {
					FromEnv string `xml:"from_env,attr"`
					Value   string `xml:",chardata"`
				} `xml:"password"`
				SHA256 *string `xml:"password_sha256_hex"`
			} `xml:"analytics_ro"`
		} `xml:"users"`
	}
	if err := xml.Unmarshal(raw, &doc); err != nil {
		t.Fatal(err)
	}
	pw := doc.Users.RO.Password
	switch {
	case pw == nil:
		t.Error("users.d/analyticsd.xml: analytics_ro has no <password>")
	case pw.FromEnv != "CLICKHOUSE_RO_PASSWORD":
		t.Errorf(`analytics_ro <password from_env=%q>, want from_env="CLICKHOUSE_RO_PASSWORD"`, pw.FromEnv)
	case strings.TrimSpace(pw.Value) != "":
		// ClickHouse refuses from_env on an element that has a value.
		t.Errorf("analytics_ro <password> has the literal value %q as well as from_env", pw.Value)
	}
	if doc.Users.RO.SHA256 != nil {
		t.Error("analytics_ro also has a <password_sha256_hex>; ClickHouse allows one kind of password")
	}
}

var (
	backticked = regexp.MustCompile("`([A-Z][A-Z0-9_]+)`")
	configRead = regexp.MustCompile(`\b(?:str|integer|boolean|duration|getenv)\("([A-Z][A-Z0-9_]+)"`)
)

// readmeConfigVars lists the variables of the README's "## Configuration" table.
func readmeConfigVars(t *testing.T) []string {
	t.Helper()
	raw, err := os.ReadFile(filepath.Join(root, "README.md"))
	if err != nil {
		t.Fatal(err)
	}
	_, section, ok := strings.Cut(string(raw), "\n## Configuration\n")
	if !ok {
		t.Fatal(`README.md has no "## Configuration" section`)
	}
	if i := strings.Index(section, "\n## "); i >= 0 {
		section = section[:i]
	}
	var out []string
	for _, line := range strings.Split(section, "\n") {
		cells := strings.Split(line, "|")
		if len(cells) < 3 {
			continue
		}
		for _, m := range backticked.FindAllStringSubmatch(cells[1], -1) {
			out = append(out, m[1])
		}
	}
	if len(out) < 30 || !slices.Contains(out, "AUTH_JWT_SECRET") || !slices.Contains(out, "AUTH_JWT_AUDIENCE") {
		t.Fatalf("README configuration table parsed into %v; the parser is broken", out)
	}
	return out
}

// configCodeVars lists the variables cmd/analyticsd's config loader reads, so one missing from the
// README still has to reach the container.
func configCodeVars(t *testing.T) []string {
	t.Helper()
	files, _ := filepath.Glob(filepath.Join(root, "cmd", "analyticsd", "*.go"))
	seen := map[string]bool{}
	for _, f := range files {
		if strings.HasSuffix(f, "_test.go") {
			continue
		}
		raw, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		for _, m := range configRead.FindAllStringSubmatch(string(raw), -1) {
			seen[m[1]] = true
		}
	}
	if !seen["CLICKHOUSE_DSN"] || !seen["AUTH_JWT_SECRET"] {
		t.Fatalf("found %v in cmd/analyticsd; the scan for config variables is broken", seen)
	}
	var out []string
	for v := range seen {
		out = append(out, v)
	}
	sort.Strings(out)
	return out
}

// wiring are the variables compose sets itself: how the containers find each other, the ports the
// health check, Prometheus and the published port rely on, and the spool volume's path. They are
// not taken from the shell on purpose: `eval "$(deploy/local/stack.sh env)"` exports
// CLICKHOUSE_DSN, POSTGRES_URL and REDIS_URL for the local stack, which would send the containers
// to 127.0.0.1.
var wiring = map[string]string{
	"CLICKHOUSE_DSN":         "clickhouse://default:@clickhouse:9000/analytics",
	"POSTGRES_URL":           "", // checked in TestComposePasswordsReachServices
	"REDIS_URL":              "redis://redis:6379/0",
	"CLICKHOUSE_CLUSTER":     "", // set empty: checked in TestComposeIsNeverACluster
	"REDIS_CLUSTER":          "false",
	"ANALYTICS_ADDR":         ":8080",
	"ANALYTICS_METRICS_ADDR": ":9464",
	"ANALYTICS_SPOOL_DIR":    "/var/lib/analyticsd/spool",
}

// Every variable of the README's configuration table (and any other the config loader reads)
// reaches analyticsd and migrate: from the shell or from .env when set there, and left unset
// otherwise. Unset, not empty: compose-go keeps a variable without a value as nil, docker compose
// passes it to the engine as a bare "NAME", and the engine leaves such a variable out of the
// container's environment, so analyticsd's built-in default applies.
func TestComposeAnalyticsdEnvironment(t *testing.T) {
	vars := readmeConfigVars(t)
	for _, v := range configCodeVars(t) {
		if !slices.Contains(vars, v) {
			vars = append(vars, v)
		}
	}
	var passThrough []string
	for _, v := range vars {
		if _, ok := wiring[v]; !ok {
			passThrough = append(passThrough, v)
		}
	}

	// Unset in the shell and in .env: present without a value.
	unset := mustLoad(t, passwords())
	// Set in the shell: that value, for the wiring too (where compose's own value must win).
	shell := passwords()
	for _, v := range vars {
		shell[v] = "shell-" + strings.ToLower(v)
	}
	fromShell := mustLoad(t, shell)
	// Set in .env only.
	dotenv := filepath.Join(t.TempDir(), ".env")
	var lines []string
	for _, v := range passThrough {
		lines = append(lines, v+"=dotenv-"+strings.ToLower(v))
	}
	if err := os.WriteFile(dotenv, []byte(strings.Join(lines, "\n")+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	fromDotenv := mustLoad(t, passwords(), dotenv)

	for _, svc := range []string{"migrate", "analyticsd"} {
		for _, v := range vars {
			if want, fixed := wiring[v]; fixed {
				for _, p := range []*types.Project{unset, fromShell} {
					got := service(t, p, svc).Environment[v]
					switch {
					case got == nil:
						t.Errorf("%s: %s is not set; compose must set it", svc, v)
					case want != "" && *got != want:
						t.Errorf("%s: %s=%q, want compose's own %q whatever the shell says", svc, v, *got, want)
					}
				}
				continue
			}
			if got, ok := service(t, unset, svc).Environment[v]; !ok {
				t.Errorf("%s: %s does not reach the container (not in its environment)", svc, v)
				continue
			} else if got != nil {
				t.Errorf("%s: %s=%q when unset in the shell and .env; want it left unset (no value in compose)", svc, v, *got)
			}
			if got := service(t, fromShell, svc).Environment[v]; got == nil || *got != shell[v] {
				t.Errorf("%s: %s from the shell arrives as %s, want %q", svc, v, show(got), shell[v])
			}
			want := "dotenv-" + strings.ToLower(v)
			if got := service(t, fromDotenv, svc).Environment[v]; got == nil || *got != want {
				t.Errorf("%s: %s from .env arrives as %s, want %q", svc, v, show(got), want)
			}
		}
	}
	if a, m := service(t, fromShell, "analyticsd").Environment, service(t, fromShell, "migrate").Environment; !mapsEqual(a, m) {
		t.Error("analyticsd and migrate have different environments; both must run with the same configuration")
	}

	// .env.example names every pass-through variable, so an operator sees what can be set.
	raw, err := os.ReadFile(envExample)
	if err != nil {
		t.Fatal(err)
	}
	for _, v := range passThrough {
		if !regexp.MustCompile(`(?m)^#?\s*` + v + `=`).Match(raw) {
			t.Errorf(".env.example does not mention %s", v)
		}
	}
}

func show(v *string) string {
	if v == nil {
		return "<unset>"
	}
	return fmt.Sprintf("%q", *v)
}

func mapsEqual(a, b types.MappingWithEquals) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		w, ok := b[k]
		if !ok || (v == nil) != (w == nil) || (v != nil && *v != *w) {
			return false
		}
	}
	return true
}

var (
	digestRe  = regexp.MustCompile(`^sha256:[0-9a-f]{64}$`)
	versionRe = regexp.MustCompile(`^v?\d+(\.\d+)*`)
)

// releaseParts is how many version components name one release: PostgreSQL numbers releases
// major.minor (16.15), the other images major.minor.patch (ClickHouse adds a fourth).
var releaseParts = map[string]int{"postgres": 2}

// checkPinned fails unless ref names one release: a digest, or a tag whose version has every
// component of a release (postgres:16.15, redis:7.4.11; not postgres:16 or redis:7).
func checkPinned(t *testing.T, where, ref string) {
	t.Helper()
	if _, digest, ok := strings.Cut(ref, "@"); ok {
		if !digestRe.MatchString(digest) {
			t.Errorf("%s: image %s has a malformed digest", where, ref)
		}
		return
	}
	name, tag := ref, ""
	if i := strings.LastIndex(ref, ":"); i > strings.LastIndex(ref, "/") {
		name, tag = ref[:i], ref[i+1:]
	}
	want := 3
	if n, ok := releaseParts[name[strings.LastIndex(name, "/")+1:]]; ok {
		want = n
	}
	v := versionRe.FindString(tag)
	if got := strings.Count(v, ".") + 1; v == "" || got < want {
		t.Errorf("%s: image %s:%s floats; pin one release (%d version components) or a digest", where, name, tag, want)
	}
}

// Every image is an exact release, so `docker compose pull` a month from now gets the same servers.
func TestComposeImagesPinned(t *testing.T) {
	p := mustLoad(t, passwords())
	for _, s := range p.Services {
		if s.Build != nil {
			continue // built from the Dockerfile, checked below
		}
		checkPinned(t, "docker-compose.yml "+s.Name, s.Image)
	}

	raw, err := os.ReadFile(filepath.Join(root, "Dockerfile"))
	if err != nil {
		t.Fatal(err)
	}
	dockerfile := string(raw)
	args := map[string]string{}
	for _, m := range regexp.MustCompile(`(?m)^ARG\s+(\w+)=(\S+)`).FindAllStringSubmatch(dockerfile, -1) {
		args[m[1]] = m[2]
	}
	froms := regexp.MustCompile(`(?m)^FROM\s+(?:--platform=\S+\s+)?(\S+)`).FindAllStringSubmatch(dockerfile, -1)
	if len(froms) < 2 {
		t.Fatalf("Dockerfile: found %d FROM lines, want a build and a runtime stage", len(froms))
	}
	for _, m := range froms {
		ref := regexp.MustCompile(`\$\{(\w+)\}`).ReplaceAllStringFunc(m[1], func(s string) string {
			return args[s[2:len(s)-1]]
		})
		checkPinned(t, "Dockerfile", ref)
	}
	// golang images set GOTOOLCHAIN=local: the image's Go must be the one go.mod asks for.
	mod, err := os.ReadFile(filepath.Join(root, "go.mod"))
	if err != nil {
		t.Fatal(err)
	}
	goLine := regexp.MustCompile(`(?m)^go (\S+)$`).FindSubmatch(mod)
	if goLine == nil {
		t.Fatal("go.mod has no go line")
	}
	if args["GO_VERSION"] != string(goLine[1]) {
		t.Errorf("Dockerfile GO_VERSION=%s, go.mod asks for go %s; the build would fail (GOTOOLCHAIN=local) or drift", args["GO_VERSION"], goLine[1])
	}
}

// Every long-running service has a health check; Grafana's asks its own /api/health.
func TestComposeHealthchecks(t *testing.T) {
	p := mustLoad(t, passwords())
	for _, s := range p.Services {
		if s.Name == "migrate" {
			continue // one-shot
		}
		if s.HealthCheck == nil || len(s.HealthCheck.Test) == 0 || s.HealthCheck.Disable {
			t.Errorf("%s has no health check", s.Name)
		}
	}
	g := service(t, p, "grafana")
	if g.HealthCheck == nil || !strings.Contains(strings.Join(g.HealthCheck.Test, " "), "127.0.0.1:3000/api/health") {
		t.Errorf("grafana's health check is %v; want one that requests http://127.0.0.1:3000/api/health", g.HealthCheck)
	}
}

// Prometheus scrapes analyticsd where its metrics are: the operator listener compose sets with
// ANALYTICS_METRICS_ADDR (the API port has no /metrics), by service name on the compose network.
// Grafana lets no one in without an account.
func TestComposeMonitoringWiring(t *testing.T) {
	p := mustLoad(t, passwords())
	env := service(t, p, "analyticsd").Environment
	addr := env["ANALYTICS_METRICS_ADDR"]
	if addr == nil || !strings.HasPrefix(*addr, ":") {
		t.Fatalf("analyticsd's ANALYTICS_METRICS_ADDR = %v, want :<port> on the compose network", addr)
	}
	raw, err := os.ReadFile(filepath.Join(root, "deploy/prometheus/prometheus.yml"))
	if err != nil {
		t.Fatal(err)
	}
	var cfg struct {
		ScrapeConfigs []struct {
			JobName       string `yaml:"job_name"`
			MetricsPath   string `yaml:"metrics_path"`
			StaticConfigs []struct {
				Targets []string `yaml:"targets"`
			} `yaml:"static_configs"`
		} `yaml:"scrape_configs"`
	}
	if err := yaml.Unmarshal(raw, &cfg); err != nil {
		t.Fatalf("prometheus.yml: %v", err)
	}
	var targets []string
	for _, sc := range cfg.ScrapeConfigs {
		if sc.JobName != "analyticsd" {
			continue
		}
		if sc.MetricsPath != "" && sc.MetricsPath != "/metrics" {
			t.Errorf("analyticsd job scrapes %s, want /metrics", sc.MetricsPath)
		}
		for _, st := range sc.StaticConfigs {
			targets = append(targets, st.Targets...)
		}
	}
	if want := []string{"analyticsd" + *addr}; !slices.Equal(targets, want) {
		t.Errorf("prometheus scrapes analyticsd at %v, want %v (the operator listener)", targets, want)
	}
	g := service(t, p, "grafana").Environment
	for k, want := range map[string]string{"GF_AUTH_ANONYMOUS_ENABLED": "false", "GF_USERS_ALLOW_SIGN_UP": "false"} {
		if v := g[k]; v == nil || !strings.EqualFold(*v, want) {
			t.Errorf("grafana %s = %v, want %s", k, v, want)
		}
	}
}

// The single-server compose file runs one ClickHouse and one Redis: a CLICKHOUSE_CLUSTER exported in
// the shell (say, after `eval "$(deploy/local/cluster.sh env)"`) must not switch it to the cluster
// layout, whose tables its server cannot create.
func TestComposeIsNeverACluster(t *testing.T) {
	shell := passwords()
	shell["CLICKHOUSE_CLUSTER"], shell["REDIS_CLUSTER"] = "analytics_cluster", "1"
	p := mustLoad(t, shell)
	for _, svc := range []string{"migrate", "analyticsd"} {
		env := service(t, p, svc).Environment
		if v := env["CLICKHOUSE_CLUSTER"]; v == nil || *v != "" {
			t.Errorf("%s: CLICKHOUSE_CLUSTER=%v, want set and empty", svc, v)
		}
		if v := env["REDIS_CLUSTER"]; v == nil || *v != "false" {
			t.Errorf("%s: REDIS_CLUSTER=%v, want false", svc, v)
		}
	}
}
