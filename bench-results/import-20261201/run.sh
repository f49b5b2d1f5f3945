#!/usr/bin/env bash
# before/after of the importer's per-metric settlement records: 200k events, ABAB.
set -uo pipefail
cd /work/main
eval "$(deploy/local/stack.sh env)"
export PATH=$PATH:/usr/local/go/bin
PG=postgres://analytics:analytics@127.0.0.1:15432
CHP=19000
SRC="$PG/import_bench_src?sslmode=disable&search_path=import_src"
psql "$PG/analytics?sslmode=disable" -q -c "DROP DATABASE IF EXISTS import_bench_src" -c "CREATE DATABASE import_bench_src"
(cd bench-results/import-20261130 && /usr/bin/time -f "seed: %e s" psql -q "$PG/import_bench_src?sslmode=disable" -v n=200000 -f seed.sql > /dev/null)
git worktree add -q /tmp/impbench/before 31e8d23 2>/dev/null
(cd /tmp/impbench/before && go build -o /tmp/impbench/analyticsd-before ./cmd/analyticsd)
go build -o /tmp/impbench/analyticsd-after ./cmd/analyticsd
fresh() {
  clickhouse-client --port $CHP --query "DROP DATABASE IF EXISTS import_bench_$1"
  psql "$PG/analytics?sslmode=disable" -q -c "DROP DATABASE IF EXISTS import_bench_$1" -c "CREATE DATABASE import_bench_$1"
  env CLICKHOUSE_DSN=clickhouse://default:@127.0.0.1:$CHP/import_bench_$1 POSTGRES_URL=$PG/import_bench_$1?sslmode=disable LOG_LEVEL=warn /tmp/impbench/analyticsd-$2 migrate > /dev/null 2>&1
}
for round in 1 2; do
  for v in before after; do
    fresh $v $v
    echo "== round $round $v $(uptime)"
    env CLICKHOUSE_DSN=clickhouse://default:@127.0.0.1:$CHP/import_bench_$v POSTGRES_URL=$PG/import_bench_$v?sslmode=disable LOG_LEVEL=warn \
      /usr/bin/time -f "$v: %e s wall, %U s user, %S s sys, %M KB max RSS" /tmp/impbench/analyticsd-$v import --source "$SRC" --progress off 2>&1 | grep -v "^$" | tail -8
    clickhouse-client --port $CHP --query "SELECT count() AS events, (SELECT sum(count) FROM import_bench_$v.daily_usage) AS counted FROM import_bench_$v.events"
  done
done
git worktree remove --force /tmp/impbench/before
