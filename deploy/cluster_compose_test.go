package deploy_test

// Checks of docker-compose.cluster.yml (ClickHouse cluster, Keeper, Redis Cluster, two API
// instances) and the ClickHouse and Keeper files it mounts, read by the Compose loader the way
// `docker compose -f docker-compose.cluster.yml` reads them. The checks return their findings
// instead of failing the test directly, so TestClusterComposeCatchesMistakes can run them on
// broken copies and prove each one fails.

import (
	"bytes"
	"context"
	"encoding/xml"
	"fmt"
	"maps"
	"net"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"
	"testing"

	"github.com/ClickHouse/clickhouse-go/v2"
	"github.com/compose-spec/compose-go/v2/cli"
	"github.com/compose-spec/compose-go/v2/types"
	"github.com/redis/go-redis/v9"
	"go.yaml.in/yaml/v3"
)

const clusterComposeFile = "../docker-compose.cluster.yml"

// clusterVars are the variables cluster mode adds to analyticsd's configuration (issue 19), which
// both the compose file and the Kubernetes manifests set: CLICKHOUSE_CLUSTER names the ClickHouse
// cluster, REDIS_CLUSTER=true makes REDIS_URL a Redis Cluster URL.
var clusterVars = []string{"CLICKHOUSE_CLUSTER", "REDIS_CLUSTER"}

// loadClusterCompose reads file (docker-compose.cluster.yml or a broken copy of it) with exactly
// env as the shell environment and no .env; relative paths resolve against the repository root.
func loadClusterCompose(t *testing.T, file string, env map[string]string) (*types.Project, error) {
	t.Helper()
	var list []string
	for k, v := range env {
		list = append(list, k+"="+v)
	}
	o, err := cli.NewProjectOptions([]string{file}, cli.WithWorkingDirectory(root), cli.WithEnv(list))
	if err != nil {
		t.Fatal(err)
	}
	return o.LoadProject(context.Background())
}

// fileReader reads the host files a compose file mounts; tests swap some for broken copies.
type fileReader func(path string) ([]byte, error)

func diskFiles(overrides map[string][]byte) fileReader {
	return func(path string) ([]byte, error) {
		if b, ok := overrides[path]; ok {
			return b, nil
		}
		return os.ReadFile(path)
	}
}

// xnode is any XML element, for configs whose element names are data (a cluster's name in
// <remote_servers>, a profile's name).
type xnode struct {
	XMLName xml.Name
	Attrs   []xml.Attr `xml:",any,attr"`
	Text    string     `xml:",chardata"`
	Kids    []xnode    `xml:",any"`
}

// all returns the elements at path below n (each step one child name).
func (n xnode) all(path ...string) []xnode {
	cur := []xnode{n}
	for _, step := range path {
		var next []xnode
		for _, c := range cur {
			for _, k := range c.Kids {
				if k.XMLName.Local == step {
					next = append(next, k)
				}
			}
		}
		cur = next
	}
	return cur
}

// text is the trimmed text of the last element at path, and whether there is one.
func (n xnode) text(path ...string) (string, bool) {
	els := n.all(path...)
	if len(els) == 0 {
		return "", false
	}
	return strings.TrimSpace(els[len(els)-1].Text), true
}

func (n xnode) attr(name string) string {
	for _, a := range n.Attrs {
		if a.Name.Local == name {
			return a.Value
		}
	}
	return ""
}

func parseXML(raw []byte) (xnode, error) {
	var n xnode
	err := xml.Unmarshal(raw, &n)
	return n, err
}

// problems collects what a check found wrong.
type problems []string

func (p *problems) add(format string, args ...any) { *p = append(*p, fmt.Sprintf(format, args...)) }

// mountedFiles returns the host files a service bind-mounts, by their path in the container.
func mountedFiles(s types.ServiceConfig) map[string]string {
	out := map[string]string{}
	for _, v := range s.Volumes {
		if v.Type == types.VolumeTypeBind {
			out[v.Target] = v.Source
		}
	}
	return out
}

// serverConfig is one ClickHouse server's config.d or users.d files, parsed, in the order the
// server merges them (file name), so a lookup can take the last file that sets a value.
type serverConfig []xnode

func (c serverConfig) text(path ...string) (string, bool) {
	val, found := "", false
	for _, f := range c {
		if v, ok := f.text(path...); ok {
			val, found = v, true
		}
	}
	return val, found
}

func (c serverConfig) all(path ...string) []xnode {
	var out []xnode
	for _, f := range c {
		out = append(out, f.all(path...)...)
	}
	return out
}

