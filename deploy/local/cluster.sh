#!/usr/bin/env bash
# Local ClickHouse cluster and Redis Cluster for analyticsd's cluster mode, from Debian packages,
# on 127.0.0.1, without Docker: ZooKeeper, four clickhouse-server processes as 2 shards x 2
# replicas (cluster "analytics_cluster"), and a three-master Redis Cluster. Postgres is the single
# stack's (stack.sh), which `up` starts too.
#
# Usage: deploy/local/cluster.sh COMMAND
#   up                    install missing packages, start what is not running, wait until every
#                         server answers and the cluster is formed
#   down                  stop what this script started; idempotent
#   status                one line per process; exit 0 if all are up
#   diagnose              what a failed cluster test needs to be understood: each process, ZooKeeper's
#                         state, each server's running queries and distributed-DDL progress, log tails
#   env                   print `export ...` lines (CLICKHOUSE_CLUSTER, CLICKHOUSE_DSN listing every
#                         server, REDIS_CLUSTER, REDIS_URL, POSTGRES_URL) for eval "$(... env)"
#   stop-node NAME        stop one process: zookeeper, ch1..ch4, redis1..redis3 (fault tests)
#   kill-node NAME        SIGKILL one process (fault tests: a crash, not a shutdown)
#   start-node NAME       start one process again
#   destroy               down, then delete the cluster's data
#
# Environment (defaults in brackets): ANALYTICS_DATA_DIR [<repo>/.data] (the cluster lives in
# its cluster/ subdirectory), CLUSTER_ZK_PORT [12181], CLUSTER_CH_PORT [19101] (ch1..ch4 use
# 4 consecutive native ports; HTTP ports start at CLUSTER_CH_HTTP_PORT [18201], replication
# ports at CLUSTER_CH_REPL_PORT [19301]), CLUSTER_REDIS_PORT [17001] (3 consecutive ports; the
# cluster bus adds 10000), STACK_TIMEOUT [90].
set -euo pipefail

CLUSTER_SCRIPT=$(readlink -f -- "${BASH_SOURCE[0]}")
# The single stack's helpers (find_bin, pid_matches, stop_pid, wait_ready, render, ...) and its
# Postgres; sourcing runs no command.
# shellcheck source=deploy/local/stack.sh
source "$(dirname -- "$CLUSTER_SCRIPT")/stack.sh"

CLUSTER_NAME=analytics_cluster
ZK_PORT=${CLUSTER_ZK_PORT:-12181}
CH_BASE_PORT=${CLUSTER_CH_PORT:-19101}
CH_BASE_HTTP=${CLUSTER_CH_HTTP_PORT:-18201}
CH_BASE_REPL=${CLUSTER_CH_REPL_PORT:-19301}
REDIS_BASE_PORT=${CLUSTER_REDIS_PORT:-17001}
CLUSTER_DIR=$DATA_DIR/cluster
CRUN=$CLUSTER_DIR/run
CH_NODES=(ch1 ch2 ch3 ch4)
REDIS_NODES=(redis1 redis2 redis3)

clog() { printf 'cluster: %s\n' "$*" >&2; }

