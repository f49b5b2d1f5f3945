package ingest

import (
	"context"
	"fmt"
	"strings"
	"time"

	"github.com/ClickHouse/clickhouse-go/v2"
	"github.com/ClickHouse/clickhouse-go/v2/ext"
	"github.com/ClickHouse/clickhouse-go/v2/lib/driver"
	"github.com/google/uuid"

	"github.com/analyticsd/analyticsd/schema"
)

type clickhouseException = clickhouse.Exception

// insertBlockRows is how many rows go into each block of one INSERT. The server squashes the blocks
// of an INSERT back into large ones before writing parts (min_insert_block_size_rows), so the parts
// are the same as with one big block, while the client encodes every block into the same, already
// grown column buffers. One block per segment meant growing ~15 MB of fresh buffers per insert, and
// on this VM the page faults of that made runtime.growslice 42% of ingest CPU (BENCHMARKS.md).
const insertBlockRows = 8192

// insert inserts its (one kind, one day) as one INSERT. Its query id starts with the segment's id, so
// a retry can find an attempt still running on the server (awaitAttempts).
func (sh *shipper) insert(ctx context.Context, s *segment, kind Kind, its []item, sp *shipment) error {
	ctx, cancel := context.WithTimeout(ctx, sh.cfg.InsertTimeout)
	defer cancel()
	table, columns := sh.db+".events", "(tenant_id, ts, id, received_at, event, source, user_id, props, ip, request_id)"
	if kind == KindIncrement {
		table, columns = sh.db+".usage_increments", "(tenant_id, ts, id, metric, n)"
	}
	batch, err := sh.prepare(ctx, s, sp, "INSERT INTO "+table+" "+columns)
	if err != nil {
		return fmt.Errorf("insert into %s: prepare: %w", table, err)
	}
	if kind == KindIncrement {
		return insertIncrements(batch, table, its)
	}
	return insertEvents(batch, table, its)
}

// prepare begins an INSERT — from here on the server lists it in system.processes — and then makes
// sure the claim histories its rows were judged in have not changed: a loss of claims that happened
// before the server listed it shows in this read, which comes after (the insert is aborted before any
// of its data left, so nothing commits, and the rows are judged again); one that happens later is
// noticed after the listing, and whoever notices it waits for this insert (histories.go).
func (sh *shipper) prepare(ctx context.Context, s *segment, sp *shipment, query string) (driver.Batch, error) {
	qctx := clickhouse.Context(ctx, clickhouse.WithQueryID(fmt.Sprintf("ingest-%s-%d", s.id, sh.queries.Add(1))))
	batch, err := sh.ch.PrepareBatch(qctx, query)
	if err != nil {
		return nil, err
	}
	if err := sh.unchanged(ctx, sp); err != nil {
		_ = batch.Abort()
		return nil, err
	}
	return batch, nil
}

func insertEvents(batch driver.Batch, table string, its []item) error {
	n := min(len(its), insertBlockRows)
	tenant, id := make([]uuid.UUID, 0, n), make([]uuid.UUID, 0, n)
	ts, recv := make([]time.Time, 0, n), make([]time.Time, 0, n)
	event, source, user, props, ip, req := make([]string, 0, n), make([]string, 0, n), make([]string, 0, n), make([]string, 0, n), make([]string, 0, n), make([]string, 0, n)
	// send hands the block to the batch; on failure the INSERT is aborted.
	send := func() error {
		var err error
		for i, col := range []any{tenant, ts, id, recv, event, source, user, props, ip, req} {
			if err = batch.Column(i).Append(col); err != nil {
				err = fmt.Errorf("column %d: %w", i, err)
				break
			}
		}
		if err == nil {
			err = batch.Flush()
		}
		if err != nil {
			_ = batch.Abort()
			return fmt.Errorf("insert %d rows into %s: %w", len(its), table, err)
		}
		tenant, id, ts, recv = tenant[:0], id[:0], ts[:0], recv[:0]
		event, source, user, props, ip, req = event[:0], source[:0], user[:0], props[:0], ip[:0], req[:0]
		return nil
	}
	for _, it := range its {
		r := it.event()
		tenant, ts, id, recv = append(tenant, r.TenantID), append(ts, r.Ts), append(id, r.ID), append(recv, r.ReceivedAt)
		event, source, user = append(event, r.Event), append(source, r.Source), append(user, r.UserID)
		props, ip, req = append(props, r.Props), append(ip, r.IP), append(req, r.RequestID)
		if len(tenant) == insertBlockRows {
			if err := send(); err != nil {
				return err
			}
		}
	}
	if len(tenant) > 0 {
		if err := send(); err != nil {
			return err
		}
	}
	if err := batch.Send(); err != nil {
		return fmt.Errorf("insert %d rows into %s: %w", len(its), table, err)
	}
	return nil
}

func insertIncrements(batch driver.Batch, table string, its []item) error {
	n := len(its)
	tenant, ts, id, metric, amount := make([]uuid.UUID, n), make([]time.Time, n), make([]uuid.UUID, n), make([]string, n), make([]int64, n)
	for i, it := range its {
		r := it.increment()
		tenant[i], ts[i], id[i], metric[i], amount[i] = r.TenantID, r.Ts, r.ID, r.Metric, r.N
	}
	for i, col := range []any{tenant, ts, id, metric, amount} {
		if err := batch.Column(i).Append(col); err != nil {
			_ = batch.Abort()
			return fmt.Errorf("insert into %s: column %d: %w", table, i, err)
		}
	}
	if err := batch.Send(); err != nil {
		return fmt.Errorf("insert %d rows into %s: %w", n, table, err)
	}
	return nil
}

