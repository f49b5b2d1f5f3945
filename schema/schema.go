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
	// RetentionDays is how long raw events and increments are kept.
	RetentionDays int
	Features
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
