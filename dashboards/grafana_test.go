package dashboards_test

import (
	"context"
	"encoding/json"
	"encoding/xml"
	"errors"
	"fmt"
	"io/fs"
	"maps"
	"os"
	"path/filepath"
	"reflect"
	"regexp"
	"slices"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/ClickHouse/clickhouse-go/v2"
	"github.com/ClickHouse/clickhouse-go/v2/lib/driver"
	"github.com/google/uuid"

	"github.com/analyticsd/analyticsd/internal/testenv"
)

// The Grafana side: provisioning files and dashboard JSON under grafana/, mounted by
// docker-compose.yml. These tests read the files as Grafana would, expand every ClickHouse query
// the way the grafana-clickhouse-datasource plugin does, and run it on the test server.

const (
	grafanaDir     = "grafana"
	dashboardsDir  = "grafana/dashboards"
	datasourcesDir = "grafana/provisioning/datasources"
)

type dsRef struct {
	Type string `json:"type"`
	UID  string `json:"uid"`
}

type gTarget struct {
	RefID         string `json:"refId"`
	Datasource    *dsRef `json:"datasource"`
	EditorType    string `json:"editorType"`
	Format        *int   `json:"format"`
	RawSQL        string `json:"rawSql"`
	PluginVersion string `json:"pluginVersion"`
	Expr          string `json:"expr"`
}

type gPanel struct {
	ID         int       `json:"id"`
	Type       string    `json:"type"`
	Title      string    `json:"title"`
	Datasource *dsRef    `json:"datasource"`
	Targets    []gTarget `json:"targets"`
	Panels     []gPanel  `json:"panels"` // a collapsed row's panels
	GridPos    struct {
		H, W, X, Y int
	} `json:"gridPos"`
}

type gVariable struct {
	Name       string          `json:"name"`
	Type       string          `json:"type"`
	Datasource *dsRef          `json:"datasource"`
	Query      json.RawMessage `json:"query"`
	Multi      bool            `json:"multi"`
	IncludeAll bool            `json:"includeAll"`
	AllValue   string          `json:"allValue"`
}

// sql returns a ClickHouse variable's query, which the plugin accepts as a string or {rawSql}.
func (v gVariable) sql() string {
	var s string
	if json.Unmarshal(v.Query, &s) == nil {
		return s
	}
	var q struct {
		RawSQL string `json:"rawSql"`
	}
	_ = json.Unmarshal(v.Query, &q)
	return q.RawSQL
}

type gDashboard struct {
	file       string
	UID        string   `json:"uid"`
	Title      string   `json:"title"`
	Panels     []gPanel `json:"panels"`
	Templating struct {
		List []gVariable `json:"list"`
	} `json:"templating"`
}

func (d gDashboard) allPanels() []gPanel {
	var out []gPanel
	for _, p := range d.Panels {
		if p.Type == "row" {
			out = append(out, p.Panels...)
			continue
		}
		out = append(out, p)
	}
	return out
}

func loadDashboards(t *testing.T) []gDashboard {
	t.Helper()
	files, err := filepath.Glob(filepath.Join(dashboardsDir, "*.json"))
	if err != nil || len(files) == 0 {
		t.Fatalf("no dashboards in %s (%v)", dashboardsDir, err)
	}
	var out []gDashboard
	for _, f := range files {
		raw, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		var d gDashboard
		if err := json.Unmarshal(raw, &d); err != nil {
			t.Fatalf("%s: %v", f, err)
		}
		d.file = filepath.Base(f)
		out = append(out, d)
	}
	return out
}

// provisionedDatasources maps uid → type from the provisioning YAML (one data source per file).
func provisionedDatasources(t *testing.T) map[string]string {
	t.Helper()
	files, _ := filepath.Glob(filepath.Join(datasourcesDir, "*.yaml"))
	out := map[string]string{}
	uidRe := regexp.MustCompile(`(?m)^\s+uid:\s*(\S+)\s*$`)
	typeRe := regexp.MustCompile(`(?m)^\s+type:\s*(\S+)\s*$`)
	for _, f := range files {
		raw, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		uids, types := uidRe.FindAllStringSubmatch(string(raw), -1), typeRe.FindAllStringSubmatch(string(raw), -1)
		if len(uids) != 1 || len(types) != 1 {
			t.Fatalf("%s: want one data source with a uid and a type, got %d uids and %d types", f, len(uids), len(types))
		}
		out[uids[0][1]] = types[0][1]
	}
	return out
}

func readFile(t *testing.T, path string) string {
	t.Helper()
	raw, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return string(raw)
}

