package main

import (
	"context"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"
)

// TestQuickRun runs the harness end to end in --quick mode against the local stack, so it cannot rot:
// every scenario must run and every target must get a measured figure. It asserts nothing about
// speed. Without the stack's env it is skipped, unless ANALYTICS_REQUIRE_SERVICES=1.
func TestQuickRun(t *testing.T) {
	if testing.Short() {
		t.Skip("-short: the quick run takes about 30 s")
	}
	for _, k := range stackVars {
		if os.Getenv(k) == "" {
			if os.Getenv("ANALYTICS_REQUIRE_SERVICES") == "1" {
				t.Fatalf("%s is not set (ANALYTICS_REQUIRE_SERVICES=1)", k)
			}
			t.Skipf("%s is not set; skipping the quick benchmark run", k)
		}
	}
	dir := t.TempDir()
	bin := filepath.Join(dir, "analytics-bench")
	// Built without -race even under `go test -race`: the harness's own speed is not under test here,
	// but a race-instrumented load generator would slow every scenario several times over.
	if out, err := exec.Command("go", "build", "-o", bin, ".").CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	out := filepath.Join(dir, "quick.json")
	cmd := exec.CommandContext(ctx, bin, "--quick", "--out", out)
	cmd.Env = os.Environ()
	logs, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("analytics-bench --quick: %v\n%s", err, logs)
	}
	b, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	var res Result
	if err := json.Unmarshal(b, &res); err != nil {
		t.Fatalf("result file: %v", err)
	}
	if !res.Complete {
		t.Errorf("run not complete:\n%s", logs)
	}
	ran := map[string]bool{}
	for _, s := range res.Scenarios {
		ran[s.Name] = true
		if s.Error != "" {
			t.Errorf("scenario %s: %s", s.Name, s.Error)
		}
	}
	for _, name := range []string{"rest_ingest", "ack_latency", "freshness", "quota_consume", "bulk_load", "events_page", "kpis", "usage_90d", "export_csv", "storage"} {
		if !ran[name] {
			t.Errorf("scenario %s did not run", name)
		}
	}
	for _, tg := range res.Targets {
		if tg.Measured == nil {
			t.Errorf("target %s / %s has no measured figure", tg.Scenario, tg.Figure)
		}
	}
	t.Logf("quick run: %.0fs", res.Meta.Seconds)
}
