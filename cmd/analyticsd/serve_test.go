package main

import (
	"context"
	"encoding/json"
	"errors"
	"net"
	"slices"
	"strings"
	"testing"

	"github.com/analyticsd/analyticsd/internal/testenv"
)

func TestServeUnwindsLastOpenedFirstOnce(t *testing.T) {
	var u unwind
	var ran []string
	for _, name := range []string{"redis", "postgres", "clickhouse"} {
		u.push(name, func(context.Context) error { ran = append(ran, name); return nil })
	}
	failing := errors.New("close failed")
	u.push("http", func(context.Context) error { ran = append(ran, "http"); return failing })
	var steps []string
	var errs []error
	do := func(name string, fn func() error) {
		steps = append(steps, name)
		errs = append(errs, fn())
	}
	u.run(context.Background(), do)
	u.run(context.Background(), do)
	want := []string{"http", "clickhouse", "postgres", "redis"}
	if !slices.Equal(ran, want) || !slices.Equal(steps, want) {
		t.Errorf("ran %v as steps %v, want %v once each", ran, steps, want)
	}
	if len(errs) != 4 || !errors.Is(errs[0], failing) {
		t.Errorf("step errors %v, want the http step's error handed to do", errs)
	}
}

// The shutdown's order is load-bearing: requests stop first, the alerts they found are recorded
// before the ingest flush (their events go to the spool), the flush comes before the live
// counter feed it gives counts back to (and before exports still streaming are waited for, so a slow
// export client cannot spend the flush's budget), and the stores close last. Each step runs once, and none fails.
func TestServeShutsDownInOrder(t *testing.T) {
	e := testenv.Migrated(t)
	getenv := stackEnv(t, e, map[string]string{"ANALYTICS_ADDR": freeAddr(t), "ANALYTICS_SPOOL_DIR": t.TempDir(), "LOG_LEVEL": "info"})
	logs := &syncBuffer{}
	t.Run("serve until stopped", func(t *testing.T) { serveLogging(t, getenv, logs) })
	var steps []string
	for _, line := range strings.Split(logs.String(), "\n") {
		var rec struct{ Msg, Step string }
		if json.Unmarshal([]byte(line), &rec) == nil && strings.HasPrefix(rec.Msg, "shutdown step") {
			steps = append(steps, rec.Msg+": "+rec.Step)
		}
	}
	var want []string
	for _, step := range []string{"http", "operator listener", "clock and redis watch", "api keys' last use", "rollup and retention jobs",
		"erasure jobs", "quota reconciliation", "quota alerts", "ingest flush", "erasure presence", "live counters", "quota alerts recorded", "alert webhooks", "idempotency liveness", "exports", "clickhouse", "postgres", "redis"} {
		want = append(want, "shutdown step done: "+step)
	}
	if !slices.Equal(steps, want) {
		t.Errorf("shutdown steps:\n%s\nwant\n%s", strings.Join(steps, "\n"), strings.Join(want, "\n"))
	}
}

// A start-up error closes what serve had opened. Here the API's port is taken, which serve finds
// after it took the spool: a server started next on the same spool must not be refused as if the
// failed one still held it.
func TestServeStartupErrorClosesWhatItOpened(t *testing.T) {
	e := testenv.Migrated(t)
	taken, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer taken.Close()
	dir := t.TempDir()
	r := runCmd(t, stackEnv(t, e, map[string]string{"ANALYTICS_ADDR": taken.Addr().String(), "ANALYTICS_SPOOL_DIR": dir}), "serve")
	if r.code != exitFailure || !strings.Contains(r.stderr, "listen on "+taken.Addr().String()) {
		t.Fatalf("serve on a taken port: exit %d, stderr %s; want %d naming the address", r.code, r.stderr, exitFailure)
	}
	logs := &syncBuffer{}
	getenv := stackEnv(t, e, map[string]string{"ANALYTICS_ADDR": freeAddr(t), "ANALYTICS_SPOOL_DIR": dir})
	if !t.Run("serve on the same spool", func(t *testing.T) { serveLogging(t, getenv, logs) }) {
		t.Errorf("serve on the spool of the failed start did not start; it logged:\n%s", logs.String())
	}
}