// readDir parses the files a server mounts under dir (config.d or users.d).
func readDir(s types.ServiceConfig, dir string, read fileReader, bad *problems) serverConfig {
	files := mountedFiles(s)
	var targets []string
	for target := range files {
		if filepath.Dir(target) == dir && strings.HasSuffix(target, ".xml") {
			targets = append(targets, target)
		}
	}
	sort.Strings(targets)
	var out serverConfig
	for _, target := range targets {
		raw, err := read(files[target])
		if err != nil {
			bad.add("%s: mounted %s: %v", s.Name, target, err)
			continue
		}
		n, err := parseXML(raw)
		if err != nil {
			bad.add("%s: %s is not XML: %v", s.Name, files[target], err)
			continue
		}
		out = append(out, n)
	}
	return out
}

// roles sorts a cluster compose project's services by what they run.
type roles struct {
	keepers, servers, redisNodes, apis []types.ServiceConfig
	migrate                            *types.ServiceConfig
	redisInit                          *types.ServiceConfig
}

func clusterRoles(p *types.Project) roles {
	var r roles
	names := slices.Sorted(maps.Keys(p.Services))
	for _, name := range names {
		s := p.Services[name]
		switch {
		case strings.HasPrefix(s.Image, "clickhouse/clickhouse-keeper:"):
			r.keepers = append(r.keepers, s)
		case strings.HasPrefix(s.Image, "clickhouse/clickhouse-server:"):
			r.servers = append(r.servers, s)
		case strings.HasPrefix(s.Image, "redis:") && slices.Contains(s.Command, "--cluster-enabled"):
			r.redisNodes = append(r.redisNodes, s)
		case strings.HasPrefix(s.Image, "redis:"):
			r.redisInit = &s
		case s.Build != nil && slices.Equal(s.Command, []string{"serve"}):
			r.apis = append(r.apis, s)
		case s.Build != nil && slices.Equal(s.Command, []string{"migrate"}):
			r.migrate = &s
		}
	}
	return r
}

func envOf(s types.ServiceConfig, key string) (string, bool) {
	v := s.Environment[key]
	if v == nil {
		return "", false
	}
	return *v, true
}

// checkClusterCompose is every wiring check of the cluster compose file.
func checkClusterCompose(p *types.Project, read fileReader, known map[string]bool) problems {
	var bad problems
	r := clusterRoles(p)
	if len(r.keepers) != 3 || len(r.servers) != 4 || len(r.redisNodes) != 3 || len(r.apis) < 2 || r.migrate == nil || r.redisInit == nil {
		bad.add("want 3 Keepers, 4 ClickHouse servers, 3 Redis Cluster nodes, a redis init, migrate and at least 2 API instances; got %d, %d, %d, %v, %v, %d",
			len(r.keepers), len(r.servers), len(r.redisNodes), r.redisInit != nil, r.migrate != nil, len(r.apis))
		return bad
	}
	checkSpools(p, r, &bad)
	cluster := checkClickHouseCluster(r, read, &bad)
	checkKeepers(r, read, &bad)
	checkAnalyticsdEnv(r, cluster, known, &bad)
	checkClusterOrder(r, &bad)
	checkClusterImages(p, r, &bad)
	checkClusterPorts(p, &bad)
	checkClusterPrometheus(p, r, &bad)
	return bad
}

// Every API instance keeps its spool on a named volume of its own at ANALYTICS_SPOOL_DIR, and no
// other service mounts it: the spool is flock'd by the instance that owns it, so a shared volume
// would stop the second instance from starting, and a spool outside a volume is lost with the
// container.
func checkSpools(p *types.Project, r roles, bad *problems) {
	owner := map[string]string{}
	for _, s := range r.apis {
		dir, ok := envOf(s, "ANALYTICS_SPOOL_DIR")
		if !ok || dir == "" {
			bad.add("%s: ANALYTICS_SPOOL_DIR is not set", s.Name)
			continue
		}
		var vol *types.ServiceVolumeConfig
		for i, v := range s.Volumes {
			if v.Target == dir {
				vol = &s.Volumes[i]
			}
		}
		switch {
		case vol == nil:
			bad.add("%s: no volume at its spool %s: acknowledged events would die with the container", s.Name, dir)
		case vol.Type != types.VolumeTypeVolume || vol.Source == "":
			bad.add("%s: spool %s is a %s mount, want a named volume", s.Name, dir, vol.Type)
		case vol.ReadOnly:
			bad.add("%s: spool volume %s is read-only", s.Name, vol.Source)
		case owner[vol.Source] != "":
			bad.add("%s and %s share the spool volume %s; each instance needs its own (the spool is locked by its owner)", owner[vol.Source], s.Name, vol.Source)
		default:
			owner[vol.Source] = s.Name
		}
	}
	for _, s := range p.Services {
		for _, v := range s.Volumes {
			if o := owner[v.Source]; v.Type == types.VolumeTypeVolume && o != "" && o != s.Name {
				bad.add("%s mounts %s's spool volume %s", s.Name, o, v.Source)
			}
		}
	}
}

