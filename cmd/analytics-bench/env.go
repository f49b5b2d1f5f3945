package main

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/analyticsd/analyticsd/internal/loopback"
)

// moduleRoot finds the analyticsd checkout: the nearest directory upwards holding its go.mod.
func moduleRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		b, err := os.ReadFile(filepath.Join(dir, "go.mod"))
		if err == nil && bytes.Contains(b, []byte("module github.com/analyticsd/analyticsd\n")) {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", errors.New("run analytics-bench inside the analyticsd checkout (no go.mod of github.com/analyticsd/analyticsd found upwards)")
		}
		dir = parent
	}
}

var stackVars = []string{"CLICKHOUSE_DSN", "POSTGRES_URL", "REDIS_URL"}

// clusterVars select the cluster layout when set (`eval "$(deploy/local/cluster.sh env)"`): the bench
// then runs against the cluster, its baselines through the Distributed tables.
var clusterVars = []string{"CLICKHOUSE_CLUSTER", "REDIS_CLUSTER"}

// stackEnv returns the three service URLs: from the environment when all are set and reuse is on,
// otherwise from `deploy/local/stack.sh up` and its `env` output.
func stackEnv(ctx context.Context, root string, reuse bool, logf func(string, ...any)) (map[string]string, error) {
	env := map[string]string{}
	missing := 0
	for _, k := range stackVars {
		env[k] = os.Getenv(k)
		if env[k] == "" {
			missing++
		}
	}
	if reuse && missing == 0 {
		for _, k := range clusterVars {
			env[k] = os.Getenv(k)
		}
		logf("using the stack named by CLICKHOUSE_DSN, POSTGRES_URL and REDIS_URL (cluster %q)", env["CLICKHOUSE_CLUSTER"])
		return env, nil
	}
	script := filepath.Join(root, "deploy", "local", "stack.sh")
	logf("starting the local stack: %s up", script)
	up := exec.CommandContext(ctx, script, "up")
	up.Dir, up.Stdout, up.Stderr = root, os.Stderr, os.Stderr
	if err := up.Run(); err != nil {
		return nil, fmt.Errorf("%s up: %w", script, err)
	}
	out, err := exec.CommandContext(ctx, script, "env").Output()
	if err != nil {
		return nil, fmt.Errorf("%s env: %w", script, err)
	}
	for _, line := range strings.Split(string(out), "\n") {
		k, v, ok := strings.Cut(strings.TrimPrefix(strings.TrimSpace(line), "export "), "=")
		if !ok {
			continue
		}
		env[k] = strings.Trim(v, `'"`)
	}
	for _, k := range stackVars {
		if env[k] == "" {
			return nil, fmt.Errorf("%s env did not print %s", script, k)
		}
	}
	return env, nil
}

// withDatabase points a ClickHouse DSN at database db.
func withDatabase(dsn, db string) (string, error) {
	u, err := url.Parse(dsn)
	if err != nil {
		return "", fmt.Errorf("parse CLICKHOUSE_DSN: %w", err)
	}
	u.Path = "/" + db
	return u.String(), nil
}

// withSearchPath points a Postgres URL's sessions at schema.
func withSearchPath(pgURL, schema string) (string, error) {
	u, err := url.Parse(pgURL)
	if err != nil {
		return "", fmt.Errorf("parse POSTGRES_URL: %w", err)
	}
	q := u.Query()
	q.Set("search_path", schema)
	u.RawQuery = q.Encode()
	return u.String(), nil
}

// clientArgs are clickhouse-client's connection flags for a DSN.
func clientArgs(dsn string) ([]string, error) {
	u, err := url.Parse(dsn)
	if err != nil {
		return nil, err
	}
	// A cluster's DSN lists several servers; clickhouse-client talks to the first, like the pool.
	first, _, _ := strings.Cut(u.Host, ",")
	host, port, err := net.SplitHostPort(first)
	if err != nil {
		host, port = first, ""
	}
	args := []string{"--host", host}
	if port != "" {
		args = append(args, "--port", port)
	}
	if u.User != nil {
		if name := u.User.Username(); name != "" {
			args = append(args, "--user", name)
		}
		if pw, ok := u.User.Password(); ok && pw != "" {
			args = append(args, "--password", pw)
		}
	}
	return args, nil
}

// freeAddr picks an address for a server the bench starts (package loopback says why not ":0").
func freeAddr() (string, error) { return loopback.Addr() }

// buildAnalyticsd compiles ./cmd/analyticsd into dir.
// With overlay (a go build -overlay file), extra files are compiled in without touching the checkout.
func buildAnalyticsd(ctx context.Context, root, dir, overlay string) (string, error) {
	bin := filepath.Join(dir, "analyticsd")
	args := []string{"build", "-o", bin}
	if overlay != "" {
		args = append(args, "-overlay", overlay)
	}
	cmd := exec.CommandContext(ctx, "go", append(args, "./cmd/analyticsd")...)
	cmd.Dir = root
	if out, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("go build ./cmd/analyticsd: %w\n%s", err, out)
	}
	return bin, nil
}

