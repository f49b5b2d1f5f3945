// Package relocate moves an analytics database from one ClickHouse server onto a cluster: the raw
// events and increments, and the part of the daily aggregates that no raw row still stored explains
// (days past retention), so that the cluster answers every read as the old server did and bills the
// same. It copies with the cluster's own INSERT … SELECT FROM remote(), so the rows go from server to
// server without passing through analyticsd, and it checks the result per tenant, day and metric.
//
// It does not create the cluster's tables (`analyticsd migrate` with CLICKHOUSE_CLUSTER does), stop
// writers (the old server must take no writes while it runs: stop the API instances, drain their
// spools), or touch Postgres and Redis (the same Postgres serves both layouts; live counters rebuild
// from ClickHouse).
package relocate

import (
	"context"
	"errors"
	"fmt"
	"regexp"
	"strings"

	"github.com/ClickHouse/clickhouse-go/v2"
	"github.com/ClickHouse/clickhouse-go/v2/lib/driver"

	"github.com/analyticsd/analyticsd/schema"
)

// Source is the single server's database, as the cluster's servers reach it.
type Source struct {
	Addr     string // host:port, native protocol
	DB       string
	User     string
	Password string
}

var addrRe = regexp.MustCompile(`^[A-Za-z0-9._\-\[\]:]+:[0-9]{1,5}$`)

// ParseSource reads a CLICKHOUSE_DSN-style URL naming one server: clickhouse://user:pass@host:9000/db.
func ParseSource(dsn string) (Source, error) {
	opts, err := clickhouse.ParseDSN(dsn)
	if err != nil {
		return Source{}, fmt.Errorf("--from: %v (want clickhouse://user:password@host:9000/database)", err)
	}
	if len(opts.Addr) != 1 {
		return Source{}, fmt.Errorf("--from: want exactly one server, got %d", len(opts.Addr))
	}
	s := Source{Addr: opts.Addr[0], DB: opts.Auth.Database, User: opts.Auth.Username, Password: opts.Auth.Password}
	if s.DB == "" || s.DB == "default" {
		s.DB = "analytics"
	}
	if s.User == "" {
		s.User = "default"
	}
	if !addrRe.MatchString(s.Addr) {
		return Source{}, fmt.Errorf("--from: %q is not host:port", s.Addr)
	}
	if !schema.ValidIdent(s.DB) {
		return Source{}, fmt.Errorf("--from: database %q is not a plain identifier", s.DB)
	}
	return s, nil
}

// remote is the remote() table function reading table of the source; every part is checked or quoted.
func (s Source) remote(table string) string {
	return fmt.Sprintf("remote(%s, %s, %s, %s, %s)", quote(s.Addr), s.DB, table, quote(s.User), quote(s.Password))
}

