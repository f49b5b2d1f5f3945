#!/usr/bin/env bash
# The import benchmark of BENCHMARKS.md ("Import from Postgres"): 1M events of the guide's tables,
# `analyticsd import` against clickhouse-client loading the same rows from a TSV dump, in one run.
# Prerequisites: the local stack (deploy/local/stack.sh up), and the source seeded once with
#   psql "postgres://analytics:analytics@127.0.0.1:15432/import_bench_src?sslmode=disable" -v n=1000000 -f seed.sql
# into the database import_bench_src (CREATE DATABASE, empty). Targets import_bench_{raw,a,b} are made here.
# Usage: bench-results/import-20261130/run.sh [clean|resume|baseline|all]  (default all)
set -euo pipefail
cd "$(dirname "$0")/../.."
eval "$(deploy/local/stack.sh env)"
export PATH=$PATH:/usr/local/go/bin
OUT=bench-results/import-20261130
PG=postgres://analytics:analytics@127.0.0.1:${POSTGRES_PORT:-15432}
CHP=${CLICKHOUSE_PORT:-19000}
SRC="$PG/import_bench_src?sslmode=disable&search_path=import_src"
PSQL_SRC="$PG/import_bench_src?sslmode=disable&options=-csearch_path%3Dimport_src" # psql does not take search_path in a URI
BIN=/tmp/analyticsd-import-bench
go build -o "$BIN" ./cmd/analyticsd

target() { # target NAME: env for analyticsd pointing at ClickHouse database import_bench_NAME and Postgres database import_bench_NAME
	echo "CLICKHOUSE_DSN=clickhouse://default:@127.0.0.1:$CHP/import_bench_$1 POSTGRES_URL=$PG/import_bench_$1?sslmode=disable LOG_LEVEL=warn"
}
fresh() { # fresh NAME: drop both of the target's databases (the checkpoint lives in Postgres) and migrate
	clickhouse-client --port "$CHP" --query "DROP DATABASE IF EXISTS import_bench_$1"
	psql "$PG/analytics?sslmode=disable" -q -c "DROP DATABASE IF EXISTS import_bench_$1" -c "CREATE DATABASE import_bench_$1"
	env $(target "$1") "$BIN" migrate 2>&1 | tail -1
}

baseline() {
	{ echo "== $(date -u +%FT%TZ) baseline: dump the rows as TSV, load them with clickhouse-client"; uptime
	fresh raw
	echo "-- dump (psql \\copy, the same columns and NULL defaults the import uses)"
	/usr/bin/time -f "dump: %e s wall, %U s user, %S s sys, %M KB max RSS" psql "$PSQL_SRC" -c "\\copy (SELECT tenant_id, to_char(ts AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS'), id, to_char(ts AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS'), event, COALESCE(source, 'app'), COALESCE(user_id, ''), COALESCE(props::text, '{}'), COALESCE(ip, ''), COALESCE(request_id, '') FROM analytics_events) TO '/tmp/import_bench_events.tsv'"
	ls -l /tmp/import_bench_events.tsv
	echo "-- load: clickhouse-client --port $CHP --query \"INSERT INTO import_bench_raw.events (...) FORMAT TSV\" < /tmp/import_bench_events.tsv"
	/usr/bin/time -f "load: %e s wall, %U s user, %S s sys, %M KB max RSS" clickhouse-client --port "$CHP" --query "INSERT INTO import_bench_raw.events (tenant_id, ts, id, received_at, event, source, user_id, props, ip, request_id) FORMAT TSV" < /tmp/import_bench_events.tsv
	clickhouse-client --port "$CHP" --query "SELECT count() AS events, (SELECT sum(count) FROM import_bench_raw.daily_usage) AS counted FROM import_bench_raw.events"
	uptime; rm -f /tmp/import_bench_events.tsv; } 2>&1 | tee "$OUT/baseline.out"
}

clean() {
	{ echo "== $(date -u +%FT%TZ) analyticsd import, uninterrupted, into import_bench_a"; uptime
	fresh a
	echo "-- $BIN import --source '$SRC' --progress lines"
	env $(target a) /usr/bin/time -f "import: %e s wall, %U s user, %S s sys, %M KB max RSS" "$BIN" import --source "$SRC" --progress lines
	clickhouse-client --port "$CHP" --query "SELECT count() AS events, (SELECT sum(count) FROM import_bench_a.daily_usage) AS counted FROM import_bench_a.events"
	uptime; } 2>&1 | tee "$OUT/clean.out"
}

resume() {
	{ echo "== $(date -u +%FT%TZ) analyticsd import into import_bench_b, kill -9 after ${KILL_AFTER:-6} s, then the same command again"; uptime
	fresh b
	env $(target b) "$BIN" import --source "$SRC" --progress lines & pid=$!
	sleep "${KILL_AFTER:-6}"; kill -9 "$pid"; wait "$pid" || echo "killed: exit $?"
	psql "$PG/import_bench_b?sslmode=disable" -Atc "SELECT 'checkpoint after the kill: ' || state || ' ' || count(*) FROM import_days GROUP BY state"
	clickhouse-client --port "$CHP" --query "SELECT 'events after the kill', count() FROM import_bench_b.events"
	echo "-- resumed"
	env $(target b) /usr/bin/time -f "resume: %e s wall, %U s user, %S s sys, %M KB max RSS" "$BIN" import --source "$SRC" --progress lines
	echo "-- again (adds nothing)"
	env $(target b) "$BIN" import --source "$SRC" --progress off
	clickhouse-client --port "$CHP" --query "SELECT count() AS events, (SELECT sum(count) FROM import_bench_b.daily_usage) AS counted FROM import_bench_b.events"
	uptime; } 2>&1 | tee "$OUT/resume.out"
}

case "${1:-all}" in
baseline) baseline ;;
clean) clean ;;
resume) resume ;;
all) baseline; clean; resume ;;
esac
