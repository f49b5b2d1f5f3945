package schema_test

import (
	"context"
	"errors"
	"fmt"
	"net/url"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/ClickHouse/clickhouse-go/v2/lib/driver"
	"github.com/google/uuid"

	"github.com/analyticsd/analyticsd/internal/testenv"
	"github.com/analyticsd/analyticsd/schema"
)

type chTable struct {
	Name         string `ch:"name"`
	Engine       string `ch:"engine"`
	PartitionKey string `ch:"partition_key"`
	SortingKey   string `ch:"sorting_key"`
}

func TestMigrateCreatesEveryObject(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	env := testenv.Migrated(t)

	var tables []chTable
	if err := env.CH.Select(ctx, &tables,
		"SELECT name, engine, partition_key, sorting_key FROM system.tables WHERE database = ? ORDER BY name", env.DB); err != nil {
		t.Fatal(err)
	}
	got := map[string]chTable{}
	for _, tb := range tables {
		got[tb.Name] = tb
	}
	want := []chTable{
		{"events", "MergeTree", "toYYYYMMDD(ts)", "tenant_id, ts, id"},
		{"usage_increments", "MergeTree", "toYYYYMMDD(ts)", "tenant_id, ts, id"},
		{"daily_usage", "SummingMergeTree", "toYYYYMM(date)", "tenant_id, metric, date"},
		{"daily_usage_events_mv", "MaterializedView", "", ""},
		{"daily_usage_increments_mv", "MaterializedView", "", ""},
		{"usage_quarter_hour", "SummingMergeTree", "toYYYYMMDD(slot)", "tenant_id, metric, slot"},
		{"usage_quarter_hour_events_mv", "MaterializedView", "", ""},
		{"usage_quarter_hour_increments_mv", "MaterializedView", "", ""},
		{"schema_migrations", "MergeTree", "", "version"},
	}
	if testenv.Cluster() != "" {
		// The rows live in replicated <name>_local tables; the plain names are Distributed tables.
		want = []chTable{
			{"events_local", "ReplicatedMergeTree", "toYYYYMMDD(ts)", "tenant_id, ts, id"},
			{"usage_increments_local", "ReplicatedMergeTree", "toYYYYMMDD(ts)", "tenant_id, ts, id"},
			{"daily_usage_local", "ReplicatedSummingMergeTree", "toYYYYMM(date)", "tenant_id, metric, date"},
			{"events", "Distributed", "", ""},
			{"usage_increments", "Distributed", "", ""},
			{"daily_usage", "Distributed", "", ""},
			{"daily_usage_events_mv", "MaterializedView", "", ""},
			{"daily_usage_increments_mv", "MaterializedView", "", ""},
			{"usage_quarter_hour_local", "ReplicatedSummingMergeTree", "toYYYYMMDD(slot)", "tenant_id, metric, slot"},
			{"usage_quarter_hour", "Distributed", "", ""},
			{"usage_quarter_hour_events_mv", "MaterializedView", "", ""},
			{"usage_quarter_hour_increments_mv", "MaterializedView", "", ""},
			{"schema_migrations", "ReplicatedMergeTree", "", "version"},
		}
		checkEveryReplica(ctx, t, env.CH, env.DB, len(want))
	}
	for _, w := range want {
		g, ok := got[w.Name]
		if !ok {
			t.Errorf("clickhouse %s.%s missing; have %v", env.DB, w.Name, tables)
			continue
		}
		if g != w {
			t.Errorf("clickhouse %s: got %+v, want %+v", w.Name, g, w)
		}
	}
	if len(got) != len(want) {
		t.Errorf("got %d clickhouse objects, want %d: %+v", len(got), len(want), tables)
	}

	rows, err := env.PG.Query(ctx, "SELECT table_name FROM information_schema.tables WHERE table_schema = $1 ORDER BY 1", env.PGSchema)
	if err != nil {
		t.Fatal(err)
	}
	var pgTables []string
	for rows.Next() {
		var n string
		if err := rows.Scan(&n); err != nil {
			t.Fatal(err)
		}
		pgTables = append(pgTables, n)
	}
	if err := rows.Err(); err != nil {
		t.Fatal(err)
	}
	if got, want := strings.Join(pgTables, ","), "analytics_daily_usage,api_keys,audit_log,erased_usage,erasure_acks,erasure_instances,erasure_jobs,erasure_ledger_version,erasure_rounds,import_days,import_tenants,quota_alerts,retention_floor,rollup_runs,schema_migrations,tenants,usage_levels"; got != want {
		t.Errorf("postgres tables: got %s, want %s", got, want)
	}
}

