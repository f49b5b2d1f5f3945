package schema

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"net"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/ClickHouse/clickhouse-go/v2"
	"github.com/ClickHouse/clickhouse-go/v2/lib/driver"

	"github.com/analyticsd/analyticsd/internal/excerpt"
)

// Shards reaches the servers of a cluster directly, over connections of its own with the DSN's
// credentials. Servers connects to every server, for what must be asked of each one itself (its
// running queries, its mutations). Exec sends a statement to one replica of each shard: what
// ALTER … ON CLUSTER does for a replicated table (the replica that runs it writes the change to the
// shard's replication log, and the shard's other replicas apply it from there, now or when they
// come back), without the servers' distributed-DDL worker.
//
// Exec exists for servers whose worker cannot be trusted with a replicated ALTER (AlterRacesOnCluster):
// on 18.16 the two replicas of a shard race for the task's lock, the loser can take it just after the
// winner released it, run the statement again and then fail to create the task's "executed" node,
// and on that error (ZooKeeper's "Node exists") the worker thread ends for good. Every later
// statement ON CLUSTER then waits on that server until it is restarted. The local cluster lost its
// ch1 worker that way in a run of the storage suites (an erasure's ALTER … DELETE), and CI failed on
// it the same way: 30 tests timing out on CREATE DATABASE … ON CLUSTER.
//
// Statements sent this way must be safe to run twice on a shard (DROP PARTITION, ALTER … DELETE are):
// a replica that fails or times out after running one is followed by the next replica of its shard.
type Shards struct {
	cluster string
	base    clickhouse.Options
	wrap    func(addr string, c driver.Conn) driver.Conn
	// Retry bounds how long a shard whose live replicas refuse a statement for a transient reason is
	// tried again (default 60 s: a killed leader stays the leader for the ZooKeeper session timeout,
	// 30 s by ClickHouse's default, counted from its death, not from the first try).
	Retry time.Duration
}

// NewShards returns a Shards for cluster whose connections take base's options (credentials,
// settings, TLS, timeouts) with each server's own address. base is copied, not kept.
func NewShards(cluster string, base *clickhouse.Options) *Shards {
	b := *base
	b.Addr = nil
	b.Settings = maps.Clone(base.Settings)
	if base.TLS != nil {
		b.TLS = base.TLS.Clone()
	}
	b.MaxOpenConns, b.MaxIdleConns = 1, 1
	if b.DialTimeout == 0 || b.DialTimeout > 5*time.Second {
		b.DialTimeout = 5 * time.Second
	}
	return &Shards{cluster: cluster, base: b, Retry: time.Minute}
}

// Wrap returns a copy of s whose connections pass through w: tests observe or fail the statements
// sent to each shard with the same wrapper they put around the main connection. Nil stays nil.
func (s *Shards) Wrap(w func(addr string, c driver.Conn) driver.Conn) *Shards {
	if s == nil {
		return nil
	}
	c := *s
	c.wrap = w
	return &c
}

// ShardsOf is NewShards for cluster with the options of dsn (a CLICKHOUSE_DSN); nil when cluster is
// empty or dsn does not parse (the configuration's own check reports that).
func ShardsOf(cluster, dsn string) *Shards {
	if cluster == "" {
		return nil
	}
	opts, err := clickhouse.ParseDSN(dsn)
	if err != nil {
		return nil
	}
	opts.Auth.Database = "default"
	return NewShards(cluster, opts)
}

// AlterRacesOnCluster reports whether a server's distributed-DDL worker may stop for good on an
// ALTER … ON CLUSTER of a replicated table (see Shards). Its once-per-shard execution was rewritten
// in 20.8; analyticsd sends such ALTERs through Shards to servers older than that.
func AlterRacesOnCluster(v Version) bool { return !v.AtLeast(20, 8) }

// Server is one server of a cluster as system.clusters lists it: its shard, and host:port as the
// cluster's configuration names it.
type Server struct {
	Shard uint32
	Addr  string
}