type macro struct{ shard, replica string }

// checkClickHouseCluster checks the servers' mounted config and returns the cluster's name (the
// single cluster in <remote_servers>).
func checkClickHouseCluster(r roles, read fileReader, bad *problems) string {
	const confD, usersD = "/etc/clickhouse-server/config.d", "/etc/clickhouse-server/users.d"
	keeperAddrs := map[string]bool{}
	for _, k := range r.keepers {
		keeperAddrs[net.JoinHostPort(hostOf(k), "9181")] = true
	}
	macros := map[macro]string{}
	byShard := map[string][]string{}
	var clusterName string
	var clusterShards [][]string
	for i, s := range r.servers {
		conf := readDir(s, confD, read, bad)
		users := readDir(s, usersD, read, bad)

		// What differs per server.
		m := macro{}
		m.shard, _ = conf.text("macros", "shard")
		m.replica, _ = conf.text("macros", "replica")
		if m.shard == "" || m.replica == "" {
			bad.add("%s: no <macros> with <shard> and <replica>", s.Name)
		} else if other, dup := macros[m]; dup {
			bad.add("%s and %s have the same macros shard=%s replica=%s: they would write the same replica in Keeper", other, s.Name, m.shard, m.replica)
		} else {
			macros[m] = s.Name
			byShard[m.shard] = append(byShard[m.shard], hostOf(s))
		}
		if h, _ := conf.text("interserver_http_host"); h != hostOf(s) {
			bad.add("%s: interserver_http_host %q, want its host name %q (replicas fetch parts from it)", s.Name, h, hostOf(s))
		}

		// What every server must agree on.
		clusters := conf.all("remote_servers")
		var names []string
		for _, rs := range clusters {
			for _, c := range rs.Kids {
				names = append(names, c.XMLName.Local)
			}
		}
		if len(names) != 1 {
			bad.add("%s: <remote_servers> defines clusters %v, want exactly one", s.Name, names)
			continue
		}
		if len(clusters) > 0 && clusters[len(clusters)-1].attr("replace") == "" {
			bad.add("%s: <remote_servers> without replace=\"replace\" keeps the image's sample clusters", s.Name)
		}
		var shards [][]string
		for _, sh := range clusters[len(clusters)-1].Kids[0].all("shard") {
			if v, _ := sh.text("internal_replication"); v != "true" {
				bad.add("%s: a shard of %s has internal_replication %q, want true (the replicated table copies each block)", s.Name, names[0], v)
			}
			var hosts []string
			for _, rep := range sh.all("replica") {
				h, _ := rep.text("host")
				port, _ := rep.text("port")
				if port != "9000" {
					bad.add("%s: replica %s on port %q, want the native port 9000", s.Name, h, port)
				}
				hosts = append(hosts, h)
			}
			slices.Sort(hosts)
			shards = append(shards, hosts)
		}
		if i == 0 {
			clusterName, clusterShards = names[0], shards
		} else if names[0] != clusterName || !slices.EqualFunc(shards, clusterShards, slices.Equal) {
			bad.add("%s: cluster %s %v differs from %s's %s %v", s.Name, names[0], shards, r.servers[0].Name, clusterName, clusterShards)
		}

		zk := map[string]bool{}
		for _, node := range conf.all("zookeeper", "node") {
			h, _ := node.text("host")
			port, _ := node.text("port")
			zk[net.JoinHostPort(h, port)] = true
		}
		if !maps.Equal(zk, keeperAddrs) {
			bad.add("%s: <zookeeper> nodes %v, want the Keeper services %v", s.Name, slices.Sorted(maps.Keys(zk)), slices.Sorted(maps.Keys(keeperAddrs)))
		}
		if path, _ := conf.text("distributed_ddl", "path"); path == "" {
			bad.add("%s: no <distributed_ddl><path>: ON CLUSTER DDL has no task queue", s.Name)
		}

		if lb, _ := users.text("profiles", "default", "load_balancing"); lb != "in_order" {
			bad.add("%s: the default profile's load_balancing is %q, want in_order", s.Name, lb)
		}
		if len(users.all("users", "analytics_ro")) == 0 {
			bad.add("%s: no read-only user analytics_ro (Grafana's data source logs in as it)", s.Name)
		} else if ro, _ := users.text("profiles", "analytics_ro", "readonly"); ro != "1" {
			bad.add("%s: analytics_ro's profile has readonly %q, want 1", s.Name, ro)
		}
		if pw := users.all("users", "analytics_ro", "password"); len(pw) == 0 || pw[len(pw)-1].attr("from_env") != "CLICKHOUSE_RO_PASSWORD" {
			bad.add("%s: analytics_ro's password must come from_env CLICKHOUSE_RO_PASSWORD", s.Name)
		} else if v, ok := envOf(s, "CLICKHOUSE_RO_PASSWORD"); !ok || v == "" {
			bad.add("%s: CLICKHOUSE_RO_PASSWORD is not in the server's environment", s.Name)
		}
	}

	// Two shards of two replicas, and each shard of remote_servers is exactly the servers whose
	// macros name that shard: otherwise a Distributed read would miss or double rows.
	if len(byShard) != 2 {
		bad.add("macros name shards %v, want 2", slices.Sorted(maps.Keys(byShard)))
	}
	var fromMacros [][]string
	for _, shard := range slices.Sorted(maps.Keys(byShard)) {
		hosts := byShard[shard]
		if len(hosts) != 2 {
			bad.add("shard %s has replicas %v, want 2", shard, hosts)
		}
		slices.Sort(hosts)
		fromMacros = append(fromMacros, hosts)
	}
	sortShards := func(s [][]string) [][]string {
		s = slices.Clone(s)
		slices.SortFunc(s, func(a, b []string) int { return strings.Compare(strings.Join(a, ","), strings.Join(b, ",")) })
		return s
	}
	if clusterName != "" && !slices.EqualFunc(sortShards(clusterShards), sortShards(fromMacros), slices.Equal) {
		bad.add("remote_servers' shards %v do not match the servers' macros %v", clusterShards, fromMacros)
	}
	return clusterName
}

