#!/usr/bin/env bash
# Local dev/test/CI stack for analyticsd: private ClickHouse, Postgres and Redis
# instances on 127.0.0.1, without Docker and without systemd.
#
# Usage: deploy/local/stack.sh COMMAND
#   up                    install missing Debian packages, start every service that is
#                         not running yet, wait until each answers a real query
#   down                  stop what this script started (per pidfiles); idempotent
#   status                one line per service; exit 0 if all are up, 1 otherwise
#   env                   print `export ...` lines for eval "$(deploy/local/stack.sh env)"
#   start-service NAME    start one service (clickhouse|postgres|redis)
#   stop-service NAME     stop one service (clickhouse|postgres|redis)
#   destroy               down, then delete all data of this stack
#
# Environment (defaults in brackets):
#   ANALYTICS_DATA_DIR    [<repo>/.data]  data, logs, configs and pidfiles (git-ignored)
#   CLICKHOUSE_PORT [19000]  CLICKHOUSE_HTTP_PORT [18123]
#   POSTGRES_PORT   [15432]  REDIS_PORT           [16379]
#                         (every default lies below the kernel's ephemeral port range;
#                         see warn_ephemeral)
#   STACK_TIMEOUT   [90]     seconds to wait for each service to become ready
#   CLICKHOUSE_MAX_MEMORY_USAGE [4000000000]        per-query memory cap (bytes)
#   CLICKHOUSE_MAX_MEMORY_ALL_QUERIES [8000000000]  cap over all running queries (bytes)
#
# Layout under the data dir:
#   run/           pidfiles (clickhouse.pid, postgres.pid, redis.pid), ports, lock
#   clickhouse/    rendered config.xml/users.xml (templates in deploy/local/clickhouse/),
#                  data/, tmp/, user_files/, format_schemas/, log/
#   postgres/      data/ (PGDATA, also holds the unix socket) and postgres.log; when the
#                  postgres OS user cannot reach this path (e.g. repo under a 0700 home),
#                  /var/tmp/analyticsd-pg-<hash of data dir path>/ is used instead.
#                  postgres.location records which one is in use.
#   redis/         redis.log (nothing is persisted: --save '' --appendonly no)
#
# Progress and errors go to stderr; only `env` and `status` write to stdout.
set -euo pipefail

SCRIPT_PATH=$(readlink -f -- "${BASH_SOURCE[0]}")
SCRIPT_DIR=$(dirname -- "$SCRIPT_PATH")
ROOT=$(cd -- "$SCRIPT_DIR/../.." && pwd -P)
TEMPLATE_DIR=$SCRIPT_DIR/clickhouse

CLICKHOUSE_PORT=${CLICKHOUSE_PORT:-19000}
CLICKHOUSE_HTTP_PORT=${CLICKHOUSE_HTTP_PORT:-18123}
POSTGRES_PORT=${POSTGRES_PORT:-15432}
REDIS_PORT=${REDIS_PORT:-16379}
STACK_TIMEOUT=${STACK_TIMEOUT:-90}
CLICKHOUSE_MAX_MEMORY_USAGE=${CLICKHOUSE_MAX_MEMORY_USAGE:-4000000000}
CLICKHOUSE_MAX_MEMORY_ALL_QUERIES=${CLICKHOUSE_MAX_MEMORY_ALL_QUERIES:-8000000000}

DATA_DIR=$(realpath -m -- "${ANALYTICS_DATA_DIR:-$ROOT/.data}")
RUN_DIR=$DATA_DIR/run
MARKER=$DATA_DIR/.analyticsd-stack

CH_DIR=$DATA_DIR/clickhouse
CH_CONFIG=$CH_DIR/config.xml
CH_PIDFILE=$RUN_DIR/clickhouse.pid
CH_PORTFILE=$RUN_DIR/clickhouse.port

PG_LOCFILE=$DATA_DIR/postgres.location
PG_PIDFILE=$RUN_DIR/postgres.pid
PG_PORTFILE=$RUN_DIR/postgres.port

REDIS_DIR=$DATA_DIR/redis
REDIS_PIDFILE=$RUN_DIR/redis.pid
REDIS_PORTFILE=$RUN_DIR/redis.port

SERVICES=(clickhouse postgres redis)
STOP_GRACE=20

# ---------------------------------------------------------------- helpers

log() { printf '%s\n' "$*" >&2; }
die() { printf 'stack.sh: %s\n' "$*" >&2; exit 1; }
warn() { printf 'stack.sh: warning: %s\n' "$*" >&2; }

is_root() { [ "$(id -u)" -eq 0 ]; }

