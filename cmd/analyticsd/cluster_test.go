package main

import (
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"net/http"
	"net/url"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/analyticsd/analyticsd/internal/testenv"
	"github.com/analyticsd/analyticsd/internal/testenv/fixture"
	"github.com/analyticsd/analyticsd/schema"
)

// The same workload gives the same API answers on one server and on the cluster: every event page
// (followed by cursor), usage, KPIs, event names, active users and both exports, for three tenants
// whose rows land on different shards. Runs in `make test-cluster`, which points the environment
// at the local cluster and SINGLE_* at the single-server stack.
func TestClusterAnswersAsOneServerDoes(t *testing.T) {
	if testenv.Cluster() == "" {
		t.Skip("compares the cluster with one server: `make test-cluster` runs it")
	}
	single := testenv.MigratedAt(t, testenv.SingleServer(t))
	cluster := testenv.Migrated(t)
	if single.Target.Cluster != "" || cluster.Target.Cluster == "" {
		t.Fatalf("targets: single %+v, cluster %+v", single.Target, cluster.Target)
	}

	type server struct {
		name string
		base string
		keys map[string]string // slug -> write+read key
	}
	slugs := []string{"alpha", "bravo", "charlie"}
	start := func(name string, e testenv.Env) server {
		getenv := stackEnv(t, e, map[string]string{"ANALYTICS_ADDR": freeAddr(t), "ANALYTICS_SPOOL_DIR": t.TempDir()})
		logs := &syncBuffer{}
		t.Cleanup(func() {
			if t.Failed() {
				t.Logf("%s logs:\n%s", name, logs.String())
			}
		})
		s := server{name: name, base: serveLogging(t, getenv, logs), keys: map[string]string{}}
		for _, slug := range slugs {
			if r := runCmd(t, getenv, "tenant", "create", "--slug", slug); r.code != 0 {
				t.Fatalf("%s: tenant create %s: %s", name, slug, r.stderr)
			}
			r := runCmd(t, getenv, "apikey", "create", "--tenant", slug, "--scopes", "events:write,analytics:read")
			if r.code != 0 {
				t.Fatalf("%s: apikey create: %s", name, r.stderr)
			}
			s.keys[slug] = r.lastLine()
		}
		return s
	}
	servers := []server{start("one server", single), start("cluster", cluster)}

	// One workload, generated once: fixed ids, times over the last three days (many sharing a
	// second, so paging must break ties by id), a few users and event names, explicit increments.
	rng := rand.New(rand.NewPCG(19, 2026))
	now := time.Now().UTC().Truncate(time.Second)
	names := []string{"auth.user.login", "auth.user.signup", "build.completed", "email.sent", "billing.payment"}
	bodies := map[string][]byte{}
	want := map[string]int{}
	for _, slug := range slugs {
		n := 150 + rng.IntN(100)
		evs := make([]map[string]any, n)
		for i := range evs {
			evs[i] = map[string]any{
				"id":      uuid.NewString(),
				"event":   names[rng.IntN(len(names))],
				"user_id": fmt.Sprintf("u%d", rng.IntN(12)),
				"ts":      now.Add(-time.Duration(rng.IntN(3*86400/20)) * 20 * time.Second).Format(time.RFC3339),
				"props":   map[string]any{"n": i, "plan": []string{"free", "pro"}[i%2]},
			}
		}
		b, _ := json.Marshal(evs)
		bodies[slug], want[slug] = b, n
	}
	for _, s := range servers {
		for _, slug := range slugs {
			r := fixture.At(t, s.base).Do(t, fixture.Request{Method: http.MethodPost, Path: "/api/analytics/events", Key: s.keys[slug],
				Body: bodies[slug], Header: map[string]string{"Content-Type": "application/json"}})
			if r.Status != http.StatusAccepted {
				t.Fatalf("%s: ingest %s: %d %s", s.name, slug, r.Status, r.Raw)
			}
			for _, inc := range []string{`{"metric":"api_requests_daily","n":7}`, `{"metric":"builds_daily","n":3}`} {
				r := fixture.At(t, s.base).Do(t, fixture.Request{Method: http.MethodPost, Path: "/api/analytics/usage", Key: s.keys[slug],
					Body: []byte(inc), Header: map[string]string{"Content-Type": "application/json"}})
				if r.Status/100 != 2 {
					t.Fatalf("%s: increment %s: %d %s", s.name, slug, r.Status, r.Raw)
				}
			}
		}
	}
	// Wait until both have stored everything (ingest acknowledges before ClickHouse has it).
	for _, s := range servers {
		for _, slug := range slugs {
			testenv.Eventually(t, time.Minute, func() error {
				got := len(pages(t, s.base, s.keys[slug]))
				if got != want[slug] {
					return fmt.Errorf("%s: %s has %d events, want %d", s.name, slug, got, want[slug])
				}
				return nil
			})
		}
	}

	from, to := now.AddDate(0, 0, -3).Format(time.DateOnly), now.Format(time.DateOnly)
	reads := []string{
		"/api/analytics/usage?metric=auth.user.login&from=" + from + "&to=" + to,
		"/api/analytics/usage?metric=api_requests_daily&from=" + from + "&to=" + to + "&fill=zero",
		"/api/analytics/metrics",
		"/api/analytics/event-names",
		"/api/analytics/active-users",
		"/api/analytics/active-users?event=build.completed&from=" + from + "&to=" + to,
		"/api/analytics/export.csv",
		"/api/analytics/export.ndjson?limit=50",
	}
	for _, slug := range slugs {
		a, b := servers[0], servers[1]
		if pa, pb := pages(t, a.base, a.keys[slug]), pages(t, b.base, b.keys[slug]); !reflect.DeepEqual(pa, pb) {
			t.Errorf("%s: event pages differ: %d events on %s, %d on %s", slug, len(pa), a.name, len(pb), b.name)
		}
		for _, path := range reads {
			ra, rb := read(t, a.base, path, a.keys[slug]), read(t, b.base, path, b.keys[slug])
			if ra != rb {
				t.Errorf("%s %s differs:\n%s: %.600s\n%s: %.600s", slug, path, a.name, ra, b.name, rb)
			}
		}
	}
}