// The provisioning matches docker-compose.yml and the read-only ClickHouse user.
func TestGrafanaProvisioning(t *testing.T) {
	ch := readFile(t, filepath.Join(datasourcesDir, "clickhouse.yaml"))
	for _, want := range []string{
		"type: grafana-clickhouse-datasource", "uid: clickhouse", "host: clickhouse", "port: 9000", "protocol: native",
		"defaultDatabase: analytics", "username: $CLICKHOUSE_RO_USER", "password: $CLICKHOUSE_RO_PASSWORD",
	} {
		if !strings.Contains(ch, want) {
			t.Errorf("clickhouse.yaml lacks %q", want)
		}
	}
	if strings.Index(ch, "secureJsonData:") > strings.Index(ch, "password: $CLICKHOUSE_RO_PASSWORD") {
		t.Error("clickhouse.yaml: the password must sit under secureJsonData, not jsonData")
	}
	prom := readFile(t, filepath.Join(datasourcesDir, "prometheus.yaml"))
	for _, want := range []string{"type: prometheus", "uid: prometheus", "url: http://prometheus:9090"} {
		if !strings.Contains(prom, want) {
			t.Errorf("prometheus.yaml lacks %q", want)
		}
	}

	// The plugin sends max_execution_time = queryTimeout + 5; analytics_ro may set at most its max.
	m := regexp.MustCompile(`queryTimeout:\s*"(\d+)"`).FindStringSubmatch(ch)
	if m == nil {
		t.Fatal(`clickhouse.yaml: no queryTimeout: "<seconds>"`)
	}
	timeout, _ := strconv.Atoi(m[1])
	users := readFile(t, filepath.Join("..", "deploy", "clickhouse", "users.d", "analyticsd.xml"))
	mx := regexp.MustCompile(`(?s)<max_execution_time>\s*<min>\d+</min>\s*<max>(\d+)</max>\s*<changeable_in_readonly/>`).FindStringSubmatch(users)
	if mx == nil {
		t.Fatal("users.d/analyticsd.xml: analytics_ro has no changeable max_execution_time constraint")
	}
	if ceiling, _ := strconv.Atoi(mx[1]); timeout+5 > ceiling {
		t.Errorf("queryTimeout %d: the plugin would send max_execution_time %d, above analytics_ro's ceiling %d", timeout, timeout+5, ceiling)
	}

	grafana := grafanaService(t)
	for _, want := range []string{
		"CLICKHOUSE_RO_USER:", "CLICKHOUSE_RO_PASSWORD:",
		"./dashboards/grafana/provisioning:/etc/grafana/provisioning",
		"./dashboards/grafana/dashboards:/var/lib/grafana/dashboards",
	} {
		if !strings.Contains(grafana, want) {
			t.Errorf("docker-compose.yml's grafana service lacks %q", want)
		}
	}
	provider := readFile(t, filepath.Join(grafanaDir, "provisioning", "dashboards", "dashboards.yaml"))
	if !strings.Contains(provider, "path: /var/lib/grafana/dashboards") {
		t.Error("dashboards.yaml does not load /var/lib/grafana/dashboards, where compose mounts the JSON")
	}
	// Every ClickHouse target records the plugin version compose installs.
	pin := pinnedPlugin(t)
	for _, d := range loadDashboards(t) {
		for _, p := range d.allPanels() {
			for _, tg := range p.Targets {
				if tg.RawSQL != "" && tg.PluginVersion != pin {
					t.Errorf("%s / %s: pluginVersion %q, compose installs %s", d.file, p.Title, tg.PluginVersion, pin)
				}
			}
		}
	}
}

// ---------------------------------------------------------------- what the plugin sends

// grafanaService is the grafana service's part of docker-compose.yml.
func grafanaService(t *testing.T) string {
	t.Helper()
	compose := readFile(t, filepath.Join("..", "docker-compose.yml"))
	i := strings.Index(compose, "\n  grafana:")
	if i < 0 {
		t.Fatal("docker-compose.yml has no grafana service")
	}
	grafana := compose[i:]
	if i := strings.Index(grafana, "\nvolumes:"); i > 0 {
		grafana = grafana[:i]
	}
	return grafana
}

// pinnedPlugin is the grafana-clickhouse-datasource version compose installs.
func pinnedPlugin(t *testing.T) string {
	t.Helper()
	pin := regexp.MustCompile(`GF_PLUGINS_PREINSTALL_SYNC:\s*grafana-clickhouse-datasource@(\S+)`).FindStringSubmatch(grafanaService(t))
	if pin == nil {
		t.Fatal("docker-compose.yml does not pin grafana-clickhouse-datasource in GF_PLUGINS_PREINSTALL_SYNC")
	}
	return pin[1]
}

// pluginDatasource is what of the provisioned data source and of Grafana's configuration decides
// the settings the plugin sends.
type pluginDatasource struct {
	queryTimeout   int  // jsonData.queryTimeout, seconds
	enableRowLimit bool // jsonData.enableRowLimit
	rowLimit       int  // Grafana's [dataproxy] row_limit (GF_DATAPROXY_ROW_LIMIT), default 1000000
}

// provisionedPlugin reads the ClickHouse data source's provisioning and the grafana service.
func provisionedPlugin(t *testing.T) pluginDatasource {
	t.Helper()
	ch := readFile(t, filepath.Join(datasourcesDir, "clickhouse.yaml"))
	if strings.Contains(ch, "customSettings") {
		t.Fatal("clickhouse.yaml sets customSettings, which the plugin sends with every query; model them in pluginSettings")
	}
	var ds pluginDatasource
	m := regexp.MustCompile(`queryTimeout:\s*"(\d+)"`).FindStringSubmatch(ch)
	if m == nil {
		t.Fatal(`clickhouse.yaml: no queryTimeout: "<seconds>"`)
	}
	ds.queryTimeout, _ = strconv.Atoi(m[1])
	ds.enableRowLimit = regexp.MustCompile(`enableRowLimit:\s*"?true"?`).MatchString(ch)
	ds.rowLimit = 1_000_000
	if m := regexp.MustCompile(`GF_DATAPROXY_ROW_LIMIT:\s*"?(\d+)"?`).FindStringSubmatch(grafanaService(t)); m != nil {
		ds.rowLimit, _ = strconv.Atoi(m[1])
	}
	return ds
}

// version is a plugin release as comparable numbers.
type version [3]int

func parseVersion(s string) (version, error) {
	var v version
	parts := strings.Split(strings.TrimPrefix(s, "v"), ".")
	if len(parts) != 3 {
		return v, fmt.Errorf("version %q: want major.minor.patch", s)
	}
	for i, p := range parts {
		n, err := strconv.Atoi(p)
		if err != nil {
			return v, fmt.Errorf("version %q: %v", s, err)
		}
		v[i] = n
	}
	return v, nil
}

func (v version) less(w version) bool { return slices.Compare(v[:], w[:]) < 0 }

// newestModelledPlugin is the newest plugin release whose source pluginSettings was checked against.
var newestModelledPlugin = version{4, 20, 0}

