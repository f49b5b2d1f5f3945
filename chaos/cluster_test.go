//go:build chaos

package chaos

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/ClickHouse/clickhouse-go/v2"
	"github.com/google/uuid"
	"github.com/redis/go-redis/v9"

	"github.com/analyticsd/analyticsd/internal/testenv"
	"github.com/analyticsd/analyticsd/rollup"
)

// cluster runs deploy/local/cluster.sh (stop-node / kill-node / start-node).
func cluster(t *testing.T, args ...string) {
	t.Helper()
	out, err := exec.Command("../deploy/local/cluster.sh", args...).CombinedOutput()
	if err != nil {
		t.Fatalf("cluster.sh %v: %v\n%s", args, err, out)
	}
}

// merge is the acknowledged ids of several loads (one per instance).
func merge(ls ...*load) *load {
	all := &load{other: map[int]int{}}
	for _, l := range ls {
		all.acked = append(all.acked, l.acked...)
		all.refused += l.refused
		for k, v := range l.other {
			all.other[k] += v
		}
	}
	return all
}

// redisNodeOf names the Redis Cluster master (redis1..redis3) that holds the tenant's slot: every
// key of a tenant carries its {tenant} hash tag, so one master holds all of them.
func redisNodeOf(t *testing.T, s *system) string {
	t.Helper()
	cc, ok := s.env.Redis.(*redis.ClusterClient)
	if !ok {
		t.Fatal("not a Redis Cluster client")
	}
	m, err := cc.MasterForKey(context.Background(), "x:{"+s.tenant.String()+"}")
	if err != nil {
		t.Fatal(err)
	}
	_, port, _ := strings.Cut(m.Options().Addr, ":")
	p, _ := strconv.Atoi(port)
	base := 17001
	if v := os.Getenv("CLUSTER_REDIS_PORT"); v != "" {
		base, _ = strconv.Atoi(v)
	}
	return fmt.Sprintf("redis%d", p-base+1)
}

