package main

import (
	"context"
	bin "encoding/binary"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/analyticsd/analyticsd/auth"
	"github.com/analyticsd/analyticsd/ingest"
	"github.com/analyticsd/analyticsd/ingest/spool"
	"github.com/analyticsd/analyticsd/internal/testenv"
	"github.com/analyticsd/analyticsd/internal/testenv/fixture"
)

var serveVars = []string{"CLICKHOUSE_DSN", "POSTGRES_URL", "REDIS_URL", "LOG_LEVEL", "ANALYTICS_ADDR", "ANALYTICS_SPOOL_DIR",
	"INGEST_FLUSH_INTERVAL", "RATE_LIMIT_RPS", "ANALYTICS_METRICS_ADDR"}

func writeKey(t *testing.T, e testenv.Env, slug string) (uuid.UUID, string) {
	t.Helper()
	tn := fixture.Tenant(t, e.PG, slug)
	key, _ := fixture.Key(t, e.PG, tn.ID, "w", auth.ScopeEventsWrite)
	return tn.ID, key
}

func postEvents(t *testing.T, base, key, body string) (int, string) {
	t.Helper()
	r := fixture.At(t, base).Do(t, fixture.Request{Method: http.MethodPost, Path: "/api/analytics/events", Key: key, Body: []byte(body)})
	return r.Status, r.Raw
}

func countEvents(t *testing.T, e testenv.Env, tenantID uuid.UUID) uint64 {
	t.Helper()
	var n uint64
	if err := e.CH.QueryRow(context.Background(), "SELECT count() FROM "+e.DB+".events WHERE tenant_id = ?", tenantID).Scan(&n); err != nil {
		t.Fatal(err)
	}
	return n
}

// Finding 2: two servers on one spool directory took over each other's segments. The second now
// refuses to start, naming the directory and the process holding it.
func TestSecondServeOnOneSpoolIsRefused(t *testing.T) {
	e := testenv.Migrated(t)
	dir := t.TempDir()
	getenv := stackEnv(t, e, map[string]string{"ANALYTICS_ADDR": freeAddr(t), "ANALYTICS_SPOOL_DIR": dir})
	first := startServer(t, getenv, serveVars)

	second := stackEnv(t, e, map[string]string{"ANALYTICS_ADDR": freeAddr(t), "ANALYTICS_SPOOL_DIR": dir})
	cmd := exec.Command(binary(t), "serve")
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	for _, n := range serveVars {
		cmd.Env = append(cmd.Env, n+"="+second(n))
	}
	done := make(chan struct{})
	var out []byte
	var err error
	go func() { out, err = cmd.CombinedOutput(); close(done) }()
	select {
	case <-done:
	case <-time.After(20 * time.Second):
		cmd.Process.Kill()
		t.Fatal("a second serve on the same spool is still running after 20 s")
	}
	msg := string(out)
	if err == nil || !strings.Contains(msg, dir) || !strings.Contains(msg, fmt.Sprintf("pid %d", first.cmd.Process.Pid)) {
		t.Fatalf("second serve: %v\n%s\nwant a refusal naming %s and pid %d", err, msg, dir, first.cmd.Process.Pid)
	}
	// The first one is unharmed.
	if resp, err := http.Get(first.base + "/healthz"); err != nil || resp.StatusCode != 200 {
		t.Errorf("first server after the refusal: %v", err)
	}
}