// pluginSettings returns the ClickHouse settings grafana-clickhouse-datasource sends with every
// query, as its source (pkg/plugin/driver.go Connect, pkg/plugin/settings.go LoadSettings) does
// per release:
//   - max_execution_time: sqlds runs each query under a deadline of queryTimeout seconds, and
//     clickhouse-go turns a deadline into max_execution_time = seconds left + 5 (at most
//     queryTimeout + 5);
//   - limit: from 4.9.0 (#1215) always, Grafana's row limit; from 4.10.2 (#1294) only when the data
//     source enables a row limit and it is not 0.
//
// A release newer than the ones read is an error, so a version bump means reading its source again.
func pluginSettings(pluginVersion string, ds pluginDatasource) (map[string]int, error) {
	v, err := parseVersion(pluginVersion)
	if err != nil {
		return nil, err
	}
	if newestModelledPlugin.less(v) {
		return nil, fmt.Errorf("grafana-clickhouse-datasource %s is newer than %d.%d.%d, the newest release whose settings are modelled here; "+
			"read its pkg/plugin/driver.go and extend pluginSettings", pluginVersion, newestModelledPlugin[0], newestModelledPlugin[1], newestModelledPlugin[2])
	}
	out := map[string]int{"max_execution_time": ds.queryTimeout + 5}
	switch {
	case v.less(version{4, 9, 0}):
	case v.less(version{4, 10, 2}):
		out["limit"] = ds.rowLimit
	case ds.enableRowLimit && ds.rowLimit != 0:
		out["limit"] = ds.rowLimit
	}
	return out, nil
}

func TestPluginSettings(t *testing.T) {
	ds := pluginDatasource{queryTimeout: 25, rowLimit: 1_000_000}
	withLimit := ds
	withLimit.enableRowLimit = true
	check := func(name, version string, ds pluginDatasource, want map[string]int) {
		t.Helper()
		got, err := pluginSettings(version, ds)
		if err != nil {
			t.Errorf("%s: %v", name, err)
			return
		}
		if !reflect.DeepEqual(got, want) {
			t.Errorf("%s: got %v, want %v", name, got, want)
		}
	}
	check("before the row limit", "4.8.0", ds, map[string]int{"max_execution_time": 30})
	check("4.10.1 always sends limit", "4.10.1", ds, map[string]int{"max_execution_time": 30, "limit": 1_000_000})
	check("4.10.2 leaves it out", "4.10.2", ds, map[string]int{"max_execution_time": 30})
	check("4.10.2 with enableRowLimit", "4.10.2", withLimit, map[string]int{"max_execution_time": 30, "limit": 1_000_000})
	check("newest modelled", "4.20.0", ds, map[string]int{"max_execution_time": 30})
	if _, err := pluginSettings("4.21.0", ds); err == nil {
		t.Error("4.21.0: got no error, want one (its settings were never read)")
	}
}

// chProfile is a settings profile of a ClickHouse users file: values and constraints.
type chProfile struct {
	values      map[string]string
	constraints map[string]chConstraint
}

type chConstraint struct {
	min, max             *int
	changeableInReadonly bool
	constant             bool
}

type xmlNode struct {
	XMLName xml.Name
	Content string    `xml:",chardata"`
	Nodes   []xmlNode `xml:",any"`
}

func (n xmlNode) child(name string) (xmlNode, bool) {
	for _, c := range n.Nodes {
		if c.XMLName.Local == name {
			return c, true
		}
	}
	return xmlNode{}, false
}

// readProfile reads profile name from a ClickHouse users file.
func readProfile(t *testing.T, path, name string) chProfile {
	t.Helper()
	var root xmlNode
	if err := xml.Unmarshal([]byte(readFile(t, path)), &root); err != nil {
		t.Fatalf("%s: %v", path, err)
	}
	profiles, _ := root.child("profiles")
	node, ok := profiles.child(name)
	if !ok {
		t.Fatalf("%s: no profile %s", path, name)
	}
	p := chProfile{values: map[string]string{}, constraints: map[string]chConstraint{}}
	for _, c := range node.Nodes {
		if c.XMLName.Local != "constraints" {
			p.values[c.XMLName.Local] = strings.TrimSpace(c.Content)
			continue
		}
		for _, setting := range c.Nodes {
			var k chConstraint
			for _, f := range setting.Nodes {
				n, err := strconv.Atoi(strings.TrimSpace(f.Content))
				switch f.XMLName.Local {
				case "min", "max":
					if err != nil {
						t.Fatalf("%s: constraint %s/%s: %v", path, setting.XMLName.Local, f.XMLName.Local, err)
					}
					if f.XMLName.Local == "min" {
						k.min = &n
					} else {
						k.max = &n
					}
				case "changeable_in_readonly":
					k.changeableInReadonly = true
				case "readonly", "const":
					k.constant = true
				}
			}
			p.constraints[setting.XMLName.Local] = k
		}
	}
	return p
}

// clickhouseDefaults are server defaults of the settings the plugin may send.
var clickhouseDefaults = map[string]string{"limit": "0", "max_execution_time": "0"}

// checkSettings returns the errors ClickHouse 25.8 answers when a user of profile p sends these
// settings with a query (Access/SettingsConstraints.cpp): a value equal to the current one is not
// a change; with readonly=1 only a setting constrained changeable_in_readonly may change, and only
// within its min and max. The test server (18.16) does not enforce any of this for settings sent
// with a query, so the check is made here, from the users file compose mounts.
func checkSettings(p chProfile, settings map[string]int) error {
	var errs []error
	names := slices.Sorted(maps.Keys(settings))
	for _, name := range names {
		value := settings[name]
		current, ok := p.values[name]
		if !ok {
			current, ok = clickhouseDefaults[name]
		}
		if ok && current == strconv.Itoa(value) {
			continue
		}
		k, constrained := p.constraints[name]
		if p.values["readonly"] == "1" && (!constrained || !k.changeableInReadonly) {
			errs = append(errs, fmt.Errorf("Code: 164. Cannot modify '%s' setting in readonly mode", name))
			continue
		}
		switch {
		case k.constant:
			errs = append(errs, fmt.Errorf("Code: 452. Setting %s should not be changed", name))
		case k.min != nil && value < *k.min:
			errs = append(errs, fmt.Errorf("Code: 452. Setting %s shouldn't be less than %d", name, *k.min))
		case k.max != nil && value > *k.max:
			errs = append(errs, fmt.Errorf("Code: 452. Setting %s shouldn't be greater than %d", name, *k.max))
		}
	}
	return errors.Join(errs...)
}