// ClusterServers lists cluster's servers as ch's server knows them (its system.clusters): in shard
// order, each shard's replicas in their configured order. Host names lose any quote or comma, so an
// address can go into a remote() table function as it is.
func ClusterServers(ctx context.Context, ch driver.Conn, cluster string) ([]Server, error) {
	rows, err := ch.Query(ctx, "SELECT shard_num, host_name, port FROM system.clusters WHERE cluster = ? ORDER BY shard_num, replica_num", cluster)
	if err != nil {
		return nil, fmt.Errorf("list the servers of cluster %s: %w", cluster, err)
	}
	defer rows.Close()
	var out []Server
	for rows.Next() {
		var sv Server
		var host string
		var port uint16
		if err := rows.Scan(&sv.Shard, &host, &port); err != nil {
			return nil, fmt.Errorf("list the servers of cluster %s: %w", cluster, err)
		}
		sv.Addr = net.JoinHostPort(strings.NewReplacer("'", "", ",", "", "\\", "").Replace(host), strconv.Itoa(int(port)))
		out = append(out, sv)
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("list the servers of cluster %s: %w", cluster, err)
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("cluster %s has no servers in system.clusters", cluster)
	}
	return out, nil
}

// Exec runs query with args on one replica of every shard of the cluster (as system.clusters on via
// lists them, by the host names its configuration gives): on the first replica of the shard that
// answers, then on the next if it fails. It returns the servers found down: their shard ran the
// statement on another replica, and they apply it from the replication log when they return. It goes
// through every shard, and fails naming each shard where no replica took the statement (a shard whose
// every replica is down, or that refused it).
func (s *Shards) Exec(ctx context.Context, via driver.Conn, query string, args ...any) (down []string, err error) {
	all, err := ClusterServers(ctx, via, s.cluster)
	if err != nil {
		return nil, err
	}
	var errs []error
	for i := 0; i < len(all); {
		j := i
		for j < len(all) && all[j].Shard == all[i].Shard {
			j++
		}
		d, err := s.onShard(ctx, all[i:j], query, args)
		down = append(down, d...)
		errs = append(errs, err)
		i = j
	}
	return down, errors.Join(errs...)
}

// onShard runs query on the first replica of one shard that takes it, and pings the others. A live
// replica may refuse for a while after another one died: 18.16 forwards DROP PARTITION to the shard's
// leader, and a killed leader stays the leader until its ZooKeeper session expires (10 s on the local
// cluster: "Connection refused" from the live replica meanwhile, then "leadership changed"). So while
// a replica answers and refuses for such a reason, the shard is tried again every second, for up to
// Retry.
func (s *Shards) onShard(ctx context.Context, reps []Server, query string, args []any) ([]string, error) {
	deadline := time.Now().Add(s.Retry)
	for {
		var down []string
		var errs []error
		done, again := false, false
		for _, r := range reps {
			if ctx.Err() != nil {
				errs = append(errs, ctx.Err())
				break
			}
			ran, alive, err := s.run(ctx, r.Addr, !done, query, args)
			if !alive {
				down = append(down, r.Addr)
			}
			if err != nil {
				errs = append(errs, fmt.Errorf("%s: %w", r.Addr, err))
				again = again || (alive && transient(err))
			}
			done = done || ran
		}
		if done {
			return down, nil
		}
		err := fmt.Errorf("no replica of shard %d of cluster %s took %q: %w", reps[0].Shard, s.cluster, excerpt.Of(query, 120), errors.Join(errs...))
		if !again || time.Now().After(deadline) {
			return down, err
		}
		select {
		case <-ctx.Done():
			return down, err
		case <-time.After(time.Second):
		}
	}
}

// transient reports a server's refusal that a moment may cure: it could not reach another replica
// (the shard's leader, for DROP PARTITION), or ZooKeeper, or its table is read-only until its
// ZooKeeper session is back.
func transient(err error) bool {
	var ex *clickhouse.Exception
	if !errors.As(err, &ex) {
		return false
	}
	switch ex.Code {
	case 209, 210, 225, 242, 254, 278, 279, 292, 999:
		// SOCKET_TIMEOUT, NETWORK_ERROR, NO_ZOOKEEPER, TABLE_IS_READ_ONLY, NO_ACTIVE_REPLICAS,
		// LEADERSHIP_LOST, ALL_CONNECTION_TRIES_FAILED, LEADERSHIP_CHANGED, KEEPER_EXCEPTION
		return true
	}
	return false
}

