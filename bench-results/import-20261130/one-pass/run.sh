#!/usr/bin/env bash
# Per-tenant reads and inserts (HEAD 2321074, analyticsd-old) against one pass over the source for all
# tenants (analyticsd-new), and the clickhouse-client baseline, on 200,000 events of seed.sql, in one run.
# Binaries: git archive 2321074 | tar -x -C /tmp/oldsrc && (cd /tmp/oldsrc && go build -o /tmp/analyticsd-old ./cmd/analyticsd);
#           go build -o /tmp/analyticsd-new ./cmd/analyticsd (the working tree with importer/recent.go)
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(../../deploy/local/stack.sh env)"
PG=postgres://analytics:analytics@127.0.0.1:${POSTGRES_PORT:-15432}
CHP=${CLICKHOUSE_PORT:-19000}
SRC="$PG/import_bench_src?sslmode=disable&search_path=import_src"
PSQL_SRC="$PG/import_bench_src?sslmode=disable&options=-csearch_path%3Dimport_src"
psql "$PG/analytics?sslmode=disable" -q -c "DROP DATABASE IF EXISTS import_bench_src" -c "CREATE DATABASE import_bench_src"
psql "$PG/import_bench_src?sslmode=disable" -q -v n=200000 -v ON_ERROR_STOP=1 -f seed.sql | tail -3
target() { echo "CLICKHOUSE_DSN=clickhouse://default:@127.0.0.1:$CHP/import_bench_$1 POSTGRES_URL=$PG/import_bench_$1?sslmode=disable LOG_LEVEL=warn"; }
fresh() {
	clickhouse-client --port "$CHP" --query "DROP DATABASE IF EXISTS import_bench_$1"
	psql "$PG/analytics?sslmode=disable" -q -c "DROP DATABASE IF EXISTS import_bench_$1" -c "CREATE DATABASE import_bench_$1"
	env $(target "$1") /tmp/analyticsd-new migrate 2>&1 | tail -1
}
for round in 1 2; do
	echo "== round $round $(date -u +%FT%TZ)"; uptime
	fresh raw
	/usr/bin/time -f "baseline dump: %e s" psql "$PSQL_SRC" -c "\\copy (SELECT tenant_id, to_char(ts AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS'), id, to_char(ts AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS'), event, COALESCE(source, 'app'), COALESCE(user_id, ''), COALESCE(props::text, '{}'), COALESCE(ip, ''), COALESCE(request_id, '') FROM analytics_events) TO '/tmp/import_bench_events.tsv'"
	/usr/bin/time -f "baseline load: %e s" clickhouse-client --port "$CHP" --query "INSERT INTO import_bench_raw.events (tenant_id, ts, id, received_at, event, source, user_id, props, ip, request_id) FORMAT TSV" < /tmp/import_bench_events.tsv
	rm -f /tmp/import_bench_events.tsv
	for v in old new; do
		fresh "$v"
		env $(target "$v") /usr/bin/time -f "import $v: %e s wall, %U s user, %M KB max RSS" /tmp/analyticsd-$v import --source "$SRC" --progress off
		clickhouse-client --port "$CHP" --query "SELECT '$v', count() AS events, (SELECT sum(count) FROM import_bench_$v.daily_usage) AS counted, (SELECT count() FROM system.parts WHERE database = 'import_bench_$v' AND table = 'events') AS parts_now FROM import_bench_$v.events"
	done
	uptime
done