// An operator sees what waits in a spool, and ships a retired instance's spool with drain: here the
// instance died (kill -9) while ClickHouse was unreachable to it.
func TestSpoolStatusAndDrain(t *testing.T) {
	e := testenv.Migrated(t)
	tn, key := writeKey(t, e, "retired")
	dir := t.TempDir()
	dead, p := unshippedSpool(t, e, key, dir)
	// ClickHouse was unreachable at start-up: /readiness says nothing is written until it is checked.
	if code, w := fixture.Readiness(t, p.ops); code != 200 && code != 503 || !strings.Contains(strings.Join(w, "; "), "start-up checks") {
		t.Errorf("readiness with clickhouse unchecked: %d %v, want a warning that nothing is written until its checks pass", code, w)
	}
	testenv.Eventually(t, 10*time.Second, func() error {
		live := runCmd(t, dead, "spool", "status", "--dir", dir)
		if live.code != 0 || !strings.Contains(live.stdout, "held by pid") || !strings.Contains(live.stdout, "6 events") {
			return fmt.Errorf("status of a running server's spool: %d\n%s%s", live.code, live.stdout, live.stderr)
		}
		return nil
	})
	if r := runCmd(t, dead, "spool", "drain", "--dir", dir); r.code == 0 || !strings.Contains(r.stderr, "in use by") {
		t.Errorf("drain while a server holds the spool: %d %s, want a refusal", r.code, r.stderr)
	}
	p.cmd.Process.Kill()
	p.cmd.Wait()

	getenv := stackEnv(t, e, nil)
	ins := runCmd(t, getenv, "spool", "inspect", "--dir", dir, "--json")
	var rep struct {
		Segments []struct {
			Events int `json:"events"`
		} `json:"segments"`
	}
	if err := json.Unmarshal([]byte(ins.stdout), &rep); err != nil || len(rep.Segments) == 0 {
		t.Fatalf("inspect: %v %s %s", err, ins.stdout, ins.stderr)
	}
	rows := runCmd(t, getenv, "spool", "inspect", "--dir", dir, "--rows")
	if n := strings.Count(rows.stdout, `"kind":"event"`); n != 6 {
		t.Errorf("inspect --rows printed %d events, want 6:\n%s", n, rows.stdout)
	}
	if r := runCmd(t, getenv, "spool", "drain", "--dir", dir); r.code != 0 || !strings.Contains(r.stdout, "drained") {
		t.Fatalf("drain: %d %s %s", r.code, r.stdout, r.stderr)
	}
	if n := countEvents(t, e, tn); n != 6 {
		t.Errorf("after drain: %d events stored, want 6", n)
	}
	if left, _ := os.ReadDir(dir); len(left) > 2 { // LOCK, and the quarantine dir if any
		t.Errorf("spool after drain: %v", left)
	}
}

// unshippedSpool starts a server on dir whose ClickHouse nobody listens on and has it accept three
// requests of two events each: one segment of three records waiting (its flush interval is an
// hour). The caller kills it.
func unshippedSpool(t *testing.T, e testenv.Env, key, dir string) (func(string) string, *proc) {
	t.Helper()
	return unshippedSpoolOf(t, e, key, dir, `[{"event":"a.b"},{"event":"c.d"}]`)
}

func unshippedSpoolOf(t *testing.T, e testenv.Env, key, dir, body string) (func(string) string, *proc) {
	t.Helper()
	dead := stackEnv(t, e, map[string]string{"ANALYTICS_ADDR": freeAddr(t), "ANALYTICS_SPOOL_DIR": dir,
		"CLICKHOUSE_DSN": "clickhouse://default:@" + freeAddr(t) + "/" + e.DB, "INGEST_FLUSH_INTERVAL": "1h", "ANALYTICS_METRICS_ADDR": freeAddr(t)})
	p := startServer(t, dead, serveVars)
	for i := 0; i < 3; i++ {
		if st, resp := postEvents(t, p.base, key, body); st != 202 {
			t.Fatalf("post: %d %s", st, resp)
		}
	}
	return dead, p
}

