package ingest

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/google/uuid"

	"github.com/analyticsd/analyticsd/internal/clock"
	"github.com/analyticsd/analyticsd/schema"
)

// What shipping does when Redis loses claims (a restart without persistence, FLUSHALL, a failover to
// a replica behind its master) while rows are on their way.
//
// An instance that judged its rows new in a history the loss took may be inserting them at that
// moment; a client's retry of one of them, sent to another instance, is claimed anew in the next
// history. Nothing in Redis can tell the second instance of the first one's insert, and before that
// insert commits ClickHouse cannot either: a check (or the "history complete" question) made in
// between finds nothing and the retry is stored a second time. So the two ends meet at the moment the
// server lists an insert (system.processes):
//
//   - after the server lists an insert, the claim histories its rows were judged in are read again
//     (prepare, unchanged): if they changed, a loss came first, and the insert is aborted before any
//     of its data left and the rows are judged again. So an insert that goes on was listed before
//     any loss its process has yet to notice;
//   - an instance that notices a loss judges no row whose claim proves nothing until every insert the
//     servers listed before it saw the loss (and settleMargin more) has finished, on every server
//     (awaitLoss). Only the first rows shipped after a loss wait, once per loss and process, for as
//     long as the inserts running then take. A loss is a raised restart floor (dedup): a restart or
//     failover, or a wipe, which the run ids' record, created anew, shows — or, to a process whose
//     first look finds that record just created, possibly one (it cannot tell a wipe from first use).

// settleMargin covers the time an answer takes to come back from the server: an insert's listing is
// placed at our clock's now minus its elapsed, which is later than it was by that time.
const settleMargin = time.Second

// errHistoryChanged: a tenant's claim history changed (Redis lost claims) while its rows were being
// shipped; the chunk is judged again.
var errHistoryChanged = errors.New("the claim history changed while its rows were being shipped (Redis lost claims); they are judged again")

func historyChanged(tenant uuid.UUID) error {
	return fmt.Errorf("tenant %s: %w", tenant, errHistoryChanged)
}

// shipment is one attempt at shipping a chunk.
type shipment struct {
	budget int // inserts left for isolating rows ClickHouse refuses (isolationBudget)
	// epochs are the claim histories the chunk's rows were judged in.
	epochs map[uuid.UUID]time.Time
}

// unchanged reads sp's claim histories again and reports errHistoryChanged if any changed.
func (sh *shipper) unchanged(ctx context.Context, sp *shipment) error {
	if sh.claims == nil || len(sp.epochs) == 0 {
		return nil
	}
	tenants := make([]uuid.UUID, 0, len(sp.epochs))
	for t := range sp.epochs {
		tenants = append(tenants, t)
	}
	now, err := sh.claims.Epochs(ctx, tenants)
	if err != nil {
		return fmt.Errorf("check claims again before inserting: %w", err)
	}
	for t, e := range sp.epochs {
		if !now[t].Equal(e) {
			return historyChanged(t)
		}
	}
	return nil
}

// errLossSettling: rows whose claims prove nothing wait for inserts begun before a loss of claims
// to finish (awaitLoss), and this attempt's time ran out. Not an insert failure (ClickHouse not
// answering is one).
var errLossSettling = errors.New("rows whose claims prove nothing wait for inserts begun before Redis lost claims")

// awaitLoss returns once no insert that can rest on claims the latest loss took is still running on
// any server (see the top of this file). Asked by every shipment with rows whose claims prove
// nothing; after the first answer for a loss it costs a mutex. Inserts still running a whole
// InsertTimeout later were given up by their clients: they are stopped, and their segments' own
// retries find what they stored (awaitAttempts).
func (sh *shipper) awaitLoss(ctx context.Context) error {
	if sh.claims == nil {
		return nil
	}
	at, seen := sh.claims.Loss()
	if at.IsZero() {
		return nil
	}
	// By this process's clock (clock.Now, as the loss was seen by), the loss happened before it saw
	// it, and before `at` plus the clocks' difference (`at` is the clock of whichever process
	// noticed it first).
	since := seen
	if f := at.Add(clock.MaxSkew); f.Before(since) {
		since = f
	}
	since = since.Add(settleMargin).Round(0)
	sh.lossMu.Lock()
	defer sh.lossMu.Unlock()
	if sh.lossSettled.Equal(since) {
		return nil
	}
	if clock.Now().Sub(since) > 2*sh.cfg.InsertTimeout {
		// An old loss (a process starting long after it): whatever began before is long done or
		// was stopped. Not asked, so a server that cannot be reached does not hold rows back.
		sh.lossSettled = since
		return nil
	}
	// Nothing to wait for in time: an insert the servers list from now on is confirmed by its
	// process after the loss, so only those running now can matter.
	servers, err := sh.servers(ctx, "an insert begun before Redis lost claims")
	if err != nil {
		return err
	}
	defer schema.CloseAll(servers[1:])
	// This database's inserts only (another deployment's, or another test's, are not ours to wait
	// for or stop): " <db>." is in the query, on a shard server too (not "web_<db>.").
	const before = "(query_id LIKE 'ingest-%' OR initial_query_id LIKE 'ingest-%') AND position(query, ?) > 0 AND elapsed >= ?"
	db := " " + sh.db + "."
	start := time.Now()
	logged := false
	for {
		running := 0
		for _, sv := range servers {
			var n uint64
			qctx, cancel := context.WithTimeout(ctx, 10*time.Second)
			age := clock.Now().Sub(since).Seconds()
			err := sv.QueryRow(qctx, "SELECT count() FROM system.processes WHERE "+before, db, age).Scan(&n)
			cancel()
			if err != nil {
				return fmt.Errorf("look for inserts begun before Redis lost claims on %s: %w", sv.Addr, err)
			}
			if n == 0 {
				continue
			}
			running++
			if time.Since(start) > sh.cfg.InsertTimeout {
				sh.log.Warn("inserts begun before redis lost claims still run; stopping them", "server", sv.Addr, "inserts", n)
				// Exec: 18.16 answers KILL QUERY in a form the driver's Query reads as EOF.
				if err := sv.Exec(ctx, "KILL QUERY WHERE "+before+" SYNC", db, age); err != nil {
					return fmt.Errorf("stop inserts begun before Redis lost claims on %s: %w", sv.Addr, err)
				}
			}
		}
		if running == 0 {
			sh.lossSettled = since
			return nil
		}
		if !logged {
			sh.log.Info("redis lost claims: rows whose claims prove nothing wait until the inserts begun before are done", "loss", at, "servers", running)
			logged = true
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("%w: %d servers still run them: %w", errLossSettling, running, ctx.Err())
		case <-time.After(50 * time.Millisecond):
		}
	}
}