// pages follows GET /events by cursor, 7 at a time, and returns every event as the API wrote it.
func pages(t *testing.T, base, key string) []string {
	t.Helper()
	var out []string
	cursor := ""
	for range 1000 {
		path := "/api/analytics/events?limit=7"
		if cursor != "" {
			path += "&cursor=" + url.QueryEscape(cursor)
		}
		r := fixture.At(t, base).Get(t, key, "", path)
		if r.Status != http.StatusOK {
			t.Fatalf("GET %s: %d %s", path, r.Status, r.Raw)
		}
		var page struct {
			Data struct {
				Events     []json.RawMessage `json:"events"`
				NextCursor *string           `json:"next_cursor"`
			} `json:"data"`
		}
		if err := json.Unmarshal([]byte(r.Raw), &page); err != nil {
			t.Fatalf("GET %s: %v: %s", path, err, r.Raw)
		}
		for _, e := range page.Data.Events {
			out = append(out, string(e))
		}
		if page.Data.NextCursor == nil {
			return out
		}
		cursor = *page.Data.NextCursor
	}
	t.Fatal("more than 1000 pages")
	return nil
}

// read GETs path and returns the body with what legitimately differs between two servers removed:
// when it was generated (meta timing) is not part of the answer.
func read(t *testing.T, base, path, key string) string {
	t.Helper()
	r := fixture.At(t, base).Get(t, key, "", path)
	if r.Status != http.StatusOK {
		t.Fatalf("GET %s: %d %s", path, r.Status, r.Raw)
	}
	if strings.Contains(path, "/export.") {
		return r.Raw // CSV, NDJSON: compared byte for byte
	}
	var v map[string]any
	if err := json.Unmarshal([]byte(r.Raw), &v); err != nil {
		t.Fatalf("GET %s: %v", path, err)
	}
	if m, ok := v["meta"].(map[string]any); ok {
		for _, k := range []string{"generated_at", "took_ms", "elapsed_ms", "cached_at"} {
			delete(m, k)
		}
	}
	b, _ := json.Marshal(v)
	return string(b)
}