// checkEveryReplica asks each server of the cluster (system.clusters, through remote()) how many
// objects the database holds there: ON CLUSTER must have created all of them on all of them.
func checkEveryReplica(ctx context.Context, t *testing.T, ch driver.Conn, db string, want int) {
	t.Helper()
	var hosts []string
	rows, err := ch.Query(ctx, "SELECT host_address || ':' || toString(port) FROM system.clusters WHERE cluster = ?", testenv.Cluster())
	if err != nil {
		t.Fatal(err)
	}
	for rows.Next() {
		var h string
		if err := rows.Scan(&h); err != nil {
			t.Fatal(err)
		}
		hosts = append(hosts, h)
	}
	rows.Close()
	if len(hosts) < 2 {
		t.Fatalf("cluster %s has %d servers; want a real cluster", testenv.Cluster(), len(hosts))
	}
	for _, h := range hosts {
		var n uint64
		if err := ch.QueryRow(ctx, "SELECT count() FROM remote('"+h+"', system, tables) WHERE database = ?", db).Scan(&n); err != nil {
			t.Fatalf("%s: %v", h, err)
		}
		if int(n) != want {
			t.Errorf("server %s holds %d objects of %s, want %d", h, n, db, want)
		}
	}
}

// The materialized views must turn events and increments into daily_usage rows.
func TestMaterializedViewsFeedDailyUsage(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	env := testenv.Migrated(t)
	tenant := "6f1c1a52-3b8e-4a43-9a55-0d2f4a0e7c11"
	day := time.Date(2026, 11, 20, 10, 0, 0, 0, time.UTC)

	b, err := env.CH.PrepareBatch(ctx, "INSERT INTO "+env.DB+".events (tenant_id, ts, id, received_at, event, source, user_id, props, ip, request_id)")
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 3; i++ {
		if err := b.Append(tenant, day.Add(time.Duration(i)*time.Minute), uuid.NewString(), day, "auth.user.login", "app", "u1", "{}", "", ""); err != nil {
			t.Fatal(err)
		}
	}
	if err := b.Send(); err != nil {
		t.Fatal(err)
	}
	b, err = env.CH.PrepareBatch(ctx, "INSERT INTO "+env.DB+".usage_increments (tenant_id, ts, id, metric, n)")
	if err != nil {
		t.Fatal(err)
	}
	if err := b.Append(tenant, day, "00000000-0000-4000-8000-000000000001", "api_requests_daily", int64(5)); err != nil {
		t.Fatal(err)
	}
	if err := b.Append(tenant, day, "00000000-0000-4000-8000-000000000002", "api_requests_daily", int64(2)); err != nil {
		t.Fatal(err)
	}
	if err := b.Send(); err != nil {
		t.Fatal(err)
	}
	var got []struct {
		Metric string `ch:"metric"`
		Count  int64  `ch:"c"`
	}
	if err := env.CH.Select(ctx, &got, "SELECT metric, sum(count) AS c FROM "+env.DB+".daily_usage WHERE tenant_id = ? AND date = toDate(?) GROUP BY metric ORDER BY metric", tenant, day); err != nil {
		t.Fatal(err)
	}
	if len(got) != 2 || got[0].Metric != "api_requests_daily" || got[0].Count != 7 || got[1].Metric != "auth.user.login" || got[1].Count != 3 {
		t.Errorf("daily_usage: got %+v, want api_requests_daily=7, auth.user.login=3", got)
	}
}