func TestCheckSettings(t *testing.T) {
	thirty, one := 30, 1
	p := chProfile{
		values:      map[string]string{"readonly": "1", "max_execution_time": "30"},
		constraints: map[string]chConstraint{"max_execution_time": {min: &one, max: &thirty, changeableInReadonly: true}},
	}
	check := func(name string, settings map[string]int, want string) {
		t.Helper()
		err := checkSettings(p, settings)
		if got := fmt.Sprint(err); (want == "" && err != nil) || (want != "" && !strings.Contains(got, want)) {
			t.Errorf("%s: got %v, want %q", name, err, want)
		}
	}
	check("unchanged", map[string]int{"max_execution_time": 30}, "")
	check("changeable, in range", map[string]int{"max_execution_time": 12}, "")
	check("changeable, above max", map[string]int{"max_execution_time": 65}, "shouldn't be greater than 30")
	check("limit", map[string]int{"limit": 1_000_000}, "Cannot modify 'limit' setting in readonly mode")
	check("limit at its default", map[string]int{"limit": 0}, "")
	check("unknown setting", map[string]int{"max_threads": 2}, "Cannot modify 'max_threads'")
}

// pluginQuerySettings returns the settings the pinned plugin sends with every query, after
// checking that ClickHouse lets analytics_ro (deploy/clickhouse/users.d) send them: a refusal
// there fails every panel in the compose stack.
func pluginQuerySettings(t *testing.T) map[string]int {
	t.Helper()
	pin := pinnedPlugin(t)
	settings, err := pluginSettings(pin, provisionedPlugin(t))
	if err != nil {
		t.Fatal(err)
	}
	profile := readProfile(t, filepath.Join("..", "deploy", "clickhouse", "users.d", "analyticsd.xml"), "analytics_ro")
	if err := checkSettings(profile, settings); err != nil {
		t.Fatalf("grafana-clickhouse-datasource@%s sends %v with every query; ClickHouse refuses them for analytics_ro, "+
			"so every panel fails:\n%v", pin, settings, err)
	}
	return settings
}

// The plugin compose installs sends only settings the read-only user may send.
func TestGrafanaPluginSettingsAllowed(t *testing.T) {
	pluginQuerySettings(t)
}

// Macros the plugin expands to SQL that ClickHouse 18.16 runs (../shared clickhouse-notes, Grafana).
var allowedMacros = []string{"timeFilter", "fromTime", "toTime", "interval_s", "conditionalAll", "dateFilter"}

var macroRe = regexp.MustCompile(`\$__(\w+)`)

// Dashboards are well formed: unique uids, data sources that are provisioned, targets on every
// panel, only macros that work on every supported server, and only variables that exist.
func TestGrafanaDashboards(t *testing.T) {
	sources := provisionedDatasources(t)
	exported := exportedMetrics(t)
	uids, titles := map[string]string{}, map[string]string{}
	dashboards := loadDashboards(t)
	for _, want := range []string{"analyticsd-usage", "analyticsd-events", "analyticsd-ingest"} {
		if !slices.ContainsFunc(dashboards, func(d gDashboard) bool { return d.UID == want }) {
			t.Errorf("no dashboard with uid %s", want)
		}
	}
	for _, d := range dashboards {
		if d.UID == "" || len(d.UID) > 40 || d.Title == "" {
			t.Errorf("%s: uid %q (1-40 chars) and title %q are required", d.file, d.UID, d.Title)
		}
		if other, dup := uids[d.UID]; dup {
			t.Errorf("%s and %s share uid %s", other, d.file, d.UID)
		}
		if other, dup := titles[d.Title]; dup {
			t.Errorf("%s and %s share title %q", other, d.file, d.Title)
		}
		uids[d.UID], titles[d.Title] = d.file, d.file

		vars := map[string]gVariable{}
		for _, v := range d.Templating.List {
			vars[v.Name] = v
			if v.Datasource != nil {
				if typ, ok := sources[v.Datasource.UID]; !ok || typ != v.Datasource.Type {
					t.Errorf("%s: variable %s uses data source %+v, which is not provisioned", d.file, v.Name, *v.Datasource)
				}
			}
		}
		ids := map[int]bool{}
		for _, p := range d.allPanels() {
			where := fmt.Sprintf("%s / %q", d.file, p.Title)
			if ids[p.ID] {
				t.Errorf("%s: panel id %d repeats", where, p.ID)
			}
			ids[p.ID] = true
			if p.GridPos.W <= 0 || p.GridPos.H <= 0 || p.GridPos.X+p.GridPos.W > 24 {
				t.Errorf("%s: gridPos %+v does not fit the 24-column grid", where, p.GridPos)
			}
			if p.Datasource == nil {
				t.Errorf("%s: no data source", where)
				continue
			}
			if typ, ok := sources[p.Datasource.UID]; !ok || typ != p.Datasource.Type {
				t.Errorf("%s: data source %+v is not provisioned (%v)", where, *p.Datasource, sources)
			}
			if len(p.Targets) == 0 {
				t.Errorf("%s: no targets", where)
			}
			refs := map[string]bool{}
			for _, tg := range p.Targets {
				if tg.RefID == "" || refs[tg.RefID] {
					t.Errorf("%s: refId %q missing or repeated", where, tg.RefID)
				}
				refs[tg.RefID] = true
				if tg.Datasource != nil && *tg.Datasource != *p.Datasource {
					t.Errorf("%s: target %s uses %+v, the panel %+v", where, tg.RefID, *tg.Datasource, *p.Datasource)
				}
				switch p.Datasource.Type {
				case "grafana-clickhouse-datasource":
					checkClickHouseTarget(t, where, tg, vars)
				case "prometheus":
					checkPromTarget(t, where, tg, exported)
				}
			}
		}
	}
}