check_number() { # NAME VALUE MIN MAX
  if [[ $2 =~ ^[0-9]+$ ]] && (( 10#$2 >= $3 && 10#$2 <= $4 )); then return 0; fi
  die "$1 must be an integer in [$3, $4], got '$2'"
}

validate_env() {
  check_number CLICKHOUSE_PORT "$CLICKHOUSE_PORT" 1 65535
  check_number CLICKHOUSE_HTTP_PORT "$CLICKHOUSE_HTTP_PORT" 1 65535
  check_number POSTGRES_PORT "$POSTGRES_PORT" 1 65535
  check_number REDIS_PORT "$REDIS_PORT" 1 65535
  check_number STACK_TIMEOUT "$STACK_TIMEOUT" 1 86400
  check_number CLICKHOUSE_MAX_MEMORY_USAGE "$CLICKHOUSE_MAX_MEMORY_USAGE" 0 999999999999999
  check_number CLICKHOUSE_MAX_MEMORY_ALL_QUERIES "$CLICKHOUSE_MAX_MEMORY_ALL_QUERIES" 0 999999999999999
  local dup
  dup=$(printf '%s\n' "$CLICKHOUSE_PORT" "$CLICKHOUSE_HTTP_PORT" "$POSTGRES_PORT" "$REDIS_PORT" | sort | uniq -d)
  [ -z "$dup" ] || die "port $dup is configured for two services"
}

# stack_ports: one NAME=PORT line per port the stack listens on.
stack_ports() {
  printf '%s\n' CLICKHOUSE_PORT="$CLICKHOUSE_PORT" CLICKHOUSE_HTTP_PORT="$CLICKHOUSE_HTTP_PORT" \
    POSTGRES_PORT="$POSTGRES_PORT" REDIS_PORT="$REDIS_PORT"
}

# warn_ephemeral NAME=PORT...: warn about each port inside the kernel's ephemeral range. The
# kernel gives ports from that range to outgoing connections as their local ports, so while a
# service is stopped (the fault suite stops and restarts each) any connection on the machine can
# take its port, and the restart fails with "address already in use". The default Postgres port
# was 55432 until a clean-clone run failed exactly so. Ports below the range go only to listeners.
warn_ephemeral() {
  local lo hi arg
  read -r lo hi 2>/dev/null </proc/sys/net/ipv4/ip_local_port_range || return 0
  for arg in "$@"; do
    if [ "${arg#*=}" -ge "$lo" ] && [ "${arg#*=}" -le "$hi" ]; then
      log "warning: ${arg%%=*}=${arg#*=} lies in the kernel's ephemeral port range ($lo-$hi): while the service is stopped an outgoing connection can take the port and its restart fails; pick one below $lo"
    fi
  done
}

# find_bin NAME: print the path of an executable, also looking in sbin dirs that a
# non-root PATH lacks (Debian puts clickhouse-server in /usr/sbin).
find_bin() {
  local d
  if command -v "$1" >/dev/null 2>&1; then command -v "$1"; return 0; fi
  for d in /usr/sbin /usr/bin /usr/local/sbin /usr/local/bin /sbin /bin; do
    if [ -x "$d/$1" ]; then printf '%s\n' "$d/$1"; return 0; fi
  done
  return 1
}

# pg_bindir [PGDATA]: bin dir of the server matching PGDATA's version if it is
# initialized, else the newest /usr/lib/postgresql/*/bin.
pg_bindir() {
  local d v best=""
  if [ -n "${1:-}" ] && [ -r "$1/PG_VERSION" ]; then
    v=$(cat "$1/PG_VERSION")
    if [ -x "/usr/lib/postgresql/$v/bin/postgres" ]; then
      printf '%s\n' "/usr/lib/postgresql/$v/bin"; return 0
    fi
  fi
  for d in /usr/lib/postgresql/*/bin; do
    if [ -x "$d/postgres" ] && [ -x "$d/initdb" ] && [ -x "$d/pg_ctl" ] \
       && [ -x "$d/psql" ] && [ -x "$d/pg_isready" ]; then
      best=$(printf '%s\n%s\n' "$best" "$d" | sed '/^$/d' | sort -V | tail -n 1)
    fi
  done
  [ -n "$best" ] || return 1
  printf '%s\n' "$best"
}

# ensure_packages SERVICE...: apt-get install what is missing for these services.
ensure_packages() {
  local svc pkgs=()
  for svc in "$@"; do
    case $svc in
      clickhouse)
        find_bin clickhouse-server >/dev/null || pkgs+=(clickhouse-server)
        find_bin clickhouse-client >/dev/null || pkgs+=(clickhouse-client) ;;
      postgres)
        pg_bindir >/dev/null || pkgs+=(postgresql) ;;
      redis)
        find_bin redis-server >/dev/null || pkgs+=(redis-server)
        find_bin redis-cli >/dev/null || pkgs+=(redis-tools) ;;
    esac
  done
  [ "${#pkgs[@]}" -gt 0 ] || return 0

  local sudo=()
  if ! is_root; then
    if command -v sudo >/dev/null 2>&1; then
      sudo=(sudo)
    else
      die "missing packages: ${pkgs[*]}; install them as root: apt-get install -y ${pkgs[*]}"
    fi
  fi
  local aptlog=$DATA_DIR/apt.log
  log "stack: installing Debian packages: ${pkgs[*]} (log: $aptlog)"
  if ! { "${sudo[@]}" apt-get update \
         && "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
              apt-get install -y --no-install-recommends "${pkgs[@]}"; } >"$aptlog" 2>&1 9>&-; then
    tail -n 30 "$aptlog" >&2 || true
    die "apt-get install ${pkgs[*]} failed (see $aptlog)"
  fi
  for svc in "$@"; do
    case $svc in
      clickhouse) find_bin clickhouse-server >/dev/null && find_bin clickhouse-client >/dev/null ;;
      postgres) pg_bindir >/dev/null ;;
      redis) find_bin redis-server >/dev/null && find_bin redis-cli >/dev/null ;;
    esac || die "$svc: binaries still missing after installing ${pkgs[*]}"
  done
}

read_pidfile() { # FILE -> pid on stdout, or nothing
  local p=""
  if [ -r "$1" ]; then IFS= read -r p 2>/dev/null <"$1" || true; fi
  [[ $p =~ ^[0-9]+$ ]] && printf '%s\n' "$p"
  return 0
}

# pid_matches PID PATTERN: the process exists (not a zombie: PID 1 here may not reap
# orphans) and its command line contains PATTERN. Guards against pid reuse.
pid_matches() {
  local -a args=()
  [[ ${1:-} =~ ^[0-9]+$ ]] || return 1
  mapfile -d '' -t args 2>/dev/null <"/proc/$1/cmdline" || return 1
  (( ${#args[@]} > 0 )) || return 1
  [[ " ${args[*]} " == *"$2"* ]]
}

# arg0_is PID NAME: the process's executable name (argv[0]) ends in NAME.
arg0_is() {
  local -a args=()
  mapfile -d '' -t args 2>/dev/null <"/proc/$1/cmdline" || return 1
  (( ${#args[@]} > 0 )) && [[ ${args[0]} == *"$2" ]]
}

# find_pid_by_cmdline NAME PATTERN: first live NAME process whose command line
# contains PATTERN.
find_pid_by_cmdline() {
  local f p
  while IFS= read -r f; do
    p=${f#/proc/}
    p=${p%/cmdline}
    if arg0_is "$p" "$1" && pid_matches "$p" "$2"; then printf '%s\n' "$p"; return 0; fi
  done < <(grep -alsF -e "$2" /proc/[0-9]*/cmdline 2>/dev/null || true)
  return 1
}

port_open() { # PORT: something accepts TCP connections on 127.0.0.1:PORT
  # shellcheck disable=SC2016 # $1 is expanded by the inner bash
  timeout 2 bash -c 'exec 3<>"/dev/tcp/127.0.0.1/$1"' _ "$1" >/dev/null 2>&1
}

ensure_port_free() { # SERVICE PORT VARNAME
  port_open "$2" || return 0
  local who=""
  if command -v ss >/dev/null 2>&1; then
    who=$(ss -Hltnp "sport = :$2" 2>/dev/null | sed -n 's/.*users:(("\([^"]*\)",pid=\([0-9]*\).*/\1 (pid \2)/p' | head -n 1)
  fi
  die "$1: port $2 on 127.0.0.1 is already in use by ${who:-another process} that this script did not start; stop it or pick another port ($3=...)"
}

recorded_port() { # PORTFILE DEFAULT
  local p=""
  if [ -r "$1" ]; then IFS= read -r p 2>/dev/null <"$1" || true; fi
  p=${p%% *}
  if [[ $p =~ ^[0-9]+$ ]]; then printf '%s\n' "$p"; else printf '%s\n' "$2"; fi
}

show_logs() { # FILE...
  local f
  for f in "$@"; do
    [ -s "$f" ] || continue
    printf -- '---- last lines of %s ----\n' "$f" >&2
    tail -n 25 "$f" >&2 || true
  done
}

# wait_ready SERVICE ALIVE_FN READY_FN LOGFILE...
wait_ready() {
  local svc=$1 alive=$2 ready=$3
  shift 3
  local deadline=$((SECONDS + STACK_TIMEOUT))
  while :; do
    if "$ready"; then return 0; fi
    if ! "$alive"; then
      log "$svc: process exited during startup"
      show_logs "$@"
      exit 1
    fi
    if (( SECONDS >= deadline )); then
      log "$svc: not ready after ${STACK_TIMEOUT}s (it is left running; 'stack.sh stop-service $svc' stops it)"
      show_logs "$@"
      exit 1
    fi
    sleep 0.2
  done
}

# stop_pid SERVICE PID PATTERN: SIGTERM, wait STOP_GRACE s, then SIGKILL.
stop_pid() {
  local svc=$1 pid=$2 pat=$3 i
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < STOP_GRACE * 10; i++)); do
    pid_matches "$pid" "$pat" || return 0
    sleep 0.1
  done
  log "$svc: still running ${STOP_GRACE}s after SIGTERM, sending SIGKILL"
  kill -KILL "$pid" 2>/dev/null || true
  for ((i = 0; i < 100; i++)); do
    pid_matches "$pid" "$pat" || return 0
    sleep 0.1
  done
  die "$svc: pid $pid survived SIGKILL"
}