node_index() { # chN|redisN -> N-1
  local n=${1//[!0-9]/}
  printf '%s\n' $((n - 1))
}
ch_port() { printf '%s\n' $((CH_BASE_PORT + $(node_index "$1"))); }
redis_port() { printf '%s\n' $((REDIS_BASE_PORT + $(node_index "$1"))); }

# ---------------------------------------------------------------- zookeeper

ZK_DIR=$CLUSTER_DIR/zookeeper
ZK_CFG=$ZK_DIR/zoo.cfg
zk_pid() {
  local p
  p=$(read_pidfile "$CRUN/zookeeper.pid")
  pid_matches "$p" "$ZK_CFG" && printf '%s\n' "$p"
}
zk_alive() { zk_pid >/dev/null; }
# zk_ready: the server serves clients. "ruok" is not enough: it answers "imok" as soon as the port is
# bound, while ZooKeeper may still be replaying its transaction log — 2 s for the 56,000 transactions
# a day of test runs leaves here, during which a clickhouse-server starting with replicated tables
# fails to load them ("All connection tries failed") and exits. "srvr" names the server's Mode only
# once it serves ("This ZooKeeper instance is not currently serving requests" before).
zk_ready() {
  local answer
  # shellcheck disable=SC2016
  answer=$(timeout 2 bash -c 'exec 3<>"/dev/tcp/127.0.0.1/$1"; printf srvr >&3; cat <&3' _ "$ZK_PORT" 2>/dev/null) || true
  [[ $answer == *"Mode: "* ]]
}

start_zookeeper() {
  [ -r /usr/share/java/zookeeper.jar ] || install_packages zookeeper
  if zk_alive; then zk_ready && return 0; else
    ensure_port_free zookeeper "$ZK_PORT" CLUSTER_ZK_PORT
    mkdir -p "$ZK_DIR/data"
    cat >"$ZK_CFG" <<EOF
tickTime=2000
initLimit=10
syncLimit=5
dataDir=$ZK_DIR/data
clientPort=$ZK_PORT
clientPortAddress=127.0.0.1
admin.enableServer=false
4lw.commands.whitelist=ruok,srvr,stat,mntr
maxClientCnxns=0
autopurge.purgeInterval=1
forceSync=no
EOF
    # forceSync=no: ZooKeeper otherwise fsyncs its log for every write, and on this VM each fsync
    # flushes the whole virtual disk: one run of the cluster's storage suites made 137,000 of them
    # (75 s of flushing; slowest 260 ms) while the spool and the servers' merges wait on the same
    # disk. Without them ZooKeeper answered in 0.28 ms on average instead of 2.2 (slowest 54 ms
    # instead of 265), and the suites ran 10-18 % faster. A killed ZooKeeper keeps what it wrote
    # (it is in the page cache); only a power loss would not, and this cluster holds test data.
    # The packaged zkServer.sh mis-parses --config; QuorumPeerMain with the file works. The two
    # logging jars (dependencies of the zookeeper package) give ZooKeeper 3.8 a logger: without
    # them it logs nothing, and session expiries are what a stuck cluster test needs to show.
    (cd "$ZK_DIR" && exec setsid java -Xmx256m -Dzookeeper.log.dir="$ZK_DIR" -Dzookeeper.root.logger=INFO,CONSOLE \
      -cp /etc/zookeeper/conf:/usr/share/java/zookeeper.jar:/usr/share/java/slf4j-log4j12.jar:/usr/share/java/log4j-1.2.jar \
      org.apache.zookeeper.server.quorum.QuorumPeerMain "$ZK_CFG") \
      </dev/null >>"$ZK_DIR/zookeeper.log" 2>&1 9>&- 8>&- &
    printf '%s\n' "$!" >"$CRUN/zookeeper.pid"
  fi
  wait_ready zookeeper zk_alive zk_ready "$ZK_DIR/zookeeper.log"
  clog "zookeeper: up (pid $(zk_pid), port $ZK_PORT)"
}

stop_zookeeper() {
  local pid
  if pid=$(zk_pid); then stop_pid zookeeper "$pid" "$ZK_CFG"; clog "zookeeper: stopped"; fi
  rm -f "$CRUN/zookeeper.pid"
}

# install_packages PKG...: apt-get install (as root, or with sudo).
install_packages() {
  local sudo=()
  is_root || sudo=(sudo)
  clog "installing Debian packages: $* (log: $CLUSTER_DIR/apt.log)"
  { "${sudo[@]}" apt-get update && "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
      apt-get install -y --no-install-recommends "$@"; } >"$CLUSTER_DIR/apt.log" 2>&1 9>&- \
    || { tail -n 30 "$CLUSTER_DIR/apt.log" >&2; die "apt-get install $* failed"; }
}

# ---------------------------------------------------------------- clickhouse nodes

ch_node_config() { printf '%s\n' "$CLUSTER_DIR/$1/config.xml"; }
ch_node_pid() {
  local p cfg
  cfg=$(ch_node_config "$1")
  p=$(read_pidfile "$CRUN/$1.pid")
  pid_matches "$p" "--config-file=$cfg" && printf '%s\n' "$p"
}

start_ch_node() { # chN
  local node=$1 i port http repl shard replica cfg
  i=$(node_index "$node")
  port=$(ch_port "$node") http=$((CH_BASE_HTTP + i)) repl=$((CH_BASE_REPL + i))
  shard=$(printf '%02d' $((i / 2 + 1))) replica=r$((i % 2 + 1))
  cfg=$(ch_node_config "$node")
  if ! ch_node_pid "$node" >/dev/null; then
    ensure_port_free "$node" "$port" CLUSTER_CH_PORT
    ensure_port_free "$node" "$http" CLUSTER_CH_HTTP_PORT
    ensure_port_free "$node" "$repl" CLUSTER_CH_REPL_PORT
    # render (stack.sh) reads CH_DIR and the ports from these globals.
    CH_DIR=$CLUSTER_DIR/$node CLICKHOUSE_PORT=$port CLICKHOUSE_HTTP_PORT=$http CH_LOAD_BALANCING=in_order
    mkdir -p "$CH_DIR"/{data,tmp,user_files,format_schemas,log,config.d}
    render "$TEMPLATE_DIR/config.xml.tmpl" "$cfg"
    render "$TEMPLATE_DIR/users.xml.tmpl" "$CH_DIR/users.xml"
    sed -e "s|@INTERSERVER_PORT@|$repl|g" -e "s|@ZK_PORT@|$ZK_PORT|g" -e "s|@SHARD@|$shard|g" \
        -e "s|@REPLICA@|$replica|g" -e "s|@CLUSTER@|$CLUSTER_NAME|g" \
        -e "s|@N1_PORT@|$CH_BASE_PORT|g" -e "s|@N2_PORT@|$((CH_BASE_PORT + 1))|g" \
        -e "s|@N3_PORT@|$((CH_BASE_PORT + 2))|g" -e "s|@N4_PORT@|$((CH_BASE_PORT + 3))|g" \
        "$TEMPLATE_DIR/cluster.xml.tmpl" >"$CH_DIR/config.d/cluster.xml"
    (cd "$CH_DIR" && exec setsid "$CH_SERVER" --config-file="$cfg") \
      </dev/null >>"$CH_DIR/log/stdout.log" 2>&1 9>&- 8>&- &
    printf '%s\n' "$!" >"$CRUN/$node.pid"
  fi
  CH_READY_PORT=$port
  NODE=$node
  wait_ready "$node" ch_node_alive ch_ready "$CLUSTER_DIR/$node/log/clickhouse-server.err.log" "$CLUSTER_DIR/$node/log/stdout.log"
  clog "$node: up (pid $(ch_node_pid "$node"), port $port, shard $shard, replica $replica)"
}
NODE=""
ch_node_alive() { ch_node_pid "$NODE" >/dev/null; }

stop_ch_node() {
  local pid
  if pid=$(ch_node_pid "$1"); then
    stop_pid "$1" "$pid" "--config-file=$(ch_node_config "$1")"
    clog "$1: stopped"
  fi
  rm -f "$CRUN/$1.pid"
}

# ---------------------------------------------------------------- redis cluster

redis_node_pid() {
  local p
  p=$(read_pidfile "$CRUN/$1.pid")
  pid_matches "$p" redis-server && pid_matches "$p" "127.0.0.1:$(redis_port "$1")" && printf '%s\n' "$p"
}
redis_node_alive() { redis_node_pid "$NODE" >/dev/null || (( SECONDS < REDIS_GRACE_UNTIL )); }

start_redis_node() {
  local node=$1 port dir
  port=$(redis_port "$node") dir=$CLUSTER_DIR/$node
  if ! redis_node_pid "$node" >/dev/null; then
    ensure_port_free "$node" "$port" CLUSTER_REDIS_PORT
    mkdir -p "$dir"
    # nodes.conf (the node's slots) is kept in its dir, so a restarted node rejoins with its slots;
    # the data itself is not persisted, like the single stack's Redis. Without replicas, a master
    # down leaves its slots uncovered: require-full-coverage no keeps the other masters' slots
    # (other tenants) answering meanwhile.
    (cd "$dir" && "$REDIS_SERVER" --port "$port" --bind 127.0.0.1 --cluster-enabled yes \
       --cluster-config-file "$dir/nodes.conf" --cluster-node-timeout 2000 \
       --cluster-require-full-coverage no \
       --daemonize yes --pidfile "$CRUN/$node.pid" --logfile "$dir/redis.log" --dir "$dir" \
       --save '' --appendonly no </dev/null 9>&- 8>&-) || die "$node: redis-server failed to start"
    REDIS_GRACE_UNTIL=$((SECONDS + 5))
  fi
  REDIS_READY_PORT=$port
  NODE=$node
  wait_ready "$node" redis_node_alive redis_ready "$dir/redis.log"
}

cluster_ok() { # every node sees the cluster as ok
  local node
  for node in "${REDIS_NODES[@]}"; do
    "$REDIS_CLI" -p "$(redis_port "$node")" cluster info 2>/dev/null | grep -q '^cluster_state:ok' || return 1
  done
}

form_redis_cluster() {
  local node addrs=() i
  cluster_ok && return 0
  if [ "$("$REDIS_CLI" -p "$REDIS_BASE_PORT" cluster info | sed -n 's/^cluster_known_nodes:\([0-9]*\).*/\1/p')" -lt 3 ]; then
    for node in "${REDIS_NODES[@]}"; do addrs+=("127.0.0.1:$(redis_port "$node")"); done
    "$REDIS_CLI" --cluster create "${addrs[@]}" --cluster-replicas 0 --cluster-yes >"$CLUSTER_DIR/redis-create.log" 2>&1 \
      || { cat "$CLUSTER_DIR/redis-create.log" >&2; die "redis cluster: create failed"; }
  fi
  for ((i = 0; i < STACK_TIMEOUT * 5; i++)); do cluster_ok && break; sleep 0.2; done
  cluster_ok || die "redis cluster: not ok after ${STACK_TIMEOUT}s (see $CLUSTER_DIR/redis*/redis.log)"
  clog "redis cluster: up (ports ${REDIS_BASE_PORT}-$((REDIS_BASE_PORT + 2)))"
}

stop_redis_node() {
  local pid
  if pid=$(redis_node_pid "$1"); then stop_pid "$1" "$pid" redis-server; clog "$1: stopped"; fi
  rm -f "$CRUN/$1.pid"
}

# ---------------------------------------------------------------- commands

cluster_formed() { # every ClickHouse server sees the four replicas of the cluster
  local node
  for node in "${CH_NODES[@]}"; do
    CH_READY_PORT=$(ch_port "$node")
    [ "$(ch_query "SELECT count() FROM system.clusters WHERE cluster = '$CLUSTER_NAME'" 2>/dev/null)" = 4 ] || return 1
  done
}

# cluster_ports: one NAME=PORT line per port the cluster listens on.
cluster_ports() {
  local i
  printf '%s\n' CLUSTER_ZK_PORT="$ZK_PORT"
  for i in "${!CH_NODES[@]}"; do
    printf '%s\n' "CLUSTER_CH_PORT+$i=$((CH_BASE_PORT + i))" "CLUSTER_CH_HTTP_PORT+$i=$((CH_BASE_HTTP + i))" \
      "CLUSTER_CH_REPL_PORT+$i=$((CH_BASE_REPL + i))"
  done
  # Redis Cluster nodes also listen on their port + 10000 (the cluster bus).
  for i in "${!REDIS_NODES[@]}"; do
    printf '%s\n' "CLUSTER_REDIS_PORT+$i=$((REDIS_BASE_PORT + i))" "CLUSTER_REDIS_PORT+$i+bus=$((REDIS_BASE_PORT + i + 10000))"
  done
}

cmd_cluster_up() {
  validate_env
  local ports
  mapfile -t ports < <(cluster_ports)
  warn_ephemeral "${ports[@]}"
  init_data_dir
  mkdir -p "$CLUSTER_DIR" "$CRUN"
  exec 8>"$CRUN/cluster.lock"
  flock -w 600 8 || die "could not lock $CRUN/cluster.lock"
  ensure_packages clickhouse redis postgres
  ch_bins
  redis_bins
  (take_lock; start_postgres) 8>&-
  start_zookeeper
  local node
  for node in "${CH_NODES[@]}"; do start_ch_node "$node"; done
  cluster_formed || die "clickhouse: the servers do not all see cluster $CLUSTER_NAME with 4 replicas"
  for node in "${REDIS_NODES[@]}"; do start_redis_node "$node"; done
  form_redis_cluster
}

cmd_cluster_down() {
  [ -d "$CRUN" ] || { clog "not running"; return 0; }
  local node
  for node in "${REDIS_NODES[@]}"; do stop_redis_node "$node"; done
  for node in "${CH_NODES[@]}"; do stop_ch_node "$node"; done
  stop_zookeeper
}

cmd_cluster_status() {
  local node rc=0 state
  for node in zookeeper "${CH_NODES[@]}" "${REDIS_NODES[@]}"; do
    state=down
    case $node in
      zookeeper) zk_alive && state=up ;;
      ch*) ch_node_pid "$node" >/dev/null && state=up ;;
      redis*) redis_node_pid "$node" >/dev/null && state=up ;;
    esac
    [ "$state" = up ] || rc=1
    printf '%-10s %s\n' "$node" "$state"
  done
  return "$rc"
}

