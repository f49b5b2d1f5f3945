package schema

import (
	"context"
	"fmt"

	"github.com/ClickHouse/clickhouse-go/v2/lib/driver"
)

// Layout says where analyticsd's ClickHouse tables live: one server (Cluster empty), or a cluster on
// which every table the code reads is a Distributed table over a replicated "<name>_local" table on
// each shard (CLICKHOUSE_CLUSTER). Reads and inserts always name the Distributed table (Table);
// statements that change stored data in place — DROP PARTITION, mutations, TTL — must name the local
// table on every shard (Local + OnCluster), because a Distributed table stores nothing itself.
type Layout struct {
	DB      string
	Cluster string
	// Shards, on a cluster, reaches each server directly: AlterLocal sends through it the ALTERs that
	// a server's distributed-DDL worker cannot be trusted with (nil: they go ON CLUSTER), and the
	// erasure asks each server through it whether its delete is done.
	Shards *Shards
}

// Clustered reports whether the tables are spread over a cluster.
func (l Layout) Clustered() bool { return l.Cluster != "" }

// Table is the fully qualified name reads and inserts use: db.name on both layouts.
func (l Layout) Table(name string) string { return l.DB + "." + name }

// Local is the fully qualified name of the table that stores name's rows: db.name on one server,
// db.name_local (one per shard replica) on a cluster.
func (l Layout) Local(name string) string {
	return l.DB + "." + l.LocalName(name)
}

// LocalName is Local without the database: name or name_local.
func (l Layout) LocalName(name string) string {
	if l.Clustered() {
		return name + "_local"
	}
	return name
}

// OnCluster is the " ON CLUSTER name" clause DDL, ALTER … DELETE and DROP PARTITION need on a
// cluster, and "" on one server. Cluster is checked by ValidIdent when the configuration is read.
func (l Layout) OnCluster() string {
	if l.Clustered() {
		return " ON CLUSTER " + l.Cluster
	}
	return ""
}

// AlterLocal runs "ALTER TABLE <table's local table> <command>" wherever table's rows are stored: on
// one server, there; on a cluster, on every shard — ON CLUSTER (ctx's settings, such as
// distributed_ddl_task_timeout, apply), or, for a server whose distributed-DDL worker races on
// replicated ALTERs (AlterRacesOnCluster) when l.Shards is set, once per shard through Shards. down
// lists the servers Shards found down: they apply the change from their shard's replication log when
// they return. command must be safe to run twice (see Shards).
func (l Layout) AlterLocal(ctx context.Context, ch driver.Conn, table, command string, args ...any) (down []string, err error) {
	stmt := "ALTER TABLE " + l.Local(table)
	if l.Clustered() && l.Shards != nil {
		// Without the version, ON CLUSTER could be the statement that stops an old server's worker:
		// fail instead (the caller tries again later).
		v, err := ServerVersion(ch)
		if err != nil {
			return nil, err
		}
		if AlterRacesOnCluster(v) {
			return l.Shards.Exec(ctx, ch, stmt+" "+command, args...)
		}
	}
	return nil, ch.Exec(ctx, stmt+l.OnCluster()+" "+command, args...)
}

// ConnSettings are the settings every connection to the layout's servers needs. Nil on one server;
// on a cluster:
//
//   - insert_distributed_sync: an insert into a Distributed table returns only when every shard has
//     committed its rows (without it the server queues them on its own disk and answers at once,
//     and a spool segment would leave the spool before its rows are on their shards);
//   - max_replica_delay_for_distributed_queries = 1 s: a read skips a replica more than a second
//     behind when another replica of its shard is current (the default, 300 s, let a replica that
//     had just restarted answer without the rows inserted while it was down: the fault suite counted
//     8,100 of 54,900 acknowledged events missing right after a replica came back); with every
//     replica behind it still answers (fallback_to_stale_replicas_for_distributed_queries).
func (l Layout) ConnSettings() map[string]any {
	if !l.Clustered() {
		return nil
	}
	return map[string]any{"insert_distributed_sync": 1, "max_replica_delay_for_distributed_queries": 1}
}

// CheckLoadBalancing reads the servers' load_balancing (a string setting, which clickhouse-go cannot
// send to 18.16, so it must come from the server's profile) and says what is wrong with it on a
// cluster: the spool's replay check reads back through the Distributed table what it inserted, and
// only in_order (or first_or_random) sends that read to the replica the insert went to while it is up;
// with random it may ask the other replica before it fetched the part, and the check then rests on the
// replicated tables' own deduplication, which remembers only the last 100 blocks.
func (l Layout) CheckLoadBalancing(ctx context.Context, ch driver.Conn) error {
	if !l.Clustered() {
		return nil
	}
	var v string
	if err := ch.QueryRow(ctx, "SELECT value FROM system.settings WHERE name = 'load_balancing'").Scan(&v); err != nil {
		return fmt.Errorf("read load_balancing: %w", err)
	}
	if v != "in_order" && v != "first_or_random" {
		return fmt.Errorf("the ClickHouse profile's load_balancing is %q; on a cluster analyticsd needs in_order (set it in the servers' users.xml profile): reads after inserts may otherwise reach a replica that has not fetched them yet", v)
	}
	return nil
}

// CheckReachable connects to every server of the cluster as analyticsd's own per-server checks do
// (Shards: the host names and ports of the cluster's configuration, the DSN's credentials) and
// reports those it cannot reach, each with why. A server listed under a name that resolves only
// inside the ClickHouse servers' network is the usual cause; while it lasts, an erasure does not
// finish, a retried spool segment whose earlier attempt may still run there waits, and (before 20.8)
// a replicated ALTER goes to another replica of the shard or fails. Nil on one server or without
// Shards.
func (l Layout) CheckReachable(ctx context.Context, ch driver.Conn) error {
	if !l.Clustered() || l.Shards == nil {
		return nil
	}
	live, down, err := l.Shards.Servers(ctx, ch)
	CloseAll(live)
	if err != nil {
		return err
	}
	if len(down) == 0 {
		return nil
	}
	return fmt.Errorf("%d of %d servers of cluster %s cannot be reached from analyticsd by the address system.clusters gives, with the DSN's credentials: %s. "+
		"Until they can, erasures do not finish and a retried spool segment may wait; make those names resolve here (docs/deploy-cluster.md)",
		len(down), len(down)+len(live), l.Cluster, Describe(down))
}

// SkipUnusedShards reports whether the server prunes a Distributed read to the shards the sharding
// key can hold (optimize_skip_unused_shards), given a WHERE with tenant_id = constant: every
// tenant-scoped read then asks one shard instead of all. 18.16 lacks the setting (it fails the
// query); 22.3 LTS evaluates expression keys such as cityHash64(toString(tenant_id)).
func SkipUnusedShards(v Version) bool { return v.AtLeast(22, 3) }

// ConnSettingsFor is ConnSettings for a server of version v: on a cluster of servers that prune
// shards, with optimize_skip_unused_shards too.
func (l Layout) ConnSettingsFor(v Version) map[string]any {
	s := l.ConnSettings()
	if s != nil && SkipUnusedShards(v) {
		s["optimize_skip_unused_shards"] = 1
	}
	return s
}

// Check validates the names a Layout puts into SQL unquoted.
func (l Layout) Check() error {
	if !ValidIdent(l.DB) {
		return fmt.Errorf("clickhouse database name %q is not a plain identifier", l.DB)
	}
	if l.Cluster != "" && !ValidIdent(l.Cluster) {
		return fmt.Errorf("CLICKHOUSE_CLUSTER %q is not a plain identifier (letters, digits, underscore)", l.Cluster)
	}
	return nil
}