// isTrue is analyticsd's reading of a boolean variable (strconv.ParseBool).
func isTrue(v string) bool {
	b, err := strconv.ParseBool(strings.TrimSpace(v))
	return err == nil && b
}

func hostOf(s types.ServiceConfig) string {
	if s.Hostname != "" {
		return s.Hostname
	}
	return s.Name
}

// Each Keeper's id (KEEPER_SERVER_ID, which keeper.xml reads with from_env) is unique and is the
// id keeper.xml's Raft configuration gives that Keeper's host name.
func checkKeepers(r roles, read fileReader, bad *problems) {
	seen := map[string]string{}
	for _, k := range r.keepers {
		id, _ := envOf(k, "KEEPER_SERVER_ID")
		if id == "" {
			bad.add("%s: KEEPER_SERVER_ID is not set", k.Name)
			continue
		}
		if other, dup := seen[id]; dup {
			bad.add("%s and %s both have Keeper id %s", other, k.Name, id)
		}
		seen[id] = k.Name

		src := mountedFiles(k)["/etc/clickhouse-keeper/keeper_config.xml"]
		raw, err := read(src)
		if err != nil {
			bad.add("%s: keeper_config.xml: %v", k.Name, err)
			continue
		}
		conf, err := parseXML(raw)
		if err != nil {
			bad.add("%s: %s is not XML: %v", k.Name, src, err)
			continue
		}
		if sid := conf.all("keeper_server", "server_id"); len(sid) != 1 || sid[0].attr("from_env") != "KEEPER_SERVER_ID" {
			bad.add("%s: keeper_server/server_id must be read from_env KEEPER_SERVER_ID", k.Name)
		}
		if port, _ := conf.text("keeper_server", "tcp_port"); port != "9181" {
			bad.add("%s: Keeper client port %q, want 9181 (the servers' <zookeeper> port)", k.Name, port)
		}
		raft := map[string]string{}
		for _, srv := range conf.all("keeper_server", "raft_configuration", "server") {
			sid, _ := srv.text("id")
			host, _ := srv.text("hostname")
			raft[sid] = host
		}
		if len(raft) != len(r.keepers) {
			bad.add("%s: the Raft configuration has %d servers, compose runs %d Keepers", k.Name, len(raft), len(r.keepers))
		}
		if raft[id] != hostOf(k) {
			bad.add("%s: Keeper id %s is %q in the Raft configuration, want its host name %q", k.Name, id, raft[id], hostOf(k))
		}
	}
}