# cmd_cluster_diagnose prints what CI's log needs when a cluster test failed: a DDL ON CLUSTER that
# timed out says only "i/o timeout", and the servers' own state is gone with the machine. Each probe
# has its own timeout and failure message, so a hung server cannot hang the report.
cmd_cluster_diagnose() {
  local node
  echo "== cluster diagnose $(date -u +%FT%TZ), load: $(cut -d' ' -f1-3 /proc/loadavg)"
  cmd_cluster_status || true
  echo "== zookeeper (port $ZK_PORT): mntr"
  # shellcheck disable=SC2016
  timeout 3 bash -c 'exec 3<>"/dev/tcp/127.0.0.1/$1"; printf mntr >&3; cat <&3' _ "$ZK_PORT" 2>&1 \
    | grep -E 'zk_(server_state|avg_latency|max_latency|max_fsynctime|outstanding_requests|znode_count|num_alive_connections|stale_sessions_expired)' \
    || echo "(no answer)"
  echo "== zookeeper log: the last warnings, errors and session expiries"
  grep -E ' (WARN|ERROR) |Expiring session' "$ZK_DIR/zookeeper.log" 2>/dev/null | tail -n 15 | cut -c1-300 || true
  ch_bins
  for node in "${CH_NODES[@]}"; do
    CH_READY_PORT=$(ch_port "$node")
    echo "== $node (port $CH_READY_PORT): queries running longer than 1 s"
    ch_query "SELECT round(elapsed, 1), query_id, substring(replaceAll(query, '\n', ' '), 1, 160)
      FROM system.processes WHERE elapsed > 1 ORDER BY elapsed DESC LIMIT 10" 2>&1 || echo "(no answer)"
    echo "== $node: err.log, the last 15 messages (less the benign Retrying createReplica)"
    grep -E '^[0-9]{4}\.' "$CLUSTER_DIR/$node/log/clickhouse-server.err.log" 2>/dev/null | grep -v "Retrying createReplica" | tail -n 15 | cut -c1-300 || true
  done
  # A DDL ON CLUSTER waits until every host has written itself under the task's finished/ node; the
  # host missing there is the one whose DDL worker is stuck (its running queries are above).
  local task ddl=/clickhouse/task_queue/ddl
  CH_READY_PORT=$CH_BASE_PORT
  echo "== distributed DDL: the newest 5 tasks, the hosts that finished each"
  for task in $(ch_query "SELECT name FROM system.zookeeper WHERE path = '$ddl' ORDER BY name DESC LIMIT 5" 2>/dev/null); do
    printf '%s: %s\n  finished: %s\n' "$task" \
      "$(ch_query "SELECT substring(replaceAll(value, '\n', ' | '), 1, 200) FROM system.zookeeper WHERE path = '$ddl' AND name = '$task'" 2>&1)" \
      "$(ch_query "SELECT name FROM system.zookeeper WHERE path = '$ddl/$task/finished'" 2>&1 | tr '\n' ' ')"
  done
}