func checkClickHouseTarget(t *testing.T, where string, tg gTarget, vars map[string]gVariable) {
	t.Helper()
	if strings.TrimSpace(tg.RawSQL) == "" || tg.EditorType != "sql" || tg.Format == nil || (*tg.Format != 0 && *tg.Format != 1) {
		t.Errorf("%s: target %s needs rawSql, editorType sql and format 0 (time series) or 1 (table)", where, tg.RefID)
	}
	for _, m := range macroRe.FindAllStringSubmatch(tg.RawSQL, -1) {
		if !slices.Contains(allowedMacros, m[1]) {
			t.Errorf("%s: macro $__%s does not work on ClickHouse 18.16; use one of %v", where, m[1], allowedMacros)
		}
	}
	for _, name := range referencedVars(tg.RawSQL) {
		if _, ok := vars[name]; !ok {
			t.Errorf("%s: uses $%s, which the dashboard does not define", where, name)
		}
	}
}

var promMetricRe = regexp.MustCompile(`\bsbh_[a-z0-9_]+`)

func checkPromTarget(t *testing.T, where string, tg gTarget, exported map[string]bool) {
	t.Helper()
	if strings.TrimSpace(tg.Expr) == "" {
		t.Errorf("%s: target %s has no expr", where, tg.RefID)
		return
	}
	names := promMetricRe.FindAllString(tg.Expr, -1)
	if len(names) == 0 {
		t.Errorf("%s: target %s names no sbh_ metric: %s", where, tg.RefID, tg.Expr)
	}
	for _, n := range names {
		base := n
		for _, suffix := range []string{"_bucket", "_sum", "_count"} {
			if b, ok := strings.CutSuffix(n, suffix); ok && exported[b] {
				base = b
			}
		}
		if !exported[base] {
			t.Errorf("%s: %s is not a metric analyticsd exports", where, n)
		}
	}
}