// The API instances and migrate run with one configuration that points at the cluster:
// CLICKHOUSE_CLUSTER is remote_servers' cluster, the DSN lists every server, REDIS_URL every
// Redis Cluster node, and every variable they get is one analyticsd reads.
func checkAnalyticsdEnv(r roles, cluster string, known map[string]bool, bad *problems) {
	first := *r.migrate
	for _, s := range r.apis {
		if !mapsEqual(s.Environment, first.Environment) {
			bad.add("%s and %s have different environments; every instance and migrate must run with the same configuration", s.Name, first.Name)
		}
	}
	for _, s := range append([]types.ServiceConfig{first}, r.apis...) {
		if got, _ := envOf(s, "CLICKHOUSE_CLUSTER"); got != cluster {
			bad.add("%s: CLICKHOUSE_CLUSTER=%q, want %q, the cluster in remote_servers", s.Name, got, cluster)
		}
		if v, _ := envOf(s, "REDIS_CLUSTER"); !isTrue(v) {
			bad.add("%s: REDIS_CLUSTER=%q, want true", s.Name, v)
		}

		dsn, _ := envOf(s, "CLICKHOUSE_DSN")
		var want []string
		for _, srv := range r.servers {
			want = append(want, net.JoinHostPort(hostOf(srv), "9000"))
		}
		if opts, err := clickhouse.ParseDSN(dsn); err != nil {
			bad.add("%s: CLICKHOUSE_DSN %q: %v", s.Name, dsn, err)
		} else if got := slices.Sorted(slices.Values(opts.Addr)); !slices.Equal(got, want) {
			bad.add("%s: CLICKHOUSE_DSN lists %v, want every server %v", s.Name, got, want)
		}

		url, _ := envOf(s, "REDIS_URL")
		want = want[:0]
		for _, n := range r.redisNodes {
			want = append(want, net.JoinHostPort(hostOf(n), "6379"))
		}
		if opts, err := redis.ParseClusterURL(url); err != nil {
			bad.add("%s: REDIS_URL %q is not a Redis Cluster URL: %v", s.Name, url, err)
		} else if got := slices.Sorted(slices.Values(opts.Addrs)); !slices.Equal(got, want) {
			bad.add("%s: REDIS_URL seeds %v, want every Redis Cluster node %v", s.Name, got, want)
		}
	}
	for _, k := range slices.Sorted(maps.Keys(first.Environment)) {
		if !known[k] {
			bad.add("%s: %s is not a variable analyticsd reads (cmd/analyticsd, README)", first.Name, k)
		}
	}
	// As in docker-compose.yml, every setting can be made from the shell or .env.
	for _, k := range slices.Sorted(maps.Keys(known)) {
		if _, ok := first.Environment[k]; !ok {
			bad.add("%s: %s does not reach the container (not in its environment)", first.Name, k)
		}
	}
}

// knownConfigVars is every variable analyticsd reads: those cmd/analyticsd reads and the README's
// configuration table.
func knownConfigVars(t *testing.T) map[string]bool {
	t.Helper()
	out := map[string]bool{}
	for _, v := range slices.Concat(configCodeVars(t), readmeConfigVars(t)) {
		out[v] = true
	}
	return out
}

// Start order: the servers wait for the Keepers, migrate for every server, Postgres and the formed
// Redis Cluster, the API instances for migrate.
func checkClusterOrder(r roles, bad *problems) {
	need := func(s types.ServiceConfig, dep, cond string) {
		if d, ok := s.DependsOn[dep]; !ok || d.Condition != cond {
			bad.add("%s must depend on %s (%s)", s.Name, dep, cond)
		}
	}
	for _, srv := range r.servers {
		for _, k := range r.keepers {
			need(srv, k.Name, types.ServiceConditionHealthy)
		}
	}
	for _, srv := range r.servers {
		need(*r.migrate, srv.Name, types.ServiceConditionHealthy)
	}
	need(*r.migrate, r.redisInit.Name, types.ServiceConditionCompletedSuccessfully)
	for _, s := range r.apis {
		need(s, r.migrate.Name, types.ServiceConditionCompletedSuccessfully)
		need(s, r.redisInit.Name, types.ServiceConditionCompletedSuccessfully)
	}
	script := strings.Join(append(slices.Clone(r.redisInit.Entrypoint), r.redisInit.Command...), " ")
	if !strings.Contains(script, "--cluster create") || !strings.Contains(script, "--cluster-yes") {
		bad.add("%s does not run redis-cli --cluster create ... --cluster-yes", r.redisInit.Name)
	}
	for _, n := range r.redisNodes {
		need(*r.redisInit, n.Name, types.ServiceConditionHealthy)
		if !strings.Contains(script, hostOf(n)) {
			bad.add("%s does not put %s into the cluster", r.redisInit.Name, n.Name)
		}
	}
}