cmd_cluster_env() {
  local node hosts=() raddrs=()
  for node in "${CH_NODES[@]}"; do hosts+=("127.0.0.1:$(ch_port "$node")"); done
  for node in "${REDIS_NODES[@]:1}"; do raddrs+=("addr=127.0.0.1:$(redis_port "$node")"); done
  local IFS=,
  printf "export CLICKHOUSE_CLUSTER='%s'\n" "$CLUSTER_NAME"
  printf "export CLICKHOUSE_DSN='clickhouse://default:@%s/analytics'\n" "${hosts[*]}"
  printf "export CLICKHOUSE_HTTP_URL='http://127.0.0.1:%s'\n" "$CH_BASE_HTTP"
  IFS='&'
  printf "export REDIS_CLUSTER=1\n"
  printf "export REDIS_URL='redis://127.0.0.1:%s?%s'\n" "$REDIS_BASE_PORT" "${raddrs[*]}"
  printf "export POSTGRES_URL='postgres://analytics:analytics@127.0.0.1:%s/analytics?sslmode=disable'\n" "$POSTGRES_PORT"
}

check_node() {
  case ${1:-} in
    zookeeper|ch[1-4]|redis[1-3]) ;;
    *) die "unknown node '${1:-}' (zookeeper, ch1..ch4, redis1..redis3)" ;;
  esac
}

