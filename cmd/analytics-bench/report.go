package main

import (
	"encoding/json"
	"fmt"
	"io"
	"math"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"time"
)

// Result is everything one run measured; it is written as JSON and printed as tables.
type Result struct {
	Meta      Meta        `json:"meta"`
	Scenarios []*Scenario `json:"scenarios"`
	Targets   []Target    `json:"targets"`
	// Complete is true when every scenario ran without error.
	Complete bool `json:"complete"`
}

// Meta says what ran where.
type Meta struct {
	Started       time.Time         `json:"started"`
	Seconds       float64           `json:"seconds"`
	Command       string            `json:"command"`
	Host          string            `json:"host"`
	CPUs          int               `json:"cpus"`
	CPUModel      string            `json:"cpu_model"`
	MemGiB        float64           `json:"mem_gib"`
	GoVersion     string            `json:"go_version"`
	ClickHouse    string            `json:"clickhouse_version"`
	Postgres      string            `json:"postgres_version"`
	Redis         string            `json:"redis_version"`
	GitRevision   string            `json:"git_revision"`
	Seed          uint64            `json:"seed"`
	Events        int               `json:"events"`
	RESTEvents    int               `json:"rest_events"`
	Quick         bool              `json:"quick"`
	Tenants       int               `json:"tenants"`
	Database      string            `json:"database"`
	ServerEnv     map[string]string `json:"server_env"`
	TenantShares  []float64         `json:"tenant_shares_top5"`
	HeavyTenantEv int               `json:"heavy_tenant_events"`
	LoadAvgStart  string            `json:"loadavg_start"`
	LoadAvgEnd    string            `json:"loadavg_end"`
}

// Scenario holds one scenario's raw figures (absolute numbers and ratios) and latency summaries.
type Scenario struct {
	Name    string             `json:"name"`
	Figures map[string]float64 `json:"figures"`
	Latency map[string]Summary `json:"latency,omitempty"`
	Notes   []string           `json:"notes,omitempty"`
	Seconds float64            `json:"seconds"`
	// LoadAvg is the machine's 1-minute load average when the scenario ended: on a shared machine,
	// a figure taken while others' work ran is worth less.
	LoadAvg float64 `json:"loadavg_1m"`
	Error   string  `json:"error,omitempty"`
}

func (s *Scenario) set(k string, v float64) { s.Figures[k] = v }

func (s *Scenario) lat(k string, sum Summary) { s.Latency[k] = sum }

func (s *Scenario) note(format string, args ...any) {
	s.Notes = append(s.Notes, fmt.Sprintf(format, args...))
}

// fig returns a figure of the named scenario: a plain figure, or "latency_key.p99_ms" style.
func (r *Result) fig(scenario, key string) (float64, bool) {
	for _, s := range r.Scenarios {
		if s.Name != scenario {
			continue
		}
		if v, ok := s.Figures[key]; ok {
			return v, true
		}
		if lk, field, ok := strings.Cut(key, "."); ok {
			if l, ok := s.Latency[lk]; ok && l.N > 0 {
				switch field {
				case "p50_ms":
					return l.P50, true
				case "p99_ms":
					return l.P99, true
				}
			}
		}
	}
	return 0, false
}

// Target is one goal of issue 8 next to what was measured.
type Target struct {
	Scenario string   `json:"scenario"`
	Figure   string   `json:"figure"`
	Goal     string   `json:"target"`
	Measured *float64 `json:"measured"`
	Unit     string   `json:"unit"`
	Pass     *bool    `json:"pass"`
}

type goal struct {
	scenario, label, key, unit string
	min                        bool // true: measured ≥ want passes; false: measured ≤ want passes
	want                       float64
}