// cli runs an analyticsd subcommand with env and returns the last line it printed.
func cli(ctx context.Context, bin string, env []string, args ...string) (string, error) {
	cmd := exec.CommandContext(ctx, bin, args...)
	cmd.Env = env
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return "", fmt.Errorf("analyticsd %s: %w: %s", strings.Join(args, " "), err, strings.TrimSpace(stderr.String()))
	}
	lines := strings.Split(strings.TrimSpace(stdout.String()), "\n")
	return strings.TrimSpace(lines[len(lines)-1]), nil
}

// server is a running `analyticsd serve`.
type server struct {
	cmd    *exec.Cmd
	base   string
	stderr *tailBuffer
	exited chan struct{}
}

func startServer(ctx context.Context, bin string, args, env []string, addr string) (*server, error) {
	cmd := exec.Command(bin, args...)
	cmd.Env = env
	s := &server{cmd: cmd, base: "http://" + addr, stderr: &tailBuffer{max: 64 << 10}, exited: make(chan struct{})}
	cmd.Stderr, cmd.Stdout = s.stderr, s.stderr
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start %s %s: %w", filepath.Base(bin), strings.Join(args, " "), err)
	}
	go func() { _ = cmd.Wait(); close(s.exited) }()
	deadline := time.Now().Add(30 * time.Second)
	for {
		resp, err := http.Get(s.base + "/healthz")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return s, nil
			}
		}
		select {
		case <-s.exited:
			return nil, fmt.Errorf("server exited at start-up: %s", s.stderr.String())
		case <-ctx.Done():
			s.stop(time.Second)
			return nil, ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			s.stop(time.Second)
			return nil, fmt.Errorf("server did not answer /healthz within 30s: %v\n%s", err, s.stderr.String())
		}
	}
}

func (s *server) pid() int { return s.cmd.Process.Pid }

// stop sends SIGTERM (analyticsd flushes its spool), then SIGKILL after grace.
func (s *server) stop(grace time.Duration) {
	if s == nil {
		return
	}
	select {
	case <-s.exited:
		return
	default:
	}
	_ = s.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-s.exited:
	case <-time.After(grace):
		_ = s.cmd.Process.Kill()
		<-s.exited
	}
}

// tailBuffer keeps the last max bytes written to it (a server's log, for error reports).
type tailBuffer struct {
	mu  sync.Mutex
	b   []byte
	max int
}

func (t *tailBuffer) Write(p []byte) (int, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.b = append(t.b, p...)
	if len(t.b) > t.max {
		t.b = append(t.b[:0], t.b[len(t.b)-t.max:]...)
	}
	return len(p), nil
}

func (t *tailBuffer) String() string {
	t.mu.Lock()
	defer t.mu.Unlock()
	return string(t.b)
}

// rssKiB reads VmRSS of pid from /proc.
func rssKiB(pid int) (int64, error) {
	f, err := os.Open("/proc/" + strconv.Itoa(pid) + "/status")
	if err != nil {
		return 0, err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := sc.Text()
		if rest, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			fields := strings.Fields(rest)
			if len(fields) == 0 {
				break
			}
			return strconv.ParseInt(fields[0], 10, 64)
		}
	}
	return 0, fmt.Errorf("no VmRSS in /proc/%d/status", pid)
}

// machine describes the host for the report.
func machine() (host, cpuModel string, memGiB float64) {
	host, _ = os.Hostname()
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for _, line := range strings.Split(string(b), "\n") {
			if k, v, ok := strings.Cut(line, ":"); ok && strings.TrimSpace(k) == "model name" {
				cpuModel = strings.TrimSpace(v)
				break
			}
		}
	}
	if b, err := os.ReadFile("/proc/meminfo"); err == nil {
		for _, line := range strings.Split(string(b), "\n") {
			if rest, ok := strings.CutPrefix(line, "MemTotal:"); ok {
				if f := strings.Fields(rest); len(f) > 0 {
					kb, _ := strconv.ParseFloat(f[0], 64)
					memGiB = kb / (1 << 20)
				}
			}
		}
	}
	return host, cpuModel, memGiB
}

// loadAvg returns /proc/loadavg's three load averages, and the 1-minute one as a number.
func loadAvg() (string, float64) {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return "", 0
	}
	f := strings.Fields(string(b))
	if len(f) < 3 {
		return "", 0
	}
	one, _ := strconv.ParseFloat(f[0], 64)
	return strings.Join(f[:3], " "), one
}

// clockTicks is USER_HZ, the unit of /proc/<pid>/stat CPU times (100 on every Linux we run on).
const clockTicks = 100