// pinProblem says why ref does not name one release ("" when it does): a digest, or a tag with
// every version component of a release (see checkPinned).
func pinProblem(ref string) string {
	if _, digest, ok := strings.Cut(ref, "@"); ok {
		if !digestRe.MatchString(digest) {
			return "malformed digest"
		}
		return ""
	}
	name, tag := ref, ""
	if i := strings.LastIndex(ref, ":"); i > strings.LastIndex(ref, "/") {
		name, tag = ref[:i], ref[i+1:]
	}
	want := 3
	if n, ok := releaseParts[name[strings.LastIndex(name, "/")+1:]]; ok {
		want = n
	}
	if v := versionRe.FindString(tag); v == "" || strings.Count(v, ".")+1 < want {
		return fmt.Sprintf("floats; pin one release (%d version components) or a digest", want)
	}
	return ""
}

// Every image is pinned, Keeper to the servers' release, and every ClickHouse server and every
// Redis node to the same one.
func checkClusterImages(p *types.Project, r roles, bad *problems) {
	for _, name := range slices.Sorted(maps.Keys(p.Services)) {
		s := p.Services[name]
		if s.Build != nil {
			continue // the Dockerfile, checked by TestComposeImagesPinned
		}
		if why := pinProblem(s.Image); why != "" {
			bad.add("%s: image %s %s", s.Name, s.Image, why)
		}
	}
	tag := func(ref string) string { return ref[strings.LastIndex(ref, ":")+1:] }
	same := func(what string, group []types.ServiceConfig) {
		for _, s := range group[1:] {
			if s.Image != group[0].Image {
				bad.add("%s: %s runs %s, %s runs %s", what, group[0].Name, group[0].Image, s.Name, s.Image)
			}
		}
	}
	same("ClickHouse servers", r.servers)
	same("Keepers", r.keepers)
	same("Redis", append(slices.Clone(r.redisNodes), *r.redisInit))
	if tag(r.keepers[0].Image) != tag(r.servers[0].Image) {
		bad.add("Keeper %s is not the servers' release %s", r.keepers[0].Image, r.servers[0].Image)
	}
}

// Nothing is published on every interface: the instances, Grafana and Prometheus on loopback.
func checkClusterPorts(p *types.Project, bad *problems) {
	for _, name := range slices.Sorted(maps.Keys(p.Services)) {
		s := p.Services[name]
		for _, port := range s.Ports {
			if ip := net.ParseIP(port.HostIP); ip == nil || !ip.IsLoopback() {
				bad.add("%s publishes %s on %q, want a loopback address", s.Name, port.Published, port.HostIP)
			}
		}
		if s.NetworkMode == "host" {
			bad.add("%s uses the host network", s.Name)
		}
	}
}

// Prometheus scrapes each instance's operator listener and each server's metrics endpoint.
func checkClusterPrometheus(p *types.Project, r roles, bad *problems) {
	var targets []string
	if ref := p.Services["prometheus"].Configs; len(ref) == 1 && ref[0].Target == "/etc/prometheus/prometheus.yml" {
		var cfg struct {
			ScrapeConfigs []struct {
				StaticConfigs []struct {
					Targets []string `yaml:"targets"`
				} `yaml:"static_configs"`
			} `yaml:"scrape_configs"`
		}
		if err := yaml.Unmarshal([]byte(p.Configs[ref[0].Source].Content), &cfg); err != nil {
			bad.add("prometheus config: %v", err)
		}
		for _, sc := range cfg.ScrapeConfigs {
			for _, st := range sc.StaticConfigs {
				targets = append(targets, st.Targets...)
			}
		}
	} else {
		bad.add("prometheus: want one config mounted at /etc/prometheus/prometheus.yml")
	}
	for _, s := range r.apis {
		addr, _ := envOf(s, "ANALYTICS_METRICS_ADDR")
		if want := hostOf(s) + addr; !strings.HasPrefix(addr, ":") || !slices.Contains(targets, want) {
			bad.add("prometheus does not scrape %s's operator listener (%s)", s.Name, want)
		}
	}
	for _, s := range r.servers {
		if want := hostOf(s) + ":9363"; !slices.Contains(targets, want) {
			bad.add("prometheus does not scrape %s", want)
		}
	}
}

