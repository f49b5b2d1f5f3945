package rollup_test

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/ClickHouse/clickhouse-go/v2/lib/driver"
	"github.com/google/uuid"

	"github.com/analyticsd/analyticsd/audit"
	"github.com/analyticsd/analyticsd/erasure"
	"github.com/analyticsd/analyticsd/rollup"
)

const eventCols = "tenant_id, ts, id, received_at, event, source, user_id, props, ip, request_id"

// userEvents writes n events of user in tenant at ts, a second apart, received at ts + skew (an
// instance whose clock is off stamps received_at with its own clock).
func (f *fixture) userEvents(t *testing.T, tenant uuid.UUID, user, event string, ts time.Time, skew time.Duration, n int) {
	t.Helper()
	var values [][]any
	for i := range n {
		at := ts.Add(time.Duration(i) * time.Second)
		values = append(values, []any{tenant, at, uuid.New(), at.Add(skew), event, "app", user, `{"email":"` + user + `@example.com"}`, "10.0.0.1", "req"})
	}
	f.env.Insert(t, "events", eventCols, values...)
}

func (f *fixture) userRows(t *testing.T, tenant uuid.UUID, user string) uint64 {
	t.Helper()
	var n uint64
	if err := f.env.CH.QueryRow(ctxT(t), "SELECT count() FROM "+f.env.DB+".events WHERE tenant_id = ? AND user_id = ?", tenant, user).Scan(&n); err != nil {
		t.Fatal(err)
	}
	return n
}

func (f *fixture) eraser(ch driver.Conn) *erasure.Service {
	l := f.env.Layout()
	if h, ok := ch.(hookConn); ok { // on an 18.16 cluster the deletes go through Shards' own connections
		l.Shards = l.Shards.Wrap(func(_ string, c driver.Conn) driver.Conn { h.Conn = c; return h })
	}
	return erasure.New(erasure.Config{Layout: l, Poll: 20 * time.Millisecond}, ch, f.env.PG, audit.New(f.env.PG), nil)
}

func (f *fixture) erase(t *testing.T, s *erasure.Service, tenant uuid.UUID, user string) erasure.Job {
	t.Helper()
	ctx := ctxT(t)
	j, err := s.EraseUser(ctx, tenant, user, "test")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.RunOne(ctx); err != nil {
		t.Fatal(err)
	}
	if j, err = s.Get(ctx, tenant, j.ID); err != nil || j.Status != erasure.StatusDone {
		t.Fatalf("erasure job: %+v %v, want done", j, err)
	}
	return j
}

// A user's erasure keeps the aggregates' counts (issue 21): the rollup of a day the user had events
// on, run after the erasure, leaves daily_usage and the billed rows as they were and repairs nothing —
// the raw events it checks against are short of the erased rows, and the erasure ledger adds them back.
func TestErasureKeepsDailyAndBilledUsage(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	ctx := ctxT(t)
	a, b := f.tenant(t, "acme"), f.tenant(t, "globex")
	d1, d2 := f.daysAgo(1), f.daysAgo(2)
	f.userEvents(t, a, "alice", "auth.user.login", d1.Add(9*time.Hour), 0, 6)
	f.userEvents(t, a, "alice", "email.sent", d2.Add(9*time.Hour), 0, 2)
	f.userEvents(t, a, "bob", "auth.user.login", d1.Add(10*time.Hour), 0, 4)
	f.userEvents(t, b, "alice", "auth.user.login", d1.Add(11*time.Hour), 0, 3)
	r := f.reconciler(nil, nil)
	for _, d := range []time.Time{d1, d2} {
		if _, err := r.RunDate(ctx, d, rollup.AllTenants(), "test"); err != nil {
			t.Fatal(err)
		}
	}
	want := map[time.Time]counts{
		d1: {k(a, "auth.user.login"): 10, k(b, "auth.user.login"): 3},
		d2: {k(a, "email.sent"): 2},
	}
	for d, w := range want {
		if got := f.postgres(t, d); got.String() != w.String() {
			t.Fatalf("billed %s before the erasure: got %v, want %v", d.Format(time.DateOnly), got, w)
		}
	}

	if j := f.erase(t, f.eraser(f.env.CH), a, "alice"); j.RowsErased != 8 {
		t.Errorf("rows erased: got %d, want 8", j.RowsErased)
	}
	if n := f.userRows(t, a, "alice"); n != 0 {
		t.Fatalf("alice's events after the erasure: %d, want 0", n)
	}
	for _, d := range []time.Time{d1, d2} {
		res, err := r.RunDate(ctx, d, rollup.AllTenants(), "test")
		if err != nil {
			t.Fatal(err)
		}
		if res.Repaired != 0 || res.Changed != 0 || !res.RawChecked {
			t.Errorf("rollup of %s after the erasure: %+v, want raw-checked, nothing repaired or changed", d.Format(time.DateOnly), res)
		}
		if got := f.aggregate(t, d); got.String() != want[d].String() {
			t.Errorf("daily_usage %s after the erasure: got %v, want %v", d.Format(time.DateOnly), got, want[d])
		}
		if got := f.postgres(t, d); got.String() != want[d].String() {
			t.Errorf("billed %s after the erasure: got %v, want %v", d.Format(time.DateOnly), got, want[d])
		}
	}
}