func TestMigrateTwiceChangesNothing(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	env := testenv.Migrated(t)
	if len(env.Schema.AppliedClickHouse) == 0 || len(env.Schema.AppliedPostgres) == 0 {
		t.Fatalf("first run applied nothing: %+v", env.Schema)
	}
	m := schema.Migrator{CH: env.CH, PG: env.PG, DB: env.DB, Cluster: testenv.Cluster(), RetentionDays: 90}
	res, err := m.Run(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(res.AppliedClickHouse) != 0 || len(res.AppliedPostgres) != 0 {
		t.Errorf("second run applied %v / %v, want nothing", res.AppliedClickHouse, res.AppliedPostgres)
	}
	var n uint64
	if err := env.CH.QueryRow(ctx, "SELECT count() FROM "+env.DB+".schema_migrations").Scan(&n); err != nil {
		t.Fatal(err)
	}
	if want := uint64(len(env.Schema.AppliedClickHouse)); n != want {
		t.Errorf("clickhouse schema_migrations has %d rows, want %d", n, want)
	}
}

func TestMigrateConcurrently(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	ch, db := testenv.ClickHouse(t)
	pg, _ := testenv.Postgres(t)
	var wg sync.WaitGroup
	results := make([]schema.Result, 4)
	errs := make([]error, 4)
	for i := range results {
		wg.Add(1)
		go func() {
			defer wg.Done()
			m := schema.Migrator{CH: ch, PG: pg, DB: db, Cluster: testenv.Cluster(), RetentionDays: 90}
			results[i], errs[i] = m.Run(ctx)
		}()
	}
	wg.Wait()
	appliedPG, appliedCH := 0, 0
	for i, err := range errs {
		if err != nil {
			t.Errorf("run %d: %v", i, err)
		}
		appliedPG += len(results[i].AppliedPostgres)
		appliedCH += len(results[i].AppliedClickHouse)
	}
	pgWant, _ := schema.Postgres()
	if appliedPG != len(pgWant) {
		t.Errorf("postgres migrations applied %d times in total, want %d (once each)", appliedPG, len(pgWant))
	}
	if appliedCH == 0 {
		t.Error("no run applied the clickhouse migrations")
	}
}

// On a cluster a replayed insert of the same block must add nothing — not to events, and not through
// the materialized views to daily_usage and usage_quarter_hour: replicated tables remember recent blocks' hashes in ZooKeeper.
// The spool's replay leans on this when a shard committed a segment's rows but the answer was lost.
func TestClusterReplayedBlockIsStoredAndCountedOnce(t *testing.T) {
	if testenv.Cluster() == "" {
		t.Skip("cluster layout only: `make test-cluster` runs it")
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	env := testenv.Migrated(t)
	day := time.Date(2026, 11, 20, 10, 0, 0, 0, time.UTC)
	tenants := []string{uuid.NewString(), uuid.NewString(), uuid.NewString(), uuid.NewString()}
	ids := make([]string, 40)
	for i := range ids {
		ids[i] = uuid.NewString()
	}
	insert := func() {
		b, err := env.CH.PrepareBatch(ctx, "INSERT INTO "+env.DB+".events (tenant_id, ts, id, received_at, event, source, user_id, props, ip, request_id)")
		if err != nil {
			t.Fatal(err)
		}
		for i, id := range ids {
			if err := b.Append(tenants[i%len(tenants)], day, id, day, "auth.user.login", "app", "u", "{}", "", ""); err != nil {
				t.Fatal(err)
			}
		}
		if err := b.Send(); err != nil {
			t.Fatal(err)
		}
	}
	insert()
	insert()
	var rows, counted, slots int64
	if err := env.CH.QueryRow(ctx, "SELECT toInt64(count()) FROM "+env.DB+".events").Scan(&rows); err != nil {
		t.Fatal(err)
	}
	if err := env.CH.QueryRow(ctx, "SELECT sum(count) FROM "+env.DB+".daily_usage").Scan(&counted); err != nil {
		t.Fatal(err)
	}
	if err := env.CH.QueryRow(ctx, "SELECT sum(count) FROM "+env.DB+".usage_quarter_hour").Scan(&slots); err != nil {
		t.Fatal(err)
	}
	if rows != int64(len(ids)) || counted != int64(len(ids)) || slots != int64(len(ids)) {
		t.Errorf("the same block inserted twice: %d rows stored, %d counted by day, %d by quarter hour; want %d each", rows, counted, slots, len(ids))
	}
	var shards uint64
	if err := env.CH.QueryRow(ctx, "SELECT uniqExact(_shard_num) FROM "+env.DB+".events").Scan(&shards); err != nil {
		t.Logf("(cannot read _shard_num on this server: %v)", err)
	} else if shards < 2 {
		t.Errorf("four tenants' rows landed on %d shard(s); the sharding key should spread tenants", shards)
	}
}

// On a cluster the servers' profile must send reads where inserts went. The local cluster's does
// (cluster.sh renders users.xml with in_order); the single stack's says random, which the check
// refuses for a cluster layout (and ignores for one server).
func TestLoadBalancingChecked(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	env := testenv.Migrated(t)
	if err := (schema.Layout{DB: env.DB}).CheckLoadBalancing(ctx, env.CH); err != nil {
		t.Errorf("one server: %v, want no check", err)
	}
	err := (schema.Layout{DB: env.DB, Cluster: "c"}).CheckLoadBalancing(ctx, env.CH)
	switch {
	case testenv.Cluster() != "" && err != nil:
		t.Errorf("the local cluster's profile: %v", err)
	case testenv.Cluster() == "" && (err == nil || !strings.Contains(err.Error(), `"random"`)):
		t.Errorf("the single stack's profile (random) checked as a cluster's: %v, want an error naming random", err)
	}
}

// analyticsd asks each server of a cluster some things itself (Shards), so serve warns at start-up
// about every server it cannot reach that way, naming it and why.
func TestReachabilityChecked(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	env := testenv.Migrated(t)
	dsn := testenv.ClickHouseDSN(t)
	if err := (schema.Layout{DB: env.DB}).CheckReachable(ctx, env.CH); err != nil {
		t.Errorf("one server: %v, want no check", err)
	}
	cluster := testenv.Cluster()
	if cluster == "" {
		// The single stack's server has no cluster c: the check says so instead of passing.
		err := (schema.Layout{DB: env.DB, Cluster: "c", Shards: schema.ShardsOf("c", dsn)}).CheckReachable(ctx, env.CH)
		if err == nil || !strings.Contains(err.Error(), "cluster c has no servers") {
			t.Errorf("a cluster the server does not know: %v, want an error saying so", err)
		}
		return
	}
	servers, err := schema.ClusterServers(ctx, env.CH, cluster)
	if err != nil {
		t.Fatal(err)
	}
	l := schema.Layout{DB: env.DB, Cluster: cluster, Shards: schema.ShardsOf(cluster, dsn)}
	if err := l.CheckReachable(ctx, env.CH); err != nil {
		t.Errorf("every server of the local cluster answers: %v", err)
	}

	cut := servers[len(servers)-1].Addr
	err = (schema.Layout{DB: env.DB, Cluster: cluster, Shards: l.Shards.Wrap(func(addr string, c driver.Conn) driver.Conn {
		if addr == cut {
			return pingFails{c}
		}
		return c
	})}).CheckReachable(ctx, env.CH)
	want := fmt.Sprintf("1 of %d servers", len(servers))
	if err == nil || !strings.Contains(err.Error(), want) || !strings.Contains(err.Error(), cut+" (no route to host (test))") {
		t.Errorf("one server cut off: %v, want %q naming %s and why", err, want, cut)
	}

	// The DSN's credentials are what the checks log in with: a wrong password cuts off every server.
	u, err := url.Parse(dsn)
	if err != nil {
		t.Fatal(err)
	}
	u.User = url.UserPassword(u.User.Username(), "not-the-password")
	err = (schema.Layout{DB: env.DB, Cluster: cluster, Shards: schema.ShardsOf(cluster, u.String())}).CheckReachable(ctx, env.CH)
	if want := fmt.Sprintf("%d of %d servers", len(servers), len(servers)); err == nil || !strings.Contains(err.Error(), want) {
		t.Errorf("a wrong password: %v, want %q", err, want)
	}
}

// pingFails is a connection whose server seems out of reach.
type pingFails struct{ driver.Conn }

func (pingFails) Ping(context.Context) error { return errors.New("no route to host (test)") }