// An existing single-server database moves onto the cluster with `move-to-cluster`: raw rows keep
// their ids, the daily aggregates and quarter-hour slots equal the old ones — including a day past
// retention whose raw rows are gone, which only the aggregate holds, and an erased user's counts
// inside it — and a second run refuses to copy into non-empty tables.
func TestMoveToCluster(t *testing.T) {
	if testenv.Cluster() == "" {
		t.Skip("needs the cluster: `make test-cluster` runs it")
	}
	ctx := t.Context()
	single := testenv.MigratedAt(t, testenv.SingleServer(t))
	cluster := testenv.Migrated(t)

	now := time.Now().UTC().Truncate(time.Second)
	tenants := []uuid.UUID{uuid.New(), uuid.New(), uuid.New()}
	var events, incs [][]any
	for i := range 600 {
		tn := tenants[i%len(tenants)]
		ts := now.Add(-time.Duration(i*431) * time.Second)
		events = append(events, []any{tn, ts, uuid.New(), ts, []string{"auth.user.login", "build.completed"}[i%2], "app", fmt.Sprintf("u%d", i%17), `{"i":1}`, "", ""})
		if i%10 == 0 {
			incs = append(incs, []any{tn, ts, uuid.New(), "api_requests_daily", int64(i)})
		}
	}
	single.Insert(t, "events", "tenant_id, ts, id, received_at, event, source, user_id, props, ip, request_id", events...)
	single.Insert(t, "usage_increments", "tenant_id, ts, id, metric, n", incs...)
	// A day past retention: its raw rows were dropped, only the aggregate is left.
	old := time.Date(2025, 1, 15, 0, 0, 0, 0, time.UTC)
	single.Insert(t, "daily_usage", "tenant_id, date, metric, count", []any{tenants[0], old, "auth.user.login", int64(42)})
	// Counts the raw rows no longer explain inside retention: an erased user's, which the aggregates keep.
	erased := now.Truncate(15 * time.Minute)
	single.Insert(t, "daily_usage", "tenant_id, date, metric, count", []any{tenants[1], erased.Truncate(24 * time.Hour), "auth.user.login", int64(5)})
	single.Insert(t, "usage_quarter_hour", "tenant_id, metric, slot, count", []any{tenants[1], "auth.user.login", erased, int64(5)})

	src, err := url.Parse(single.Target.ClickHouseDSN)
	if err != nil {
		t.Fatal(err)
	}
	src.Path = "/" + single.DB
	getenv := stackEnv(t, cluster, nil)

	// A source that has not applied every migration (here: usage_quarter_hour's, whose fill is part of
	// it) is refused before anything is copied.
	behind := testenv.MigratedAt(t, testenv.SingleServer(t))
	if err := behind.CH.Exec(ctx, fmt.Sprintf("ALTER TABLE %s.schema_migrations DELETE WHERE version = %d", behind.DB, schema.QuarterHoursVersion)); err != nil {
		t.Fatal(err)
	}
	testenv.Eventually(t, 30*time.Second, func() error {
		if ok, err := schema.Applied(ctx, behind.CH, behind.DB, schema.QuarterHoursVersion); err != nil || ok {
			return fmt.Errorf("migration still recorded (%v)", err)
		}
		return nil
	})
	behindURL := *src
	behindURL.Path = "/" + behind.DB
	if r := runCmd(t, getenv, "move-to-cluster", "--from", behindURL.String()); r.code != 1 || !strings.Contains(r.stderr, "0002_usage_quarter_hour") {
		t.Errorf("a source without migration 0002: exit %d, stderr %q; want 1 naming it", r.code, r.stderr)
	}
	r := runCmd(t, getenv, "move-to-cluster", "--from", src.String(), "--json")
	if r.code != 0 {
		t.Fatalf("move-to-cluster: exit %d: %s %s", r.code, r.stdout, r.stderr)
	}
	var res struct {
		Events     int `json:"events"`
		Increments int `json:"increments"`
		UsageOnly  int `json:"usage_only_rows"`
	}
	if err := json.Unmarshal([]byte(r.stdout), &res); err != nil || res.Events != 600 || res.Increments != len(incs) || res.UsageOnly != 1 {
		t.Errorf("move-to-cluster said %s (%v); want 600 events, %d increments, 1 aggregate past retention", r.stdout, err, len(incs))
	}

	// Independently of the command's own check: the same ids, the same totals.
	rows := func(e testenv.Env, sql string) []string {
		t.Helper()
		rs, err := e.CH.Query(ctx, strings.ReplaceAll(sql, "DB.", e.DB+"."))
		if err != nil {
			t.Fatal(err)
		}
		defer rs.Close()
		var out []string
		for rs.Next() {
			var s string
			if err := rs.Scan(&s); err != nil {
				t.Fatal(err)
			}
			out = append(out, s)
		}
		return out
	}
	for _, sql := range []string{
		"SELECT toString(id) FROM DB.events ORDER BY id",
		"SELECT concat(toString(id), toString(n)) FROM DB.usage_increments ORDER BY id",
		"SELECT concat(toString(tenant_id), toString(date), metric, toString(sum(count))) AS k FROM DB.daily_usage GROUP BY tenant_id, date, metric ORDER BY k",
		"SELECT concat(toString(tenant_id), toString(slot), metric, toString(sum(count))) AS k FROM DB.usage_quarter_hour GROUP BY tenant_id, slot, metric HAVING sum(count) != 0 ORDER BY k",
	} {
		a, b := rows(single, sql), rows(cluster, sql)
		if len(a) == 0 || !reflect.DeepEqual(a, b) {
			t.Errorf("%s: %d rows on the server, %d on the cluster, or they differ", sql, len(a), len(b))
		}
	}
	if r := runCmd(t, getenv, "move-to-cluster", "--from", src.String()); r.code != 1 || !strings.Contains(r.stderr, "not empty") {
		t.Errorf("a second copy: exit %d, stderr %q; want 1 saying the cluster's tables are not empty", r.code, r.stderr)
	}
	if r := runCmd(t, stackEnv(t, single, nil), "move-to-cluster", "--from", src.String()); r.code != 2 || !strings.Contains(r.stderr, "CLICKHOUSE_CLUSTER") {
		t.Errorf("without a cluster configured: exit %d, stderr %q; want 2 naming CLICKHOUSE_CLUSTER", r.code, r.stderr)
	}
}
