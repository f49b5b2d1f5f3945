#!/usr/bin/env bash
# CPU per event of the local cluster's servers (all four ClickHouse servers and ZooKeeper) against the
# single stack's ClickHouse, for the same rows: N events generated server-side (numbers()) and inserted
# through analyticsd's own tables (migrated into a scratch database), once into the Distributed table
# with insert_distributed_sync=1, once into the single server's events; the CPU counted includes the
# 5 s after (replicas fetching, first merges). Prints CPU seconds per process and µs per event. Needs
# both stacks up.
set -euo pipefail
N=${N:-500000}
cd "$(dirname "$0")/../.."
ticks() { awk '{print $14+$15}' "/proc/$1/stat"; }
hz=$(getconf CLK_TCK)
pids_cluster=$(for n in ch1 ch2 ch3 ch4; do cat .data/cluster/run/$n.pid; done; cat .data/cluster/run/zookeeper.pid)
pid_single=$(cat .data/run/clickhouse.pid)
gen="SELECT toUUID(concat('00000000-0000-4000-8000-', substring(toString(1000000000000 + number % 48), 2))) AS tenant_id, now() - number % 2592000 AS ts, generateUUIDv4() AS id, now() AS received_at, ['auth.user.login','apikey.request','build.completed'][number % 3 + 1] AS event, 'app' AS source, concat('u', toString(number % 5000)) AS user_id, concat('{\"n\":', toString(number), ',\"path\":\"/v1/items\"}') AS props, '' AS ip, '' AS request_id FROM numbers($N)"
cols="tenant_id, ts, id, received_at, event, source, user_id, props, ip, request_id"
run() { # label port db cluster-clause settings pids...
  local label=$1 port=$2 db=$3; shift 3
  local -a before=() ; local p i=0 total=0
  for p in "$@"; do before+=("$(ticks "$p")"); done
  local t0=$(date +%s.%N)
  clickhouse-client --port "$port" --insert_distributed_sync=1 -q "INSERT INTO $db.events ($cols) $gen"
  local t1=$(date +%s.%N)
  sleep 5 # replicas fetch the parts, merges begin: counted in the CPU, not in the wall time
  for p in "$@"; do
    local d=$(( $(ticks "$p") - before[i] )); total=$((total + d)); i=$((i + 1))
    printf '  pid %-7s %6.2f s CPU\n' "$p" "$(echo "$d / $hz" | bc -l)"
  done
  printf '%s: %d events in %.2f s wall (%.0f events/s), %.2f s CPU in all: %.1f µs per event\n' "$label" "$N" \
    "$(echo "$t1 - $t0" | bc -l)" "$(echo "$N / ($t1 - $t0)" | bc -l)" "$(echo "$total / $hz" | bc -l)" "$(echo "$total / $hz * 1000000 / $N" | bc -l)"
}
db=cpu_$(date +%s)
export CLICKHOUSE_DSN="clickhouse://default:@127.0.0.1:19000/$db" CLICKHOUSE_CLUSTER=
go run ./cmd/analyticsd migrate >/dev/null 2>&1
run "one server" 19000 "$db" "$pid_single"
clickhouse-client --port 19000 -q "DROP DATABASE $db"
eval "$(deploy/local/cluster.sh env)"
export CLICKHOUSE_DSN="clickhouse://default:@127.0.0.1:19101,127.0.0.1:19102,127.0.0.1:19103,127.0.0.1:19104/$db"
go run ./cmd/analyticsd migrate >/dev/null 2>&1
# shellcheck disable=SC2086
run "cluster 2x2" 19101 "$db" $pids_cluster
clickhouse-client --port 19101 -q "DROP DATABASE $db ON CLUSTER analytics_cluster" >/dev/null