// A spool whose disk damaged an acknowledged record in the middle of a segment: `spool status`
// names the damage, and `spool drain` ships the records around it, keeps the damaged bytes apart
// (listed by status) and exits non-zero, so that `drain && rm -rf` keeps them. Before, the damage read as a
// torn tail: drain shipped the first record only, removed the segment with the other two, and
// exited 0. (Fails on the code before this change.)
func TestDrainOfADamagedSpoolKeepsTheDamageAndFails(t *testing.T) {
	e := testenv.Migrated(t)
	tn, key := writeKey(t, e, "damaged")
	dir := t.TempDir()
	_, p := unshippedSpool(t, e, key, dir)
	p.cmd.Process.Kill()
	p.cmd.Wait()
	segs, _ := filepath.Glob(filepath.Join(dir, "*.seg"))
	if len(segs) != 1 {
		t.Fatalf("want one segment in %s, found %v", dir, segs)
	}
	b, err := os.ReadFile(segs[0])
	if err != nil {
		t.Fatal(err)
	}
	// Walk the frames (a 24-byte file header, then [length][crc32c][payload]) and flip a byte of the second.
	off, frames := 24, 0
	for off+8 <= len(b) {
		n := int(bin.LittleEndian.Uint32(b[off:]))
		if frames == 1 {
			b[off+8+n/2] ^= 0x40
		}
		off += 8 + n
		frames++
	}
	if frames != 3 {
		t.Fatalf("the segment holds %d records, want 3", frames)
	}
	if err := os.WriteFile(segs[0], b, 0o640); err != nil {
		t.Fatal(err)
	}
	getenv := stackEnv(t, e, nil)
	if st := runCmd(t, getenv, "spool", "status", "--dir", dir); !strings.Contains(st.stdout, "DAMAGED at byte") {
		t.Errorf("status does not name the damage: %d\n%s%s", st.code, st.stdout, st.stderr)
	}
	r := runCmd(t, getenv, "spool", "drain", "--dir", dir)
	if r.code == 0 || !strings.Contains(r.stderr, "damaged") {
		t.Errorf("drain of a damaged spool: exit %d %s %s, want a failure naming the damage", r.code, r.stdout, r.stderr)
	}
	if n := countEvents(t, e, tn); n != 4 {
		t.Errorf("after drain: %d events stored, want the 4 of the intact records", n)
	}
	if kept, err := spool.ListDamaged(dir); err != nil || len(kept) != 1 {
		t.Errorf("damaged %+v %v, want the damaged record kept apart", kept, err)
	}
	if q, _ := spool.ListQuarantine(dir); len(q) != 0 {
		t.Errorf("quarantine %+v, want it empty: requeue would ship damaged bytes, erasure could not scrub them", q)
	}
	if st := runCmd(t, getenv, "spool", "status", "--dir", dir); !strings.Contains(st.stdout, "damaged: 1 stretches") {
		t.Errorf("status after drain does not list the damaged stretch:\n%s", st.stdout)
	}
}

// drain guards rows that may be stored already with the retention in force and the floor in
// Postgres, as serve does: rows of a day before the floor (dropped while the window was shorter) in
// a segment whose insert had begun are quarantined, not inserted — a check cannot see a copy in a
// dropped partition, and daily_usage would count them twice. Before, drain used only its shell's
// RETENTION_DAYS and inserted them. (Fails on the code before this change.)
func TestDrainGuardsDaysBeforeTheRetentionFloor(t *testing.T) {
	e := testenv.Migrated(t)
	tn, key := writeKey(t, e, "floor")
	dir := t.TempDir()
	old := time.Now().UTC().AddDate(0, 0, -5).Format(time.RFC3339)
	_, p := unshippedSpoolOf(t, e, key, dir, fmt.Sprintf(`[{"id":%q,"event":"a.b","ts":%q}]`, uuid.NewString(), old))
	p.cmd.Process.Kill()
	p.cmd.Wait()
	// The dead server's insert had begun: the segment is in flight, its rows may be stored.
	segs, _ := filepath.Glob(filepath.Join(dir, "*.seg"))
	for _, s := range segs {
		if err := os.Rename(s, strings.TrimSuffix(s, ".seg")+".inflight"); err != nil {
			t.Fatal(err)
		}
	}
	floor := time.Now().UTC().AddDate(0, 0, -3).Format(time.DateOnly)
	if _, err := e.PG.Exec(context.Background(), `INSERT INTO retention_floor (db, complete_from) VALUES ($1, $2)
		ON CONFLICT (db) DO UPDATE SET complete_from = EXCLUDED.complete_from`, e.DB, floor); err != nil {
		t.Fatal(err)
	}
	r := runCmd(t, stackEnv(t, e, nil), "spool", "drain", "--dir", dir)
	if r.code != 0 {
		t.Fatalf("drain: %d %s %s", r.code, r.stdout, r.stderr)
	}
	if n := countEvents(t, e, tn); n != 0 {
		t.Errorf("drain inserted %d events of a day before the retention floor, want them quarantined", n)
	}
	// The three requests sent one id: one row.
	if q, err := spool.ListQuarantine(dir); err != nil || len(q) != 1 || q[0].Rows() != 1 || !strings.Contains(q[0].Reason, "complete from "+floor) {
		t.Errorf("quarantine %+v %v, want the row, naming the floor", q, err)
	}
}