func TestClusterCompose(t *testing.T) {
	p, err := loadClusterCompose(t, clusterComposeFile, passwords())
	if err != nil {
		t.Fatalf("docker-compose.cluster.yml does not load: %v", err)
	}
	if p.Name != "analyticsd-cluster" {
		t.Errorf("project name %q, want analyticsd-cluster (its volumes apart from the single-server stack's)", p.Name)
	}
	for _, msg := range checkClusterCompose(p, diskFiles(nil), knownConfigVars(t)) {
		t.Error(msg)
	}
	code := configCodeVars(t)
	for _, v := range clusterVars {
		if !slices.Contains(code, v) {
			t.Errorf("cmd/analyticsd does not read %s, which the cluster deployments rely on", v)
		}
	}
}

// Each required password stops the cluster file from loading, naming the variable, when unset or
// empty — as in docker-compose.yml.
func TestClusterComposeRequiresPasswords(t *testing.T) {
	for _, name := range requiredPasswords {
		for _, value := range []string{"<unset>", ""} {
			env := passwords()
			if value == "<unset>" {
				delete(env, name)
			} else {
				env[name] = value
			}
			_, err := loadClusterCompose(t, clusterComposeFile, env)
			if err == nil || !strings.Contains(err.Error(), "required variable "+name) {
				t.Errorf("%s=%s: got %v, want the file refused naming the variable", name, value, err)
			}
		}
	}
}