// stored returns which of ids ClickHouse has for tenant with ts in [lo, hi] (one day at most), each
// with when its earliest stored copy was received (received_at; for an increment its ts). The
// ids travel as an external table — 50,000 ids take ~75 ms on this machine, where the same ids as an
// IN list (a 2 MB query) exceed the server's max_query_size — and tenant and time narrow the scan
// to the rows the sort key (tenant_id, ts, id) puts next to each other.
func (sh *shipper) stored(ctx context.Context, kind Kind, tenant uuid.UUID, lo, hi time.Time, ids []uuid.UUID) (map[uuid.UUID]time.Time, error) {
	table, received := sh.db+".events", "received_at"
	if kind == KindIncrement {
		table, received = sh.db+".usage_increments", "ts"
	}
	t, err := ext.NewTable("spooled", ext.Column("id", "UUID"))
	if err != nil {
		return nil, err
	}
	for _, id := range ids {
		if err := t.Append(id); err != nil {
			return nil, err
		}
	}
	qctx, cancel := context.WithTimeout(ctx, sh.cfg.InsertTimeout)
	defer cancel()
	qctx = clickhouse.Context(qctx, clickhouse.WithExternalTable(t))
	rows, err := sh.ch.Query(qctx, "SELECT id, min("+received+") FROM "+table+
		" WHERE tenant_id = ? AND ts >= ? AND ts <= ? AND id IN (SELECT id FROM spooled) GROUP BY id", tenant, lo, hi)
	if err != nil {
		return nil, fmt.Errorf("check which spooled rows %s has: %w", table, err)
	}
	defer rows.Close()
	have := map[uuid.UUID]time.Time{}
	for rows.Next() {
		var id uuid.UUID
		var at time.Time
		if err := rows.Scan(&id, &at); err != nil {
			return nil, fmt.Errorf("check which spooled rows %s has: %w", table, err)
		}
		have[id] = at
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("check which spooled rows %s has: %w", table, err)
	}
	return have, nil
}

// servers returns the servers an insert may be running on, to look for `what` (its first, the
// shipper's own connection, is not to be closed): on a cluster every server, over a connection of its
// own (cfg.Shards). A server that refuses connections is skipped (nothing runs there any more); one
// that cannot be reached otherwise — a timeout, say — might still commit what runs there, so it is an
// error: the rows wait rather than risk storing twice.
func (sh *shipper) servers(ctx context.Context, what string) ([]schema.Live, error) {
	servers := []schema.Live{{Addr: "the shipper's server", Conn: sh.ch}}
	if sh.cfg.Shards == nil {
		return servers, nil
	}
	live, down, err := sh.cfg.Shards.Servers(ctx, sh.ch)
	if err != nil {
		return nil, fmt.Errorf("look for %s still running: %w", what, err)
	}
	for _, u := range down {
		if !u.Gone() {
			schema.CloseAll(live)
			return nil, fmt.Errorf("look for %s still running on %s (cannot be reached: %w); the rows wait", what, u.Addr, u.Err)
		}
		sh.log.Warn("a server of the cluster refuses connections: nothing of ours runs there", "looking_for", what, "server", u.Addr)
	}
	return append(servers, live...), nil
}

// awaitAttempts returns once no insert of segment id is running on the server, stopping any that
// goes on: an insert whose client gave up (a timeout) runs on and may commit later, and a check made
// before it finishes would miss its rows. A just-refused insert can stay listed for a moment after
// its exception, so the first second only waits.
//
// On a cluster the insert may be running elsewhere: on the server the earlier attempt was sent to
// (the pool fails over to the DSN's next address), and on the servers of each shard it writes to
// (insert_distributed_sync), whose queries carry the attempt's id as initial_query_id. So every
// server is asked, and told to stop it (servers).
func (sh *shipper) awaitAttempts(ctx context.Context, id string) error {
	pattern := "ingest-" + strings.NewReplacer("%", "", "_", "").Replace(id) + "-%"
	servers, err := sh.servers(ctx, "an earlier insert of spool segment "+id)
	if err != nil {
		return err
	}
	defer schema.CloseAll(servers[1:])
	start := time.Now()
	for {
		running := 0
		for _, sv := range servers {
			var n uint64
			qctx, cancel := context.WithTimeout(ctx, 10*time.Second)
			err := sv.QueryRow(qctx, "SELECT count() FROM system.processes WHERE query_id LIKE ? OR initial_query_id LIKE ?", pattern, pattern).Scan(&n)
			cancel()
			if err != nil {
				return fmt.Errorf("look for an earlier insert of spool segment %s still running on %s: %w", id, sv.Addr, err)
			}
			if n == 0 {
				continue
			}
			running++
			if time.Since(start) > time.Second {
				sh.log.Info("an earlier insert of this spool segment is still running on clickhouse; stopping it before checking which rows it stored", "segment", id, "server", sv.Addr)
				// Exec: 18.16 answers KILL QUERY in a form the driver's Query reads as EOF.
				if err := sv.Exec(ctx, "KILL QUERY WHERE query_id LIKE ? OR initial_query_id LIKE ? SYNC", pattern, pattern); err != nil {
					return fmt.Errorf("stop an earlier insert of spool segment %s on %s: %w", id, sv.Addr, err)
				}
			}
		}
		if running == 0 {
			return nil
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
	}
}