// Rows ClickHouse refuses for good go to the quarantine while the rest ships; /readiness warns (and
// stays 200), `spool status` lists them, and `spool requeue --all` ships them once fixed — while the
// server keeps running.
func TestQuarantineSeenAndRequeued(t *testing.T) {
	e := testenv.Migrated(t)
	tn, key := writeKey(t, e, "poisoned")
	ctx := context.Background()
	if err := e.CH.Exec(ctx, "ALTER TABLE "+e.DB+".events ADD COLUMN poison UInt8 DEFAULT throwIf(event = 'poison.pill')"); err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	getenv := stackEnv(t, e, map[string]string{"ANALYTICS_ADDR": freeAddr(t), "ANALYTICS_METRICS_ADDR": freeAddr(t), "ANALYTICS_SPOOL_DIR": dir, "INGEST_FLUSH_INTERVAL": "100ms"})
	p := startServer(t, getenv, serveVars)
	if st, body := postEvents(t, p.base, key, `[{"event":"a.b"},{"event":"poison.pill"},{"event":"c.d"}]`); st != 202 {
		t.Fatalf("post: %d %s", st, body)
	}
	var warnings []string
	testenv.Eventually(t, 30*time.Second, func() error {
		code, w := fixture.Readiness(t, p.ops)
		if len(w) == 0 {
			return fmt.Errorf("no quarantine warning in /readiness; stderr:\n%s", p.stderr)
		}
		if code != 200 {
			t.Errorf("readiness with rows in quarantine: %d, want 200 (a warning, not a failure)", code)
		}
		warnings = w
		return nil
	})
	if !strings.Contains(warnings[0], "1 rows") || countEvents(t, e, tn) != 2 {
		t.Errorf("warnings %v, %d stored; want 1 row quarantined and the 2 others stored", warnings, countEvents(t, e, tn))
	}
	st := runCmd(t, getenv, "spool", "status", "--dir", dir)
	if !strings.Contains(st.stdout, "quarantine: 1 files, 1 rows") || !strings.Contains(st.stdout, "throwIf") {
		t.Errorf("status:\n%s%s", st.stdout, st.stderr)
	}
	if r := runCmd(t, getenv, "spool", "requeue", "--dir", dir, "--all"); r.code == 0 {
		t.Errorf("requeue before the fix: exit 0\n%s", r.stdout)
	}
	if err := e.CH.Exec(ctx, "ALTER TABLE "+e.DB+".events DROP COLUMN poison"); err != nil {
		t.Fatal(err)
	}
	if r := runCmd(t, getenv, "spool", "requeue", "--dir", dir, "--all"); r.code != 0 || !strings.Contains(r.stdout, "1 inserted") {
		t.Fatalf("requeue: %d %s %s", r.code, r.stdout, r.stderr)
	}
	if n := countEvents(t, e, tn); n != 3 {
		t.Errorf("after requeue: %d stored, want 3", n)
	}
	if st := runCmd(t, getenv, "spool", "status", "--dir", dir); !strings.Contains(st.stdout, "quarantine: 0 files, 0 rows") {
		t.Errorf("status after requeue:\n%s", st.stdout)
	}
}

