package deploy_test

import (
	"io"
	"net"
	"os/exec"
	"strconv"
	"strings"
	"testing"
)

// fakeZooKeeper answers ZooKeeper's four-letter commands as a server does while it replays its
// transaction log (serving false: "ruok" already says imok, every other command says it does not
// serve) or once it serves.
func fakeZooKeeper(t *testing.T, serving bool) (port int) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			cmd := make([]byte, 4)
			if _, err := io.ReadFull(c, cmd); err == nil {
				switch {
				case string(cmd) == "ruok":
					io.WriteString(c, "imok")
				case serving:
					io.WriteString(c, "Zookeeper version: 3.8.0\nMode: standalone\nNode count: 5\n")
				default:
					io.WriteString(c, "This ZooKeeper instance is not currently serving requests\n")
				}
			}
			c.Close()
		}
	}()
	return ln.Addr().(*net.TCPAddr).Port
}

// cluster.sh starts the ClickHouse servers once ZooKeeper is ready. It used to take "imok" for
// ready, which ZooKeeper answers while it still replays its log (2 s for a day of test runs here):
// a server started then failed to load its replicated tables and exited, and `cluster.sh up` failed.
func TestClusterScriptWaitsForAServingZooKeeper(t *testing.T) {
	for _, serving := range []bool{false, true} {
		cmd := exec.Command("bash", "-c", `source local/cluster.sh && zk_ready`)
		cmd.Env = append(cmd.Environ(), "CLUSTER_ZK_PORT="+strconv.Itoa(fakeZooKeeper(t, serving)), "ANALYTICS_DATA_DIR="+t.TempDir())
		out, err := cmd.CombinedOutput()
		if ready := err == nil; ready != serving {
			t.Errorf("ZooKeeper serving %v: zk_ready says ready %v (%v) %s", serving, ready, err, out)
		}
	}
}

// Every port the local stack and cluster listen on by default lies below the kernel's ephemeral
// range, and stack.sh warns about one that does not. The kernel hands ports from that range to
// outgoing connections as their local ports; while a service is stopped (the fault suite stops and
// restarts Postgres, ClickHouse and Redis under load) a connection can take its port, and the restart
// fails: a clean-clone run failed so on Postgres at 45432; the default, 55432, lay in the range too.
// Fails with that default.
func TestLocalPortsLieBelowTheEphemeralRange(t *testing.T) {
	out, err := exec.Command("bash", "-c", `unset CLICKHOUSE_PORT CLICKHOUSE_HTTP_PORT POSTGRES_PORT REDIS_PORT CLUSTER_ZK_PORT CLUSTER_CH_PORT CLUSTER_CH_HTTP_PORT CLUSTER_CH_REPL_PORT CLUSTER_REDIS_PORT
		source local/cluster.sh && stack_ports && cluster_ports && read -r lo hi </proc/sys/net/ipv4/ip_local_port_range && echo "ephemeral=$lo"`).CombinedOutput()
	if err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	lines := strings.Fields(string(out))
	low, err := strconv.Atoi(strings.TrimPrefix(lines[len(lines)-1], "ephemeral="))
	if err != nil {
		t.Fatalf("no ephemeral range in %q", out)
	}
	ports := lines[:len(lines)-1]
	if len(ports) < 20 {
		t.Fatalf("only %d ports listed: %q", len(ports), ports)
	}
	for _, p := range ports {
		name, v, _ := strings.Cut(p, "=")
		if n, err := strconv.Atoi(v); err != nil || n >= low {
			t.Errorf("%s defaults to %s; want a port below %d, the start of the ephemeral range", name, v, low)
		}
	}

	warn := func(port string) bool {
		out, err := exec.Command("bash", "-c", `source local/stack.sh && warn_ephemeral "P=$1"`, "_", port).CombinedOutput()
		if err != nil {
			t.Fatalf("%v\n%s", err, out)
		}
		return strings.Contains(string(out), "warning: P="+port)
	}
	if !warn(strconv.Itoa(low)) || warn(strconv.Itoa(low-1)) {
		t.Errorf("warn_ephemeral: want a warning for %d (in the range) and none for %d", low, low-1)
	}
}