// hookConn runs before and after around every ALTER/DELETE the erasure sends.
type hookConn struct {
	driver.Conn
	before, after func(query string)
}

func (c hookConn) Exec(ctx context.Context, query string, args ...any) error {
	del := strings.HasPrefix(query, "ALTER TABLE") || strings.HasPrefix(query, "DELETE FROM")
	if del && c.before != nil {
		c.before(query + " " + fmt.Sprint(args...))
	}
	err := c.Conn.Exec(ctx, query, args...)
	if del && c.after != nil {
		c.after(query)
	}
	return err
}

// The race of a user who keeps sending while the job runs, and a rollup that runs while a delete is
// in flight. Rows of the user arrive between the job's snapshot and its delete (from an instance whose
// clock is 7 minutes ahead): they are not deleted by that round and not counted by it; the next round
// takes them. A rollup run with the round recorded and its rows still stored, and one run with the
// mutation just issued (rows partly gone on 18.16), both see exactly the counts before the erasure
// and repair nothing. Afterwards the ledger holds exactly the rows erased.
func TestErasureCountsExactlyWhatItDeletes(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	ctx := ctxT(t)
	a := f.tenant(t, "acme")
	d1 := f.daysAgo(1)
	f.userEvents(t, a, "carol", "auth.user.login", d1.Add(8*time.Hour), 0, 5)
	f.userEvents(t, a, "dan", "auth.user.login", d1.Add(8*time.Hour), 0, 2)
	r := f.reconciler(nil, nil)
	if _, err := r.RunDate(ctx, d1, rollup.AllTenants(), "test"); err != nil {
		t.Fatal(err)
	}
	total := int64(7)
	check := func(when string) {
		t.Helper()
		res, err := r.RunDate(ctx, d1, rollup.AllTenants(), "test")
		if err != nil {
			t.Fatalf("rollup %s: %v", when, err)
		}
		want := counts{k(a, "auth.user.login"): total}
		if res.Repaired != 0 {
			t.Errorf("rollup %s: repaired %d rows, want none", when, res.Repaired)
		}
		if got := f.postgres(t, d1); got.String() != want.String() {
			t.Errorf("billed %s: got %v, want %v", when, got, want)
		}
		if got := f.aggregate(t, d1); got.String() != want.String() {
			t.Errorf("daily_usage %s: got %v, want %v", when, got, want)
		}
	}
	var mu sync.Mutex
	deletes, injected := 0, false
	sent := map[string]bool{} // on an 18.16 cluster a round's delete goes to each shard in turn
	conn := hookConn{Conn: f.env.CH,
		before: func(q string) {
			mu.Lock()
			defer mu.Unlock()
			if !sent[q] {
				sent[q] = true
				deletes++
			}
			check("with a round recorded, before its delete")
			if !injected {
				injected = true
				f.userEvents(t, a, "carol", "auth.user.login", d1.Add(20*time.Hour), 7*time.Minute, 3)
				total += 3
			}
		},
		after: func(string) { check("with the delete just issued") },
	}
	j := f.erase(t, f.eraser(conn), a, "carol")
	if j.RowsErased != 8 {
		t.Errorf("rows erased: got %d, want 8 (5, then the 3 sent meanwhile)", j.RowsErased)
	}
	if deletes != 2 {
		t.Errorf("deletes: got %d, want 2 rounds", deletes)
	}
	if n := f.userRows(t, a, "carol"); n != 0 {
		t.Errorf("carol's events after the erasure: %d, want 0", n)
	}
	check("after the erasure")
	var erased int64
	if err := f.env.PG.QueryRow(ctx, "SELECT sum(n)::bigint FROM erased_usage WHERE tenant_id = $1", a).Scan(&erased); err != nil || erased != 8 {
		t.Errorf("erased_usage: got %d (%v), want 8", erased, err)
	}
}