// exportedMetrics collects the sbh_ metric names declared in analyticsd's (non-test) Go code.
func exportedMetrics(t *testing.T) map[string]bool {
	t.Helper()
	re := regexp.MustCompile(`Name:\s*"(sbh_[a-z0-9_]+)"`)
	out := map[string]bool{}
	err := filepath.WalkDir("..", func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() && path != ".." && (strings.HasPrefix(d.Name(), ".") || d.Name() == "test-output" || d.Name() == "node_modules") {
			return filepath.SkipDir
		}
		if d.IsDir() || !strings.HasSuffix(path, ".go") || strings.HasSuffix(path, "_test.go") {
			return nil
		}
		raw, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		for _, m := range re.FindAllStringSubmatch(string(raw), -1) {
			out[m[1]] = true
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	for _, core := range []string{"sbh_analytics_events_total", "sbh_ingest_buffer_rows", "sbh_ingest_flush_duration_seconds"} {
		if !out[core] {
			t.Fatalf("found no declaration of %s in the code; the metric scan is broken (%v)", core, out)
		}
	}
	return out
}

var varRefRe = regexp.MustCompile(`\$\{(\w+)(?::(\w+))?\}|\[\[(\w+)(?::(\w+))?\]\]|\$(\w+)`)

// referencedVars lists the dashboard variables a query uses (not the $__ macros).
func referencedVars(sql string) []string {
	var out []string
	for _, m := range varRefRe.FindAllStringSubmatch(sql, -1) {
		name := m[1] + m[3] + m[5]
		if !strings.HasPrefix(name, "__") && !slices.Contains(out, name) {
			out = append(out, name)
		}
	}
	return out
}

// ---------------------------------------------------------------- the plugin's expansion

// selection is a variable's current value: All, or the chosen values.
type selection struct {
	all    bool
	values []string
}

// expansion is what the plugin knows when it runs a query: the time range, the interval, every
// variable's selection and options, and (for the test) the database that stands for analytics.
type expansion struct {
	from, to  time.Time
	intervalS int
	vars      map[string]gVariable
	selected  map[string]selection
	options   map[string][]string // what "All" stands for
	db        string
}

// expand turns a panel's rawSql into what ClickHouse receives, in the plugin's order:
// $__conditionalAll first (front end), then Grafana's template variables (with the plugin's default
// format for multi-values, 'a','b'), then the backend macros.
func expand(sql string, e expansion) (string, error) {
	var err error
	if sql, err = expandConditionalAll(sql, e); err != nil {
		return "", err
	}
	if sql, err = expandVariables(sql, e); err != nil {
		return "", err
	}
	if sql, err = expandMacros(sql, e); err != nil {
		return "", err
	}
	if e.db != "" {
		sql = regexp.MustCompile(`\banalytics\.`).ReplaceAllString(sql, e.db+".")
	}
	if strings.Contains(sql, "$") {
		return "", fmt.Errorf("unexpanded $ left in %s", sql)
	}
	return sql, nil
}

// macroArgs reads the parenthesised, comma-separated arguments starting at s[open] == '(' and
// returns them with the index of the closing parenthesis. Like the plugin, it tracks parentheses only.
func macroArgs(s string, open int) ([]string, int, error) {
	depth, last := 0, open+1
	var args []string
	for i := open; i < len(s); i++ {
		switch s[i] {
		case '(':
			depth++
		case ')':
			depth--
			if depth == 0 {
				return append(args, s[last:i]), i, nil
			}
		case ',':
			if depth == 1 {
				args = append(args, s[last:i])
				last = i + 1
			}
		}
	}
	return nil, 0, fmt.Errorf("unbalanced parentheses after %q", s[open:min(len(s), open+40)])
}

var conditionalVarRe = regexp.MustCompile(`\$\{?(\w+)\}?`)

func expandConditionalAll(sql string, e expansion) (string, error) {
	const macro = "$__conditionalAll("
	for i := strings.LastIndex(sql, macro); i >= 0; i = strings.LastIndex(sql, macro) {
		args, end, err := macroArgs(sql, i+len(macro)-1)
		if err != nil {
			return "", err
		}
		if len(args) != 2 {
			return "", fmt.Errorf("$__conditionalAll takes (condition, $variable), got %d arguments", len(args))
		}
		m := conditionalVarRe.FindStringSubmatch(strings.TrimSpace(args[1]))
		if m == nil {
			return "", fmt.Errorf("$__conditionalAll: %q names no variable", args[1])
		}
		phrase := args[0]
		if sel, ok := e.selected[m[1]]; ok && (sel.all || (len(sel.values) == 1 && sel.values[0] == "")) {
			phrase = "1=1"
		}
		sql = sql[:i] + phrase + sql[end+1:]
	}
	return sql, nil
}

func expandVariables(sql string, e expansion) (string, error) {
	var failed error
	out := varRefRe.ReplaceAllStringFunc(sql, func(ref string) string {
		m := varRefRe.FindStringSubmatch(ref)
		name, format := m[1]+m[3]+m[5], m[2]+m[4]
		v, ok := e.vars[name]
		if !ok || strings.HasPrefix(name, "__") {
			return ref // Grafana leaves unknown variables (and the plugin's macros) alone
		}
		sel := e.selected[name]
		values := sel.values
		if sel.all {
			if v.AllValue != "" {
				values = []string{v.AllValue}
			} else {
				values = e.options[name]
			}
		}
		quote := func(escape func(string) string) string {
			q := make([]string, len(values))
			for i, s := range values {
				q[i] = "'" + escape(s) + "'"
			}
			return strings.Join(q, ",")
		}
		switch format {
		case "singlequote":
			return quote(func(s string) string { return strings.ReplaceAll(s, "'", `\'`) })
		case "sqlstring":
			return quote(func(s string) string { return strings.ReplaceAll(s, "'", "''") })
		case "csv", "raw":
			return strings.Join(values, ",")
		case "":
			if v.Multi || sel.all {
				return quote(func(s string) string { return s }) // the plugin's own format for arrays
			}
			return strings.Join(values, ",")
		}
		failed = fmt.Errorf("variable format %q of $%s is not modelled here", format, name)
		return ref
	})
	return out, failed
}

func expandMacros(sql string, e expansion) (string, error) {
	var b strings.Builder
	for {
		loc := macroRe.FindStringSubmatchIndex(sql)
		if loc == nil {
			b.WriteString(sql)
			return b.String(), nil
		}
		name := sql[loc[2]:loc[3]]
		b.WriteString(sql[:loc[0]])
		rest := sql[loc[1]:]
		var args []string
		if strings.HasPrefix(rest, "(") {
			a, end, err := macroArgs(rest, 0)
			if err != nil {
				return "", err
			}
			args, rest = a, rest[end+1:]
		}
		dt := func(t time.Time) string { return fmt.Sprintf("toDateTime(%d)", t.Unix()) }
		d := func(t time.Time) string { return fmt.Sprintf("toDate('%s')", t.UTC().Format("2006-01-02")) }
		switch {
		case name == "timeFilter" && len(args) == 1:
			c := strings.TrimSpace(args[0])
			fmt.Fprintf(&b, "%s >= %s AND %s <= %s", c, dt(e.from), c, dt(e.to))
		case name == "dateFilter" && len(args) == 1:
			c := strings.TrimSpace(args[0])
			fmt.Fprintf(&b, "%s >= %s AND %s <= %s", c, d(e.from), c, d(e.to))
		case name == "fromTime" && args == nil:
			b.WriteString(dt(e.from))
		case name == "toTime" && args == nil:
			b.WriteString(dt(e.to))
		case name == "interval_s" && args == nil:
			b.WriteString(strconv.Itoa(max(e.intervalS, 1)))
		default:
			return "", fmt.Errorf("macro $__%s%v is not one the plugin expands for ClickHouse 18.16", name, args)
		}
		sql = rest
	}
}

func TestExpand(t *testing.T) {
	from, to := time.Unix(1_700_000_000, 0), time.Unix(1_700_086_400, 0)
	vars := map[string]gVariable{"tenant": {Name: "tenant", Multi: true, IncludeAll: true}, "user": {Name: "user", Type: "textbox"}}
	check := func(name, in string, sel map[string]selection, want string) {
		t.Helper()
		got, err := expand(in, expansion{from: from, to: to, intervalS: 300, vars: vars, selected: sel,
			options: map[string][]string{"tenant": {"a", "b", "c"}}, db: "t_x"})
		if err != nil {
			t.Errorf("%s: %v", name, err)
			return
		}
		if got != want {
			t.Errorf("%s:\n got %s\nwant %s", name, got, want)
		}
	}
	all := map[string]selection{"tenant": {all: true}, "user": {values: []string{""}}}
	some := map[string]selection{"tenant": {values: []string{"a", "o'b"}}, "user": {values: []string{"o'b"}}}
	check("time filter", "WHERE $__timeFilter(ts)", all, "WHERE ts >= toDateTime(1700000000) AND ts <= toDateTime(1700086400)")
	check("from and to", "toDate($__fromTime), $__toTime", all, "toDate(toDateTime(1700000000)), toDateTime(1700086400)")
	check("date filter", "$__dateFilter(date)", all, "date >= toDate('2023-11-14') AND date <= toDate('2023-11-15')")
	check("interval", "intDiv(toUInt32(ts), $__interval_s) * $__interval_s", all, "intDiv(toUInt32(ts), 300) * 300")
	check("conditional all, All", "$__conditionalAll(t IN (${tenant:singlequote}), $tenant)", all, "1=1")
	check("conditional all, some", "$__conditionalAll(t IN (${tenant:singlequote}), $tenant)", some, `t IN ('a','o\'b')`)
	check("conditional all, nested parentheses", "$__conditionalAll(x IN (SELECT f(arrayJoin([${tenant:singlequote}]))), ${tenant})", some,
		`x IN (SELECT f(arrayJoin(['a','o\'b'])))`)
	check("two conditionals", "$__conditionalAll(a = 1, $tenant) AND $__conditionalAll(u = ${user:sqlstring}, $user)", some, "a = 1 AND u = 'o''b'")
	check("empty textbox", "$__conditionalAll(u = ${user:sqlstring}, $user)", all, "1=1")
	check("plain multi-value", "IN ($tenant)", some, "IN ('a','o'b')")
	check("All without allValue", "IN (${tenant:singlequote})", all, "IN ('a','b','c')")
	check("database", "FROM analytics.events JOIN analytics.daily_usage", all, "FROM t_x.events JOIN t_x.daily_usage")
	if _, err := expand("$__timeInterval(ts)", expansion{}); err == nil {
		t.Error("$__timeInterval: got no error, want one (it does not work on 18.16)")
	}
}

// ---------------------------------------------------------------- running the queries

// grafanaSeed puts events of two tenants into the test database: all within the last 20 days,
// some today, and explicit usage increments that must not count as events.
type grafanaSeed struct {
	a, b       uuid.UUID
	events     int // all events, both tenants
	aBuilderOB int // tenant a, builder.generate.completed from builder by user o'brien
	aAPIToday  int // tenant a, apikey.request on today's UTC date (+ increments below feed api_requests_daily)
	aIncrToday int64
}

func seedGrafana(t *testing.T, env testenv.Env) grafanaSeed {
	t.Helper()
	ctx := context.Background()
	s := grafanaSeed{a: uuid.New(), b: uuid.New()}
	now := time.Now().UTC().Truncate(time.Second)
	b, err := env.CH.PrepareBatch(ctx, "INSERT INTO "+env.DB+".events (tenant_id, ts, id, received_at, event, source, user_id, props, ip, request_id)")
	if err != nil {
		t.Fatal(err)
	}
	today := now.Truncate(24 * time.Hour)
	add := func(tn uuid.UUID, ts time.Time, event, source, user string) {
		if err := b.Append(tn, ts, uuid.New(), ts, event, source, user, `{"k":1}`, "198.51.100.1", "req"); err != nil {
			t.Fatal(err)
		}
		s.events++
		// Whatever lands on today's UTC date counts toward today's quota, whichever loop added it:
		// the 8-hourly mix below puts one apikey.request on today after 16:00 UTC.
		if tn == s.a && event == "apikey.request" && !ts.Before(today) {
			s.aAPIToday++
		}
	}
	mix := [][2]string{{"auth.user.login", "app"}, {"auth.user.registered", "app"}, {"apikey.request", "api"},
		{"builder.generate.completed", "builder"}, {"email.sent", "job"}, {"webhook.delivered", "webhook"}}
	for i := 0; i < 60; i++ {
		m := mix[i%len(mix)]
		tn := s.a
		if i%3 == 0 {
			tn = s.b
		}
		add(tn, now.Add(-time.Duration(i)*8*time.Hour), m[0], m[1], fmt.Sprintf("user-%d", i%5))
	}
	for i := 0; i < 2; i++ {
		add(s.a, now.Add(-time.Duration(i+1)*time.Hour), "builder.generate.completed", "builder", "o'brien")
		s.aBuilderOB++
	}
	for i := 0; i < 3; i++ {
		add(s.a, now, "apikey.request", "api", "user-1")
	}
	if err := b.Send(); err != nil {
		t.Fatal(err)
	}
	inc, err := env.CH.PrepareBatch(ctx, "INSERT INTO "+env.DB+".usage_increments (tenant_id, ts, id, metric, n)")
	if err != nil {
		t.Fatal(err)
	}
	if err := inc.Append(s.a, now, uuid.New(), "api_requests_daily", int64(5)); err != nil {
		t.Fatal(err)
	}
	s.aIncrToday = 5
	if err := inc.Send(); err != nil {
		t.Fatal(err)
	}
	return s
}

type result struct {
	columns []string
	types   []string
	rows    [][]string
}

func (r result) col(name string) int { return slices.Index(r.columns, name) }

// runSQL runs q read-only (as the analytics_ro profile does) with the settings the plugin sends,
// and returns every cell as text.
func runSQL(ctx context.Context, conn driver.Conn, q string, plugin map[string]int) (result, error) {
	settings := clickhouse.Settings{"readonly": 1}
	for k, v := range plugin {
		settings[k] = v
	}
	ctx = clickhouse.Context(ctx, clickhouse.WithSettings(settings))
	rows, err := conn.Query(ctx, q)
	if err != nil {
		return result{}, err
	}
	defer rows.Close()
	var r result
	cts := rows.ColumnTypes()
	for _, ct := range cts {
		r.columns = append(r.columns, ct.Name())
		r.types = append(r.types, ct.DatabaseTypeName())
	}
	for rows.Next() {
		dest := make([]any, len(cts))
		for i, ct := range cts {
			dest[i] = reflect.New(ct.ScanType()).Interface()
		}
		if err := rows.Scan(dest...); err != nil {
			return r, err
		}
		row := make([]string, len(dest))
		for i, d := range dest {
			row[i] = fmt.Sprint(reflect.ValueOf(d).Elem().Interface())
		}
		r.rows = append(r.rows, row)
	}
	return r, rows.Err()
}

func isTimeType(t string) bool { return strings.HasPrefix(t, "DateTime") || t == "Date" }

func isNumberType(t string) bool {
	t = strings.TrimPrefix(strings.TrimSuffix(strings.TrimPrefix(t, "Nullable("), ")"), "")
	return strings.HasPrefix(t, "UInt") || strings.HasPrefix(t, "Int") || strings.HasPrefix(t, "Float") || strings.HasPrefix(t, "Decimal")
}

// Every ClickHouse query of every dashboard, expanded as the plugin does for several variable
// selections, runs on the test server with seeded data and returns the columns its panel needs.
func TestGrafanaQueriesOnClickHouse(t *testing.T) {
	plugin := pluginQuerySettings(t)
	env := testenv.Migrated(t)
	seed := seedGrafana(t, env)
	ctx := context.Background()
	now := time.Now().UTC().Add(time.Minute)
	base := expansion{from: now.AddDate(0, 0, -30), to: now, intervalS: 3600, db: env.DB}

	scenarios := []struct {
		name     string
		selected map[string]selection
		wantRows bool // every panel has data
	}{
		{"all", map[string]selection{"tenant": {all: true}, "event": {all: true}, "source": {all: true}, "user": {values: []string{""}}}, true},
		{"several", map[string]selection{
			"tenant": {values: []string{seed.a.String(), seed.b.String()}}, "event": {values: []string{"auth.user.login", "apikey.request"}},
			"source": {values: []string{"app", "api"}}, "user": {values: []string{"user-1"}},
		}, false},
		{"one, quoted user", map[string]selection{
			"tenant": {values: []string{seed.a.String()}}, "event": {values: []string{"builder.generate.completed"}},
			"source": {values: []string{"builder"}}, "user": {values: []string{"o'brien"}},
		}, true},
	}

	for _, d := range loadDashboards(t) {
		vars := map[string]gVariable{}
		options := map[string][]string{}
		for _, v := range d.Templating.List {
			vars[v.Name] = v
		}
		// Variable queries first: their values are what "All" stands for.
		for _, v := range d.Templating.List {
			switch {
			case v.Type == "custom":
				var q string
				_ = json.Unmarshal(v.Query, &q)
				options[v.Name] = strings.Split(q, ",")
			case v.Type == "query" && v.Datasource != nil && v.Datasource.Type == "grafana-clickhouse-datasource":
				e := base
				e.vars, e.selected = vars, scenarios[0].selected
				q, err := expand(v.sql(), e)
				if err != nil {
					t.Errorf("%s: variable %s: %v", d.file, v.Name, err)
					continue
				}
				r, err := runSQL(ctx, env.CH, q, plugin)
				if err != nil {
					t.Errorf("%s: variable %s: %v\n%s", d.file, v.Name, err, q)
					continue
				}
				if len(r.columns) != 1 || len(r.rows) == 0 {
					t.Errorf("%s: variable %s: got columns %v and %d rows, want one column with values", d.file, v.Name, r.columns, len(r.rows))
				}
				for _, row := range r.rows {
					options[v.Name] = append(options[v.Name], row[0])
				}
			}
		}
		if got := options["tenant"]; vars["tenant"].Name != "" && !(slices.Contains(got, seed.a.String()) && slices.Contains(got, seed.b.String())) {
			t.Errorf("%s: tenant variable offers %v, want both seeded tenants", d.file, got)
		}

		for _, sc := range scenarios {
			e := base
			e.vars, e.selected, e.options = vars, sc.selected, options
			for _, p := range d.allPanels() {
				for _, tg := range p.Targets {
					if tg.RawSQL == "" {
						continue
					}
					where := fmt.Sprintf("%s / %q / %s [%s]", d.file, p.Title, tg.RefID, sc.name)
					q, err := expand(tg.RawSQL, e)
					if err != nil {
						t.Errorf("%s: %v", where, err)
						continue
					}
					r, err := runSQL(ctx, env.CH, q, plugin)
					if err != nil {
						t.Errorf("%s: %v\n%s", where, err, q)
						continue
					}
					if tg.Format != nil && *tg.Format == 0 {
						if len(r.columns) < 2 || r.columns[0] != "time" || !isTimeType(r.types[0]) || !slices.ContainsFunc(r.types[1:], isNumberType) {
							t.Errorf("%s: time series need a first column time (DateTime) and a number; got %v %v", where, r.columns, r.types)
						}
						sorted := sort.SliceIsSorted(r.rows, func(i, j int) bool { return r.rows[i][0] < r.rows[j][0] })
						if !sorted {
							t.Errorf("%s: time series rows are not ordered by time", where)
						}
					}
					if p.Type == "stat" && (len(r.columns) != 1 || !isNumberType(r.types[0]) && !isTimeType(r.types[0])) {
						t.Errorf("%s: a stat needs one number or time column, got %v %v", where, r.columns, r.types)
					}
					if sc.wantRows && len(r.rows) == 0 {
						t.Errorf("%s: no rows from seeded data\n%s", where, q)
					}
					checkKnownValues(t, where, d.UID, p.Title, sc.name, r, seed)
				}
			}
		}
	}
}

// checkKnownValues compares a few panels with what was seeded, so a filter that expands to valid
// but wrong SQL (a time range off by a day, a tenant filter that matches nothing) is caught too.
func checkKnownValues(t *testing.T, where, uid, title, scenario string, r result, seed grafanaSeed) {
	t.Helper()
	cell := func(row int, col string) string {
		if i := r.col(col); i >= 0 && row < len(r.rows) {
			return r.rows[row][i]
		}
		return "<missing>"
	}
	switch {
	case uid == "analyticsd-usage" && title == "Events" && scenario == "all":
		if got := cell(0, "events"); got != strconv.Itoa(seed.events) {
			t.Errorf("%s: got %s events, want %d (increments must not count)", where, got, seed.events)
		}
	case uid == "analyticsd-events" && title == "Matching events" && scenario == "one, quoted user":
		if got := cell(0, "events"); got != strconv.Itoa(seed.aBuilderOB) {
			t.Errorf("%s: got %s, want %d", where, got, seed.aBuilderOB)
		}
	case uid == "analyticsd-usage" && title == "Quota usage today" && scenario == "all":
		found := false
		for i := range r.rows {
			if cell(i, "tenant") == seed.a.String() && cell(i, "quota") == "api_requests_daily" {
				found = true
				want := fmt.Sprint(int64(seed.aAPIToday) + seed.aIncrToday)
				if got := cell(i, "used"); got != want || cell(i, "default_limit") != "100000" {
					t.Errorf("%s: api_requests_daily used %s of %s, want %s of 100000", where, got, cell(i, "default_limit"), want)
				}
			}
		}
		if !found {
			t.Errorf("%s: no api_requests_daily row for tenant %s: %v", where, seed.a, r.rows)
		}
	}
}