// run opens a connection to addr and pings it; if exec, it runs query there. alive reports whether
// the server answered: its ping, and its statement with an answer of its own (an error that is not
// the server's — the connection lost midway — counts as down, though the statement may have run).
func (s *Shards) run(ctx context.Context, addr string, exec bool, query string, args []any) (ran, alive bool, err error) {
	conn, err := s.dial(ctx, addr)
	if err != nil {
		return false, false, err
	}
	defer conn.Close()
	if !exec {
		return false, true, nil
	}
	if err := conn.Exec(ctx, query, args...); err != nil {
		var ex *clickhouse.Exception
		return false, errors.As(err, &ex), err
	}
	return true, true, nil
}

// dial opens a connection to addr (through the wrapper, if any) and pings it.
func (s *Shards) dial(ctx context.Context, addr string) (driver.Conn, error) {
	opts := s.base
	opts.Addr = []string{addr}
	raw, err := clickhouse.Open(&opts)
	if err != nil {
		return nil, err
	}
	conn := raw
	if s.wrap != nil {
		conn = s.wrap(addr, raw)
	}
	pctx, cancel := context.WithTimeout(ctx, opts.DialTimeout)
	err = conn.Ping(pctx)
	cancel()
	if err != nil {
		raw.Close()
		return nil, err
	}
	return conn, nil
}

// Live is a connection to one server of a cluster.
type Live struct {
	Addr string
	driver.Conn
}

// Unreachable is a server of a cluster that Servers could not connect to, and why.
type Unreachable struct {
	Addr string
	Err  error
}

// Gone reports whether the server refused the connection: nothing listens on its port, so no query
// of it is still running. Any other failure (a timeout, a name that does not resolve, TLS, a wrong
// password) says nothing about what the server is doing.
func (u Unreachable) Gone() bool {
	return errors.Is(u.Err, syscall.ECONNREFUSED) || strings.Contains(u.Err.Error(), "connection refused")
}

// Describe lists unreachable servers, each with why: "addr (error); addr (error)".
func Describe(down []Unreachable) string {
	parts := make([]string, len(down))
	for i, u := range down {
		parts[i] = fmt.Sprintf("%s (%v)", u.Addr, u.Err)
	}
	return strings.Join(parts, "; ")
}

// Servers connects to every server of the cluster (as system.clusters on via lists them), all at
// once, for what must be asked of each server itself (its running queries, its mutations) with the
// DSN's credentials (a remote() table function would log in as "default"). A server that cannot be
// reached is left out and listed in down. The caller closes the connections (CloseAll).
func (s *Shards) Servers(ctx context.Context, via driver.Conn) (live []Live, down []Unreachable, err error) {
	all, err := ClusterServers(ctx, via, s.cluster)
	if err != nil {
		return nil, nil, err
	}
	conns, errs := make([]driver.Conn, len(all)), make([]error, len(all))
	var wg sync.WaitGroup
	for i, sv := range all {
		wg.Go(func() { conns[i], errs[i] = s.dial(ctx, sv.Addr) })
	}
	wg.Wait()
	for i, sv := range all {
		if errs[i] != nil {
			down = append(down, Unreachable{sv.Addr, errs[i]})
			continue
		}
		live = append(live, Live{sv.Addr, conns[i]})
	}
	return live, down, nil
}

// CloseAll closes connections Servers opened.
func CloseAll(live []Live) {
	for _, l := range live {
		_ = l.Close()
	}
}

// String names the cluster only: the options hold the DSN's credentials, and a Layout printed with
// %+v prints its Shards.
func (s *Shards) String() string { return "shards of cluster " + s.cluster }