// The cluster's faults, each under load, each accounted: every acknowledged event stored once.
// Runs in `make test-cluster` against the local cluster (deploy/local/cluster.sh).
func TestClusterFaults(t *testing.T) {
	if testenv.Cluster() == "" {
		t.Skip("needs the local cluster: make test-cluster")
	}
	bin := build(t)
	var results []Result
	check := checker(t, &results)
	outage := pick(5*time.Second, 30*time.Second)

	t.Run("replica killed", func(t *testing.T) {
		// ch1: shard 1's first replica, the one inserts and reads go to (load_balancing in_order),
		// and the first address of analyticsd's DSN.
		s := newSystem(t, bin, nil)
		l := s.startLoad(4)
		time.Sleep(time.Second)
		cluster(t, "kill-node", "ch1")
		time.Sleep(outage)
		if resp, err := s.get("/api/analytics/events?limit=5"); err != nil || !strings.Contains(resp, `"success":true`) {
			t.Errorf("read with one replica of a shard down: %v %.300s; want an answer from the other replica", err, resp)
		}
		cluster(t, "start-node", "ch1")
		rec := s.drained(3 * time.Minute)
		l.halt()
		check(s.account("replica killed (ch1, "+outage.String()+")", l, rec))
	})

	t.Run("shard down", func(t *testing.T) {
		s := newSystem(t, bin, nil)
		l := s.startLoad(4)
		time.Sleep(time.Second)
		cluster(t, "kill-node", "ch3")
		cluster(t, "kill-node", "ch4")
		time.Sleep(outage)
		// Ingest keeps acknowledging into the spool; reads refuse whole, naming the cause.
		resp, err := s.get("/api/analytics/usage?metric=apikey.request")
		if err != nil || !strings.Contains(resp, `"shard_unavailable"`) {
			t.Errorf("read with a whole shard down: %v %.300s; want 503 shard_unavailable", err, resp)
		}
		l.mu.Lock()
		acked := len(l.acked)
		l.mu.Unlock()
		cluster(t, "start-node", "ch3")
		cluster(t, "start-node", "ch4")
		rec := s.drained(3 * time.Minute)
		l.halt()
		r := s.account("shard down (ch3+ch4, "+outage.String()+")", l, rec)
		r.Note = strings.TrimSpace(r.Note + fmt.Sprintf(" %d acknowledged while the shard was down", acked))
		check(r)
	})

	t.Run("zookeeper down", func(t *testing.T) {
		s := newSystem(t, bin, nil)
		l := s.startLoad(4)
		time.Sleep(time.Second)
		cluster(t, "kill-node", "zookeeper")
		time.Sleep(outage)
		cluster(t, "start-node", "zookeeper")
		rec := s.drained(3 * time.Minute)
		l.halt()
		check(s.account("zookeeper down ("+outage.String()+")", l, rec))
	})

	t.Run("redis cluster node down", func(t *testing.T) {
		s := newSystem(t, bin, nil)
		node := redisNodeOf(t, s)
		// A second instance for a tenant whose slot another master holds: it must not notice.
		var other *system
		for range 8 {
			if o := newSystem(t, bin, nil); redisNodeOf(t, o) != node {
				other = o
				break
			}
		}
		if other == nil {
			t.Fatal("no tenant on another master in 8 tries")
		}
		l, lo := s.startLoad(4), other.startLoad(1)
		time.Sleep(time.Second)
		cluster(t, "kill-node", node)
		time.Sleep(pick(3*time.Second, 15*time.Second))
		if resp, err := s.get("/api/analytics/quotas/api_requests_daily"); err != nil || !strings.Contains(resp, `"degraded":true`) {
			t.Errorf("quota with the tenant's Redis master down: %v %.300s, want degraded", err, resp)
		}
		// The other master's tenant keeps shipping while the node is still down (one master's outage
		// used to stop every tenant's claims and shipping).
		lo.mu.Lock()
		ackedOther := len(lo.acked)
		lo.mu.Unlock()
		deadline := time.Now().Add(10 * time.Second)
		for {
			var n uint64
			_ = other.env.CH.QueryRow(context.Background(), "SELECT count() FROM "+other.env.DB+".events WHERE tenant_id = ?", other.tenant).Scan(&n)
			if n >= uint64(ackedOther) {
				break
			}
			if time.Now().After(deadline) {
				var ready string
				if resp, err := http.Get(other.ops + "/readiness"); err == nil {
					b, _ := io.ReadAll(resp.Body)
					resp.Body.Close()
					ready = string(b)
				}
				t.Errorf("a tenant on a healthy master: %d of %d acknowledged events stored 10 s into another master's outage; its instance: %.800s", n, ackedOther, ready)
				break
			}
			time.Sleep(200 * time.Millisecond)
		}
		lo.halt()
		cluster(t, "start-node", node)
		start := time.Now()
		rec := s.drained(time.Minute)
		l.halt()
		r := s.account("redis cluster master down ("+node+")", l, rec)
		s.quotaHealed(t, "the Redis master came back empty") // the counter heals from ClickHouse
		r.RecoverS = time.Since(start).Round(10 * time.Millisecond).Seconds()
		check(r)
	})

	t.Run("one of two API instances kill -9", func(t *testing.T) {
		a := newSystem(t, bin, nil)
		b := a.sibling(t)
		la, lb := a.startLoad(2), b.startLoad(2)
		time.Sleep(time.Duration(800+time.Now().UnixNano()%700) * time.Millisecond)
		a.kill9()
		la.halt()
		time.Sleep(time.Second)
		lb.halt()
		a.start() // the same spool directory: what it acknowledged and had not shipped ships now
		start := time.Now()
		a.drained(3 * time.Minute)
		b.drained(3 * time.Minute)
		check(a.account("one of two instances kill -9", merge(la, lb), time.Since(start)))
	})

	t.Run("retention sweep with a replica down", func(t *testing.T) {
		// A drop ON CLUSTER waits for every replica; with one down it used to wait the server's
		// distributed_ddl_task_timeout (180 s) per partition and then fail the sweep. Now it drops
		// on the others, leaves the drop queued for the missing replica, and goes on.
		env := testenv.Migrated(t)
		ctx := context.Background()
		old := time.Now().UTC().AddDate(0, 0, -100).Truncate(24 * time.Hour).Add(12 * time.Hour)
		var rows [][]any
		for range 8 { // tenants spread over both shards
			rows = append(rows, []any{uuid.New(), old, uuid.New(), old, "auth.user.login", "app", "u", "{}", "", ""})
		}
		env.Insert(t, "events", "tenant_id, ts, id, received_at, event, source, user_id, props, ip, request_id", rows...)
		base := 19101
		if v := os.Getenv("CLUSTER_CH_PORT"); v != "" {
			base, _ = strconv.Atoi(v)
		}
		ch4 := "127.0.0.1:" + strconv.Itoa(base+3)
		oldRows := func() (uint64, error) {
			var n uint64
			err := env.CH.QueryRow(ctx, "SELECT count() FROM remote('"+ch4+"', "+env.DB+", events_local) WHERE ts < ?", old.Add(time.Hour)).Scan(&n)
			return n, err
		}
		direct, err := clickhouse.Open(&clickhouse.Options{Addr: []string{ch4}})
		if err != nil {
			t.Fatal(err)
		}
		defer direct.Close()
		// ch4 fetches the part from the replica the insert went to, a moment later — or, after the
		// ZooKeeper fault above, once its tables have a session again (their replicas sat read-only
		// past 30 s in one CI run): ask it to catch up.
		testenv.Eventually(t, 90*time.Second, func() error {
			sctx, cancel := context.WithTimeout(ctx, 10*time.Second)
			defer cancel()
			_ = direct.Exec(sctx, "SYSTEM SYNC REPLICA "+env.DB+".events_local")
			if n, err := oldRows(); err != nil || n == 0 {
				return fmt.Errorf("ch4 holds %d expired rows (%v); want some, for the sweep to have something to queue there", n, err)
			}
			return nil
		})
		cluster(t, "kill-node", "ch4")
		sw := rollup.NewSweeper(env.CH, env.Layout(), env.PG, nil, nil, nil, 90, nil)
		sw.DDLWait = 5 * time.Second
		start := time.Now()
		res, err := sw.Sweep(ctx)
		took := time.Since(start)
		cluster(t, "start-node", "ch4")
		if err != nil || len(res.Dropped["events"]) == 0 || len(res.Queued["events"]) == 0 {
			t.Fatalf("sweep with ch4 down: %+v, %v; want the expired events partition dropped and queued for ch4", res, err)
		}
		if took > time.Minute {
			t.Errorf("the sweep took %s with a replica down; want about DDLWait per table (ON CLUSTER), or the shard's leader election once (schema.Shards, 18.16)", took)
		}
		// Whether ch4 drops the partition once back is ClickHouse's replication, not the sweeper's:
		// on 18.16 here it did within seconds in 5 runs of 7, but in 2 it still held the rows two
		// minutes later, its replication queue synced (SYSTEM SYNC REPLICA). Recorded, not asserted
		// (RELIABILITY.md, "On a cluster").
		testenv.Eventually(t, 3*time.Minute, func() error {
			for _, table := range []string{"events_local", "usage_quarter_hour_local"} {
				if err := direct.Exec(ctx, "SYSTEM SYNC REPLICA "+env.DB+"."+table); err != nil {
					return fmt.Errorf("sync %s on ch4: %w", table, err)
				}
			}
			return nil
		})
		left, _ := oldRows()
		t.Logf("sweep with ch4 down took %s; dropped %v, queued %v; expired rows ch4 still holds once back and synced: %d",
			took.Round(time.Millisecond), res.Dropped, res.Queued, left)
	})

	os.MkdirAll("../test-output", 0o755)
	out, _ := json.MarshalIndent(results, "", "  ")
	mode := "short"
	if *long {
		mode = "long"
	}
	os.WriteFile("../test-output/chaos-cluster-"+mode+".json", out, 0o644)
}