// procCPU returns the user+system CPU time pid has used so far.
func procCPU(pid int) (time.Duration, error) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return 0, err
	}
	// The command name (field 2) may contain spaces; fields after its closing parenthesis are fixed.
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return 0, fmt.Errorf("/proc/%d/stat: unexpected format", pid)
	}
	f := strings.Fields(string(b[i+1:]))
	if len(f) < 13 {
		return 0, fmt.Errorf("/proc/%d/stat: unexpected format", pid)
	}
	utime, err1 := strconv.ParseInt(f[11], 10, 64) // field 14
	stime, err2 := strconv.ParseInt(f[12], 10, 64) // field 15
	if err1 != nil || err2 != nil {
		return 0, fmt.Errorf("/proc/%d/stat: unexpected format", pid)
	}
	return time.Duration(utime+stime) * time.Second / clockTicks, nil
}

// listeningPID finds the process listening on 127.0.0.1:port (or any address), by matching the
// socket's inode from /proc/net/tcp{,6} against every process's open files. 0 when not found (e.g.
// a remote server, or no permission to read other processes' fds).
func listeningPID(port int) int {
	inodes := map[string]bool{}
	for _, file := range []string{"/proc/net/tcp", "/proc/net/tcp6"} {
		b, err := os.ReadFile(file)
		if err != nil {
			continue
		}
		for _, line := range strings.Split(string(b), "\n")[1:] {
			f := strings.Fields(line)
			if len(f) < 10 || f[3] != "0A" { // 0A = LISTEN
				continue
			}
			_, hexPort, ok := strings.Cut(f[1], ":")
			if p, err := strconv.ParseInt(hexPort, 16, 32); ok && err == nil && int(p) == port {
				inodes["socket:["+f[9]+"]"] = true
			}
		}
	}
	if len(inodes) == 0 {
		return 0
	}
	procs, _ := os.ReadDir("/proc")
	for _, p := range procs {
		pid, err := strconv.Atoi(p.Name())
		if err != nil {
			continue
		}
		fds, err := os.ReadDir("/proc/" + p.Name() + "/fd")
		if err != nil {
			continue
		}
		for _, fd := range fds {
			if target, err := os.Readlink("/proc/" + p.Name() + "/fd/" + fd.Name()); err == nil && inodes[target] {
				return pid
			}
		}
	}
	return 0
}

// cpuMeter sums the CPU time of a set of processes between start and stop.
type cpuMeter struct {
	pids  []int
	start []time.Duration
}

func meterCPU(pids ...int) *cpuMeter {
	m := &cpuMeter{}
	for _, p := range pids {
		if p <= 0 {
			continue
		}
		if t, err := procCPU(p); err == nil {
			m.pids = append(m.pids, p)
			m.start = append(m.start, t)
		}
	}
	return m
}

// used returns the CPU time used since meterCPU, per process, in the order given (skipping unknown pids).
func (m *cpuMeter) used() []time.Duration {
	out := make([]time.Duration, len(m.pids))
	for i, p := range m.pids {
		if t, err := procCPU(p); err == nil {
			out[i] = t - m.start[i]
		}
	}
	return out
}

// machineBusy starts measuring how many cores the whole machine keeps busy (every process, from
// /proc/stat: all time but idle and iowait); the function it returns gives the average since. 0
// when /proc/stat cannot be read.
func machineBusy() func() float64 {
	read := func() (busy, total float64, ok bool) {
		b, err := os.ReadFile("/proc/stat")
		if err != nil {
			return 0, 0, false
		}
		line, _, _ := strings.Cut(string(b), "\n")
		f := strings.Fields(line)
		if len(f) < 6 || f[0] != "cpu" {
			return 0, 0, false
		}
		for i, v := range f[1:] {
			n, err := strconv.ParseFloat(v, 64)
			if err != nil {
				return 0, 0, false
			}
			if i >= 7 { // guest time is already counted in user
				break
			}
			total += n
			if i != 3 && i != 4 { // idle, iowait
				busy += n
			}
		}
		return busy, total, true
	}
	b0, _, ok0 := read()
	t0 := time.Now()
	return func() float64 {
		b1, _, ok1 := read()
		el := time.Since(t0).Seconds()
		if !ok0 || !ok1 || el <= 0 {
			return 0
		}
		return (b1 - b0) / float64(clockTicks) / el
	}
}

// procSyscalls returns how many read and write system calls (read, recvfrom, write, sendto, ...)
// a process has made, from /proc/<pid>/io: a consume's group commit writes once per group, so
// writes per consume show how many consumes shared each one.
func procSyscalls(pid int) (reads, writes int64, err error) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/io")
	if err != nil {
		return 0, 0, err
	}
	for _, line := range strings.Split(string(b), "\n") {
		k, v, ok := strings.Cut(line, ": ")
		if !ok {
			continue
		}
		n, _ := strconv.ParseInt(strings.TrimSpace(v), 10, 64)
		switch k {
		case "syscr":
			reads = n
		case "syscw":
			writes = n
		}
	}
	return reads, writes, nil
}