xml_escape() {
  local s=$1
  s=${s//&/&amp;}; s=${s//</&lt;}; s=${s//>/&gt;}
  printf '%s' "$s"
}

sed_escape() { # escape for the replacement side of s|...|...|
  printf '%s' "$1" | sed -e 's/[\\&|]/\\&/g'
}

render() { # TEMPLATE OUTPUT
  local chdir
  chdir=$(sed_escape "$(xml_escape "$CH_DIR")")
  [ -r "$1" ] || die "template $1 not found"
  sed -e "s|@CH_DIR@|$chdir|g" \
      -e "s|@TCP_PORT@|$CLICKHOUSE_PORT|g" \
      -e "s|@HTTP_PORT@|$CLICKHOUSE_HTTP_PORT|g" \
      -e "s|@MAX_MEMORY_USAGE@|$CLICKHOUSE_MAX_MEMORY_USAGE|g" \
      -e "s|@MAX_MEMORY_ALL@|$CLICKHOUSE_MAX_MEMORY_ALL_QUERIES|g" \
      -e "s|@LOAD_BALANCING@|${CH_LOAD_BALANCING:-random}|g" \
      "$1" >"$2.tmp"
  mv -f "$2.tmp" "$2"
}

init_data_dir() {
  mkdir -p "$DATA_DIR" "$RUN_DIR"
  [ -e "$MARKER" ] || printf 'analyticsd local stack data (deploy/local/stack.sh), repo %s\n' "$ROOT" >"$MARKER"
}

take_lock() {
  exec 9>"$RUN_DIR/stack.lock"
  flock -w 600 9 || die "could not lock $RUN_DIR/stack.lock (another stack.sh still running?)"
}

# ---------------------------------------------------------------- clickhouse

CH_SERVER="" CH_CLIENT=""
ch_bins() {
  CH_SERVER=$(find_bin clickhouse-server) || die "clickhouse-server not found"
  CH_CLIENT=$(find_bin clickhouse-client) || die "clickhouse-client not found"
}

ch_pid() {
  local p
  p=$(read_pidfile "$CH_PIDFILE")
  if pid_matches "$p" "--config-file=$CH_CONFIG" && arg0_is "$p" clickhouse-server; then
    printf '%s\n' "$p"; return 0
  fi
  # pidfile lost or stale: look for a server running with our config.
  if p=$(find_pid_by_cmdline clickhouse-server "--config-file=$CH_CONFIG"); then
    [ -d "$RUN_DIR" ] && printf '%s\n' "$p" >"$CH_PIDFILE"
    printf '%s\n' "$p"; return 0
  fi
  return 1
}

CH_READY_PORT=""
ch_query() { # SQL (on port CH_READY_PORT)
  timeout 10 "$CH_CLIENT" --host 127.0.0.1 --port "$CH_READY_PORT" --user default \
    --connect_timeout 2 -q "$1" </dev/null
}
ch_alive() { ch_pid >/dev/null; }
ch_ready() { [ "$(ch_query 'SELECT 1' 2>/dev/null)" = 1 ]; }

start_clickhouse() {
  ensure_packages clickhouse
  ch_bins
  local pid logs=("$CH_DIR/log/clickhouse-server.err.log" "$CH_DIR/log/stdout.log" "$CH_DIR/log/clickhouse-server.log")
  if pid=$(ch_pid); then
    local ports
    ports=$(cat "$CH_PORTFILE" 2>/dev/null || true)
    if [ -n "$ports" ] && [ "$ports" != "$CLICKHOUSE_PORT $CLICKHOUSE_HTTP_PORT" ]; then
      die "clickhouse: already running (pid $pid) on ports '$ports', not $CLICKHOUSE_PORT $CLICKHOUSE_HTTP_PORT; run 'stack.sh stop-service clickhouse' first"
    fi
    # The server reads its config once: a template edited (or restored) since it started is not in
    # effect, and measurements taken now would silently be the old config's.
    local f stale=""
    for f in config.xml users.xml; do
      render "$TEMPLATE_DIR/$f.tmpl" "$RUN_DIR/$f.rendered"
      cmp -s "$RUN_DIR/$f.rendered" "$CH_DIR/$f" || stale="$stale $f"
      rm -f "$RUN_DIR/$f.rendered"
    done
    [ -z "$stale" ] || warn "clickhouse: running (pid $pid) with a different$stale than deploy/local/clickhouse/ renders now; 'stack.sh stop-service clickhouse && stack.sh start-service clickhouse' applies it"
  else
    rm -f "$CH_PIDFILE" "$CH_PORTFILE"
    ensure_port_free clickhouse "$CLICKHOUSE_PORT" CLICKHOUSE_PORT
    ensure_port_free clickhouse "$CLICKHOUSE_HTTP_PORT" CLICKHOUSE_HTTP_PORT
    mkdir -p "$CH_DIR"/{data,tmp,user_files,format_schemas,log}
    render "$TEMPLATE_DIR/config.xml.tmpl" "$CH_CONFIG"
    render "$TEMPLATE_DIR/users.xml.tmpl" "$CH_DIR/users.xml"
    # Foreground server in its own session rather than --daemon: with --daemon,
    # 18.16 loses early errors (bad config, missing log dir) and exits silently.
    (cd "$CH_DIR" && exec setsid "$CH_SERVER" --config-file="$CH_CONFIG") \
      </dev/null >>"$CH_DIR/log/stdout.log" 2>&1 9>&- &
    pid=$!
    printf '%s\n' "$pid" >"$CH_PIDFILE"
    printf '%s %s\n' "$CLICKHOUSE_PORT" "$CLICKHOUSE_HTTP_PORT" >"$CH_PORTFILE"
  fi
  CH_READY_PORT=$CLICKHOUSE_PORT
  wait_ready clickhouse ch_alive ch_ready "${logs[@]}"
  pid=$(ch_pid) || die "clickhouse: lost track of the server process"
  local i
  for ((i = 0; i < 50; i++)); do port_open "$CLICKHOUSE_HTTP_PORT" && break; sleep 0.1; done
  port_open "$CLICKHOUSE_HTTP_PORT" || die "clickhouse: native port answers but HTTP port $CLICKHOUSE_HTTP_PORT does not"
  ch_query 'CREATE DATABASE IF NOT EXISTS analytics' >/dev/null \
    || die "clickhouse: could not create database analytics"
  log "clickhouse: up (pid $pid, port $CLICKHOUSE_PORT, http $CLICKHOUSE_HTTP_PORT)"
}

stop_clickhouse() {
  local pid
  if pid=$(ch_pid); then
    stop_pid clickhouse "$pid" "--config-file=$CH_CONFIG"
    log "clickhouse: stopped (was pid $pid)"
  else
    log "clickhouse: not running"
  fi
  rm -f "$CH_PIDFILE" "$CH_PORTFILE"
}

# ---------------------------------------------------------------- postgres

PG_BASE="" PGDATA_DIR="" PG_BIN="" PG_LOG=""

pg_set_base() {
  PG_BASE=$1
  PGDATA_DIR=$PG_BASE/data
  PG_LOG=$PG_BASE/postgres.log
}

# Fallback location, unique per data dir (so two stacks never share a cluster).
pg_fallback_dir() {
  printf '/var/tmp/analyticsd-pg-%s\n' "$(printf '%s' "$DATA_DIR" | sha256sum | cut -c1-16)"
}

# pg_find_base: load the recorded location (for down/status); false if none. Only the
# two locations this data dir can own are accepted (a copied .data/ must not point
# at another checkout's cluster).
pg_find_base() {
  local b=""
  if [ -r "$PG_LOCFILE" ]; then IFS= read -r b <"$PG_LOCFILE" || true; fi
  [ -n "$b" ] && [ -d "$b" ] || return 1
  [ "$b" = "$DATA_DIR/postgres" ] || [ "$b" = "$(pg_fallback_dir)" ] || return 1
  pg_set_base "$b"
}

pg_run() { # run a postgres tool as the postgres OS user (the server refuses root)
  if is_root; then
    (cd / && exec runuser -u postgres -- "$@") 9>&-
  else
    (cd / && exec "$@") 9>&-
  fi
}

pg_ensure_os_user() {
  is_root || return 0
  id -u postgres >/dev/null 2>&1 && return 0
  log "postgres: creating OS user postgres"
  if getent group postgres >/dev/null 2>&1; then
    useradd --system -g postgres --home-dir /var/lib/postgresql --no-create-home --shell /bin/bash postgres
  else
    useradd --system --user-group --home-dir /var/lib/postgresql --no-create-home --shell /bin/bash postgres
  fi
}

pg_prepare_dir() { # DIR: create, hand to postgres; true if postgres can use it
  mkdir -p "$1" || return 1
  if is_root; then
    chown postgres:postgres "$1" && chmod 700 "$1" || return 1
    runuser -u postgres -- test -r "$1" -a -w "$1" -a -x "$1" 2>/dev/null
  else
    chmod 700 "$1"
  fi
}

# pg_choose_base: the recorded location, else <data>/postgres, else the /var/tmp
# fallback when the postgres OS user cannot traverse into the data dir.
pg_choose_base() {
  if pg_find_base && pg_prepare_dir "$PG_BASE"; then return 0; fi
  local cand=$DATA_DIR/postgres
  if ! pg_prepare_dir "$cand"; then
    rmdir "$cand" 2>/dev/null || true
    cand=$(pg_fallback_dir)
    pg_prepare_dir "$cand" || die "postgres: neither $DATA_DIR/postgres nor $cand is usable by the postgres OS user"
    log "postgres: OS user postgres cannot reach $DATA_DIR; using $cand"
  fi
  printf '%s\n' "$cand" >"$PG_LOCFILE"
  pg_set_base "$cand"
}

pg_pid() {
  local p
  [ -n "$PGDATA_DIR" ] || return 1
  p=$(read_pidfile "$PGDATA_DIR/postmaster.pid")
  pid_matches "$p" postgres || return 1
  printf '%s\n' "$p"
}

PG_READY_PORT=""
pg_psql() { # SQL, as superuser postgres over TCP (trust auth)
  timeout 15 "$PG_BIN/psql" "host=127.0.0.1 port=$PG_READY_PORT user=postgres dbname=postgres sslmode=disable connect_timeout=3" \
    -X -q -t -A -v ON_ERROR_STOP=1 -c "$1" </dev/null
}
pg_alive() { pg_pid >/dev/null; }
pg_ready() {
  "$PG_BIN/pg_isready" -q -h 127.0.0.1 -p "$PG_READY_PORT" -t 2 </dev/null >/dev/null 2>&1 \
    && [ "$(pg_psql 'SELECT 1' 2>/dev/null)" = 1 ]
}

pg_write_conf() {
  local sockdir=$PGDATA_DIR conf=$PGDATA_DIR/analyticsd.conf
  # unix socket paths are limited to 107 bytes; fall back to TCP only.
  if (( ${#sockdir} + 17 > 107 )); then sockdir=""; fi
  {
    printf '# Written by deploy/local/stack.sh on every start; do not edit.\n'
    printf "listen_addresses = '127.0.0.1'\n"
    printf 'port = %s\n' "$POSTGRES_PORT"
    printf "unix_socket_directories = '%s'\n" "${sockdir//\'/\'\'}"
    printf 'max_connections = 200\n'
  } >"$conf.tmp"
  mv -f "$conf.tmp" "$conf"
  if is_root; then chown postgres:postgres "$conf"; fi
  if ! grep -qx "include_if_exists = 'analyticsd.conf'" "$PGDATA_DIR/postgresql.conf"; then
    printf "\n# analyticsd local stack settings\ninclude_if_exists = 'analyticsd.conf'\n" >>"$PGDATA_DIR/postgresql.conf"
  fi
}

start_postgres() {
  ensure_packages postgres
  pg_ensure_os_user
  pg_choose_base
  PG_BIN=$(pg_bindir "$PGDATA_DIR") || die "postgres: no server binaries in /usr/lib/postgresql/*/bin"
  local pid out
  if [ -s "$PGDATA_DIR/PG_VERSION" ] && [ "$PG_BIN" != "/usr/lib/postgresql/$(cat "$PGDATA_DIR/PG_VERSION")/bin" ]; then
    die "postgres: $PGDATA_DIR was created by PostgreSQL $(cat "$PGDATA_DIR/PG_VERSION"), whose server is not installed (found $PG_BIN); 'stack.sh destroy' resets the stack"
  fi
  if pid=$(pg_pid); then
    local port
    port=$(recorded_port "$PG_PORTFILE" "$POSTGRES_PORT")
    [ "$port" = "$POSTGRES_PORT" ] \
      || die "postgres: already running (pid $pid) on port $port, not $POSTGRES_PORT; run 'stack.sh stop-service postgres' first"
  else
    rm -f "$PG_PIDFILE" "$PG_PORTFILE"
    ensure_port_free postgres "$POSTGRES_PORT" POSTGRES_PORT
    if [ ! -s "$PGDATA_DIR/PG_VERSION" ]; then
      if [ -e "$PGDATA_DIR" ]; then
        log "postgres: removing incomplete cluster in $PGDATA_DIR"
        rm -rf "$PGDATA_DIR"
      fi
      if ! out=$(pg_run "$PG_BIN/initdb" -D "$PGDATA_DIR" --auth=trust -U postgres \
                   --encoding=UTF8 --locale=C 2>&1); then
        printf '%s\n' "$out" >&2
        die "postgres: initdb failed"
      fi
    fi
    pg_write_conf
    if ! out=$(pg_run "$PG_BIN/pg_ctl" start -D "$PGDATA_DIR" -l "$PG_LOG" -w -t "$STACK_TIMEOUT" 2>&1); then
      printf '%s\n' "$out" >&2
      show_logs "$PG_LOG"
      die "postgres: pg_ctl start failed"
    fi
    pid=$(pg_pid) || { show_logs "$PG_LOG"; die "postgres: started but no postmaster.pid"; }
    printf '%s\n' "$pid" >"$PG_PIDFILE"
    printf '%s\n' "$POSTGRES_PORT" >"$PG_PORTFILE"
  fi
  PG_READY_PORT=$POSTGRES_PORT
  wait_ready postgres pg_alive pg_ready "$PG_LOG"
  pid=$(pg_pid) || die "postgres: lost track of the server process"
  printf '%s\n' "$pid" >"$PG_PIDFILE"
  # role and database, idempotently, in one round trip (\gexec runs the generated
  # CREATE DATABASE outside a transaction block)
  if ! timeout 30 "$PG_BIN/psql" "host=127.0.0.1 port=$POSTGRES_PORT user=postgres dbname=postgres sslmode=disable connect_timeout=3" \
       -X -q -t -A -v ON_ERROR_STOP=1 -f - >/dev/null <<'SQL'
DO $$BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'analytics') THEN
    CREATE ROLE analytics LOGIN CREATEDB PASSWORD 'analytics';
  END IF;
END$$;
SELECT 'CREATE DATABASE analytics OWNER analytics'
 WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = 'analytics') \gexec
SQL
  then
    die "postgres: could not create role/database analytics"
  fi
  log "postgres: up (pid $pid, port $POSTGRES_PORT)"
}

stop_postgres() {
  local pid out
  if pg_find_base && pid=$(pg_pid); then
    PG_BIN=$(pg_bindir "$PGDATA_DIR") || die "postgres: server binaries not found"
    if ! out=$(pg_run "$PG_BIN/pg_ctl" stop -D "$PGDATA_DIR" -m fast -w -t 60 2>&1); then
      printf '%s\n' "$out" >&2
      pid_matches "$pid" postgres && stop_pid postgres "$pid" postgres
    fi
    log "postgres: stopped (was pid $pid)"
  else
    log "postgres: not running"
  fi
  rm -f "$PG_PIDFILE" "$PG_PORTFILE"
}

# ---------------------------------------------------------------- redis

REDIS_SERVER="" REDIS_CLI=""
redis_bins() {
  REDIS_SERVER=$(find_bin redis-server) || die "redis-server not found"
  REDIS_CLI=$(find_bin redis-cli) || die "redis-cli not found"
}

redis_pid() {
  local p port
  p=$(read_pidfile "$REDIS_PIDFILE")
  port=$(recorded_port "$REDIS_PORTFILE" "$REDIS_PORT")
  # redis sets its process title to "redis-server 127.0.0.1:PORT"
  pid_matches "$p" "redis-server" && pid_matches "$p" "127.0.0.1:$port" || return 1
  printf '%s\n' "$p"
}

REDIS_READY_PORT="" REDIS_GRACE_UNTIL=0
redis_alive() {
  redis_pid >/dev/null && return 0
  # the daemonized child writes its pidfile only after binding; allow a moment
  [ ! -e "$REDIS_PIDFILE" ] && (( SECONDS < REDIS_GRACE_UNTIL ))
}
redis_ready() {
  [ "$(timeout 5 "$REDIS_CLI" -h 127.0.0.1 -p "$REDIS_READY_PORT" ping </dev/null 2>/dev/null)" = PONG ]
}

start_redis() {
  ensure_packages redis
  redis_bins
  local pid out
  if pid=$(redis_pid); then
    local port
    port=$(recorded_port "$REDIS_PORTFILE" "$REDIS_PORT")
    [ "$port" = "$REDIS_PORT" ] \
      || die "redis: already running (pid $pid) on port $port, not $REDIS_PORT; run 'stack.sh stop-service redis' first"
  else
    rm -f "$REDIS_PIDFILE" "$REDIS_PORTFILE"
    ensure_port_free redis "$REDIS_PORT" REDIS_PORT
    mkdir -p "$REDIS_DIR"
    printf '%s\n' "$REDIS_PORT" >"$REDIS_PORTFILE"
    if ! out=$(cd "$REDIS_DIR" && "$REDIS_SERVER" --port "$REDIS_PORT" --bind 127.0.0.1 \
                 --daemonize yes --pidfile "$REDIS_PIDFILE" --logfile "$REDIS_DIR/redis.log" \
                 --dir "$REDIS_DIR" --save '' --appendonly no </dev/null 2>&1 9>&-); then
      printf '%s\n' "$out" >&2
      show_logs "$REDIS_DIR/redis.log"
      die "redis: redis-server failed to start"
    fi
    REDIS_GRACE_UNTIL=$((SECONDS + 5))
  fi
  REDIS_READY_PORT=$REDIS_PORT
  wait_ready redis redis_alive redis_ready "$REDIS_DIR/redis.log"
  local i
  for ((i = 0; i < 50; i++)); do pid=$(redis_pid) && break; sleep 0.1; done
  [ -n "$pid" ] || die "redis: answers on port $REDIS_PORT but wrote no pidfile $REDIS_PIDFILE"
  log "redis: up (pid $pid, port $REDIS_PORT)"
}

stop_redis() {
  local pid
  if pid=$(redis_pid); then
    stop_pid redis "$pid" redis-server
    log "redis: stopped (was pid $pid)"
  else
    log "redis: not running"
  fi
  rm -f "$REDIS_PIDFILE" "$REDIS_PORTFILE"
}

# ---------------------------------------------------------------- status

# status_line SERVICE: print one line; true if the service is up and answering.
status_line() {
  local svc=$1 pid="" port state=down
  case $svc in
    clickhouse)
      port=$(recorded_port "$CH_PORTFILE" "$CLICKHOUSE_PORT")
      if pid=$(ch_pid 2>/dev/null); then
        state=unhealthy
        if CH_CLIENT=$(find_bin clickhouse-client); then
          CH_READY_PORT=$port
          ch_ready && state=up
        fi
      fi ;;
    postgres)
      port=$(recorded_port "$PG_PORTFILE" "$POSTGRES_PORT")
      if pg_find_base && pid=$(pg_pid); then
        state=unhealthy
        if PG_BIN=$(pg_bindir "$PGDATA_DIR"); then
          PG_READY_PORT=$port
          pg_ready && state=up
        fi
      fi ;;
    redis)
      port=$(recorded_port "$REDIS_PORTFILE" "$REDIS_PORT")
      if pid=$(redis_pid); then
        state=unhealthy
        if REDIS_CLI=$(find_bin redis-cli); then
          REDIS_READY_PORT=$port
          redis_ready && state=up
        fi
      fi ;;
  esac
  printf '%-10s %-9s pid=%-8s port=%s\n' "$svc" "$state" "${pid:--}" "$port"
  [ "$state" = up ]
}

