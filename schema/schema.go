// Package schema owns every DDL statement of analyticsd — ClickHouse tables and materialized views,
// Postgres tables — the migration runner that applies them, and the ClickHouse version gate
// (Features) that picks newer server features. It does not read or write application data.
package schema

import (
	"bytes"
	"embed"
	"fmt"
	"io/fs"
	"path"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"text/template"
)

//go:embed clickhouse/*.sql postgres/*.sql
var files embed.FS

// Migration is one numbered DDL file, rendered and split into statements.
type Migration struct {
	Version    int
	Name       string
	Statements []string
}

// Params are the inputs of the ClickHouse DDL templates.
type Params struct {
	// DB is the ClickHouse database every object lives in (default "analytics").
	DB string
	// Cluster, when set, renders the cluster layout (see Layout): replicated local tables, Distributed
	// tables over them, and every statement ON CLUSTER.
	Cluster string
	// RetentionDays is how long raw events and increments are kept.
	RetentionDays int
	Features
}

func (p Params) layout() Layout { return Layout{DB: p.DB, Cluster: p.Cluster} }

// Local names the table that stores rows (see Layout.Local).
func (p Params) Local(name string) string { return p.layout().Local(name) }

// OnCluster is " ON CLUSTER c" on a cluster, "" on one server.
func (p Params) OnCluster() string { return p.layout().OnCluster() }

// Engine renders a storage engine: engine(args...) on one server; on a cluster its Replicated form,
// whose ZooKeeper path holds the cluster, shard, database and table (so clusters and databases
// sharing one ZooKeeper never collide) and whose replica name is the server's {replica} macro.
func (p Params) Engine(table, engine string, args ...string) string {
	if p.Cluster != "" {
		path := fmt.Sprintf("'/clickhouse/tables/%s/{shard}/%s/%s_local'", p.Cluster, p.DB, table)
		args = append([]string{path, "'{replica}'"}, args...)
		engine = "Replicated" + engine
	}
	if len(args) == 0 {
		return engine
	}
	return engine + "(" + strings.Join(args, ", ") + ")"
}

// Distributed renders, on a cluster, the statement that puts a Distributed table under the plain name
// over name_local, sharded by tenant: a tenant's rows stay on one shard, so a tenant's reads and
// aggregates never mix shards. cityHash64 of a UUID fails on 18.16, hence toString. On one server it
// renders nothing.
func (p Params) Distributed(name string) string {
	if p.Cluster == "" {
		return ""
	}
	return fmt.Sprintf("CREATE TABLE IF NOT EXISTS %s.%s%s AS %s\nENGINE = Distributed(%s, %s, %s_local, cityHash64(toString(tenant_id)));",
		p.DB, name, p.OnCluster(), p.Local(name), p.Cluster, p.DB, name)
}

// LowCardinalityString is the column type for low-cardinality strings (event, source, metric names).
func (p Params) LowCardinalityString() string {
	if p.LowCardinality {
		return "LowCardinality(String)"
	}
	return "String"
}

// Codec renders " CODEC(c)" where the server supports codecs, nothing otherwise.
func (p Params) Codec(c string) string {
	if p.Codecs {
		return " CODEC(" + c + ")"
	}
	return ""
}

var identRe = regexp.MustCompile(`^[A-Za-z_][A-Za-z0-9_]{0,62}$`)

// ValidIdent reports whether s can be used as a bare ClickHouse database or Postgres schema name.
func ValidIdent(s string) bool { return identRe.MatchString(s) }

// ClickHouse renders the ClickHouse migrations for p, in version order.
func ClickHouse(p Params) ([]Migration, error) {
	if !ValidIdent(p.DB) {
		return nil, fmt.Errorf("render clickhouse schema: database name %q is not a plain identifier", p.DB)
	}
	if err := p.layout().Check(); err != nil {
		return nil, fmt.Errorf("render clickhouse schema: %w", err)
	}
	if p.RetentionDays < 1 {
		return nil, fmt.Errorf("render clickhouse schema: retention must be at least 1 day, got %d", p.RetentionDays)
	}
	return load("clickhouse", func(name, text string) (string, error) {
		t, err := template.New(name).Option("missingkey=error").Parse(text)
		if err != nil {
			return "", err
		}
		var b bytes.Buffer
		if err := t.Execute(&b, p); err != nil {
			return "", err
		}
		return b.String(), nil
	})
}

// Postgres returns the Postgres migrations, in version order. They use unqualified names, so they land
// in the connection's search_path (tests give each run its own schema).
func Postgres() ([]Migration, error) {
	return load("postgres", func(_, text string) (string, error) { return text, nil })
}

func load(dir string, render func(name, text string) (string, error)) ([]Migration, error) {
	names, err := fs.Glob(files, dir+"/*.sql")
	if err != nil {
		return nil, err
	}
	sort.Strings(names)
	var out []Migration
	seen := map[int]string{}
	for _, name := range names {
		base := path.Base(name)
		num, label, ok := strings.Cut(strings.TrimSuffix(base, ".sql"), "_")
		v, err := strconv.Atoi(num)
		if !ok || err != nil || v <= 0 {
			return nil, fmt.Errorf("migration file %s: name must be NNNN_label.sql", name)
		}
		if prev, dup := seen[v]; dup {
			return nil, fmt.Errorf("migration files %s and %s share version %d", prev, name, v)
		}
		seen[v] = name
		raw, err := files.ReadFile(name)
		if err != nil {
			return nil, err
		}
		text, err := render(name, string(raw))
		if err != nil {
			return nil, fmt.Errorf("render %s: %w", name, err)
		}
		out = append(out, Migration{Version: v, Name: label, Statements: SplitStatements(text)})
	}
	return out, nil
}

// SplitStatements splits a DDL file on semicolons that end a line, dropping comment-only lines.
// The DDL files never put a semicolon inside a string literal at a line end, which keeps this simple.
func SplitStatements(text string) []string {
	var out []string
	var cur strings.Builder
	flush := func() {
		if s := strings.TrimSpace(cur.String()); s != "" {
			out = append(out, s)
		}
		cur.Reset()
	}
	for _, line := range strings.Split(text, "\n") {
		trimmed := strings.TrimSpace(line)
		if strings.HasPrefix(trimmed, "--") || (trimmed == "" && cur.Len() == 0) {
			continue
		}
		if strings.HasSuffix(trimmed, ";") {
			cur.WriteString(strings.TrimRight(strings.TrimRight(line, " \t"), ";"))
			flush()
			continue
		}
		cur.WriteString(line)
		cur.WriteByte('\n')
	}
	flush()
	return out
}