func quote(v string) string {
	return "'" + strings.NewReplacer(`\`, `\\`, `'`, `\'`).Replace(v) + "'"
}

// Result says what Copy moved and found.
type Result struct {
	Events     uint64 `json:"events"`
	Increments uint64 `json:"increments"`
	// UsageOnly is how many (tenant, day, metric) aggregates were copied as such: their raw rows
	// are no longer stored (past retention), or never were.
	UsageOnly uint64 `json:"usage_only_rows"`
	// Checked is how many (tenant, day, metric) totals of daily usage were compared, all equal.
	Checked int `json:"usage_totals_checked"`
}

// ErrNotEmpty: the cluster already holds rows. A copy that was interrupted left some: drop the
// cluster's database, run migrate again, and copy again.
var ErrNotEmpty = errors.New("the cluster's tables are not empty")

// Mismatch is a verification failure: totals that differ between the two sides.
type Mismatch struct {
	What  string
	Diffs []string // the first few
	Total int
}

func (m *Mismatch) Error() string {
	return fmt.Sprintf("verification failed: %d %s differ between the server and the cluster, e.g. %s", m.Total, m.What, strings.Join(m.Diffs, "; "))
}

// Copy moves src onto the cluster ch connects to (l names it). ch must insert synchronously into the
// Distributed tables (insert_distributed_sync=1, as analyticsd's connection on a cluster does), so
// every row is on its shard when a statement returns.
func Copy(ctx context.Context, ch driver.Conn, l schema.Layout, src Source) (Result, error) {
	var res Result
	if !l.Clustered() {
		return res, errors.New("the target is not a cluster: set CLICKHOUSE_CLUSTER")
	}
	if err := sourceMigrated(ctx, ch, src); err != nil {
		return res, err
	}
	for _, t := range []string{"events", "usage_increments", "daily_usage", "usage_quarter_hour"} {
		var n uint64
		if err := ch.QueryRow(ctx, "SELECT count() FROM "+l.Table(t)).Scan(&n); err != nil {
			return res, fmt.Errorf("count %s on the cluster: %w", l.Table(t), err)
		}
		if n > 0 {
			return res, fmt.Errorf("%s holds %d rows: %w; an interrupted copy leaves some: DROP DATABASE … ON CLUSTER … SYNC (SYNC on modern servers), run `analyticsd migrate`, copy again", l.Table(t), n, ErrNotEmpty)
		}
	}
	// Raw rows first: each insert on a shard feeds that shard's materialized view, which rebuilds the
	// daily aggregates of every raw row copied.
	steps := []struct{ what, sql string }{
		{"events", "INSERT INTO " + l.Table("events") + " (tenant_id, ts, id, received_at, event, source, user_id, props, ip, request_id) " +
			"SELECT tenant_id, ts, id, received_at, event, source, user_id, props, ip, request_id FROM " + src.remote("events")},
		{"usage_increments", "INSERT INTO " + l.Table("usage_increments") + " (tenant_id, ts, id, metric, n) " +
			"SELECT tenant_id, ts, id, metric, n FROM " + src.remote("usage_increments")},
		// What the views cannot rebuild: the old aggregate minus what its raw rows add up to — days
		// past retention, whose raw rows are gone. Zero differences are left out.
		{"daily usage past retention", "INSERT INTO " + l.Table("daily_usage") + " (tenant_id, date, metric, count) " +
			"SELECT tenant_id, date, metric, sum(c) AS n FROM (" +
			"SELECT tenant_id, date, metric, count AS c FROM " + src.remote("daily_usage") +
			" UNION ALL SELECT tenant_id, toDate(ts) AS date, event AS metric, -toInt64(count()) AS c FROM " + src.remote("events") + " GROUP BY tenant_id, date, metric" +
			" UNION ALL SELECT tenant_id, toDate(ts) AS date, metric, -sum(n) AS c FROM " + src.remote("usage_increments") + " GROUP BY tenant_id, date, metric" +
			") GROUP BY tenant_id, date, metric HAVING n != 0"},
		// The same for the 15-minute slots: what the raw rows do not explain (an erased user's
		// counts, kept like daily_usage keeps them).
		{"usage_quarter_hour beyond its raw rows", "INSERT INTO " + l.Table("usage_quarter_hour") + " (tenant_id, metric, slot, count) " +
			"SELECT tenant_id, metric, slot, sum(c) AS n FROM (" +
			"SELECT tenant_id, metric, slot, count AS c FROM " + src.remote("usage_quarter_hour") +
			" UNION ALL SELECT tenant_id, event AS metric, toStartOfFifteenMinutes(ts) AS slot, -toInt64(count()) AS c FROM " + src.remote("events") + " GROUP BY tenant_id, metric, slot" +
			" UNION ALL SELECT tenant_id, metric, toStartOfFifteenMinutes(ts) AS slot, -sum(n) AS c FROM " + src.remote("usage_increments") + " GROUP BY tenant_id, metric, slot" +
			") GROUP BY tenant_id, metric, slot HAVING n != 0"},
	}
	for _, s := range steps {
		if err := ch.Exec(ctx, s.sql); err != nil {
			return res, fmt.Errorf("copy %s from %s: %w", s.what, src.Addr, err)
		}
	}
	return verify(ctx, ch, l, src)
}

// sourceMigrated refuses a source that lacks a ClickHouse migration of this build: a table the copy
// reads would be missing, or — usage_quarter_hour, whose fill is part of its migration — incomplete,
// and the cluster, migrated already, would take the copy as whole and never fill it.
func sourceMigrated(ctx context.Context, ch driver.Conn, src Source) error {
	ms, err := schema.ClickHouse(schema.Params{DB: src.DB, RetentionDays: 1})
	if err != nil {
		return err
	}
	have, err := schema.AppliedVersions(ctx, ch, src.remote("schema_migrations"))
	if err != nil {
		return fmt.Errorf("the source: %w", err)
	}
	for _, m := range ms {
		if !have[m.Version] {
			return fmt.Errorf("the source database %s has not applied ClickHouse migration %04d_%s: run `analyticsd migrate` against it (CLICKHOUSE_DSN of the source, no CLICKHOUSE_CLUSTER), then copy", src.DB, m.Version, m.Name)
		}
	}
	return nil
}

// verify compares the two sides: raw row counts per tenant, and every (tenant, day, metric) total of
// daily usage — what reads and billing use — and of the quarter-hour slots (reads in a zone).
func verify(ctx context.Context, ch driver.Conn, l schema.Layout, src Source) (Result, error) {
	var res Result
	for _, t := range []struct {
		table string
		n     *uint64
	}{{"events", &res.Events}, {"usage_increments", &res.Increments}} {
		q := "SELECT toString(tenant_id) AS t, toInt64(count()) AS n FROM %s GROUP BY t"
		if err := compare(ctx, ch, fmt.Sprintf(q, src.remote(t.table)), fmt.Sprintf(q, l.Table(t.table)), t.table+" per tenant", func(n int64) { *t.n += uint64(n) }); err != nil {
			return res, err
		}
	}
	q := "SELECT concat(toString(tenant_id), ' ', toString(date), ' ', metric) AS t, sum(count) AS n FROM %s GROUP BY t"
	total := 0
	if err := compare(ctx, ch, fmt.Sprintf(q, src.remote("daily_usage")), fmt.Sprintf(q, l.Table("daily_usage")), "daily usage totals", func(int64) { total++ }); err != nil {
		return res, err
	}
	q = "SELECT concat(toString(tenant_id), ' ', toString(toDate(slot)), ' ', metric) AS t, sum(count) AS n FROM %s GROUP BY t"
	if err := compare(ctx, ch, fmt.Sprintf(q, src.remote("usage_quarter_hour")), fmt.Sprintf(q, l.Table("usage_quarter_hour")), "quarter-hour usage totals", func(int64) {}); err != nil {
		return res, err
	}
	res.Checked = total
	var usageOnly uint64
	// Aggregates with no raw rows on the cluster: the ones copied as such.
	if err := ch.QueryRow(ctx, "SELECT count() FROM (SELECT tenant_id, date, metric FROM "+l.Table("daily_usage")+" GROUP BY tenant_id, date, metric) "+
		"WHERE (tenant_id, date, metric) NOT IN (SELECT tenant_id, toDate(ts), event FROM "+l.Table("events")+
		" UNION ALL SELECT tenant_id, toDate(ts), metric FROM "+l.Table("usage_increments")+")").Scan(&usageOnly); err != nil {
		return res, fmt.Errorf("count aggregates without raw rows: %w", err)
	}
	res.UsageOnly = usageOnly
	return res, nil
}

// compare runs the same keyed count on both sides (a query of (t String, n Int64) rows) and
// reports every key whose n differs; each of the source's rows is passed to each.
func compare(ctx context.Context, ch driver.Conn, srcSQL, dstSQL, what string, each func(int64)) error {
	read := func(sql string) (map[string]int64, error) {
		rows, err := ch.Query(ctx, sql)
		if err != nil {
			return nil, err
		}
		defer rows.Close()
		out := map[string]int64{}
		for rows.Next() {
			var k string
			var n int64
			if err := rows.Scan(&k, &n); err != nil {
				return nil, err
			}
			out[k] = n
		}
		return out, rows.Err()
	}
	a, err := read(srcSQL)
	if err != nil {
		return fmt.Errorf("verify %s on the server: %w", what, err)
	}
	b, err := read(dstSQL)
	if err != nil {
		return fmt.Errorf("verify %s on the cluster: %w", what, err)
	}
	m := &Mismatch{What: what}
	note := func(k string, x, y int64) {
		m.Total++
		if len(m.Diffs) < 5 {
			m.Diffs = append(m.Diffs, fmt.Sprintf("%s: %d on the server, %d on the cluster", k, x, y))
		}
	}
	for k, x := range a {
		each(x)
		if y := b[k]; y != x {
			note(k, x, y)
		}
	}
	for k, y := range b {
		if _, ok := a[k]; !ok && y != 0 {
			note(k, 0, y)
		}
	}
	if m.Total > 0 {
		return m
	}
	return nil
}