# ---------------------------------------------------------------- commands

check_service() {
  case ${1:-} in
    clickhouse|postgres|redis) ;;
    *) die "unknown service '${1:-}' (expected clickhouse, postgres or redis)" ;;
  esac
}

cmd_up() {
  validate_env
  local ports
  mapfile -t ports < <(stack_ports)
  warn_ephemeral "${ports[@]}"
  init_data_dir
  take_lock
  ensure_packages "${SERVICES[@]}"
  local svc
  for svc in "${SERVICES[@]}"; do "start_$svc"; done
}

cmd_down() {
  if [ ! -d "$RUN_DIR" ]; then
    local svc
    for svc in "${SERVICES[@]}"; do log "$svc: not running"; done
    return 0
  fi
  take_lock
  stop_redis
  stop_postgres
  stop_clickhouse
}

cmd_status() {
  local svc rc=0
  for svc in "${SERVICES[@]}"; do status_line "$svc" || rc=1; done
  return "$rc"
}

cmd_env() {
  validate_env
  printf "export CLICKHOUSE_DSN='clickhouse://default:@127.0.0.1:%s/analytics'\n" "$CLICKHOUSE_PORT"
  printf "export CLICKHOUSE_HTTP_URL='http://127.0.0.1:%s'\n" "$CLICKHOUSE_HTTP_PORT"
  printf "export POSTGRES_URL='postgres://analytics:analytics@127.0.0.1:%s/analytics?sslmode=disable'\n" "$POSTGRES_PORT"
  printf "export REDIS_URL='redis://127.0.0.1:%s/0'\n" "$REDIS_PORT"
}