cmd_kill_node() { # NAME
  check_node "${1:-}"
  local pid=""
  case $1 in
    zookeeper) pid=$(zk_pid || true) ;;
    ch*) pid=$(ch_node_pid "$1" || true) ;;
    redis*) pid=$(redis_node_pid "$1" || true) ;;
  esac
  [ -n "$pid" ] || { clog "$1: not running"; return 0; }
  kill -KILL "$pid"
  local i
  for ((i = 0; i < 100; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  rm -f "$CRUN/$1.pid"
  clog "$1: killed (was pid $pid)"
}

cmd_node() { # start|stop NAME
  check_node "${2:-}"
  mkdir -p "$CRUN"
  ch_bins
  redis_bins
  case $1:$2 in
    start:zookeeper) start_zookeeper ;;
    stop:zookeeper) stop_zookeeper ;;
    start:ch*) start_ch_node "$2" ;;
    stop:ch*) stop_ch_node "$2" ;;
    start:redis*) start_redis_node "$2"; form_redis_cluster ;;
    stop:redis*) stop_redis_node "$2" ;;
  esac
}

cmd_cluster_destroy() {
  cmd_cluster_down
  rm -rf -- "$CLUSTER_DIR"
  clog "deleted $CLUSTER_DIR"
}

cluster_main() {
  local cmd=${1:-}
  [ $# -gt 0 ] && shift
  case $cmd in
    up) cmd_cluster_up ;;
    down) cmd_cluster_down ;;
    status) cmd_cluster_status ;;
    diagnose) cmd_cluster_diagnose ;;
    env) cmd_cluster_env ;;
    start-node) cmd_node start "$@" ;;
    stop-node) cmd_node stop "$@" ;;
    kill-node) cmd_kill_node "$@" ;;
    destroy) cmd_cluster_destroy ;;
    -h|--help|help) sed -n '2,/^set -euo/p' "$CLUSTER_SCRIPT" | sed -e '$d' -e 's/^# \{0,1\}//' >&2 ;;
    *) sed -n '2,/^set -euo/p' "$CLUSTER_SCRIPT" | sed -e '$d' -e 's/^# \{0,1\}//' >&2; exit 2 ;;
  esac
}

# Tests source this file for its helpers; only a direct run executes a command.
if [[ ${BASH_SOURCE[0]} == "$0" ]]; then
  cluster_main "$@"
fi