// Every check above fails on the mistake it is there for: each case breaks a copy of the compose
// file or of a mounted XML file, and the checks must report it.
func TestClusterComposeCatchesMistakes(t *testing.T) {
	original, err := os.ReadFile(clusterComposeFile)
	if err != nil {
		t.Fatal(err)
	}
	abs := func(rel string) string {
		a, err := filepath.Abs(filepath.Join(root, rel))
		if err != nil {
			t.Fatal(err)
		}
		return a
	}
	node := func(shard, replica, host string) []byte {
		return fmt.Appendf(nil, `<clickhouse><macros><shard>%s</shard><replica>%s</replica></macros><interserver_http_host>%s</interserver_http_host></clickhouse>`, shard, replica, host)
	}
	clusterXML, err := os.ReadFile(abs("deploy/clickhouse/cluster/config.d/cluster.xml"))
	if err != nil {
		t.Fatal(err)
	}
	keeperXML, err := os.ReadFile(abs("deploy/clickhouse/cluster/keeper.xml"))
	if err != nil {
		t.Fatal(err)
	}
	swap := func(b []byte, old, new string) []byte {
		t.Helper()
		if n := bytes.Count(b, []byte(old)); n != 1 {
			t.Fatalf("the case's text %q is in the file %d times, want once; update the case", old, n)
		}
		return bytes.Replace(b, []byte(old), []byte(new), 1)
	}
	known := knownConfigVars(t)
	cases := []struct {
		name    string
		compose [2]string         // replace [0] by [1] in the compose file
		files   map[string][]byte // host file -> broken content
		want    string
	}{
		{name: "two instances share a spool volume",
			compose: [2]string{"analyticsd-2-spool:/var/lib/analyticsd/spool", "analyticsd-1-spool:/var/lib/analyticsd/spool"},
			want:    "share the spool volume"},
		{name: "an instance's spool is not on a volume",
			compose: [2]string{"analyticsd-2-spool:/var/lib/analyticsd/spool", "analyticsd-2-spool:/var/lib/analyticsd/elsewhere"},
			want:    "analyticsd-2: no volume at its spool"},
		{name: "CLICKHOUSE_CLUSTER names another cluster",
			compose: [2]string{"CLICKHOUSE_CLUSTER: analytics_cluster", "CLICKHOUSE_CLUSTER: analytics"},
			want:    `CLICKHOUSE_CLUSTER="analytics", want "analytics_cluster"`},
		{name: "the DSN misses a server",
			compose: [2]string{"ch-s2-r1:9000,ch-s2-r2:9000/analytics", "ch-s2-r1:9000/analytics"},
			want:    "CLICKHOUSE_DSN lists"},
		{name: "REDIS_URL misses a node",
			compose: [2]string{"?addr=redis-2:6379&addr=redis-3:6379", "?addr=redis-2:6379"},
			want:    "REDIS_URL seeds"},
		{name: "a variable analyticsd does not read",
			compose: [2]string{"  LOG_FORMAT:\n", "  LOG_FORMAT:\n  INGEST_BATCH_SIZE:\n"},
			want:    "INGEST_BATCH_SIZE is not a variable analyticsd reads"},
		{name: "a variable that does not reach the instances",
			compose: [2]string{"  LOG_LEVEL:\n", ""},
			want:    "LOG_LEVEL does not reach the container"},
		{name: "two Keepers with one id",
			compose: [2]string{`KEEPER_SERVER_ID: "3"`, `KEEPER_SERVER_ID: "2"`},
			want:    "both have Keeper id 2"},
		{name: "a floating image",
			compose: [2]string{"image: postgres:16.15", "image: postgres:16"},
			want:    "postgres: image postgres:16 floats"},
		{name: "Keeper of another release",
			compose: [2]string{"clickhouse/clickhouse-keeper:25.8.33.6", "clickhouse/clickhouse-keeper:25.3.6.56"},
			want:    "is not the servers' release"},
		{name: "a port on every interface",
			compose: [2]string{`"127.0.0.1:9090:9090"`, `"9090:9090"`},
			want:    "prometheus publishes 9090"},
		{name: "an instance Prometheus does not scrape",
			compose: [2]string{`["analyticsd-1:9464", "analyticsd-2:9464"]`, `["analyticsd-1:9464"]`},
			want:    "prometheus does not scrape analyticsd-2"},
		{name: "migrate does not wait for a server",
			compose: [2]string{"      ch-s2-r2:\n        condition: service_healthy\n      postgres:", "      postgres:"},
			want:    "migrate must depend on ch-s2-r2"},
		{name: "two servers with the same macros",
			files: map[string][]byte{abs("deploy/clickhouse/cluster/nodes/ch-s2-r2.xml"): node("02", "ch-s2-r1", "ch-s2-r2")},
			want:  "have the same macros"},
		{name: "macros of a third shard",
			files: map[string][]byte{abs("deploy/clickhouse/cluster/nodes/ch-s2-r2.xml"): node("03", "ch-s2-r2", "ch-s2-r2")},
			want:  "macros name shards [01 02 03], want 2"},
		{name: "a server in the wrong shard of remote_servers",
			files: map[string][]byte{abs("deploy/clickhouse/cluster/nodes/ch-s1-r2.xml"): node("02", "ch-s1-r2", "ch-s1-r2")},
			want:  "do not match the servers' macros"},
		{name: "internal_replication off",
			files: map[string][]byte{abs("deploy/clickhouse/cluster/config.d/cluster.xml"): swap(clusterXML,
				"<internal_replication>true</internal_replication>\n                <replica>\n                    <host>ch-s2-r1</host>",
				"<internal_replication>false</internal_replication>\n                <replica>\n                    <host>ch-s2-r1</host>")},
			want: "internal_replication \"false\""},
		{name: "a Keeper missing from <zookeeper>",
			files: map[string][]byte{abs("deploy/clickhouse/cluster/config.d/cluster.xml"): swap(clusterXML, "<host>keeper-3</host>", "<host>keeper-4</host>")},
			want:  "<zookeeper> nodes"},
		{name: "the Raft configuration gives an id another host",
			files: map[string][]byte{abs("deploy/clickhouse/cluster/keeper.xml"): swap(keeperXML, "<hostname>keeper-2</hostname>", "<hostname>keeper-9</hostname>")},
			want:  `Keeper id 2 is "keeper-9"`},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			file := clusterComposeFile
			if c.compose[0] != "" {
				file = filepath.Join(t.TempDir(), "docker-compose.cluster.yml")
				if err := os.WriteFile(file, swap(original, c.compose[0], c.compose[1]), 0o600); err != nil {
					t.Fatal(err)
				}
			}
			p, err := loadClusterCompose(t, file, passwords())
			if err != nil {
				t.Fatalf("the broken copy does not load: %v", err)
			}
			got := checkClusterCompose(p, diskFiles(c.files), known)
			if !slices.ContainsFunc(got, func(s string) bool { return strings.Contains(s, c.want) }) {
				t.Errorf("want a problem containing %q, got %q", c.want, got)
			}
		})
	}
}