cmd_start_service() {
  check_service "${1:-}"
  validate_env
  init_data_dir
  take_lock
  "start_$1"
}

cmd_stop_service() {
  check_service "${1:-}"
  if [ ! -d "$RUN_DIR" ]; then log "$1: not running"; return 0; fi
  take_lock
  "stop_$1"
}

cmd_destroy() {
  if [ ! -e "$DATA_DIR" ]; then log "stack: nothing to destroy at $DATA_DIR"; return 0; fi
  [ -e "$MARKER" ] || die "$DATA_DIR has no $(basename "$MARKER") marker; refusing to delete it"
  cmd_down
  local pgbase=""
  pg_find_base && pgbase=$PG_BASE
  if [ -n "$pgbase" ] && [ "$pgbase" != "$DATA_DIR/postgres" ]; then rm -rf -- "$pgbase"; fi
  rm -rf -- "$CH_DIR" "$REDIS_DIR" "$DATA_DIR/postgres" "$PG_LOCFILE" "$DATA_DIR/apt.log" "$RUN_DIR" "$MARKER"
  rmdir -- "$DATA_DIR" 2>/dev/null || true
  log "stack: deleted data in $DATA_DIR"
}

usage() {
  sed -n '2,/^set -euo/p' "$SCRIPT_PATH" | sed -e '$d' -e 's/^# \{0,1\}//' >&2
}

main() {
  local cmd=${1:-}
  [ $# -gt 0 ] && shift
  case $cmd in
    up) cmd_up ;;
    down) cmd_down ;;
    status) cmd_status ;;
    env) cmd_env ;;
    start-service) cmd_start_service "$@" ;;
    stop-service) cmd_stop_service "$@" ;;
    destroy) cmd_destroy ;;
    -h|--help|help) usage ;;
    *) usage; exit 2 ;;
  esac
}

# cluster.sh sources this file for its helpers; only a direct run executes a command.
if [[ ${BASH_SOURCE[0]} == "$0" ]]; then
  main "$@"
fi