// A mistyped --dir is refused by every spool command. Before, drain created the directory and
// reported it drained (exit 0), and requeue --all called the quarantine empty.
func TestSpoolCommandsRefuseAMissingDirectory(t *testing.T) {
	e := testenv.Migrated(t)
	getenv := stackEnv(t, e, nil)
	dir := filepath.Join(t.TempDir(), "no-such-spool")
	for _, args := range [][]string{{"status"}, {"inspect"}, {"drain", "--timeout", "5s"}, {"requeue", "--all"}} {
		r := runCmd(t, getenv, append([]string{"spool"}, append(args, "--dir", dir)...)...)
		if r.code == 0 || !strings.Contains(r.stderr, dir) {
			t.Errorf("spool %s on a directory that does not exist: exit %d, stdout %q, stderr %q; want a refusal naming it",
				args[0], r.code, r.stdout, r.stderr)
		}
	}
	if _, err := os.Stat(dir); err == nil {
		t.Error("a spool command created the missing directory")
	}
}

// `spool drain --json` printed "drained":false and exited 0 when segments were left, so a script's
// `drain --json && rm -rf $dir` deleted acknowledged rows; `requeue --json` printed text. Both now
// print JSON and fail when something is left.
func TestSpoolJSONFailsWhatIsLeft(t *testing.T) {
	e := testenv.Migrated(t)
	tn, key := writeKey(t, e, "json-left")
	ctx := context.Background()
	dir := t.TempDir()
	getenv := stackEnv(t, e, map[string]string{"ANALYTICS_ADDR": freeAddr(t), "ANALYTICS_SPOOL_DIR": dir, "INGEST_FLUSH_INTERVAL": "1h"})
	p := startServer(t, getenv, serveVars)
	if st, body := postEvents(t, p.base, key, `[{"event":"a.b"},{"event":"c.d"}]`); st != 202 {
		t.Fatalf("post: %d %s", st, body)
	}
	// kill -9: the rows are in its spool only.
	if err := p.cmd.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	_ = p.cmd.Wait()
	if err := e.CH.Exec(ctx, "RENAME TABLE "+e.DB+".events TO "+e.DB+".events_away"); err != nil {
		t.Fatal(err)
	}
	r := runCmd(t, getenv, "spool", "drain", "--dir", dir, "--timeout", "3s", "--json")
	var res struct{ Drained bool }
	if err := json.Unmarshal([]byte(r.stdout), &res); err != nil || res.Drained || r.code == 0 {
		t.Errorf("drain --json with ClickHouse refusing: exit %d, stdout %q (%v); want JSON saying not drained and a failing exit", r.code, r.stdout, err)
	}
	if err := e.CH.Exec(ctx, "RENAME TABLE "+e.DB+".events_away TO "+e.DB+".events"); err != nil {
		t.Fatal(err)
	}
	r = runCmd(t, getenv, "spool", "drain", "--dir", dir, "--json")
	if err := json.Unmarshal([]byte(r.stdout), &res); err != nil || !res.Drained || r.code != 0 {
		t.Errorf("drain --json: exit %d, stdout %q, stderr %q; want drained", r.code, r.stdout, r.stderr)
	}
	if n := countEvents(t, e, tn); n != 2 {
		t.Errorf("%d rows stored after the drain, want 2", n)
	}
	r = runCmd(t, getenv, "spool", "requeue", "--dir", dir, "--all", "--json")
	var outcomes []map[string]any
	if err := json.Unmarshal([]byte(r.stdout), &outcomes); err != nil || outcomes == nil || len(outcomes) != 0 || r.code != 0 {
		t.Errorf("requeue --all --json of an empty quarantine: exit %d, stdout %q (%v); want []", r.code, r.stdout, err)
	}
}

// /readiness warned only when the quarantine held rows it could count: a record this release cannot
// decode is quarantined as it is and counts none, so its file sat there unseen.
func TestQuarantineWarningCountsFiles(t *testing.T) {
	if msg := quarantineWarning(ingest.Stats{QuarantinedFiles: 1}); !strings.Contains(msg, "1 files") {
		t.Errorf("a quarantine file with no countable rows: warning %q, want one naming 1 file", msg)
	}
	if msg := quarantineWarning(ingest.Stats{}); msg != "" {
		t.Errorf("an empty quarantine: warning %q, want none", msg)
	}
}