// goals are issue 8's targets, each read off a scenario's figures.
var goals = []goal{
	{"rest_ingest", "events/s vs (a) raw clickhouse-client", "ratio_vs_a", "×", true, 0.5},
	{"rest_ingest", "events/s vs (b) Postgres COPY", "ratio_vs_b_copy", "×", true, 3},
	{"ack_latency", "ack p99 at half the max rate", "ack.p99_ms", "ms", false, 50},
	{"freshness", "ack → queryable p99", "visible.p99_ms", "ms", false, 2000},
	{"events_page", "page 1 p99", "api_page1.p99_ms", "ms", false, 50},
	{"events_page", "page 50 p99", "api_page50.p99_ms", "ms", false, 50},
	{"events_page", "page 50 / page 1 (p50)", "page50_over_page1", "×", false, 1.5},
	{"events_page", "API / (c) direct, page 1 (p50)", "api_over_c_page1", "×", false, 1.5},
	{"events_page", "API / (c) direct, page 50 (p50)", "api_over_c_page50", "×", false, 1.5},
	{"kpis", "/metrics p99", "api.p99_ms", "ms", false, 100},
	{"kpis", "(b) Postgres / API (p50)", "b_over_api", "×", true, 10},
	{"usage_90d", "90-day usage p99", "api.p99_ms", "ms", false, 100},
	{"usage_90d", "(b) Postgres / API (p50)", "b_over_api", "×", true, 10},
	{"export_csv", "rows/s vs clickhouse-client FORMAT CSV", "ratio_vs_client", "×", true, 0.8},
	{"export_csv", "analyticsd RSS growth", "rss_growth_mib", "MiB", false, 64},
	{"quota_consume", "ops/s vs (d) go-redis INCR", "ratio_vs_d", "×", true, 0.3},
	{"quota_consume", "consume p99 at half the max rate", "open.p99_ms", "ms", false, 5},
	{"quota_consume", "analyticsd CPU per consume", "analyticsd_cpu_us_per_consume", "µs", false, 80},
	{"storage", "bytes/event, (b) Postgres / ClickHouse", "b_over_ch", "×", true, 8},
}

func (r *Result) evaluate() {
	r.Targets = r.Targets[:0]
	for _, g := range goals {
		t := Target{Scenario: g.scenario, Figure: g.label, Unit: g.unit}
		if g.min {
			t.Goal = fmt.Sprintf("≥ %s", num(g.want))
		} else {
			t.Goal = fmt.Sprintf("≤ %s", num(g.want))
		}
		if g.unit != "×" {
			t.Goal += " " + g.unit
		}
		if v, ok := r.fig(g.scenario, g.key); ok && !math.IsNaN(v) && !math.IsInf(v, 0) && v != 0 {
			t.Measured = &v
			pass := v <= g.want
			if g.min {
				pass = v >= g.want
			}
			t.Pass = &pass
		}
		r.Targets = append(r.Targets, t)
	}
}

func num(v float64) string {
	switch {
	case v == 0:
		return "0"
	case math.Abs(v) >= 100:
		return fmt.Sprintf("%.0f", v)
	case math.Abs(v) >= 10:
		return fmt.Sprintf("%.1f", v)
	case math.Abs(v) >= 1:
		return fmt.Sprintf("%.2f", v)
	default:
		return fmt.Sprintf("%.3g", v)
	}
}

// printTargets writes the headline table (markdown, readable in a terminal too).
func (r *Result) printTargets(w io.Writer) {
	fmt.Fprintln(w, "| scenario | figure | measured | target | |")
	fmt.Fprintln(w, "|---|---|---|---|---|")
	for _, t := range r.Targets {
		m, verdict := "—", "not measured"
		if t.Measured != nil {
			m = num(*t.Measured)
			if t.Unit != "×" {
				m += " " + t.Unit
			} else {
				m += "×"
			}
			verdict = "miss"
			if *t.Pass {
				verdict = "pass"
			}
		}
		fmt.Fprintf(w, "| %s | %s | %s | %s | %s |\n", t.Scenario, t.Figure, m, t.Goal, verdict)
	}
}

// printFigures writes every scenario's absolute figures and latency summaries.
func (r *Result) printFigures(w io.Writer) {
	for _, s := range r.Scenarios {
		status := fmt.Sprintf("%.1fs, load %.1f", s.Seconds, s.LoadAvg)
		if s.Error != "" {
			status += ", ERROR: " + s.Error
		}
		fmt.Fprintf(w, "\n%s (%s)\n", s.Name, status)
		keys := make([]string, 0, len(s.Figures))
		for k := range s.Figures {
			keys = append(keys, k)
		}
		sort.Strings(keys)
		for _, k := range keys {
			fmt.Fprintf(w, "  %-34s %s\n", k, num(s.Figures[k]))
		}
		lk := make([]string, 0, len(s.Latency))
		for k := range s.Latency {
			lk = append(lk, k)
		}
		sort.Strings(lk)
		for _, k := range lk {
			l := s.Latency[k]
			fmt.Fprintf(w, "  %-34s n=%d p50=%sms p90=%sms p99=%sms max=%sms\n", k+" latency", l.N, num(l.P50), num(l.P90), num(l.P99), num(l.Max))
		}
		for _, n := range s.Notes {
			fmt.Fprintf(w, "  note: %s\n", n)
		}
	}
}

func (r *Result) write(path string) error {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return err
	}
	b, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return err
	}
	return os.WriteFile(path, append(b, '\n'), 0o644)
}
