package deploy_test

import (
	"io"
	"net"
	"os/exec"
	"strconv"
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
