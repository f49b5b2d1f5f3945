package ingest

import (
	"context"
	"crypto/rand"
	"encoding/binary"
	"sync"
	"time"

	"github.com/google/uuid"
)

// Kind is an id space: event ids and increment ids are claimed apart and never collide. (A plain
// byte, so that a Claims implementation needs nothing from this package.)
type Kind = byte

const (
	KindEvent     Kind = 'e'
	KindIncrement Kind = 'i'
)

// Claims remembers, for every tenant and across instances, which event and increment ids were taken
// within the dedup window, and by which batch (one accepted request, named by a random batch id kept
// with its rows in the spool). The first batch to claim an id owns it; every other copy is a duplicate.
// A row is added to the live usage counters in the same atomic step that claims its id, so it is
// counted exactly when it is claimed: once. *dedup.Store implements it over Redis.
//
// A tenant's epoch is when its claim history began (the first claim, or the first after Redis lost
// its data). A claim proves an id new only if the history covers the whole window before the row
// arrived: epoch <= received - Window. Rows claimed before that are checked in ClickHouse at ship time.
type Claims interface {
	Window() time.Duration
	// Claim records, once a batch is durable, that it holds ids, counting the rows it claims.
	// dup[i] reports that another batch held ids[i] already.
	Claim(ctx context.Context, tenant uuid.UUID, kind Kind, wid uint64, ids []uuid.UUID, unit Unit, counted Counted) (dup []bool, epoch time.Time, err error)
	// Verify answers at ship time whether batch wids[i] holds ids[i] (held), claiming it for wids[i]
	// when nobody does — then reclaimed[i] is set too: the claim expired or was lost, so ClickHouse
	// may have the row already. A row not held is a duplicate. Rows claimed now are counted, unless
	// received more than a window ago (their claim may have expired after they were counted).
	Verify(ctx context.Context, tenant uuid.UUID, kind Kind, ids []uuid.UUID, wids []uint64, unit Unit, counted Counted) (held, reclaimed []bool, epoch time.Time, err error)
	// Epochs returns the tenants' current epochs (absent: none yet).
	Epochs(ctx context.Context, tenants []uuid.UUID) (map[uuid.UUID]time.Time, error)
	// Loss returns the latest loss of claims this process knows of (a Redis restart, failover or
	// wipe, or a record of Redis' run ids its first look found just created): when it happened at
	// the latest, and when this process first learnt of it, by its own clock (both zero: none).
	// Epochs refreshes it.
	Loss() (at, seen time.Time)
}

// Unit says what row i of a claim adds to the live counters when its id turns out new: a metric
// ("" for nothing), an amount, the UTC day it counts on, and when the row was received. (An alias of
// a plain func type, so a Claims implementation needs nothing from this package.)
type Unit = func(i int) (metric string, n int64, day, received time.Time)

// Counted is told what a claim added to a live counter: by how much, and its value after.
type Counted = func(day time.Time, metric string, by, value int64)

// trusted reports whether a claim made under epoch proves a row received at received new.
func trusted(epoch, received time.Time, window time.Duration) bool {
	return !epoch.After(received.Add(-window))
}

// batch is the rows of one accepted request (or one server-made event or increment) on their way to
// ClickHouse: the unit of a spool record and of claims.
type batch struct {
	wid    uint64
	events []Row
	incs   []Increment
	// checkAll: ClickHouse is asked for every row before it is inserted (requeued or legacy rows,
	// whose history is unknown).
	checkAll bool
	// uncounted: the live counters must not count these rows when they are claimed (a consume's
	// increment, which the consume itself counted).
	uncounted bool
	// minted: every id in the batch was made by the server for this request (no id and no
	// Idempotency-Key was sent), so no copy can exist anywhere: the rows are neither claimed nor
	// verified (a Redis round trip saved per request; their live counts go through the counter
	// feed), and shipping asks ClickHouse only when an insert of them may have happened already.
	minted bool
	claim  *claimState
}

// setFlags records minted and uncounted in the batch and in its id (which the spool keeps), so a
// replay ships the rows the same way.
func (b *batch) setFlags(minted, uncounted bool) {
	b.minted, b.uncounted = minted, uncounted
	b.wid &^= widFlags
	if minted {
		b.wid |= widMinted
	}
	if uncounted {
		b.wid |= widUncounted
	}
}

// ids returns the tenant and the ids of the batch's rows of a kind.
func (b *batch) ids(kind Kind) (uuid.UUID, []uuid.UUID) {
	var tenant uuid.UUID
	var ids []uuid.UUID
	if kind == KindEvent {
		for i := range b.events {
			tenant, ids = b.events[i].TenantID, append(ids, b.events[i].ID)
		}
	} else {
		for i := range b.incs {
			tenant, ids = b.incs[i].TenantID, append(ids, b.incs[i].ID)
		}
	}
	return tenant, ids
}

func newBatch(events []Row, incs []Increment) *batch {
	return &batch{wid: newBatchID(), events: events, incs: incs, claim: &claimState{}}
}

func newBatchID() uint64 {
	var b [8]byte
	_, _ = rand.Read(b[:])
	// Never 0, which marks "no batch id" (legacy records); bits 1 and 2 are flags (setFlags).
	return binary.LittleEndian.Uint64(b[:])&^widFlags | 1
}

// claimState is what the request-time Claim found for a batch. It outlives the batch's rows when a
// segment spills to disk, so shipping can still use it (looked up by batch id).
type claimState struct {
	mu      sync.Mutex
	settled bool
	evDup   []bool
	incDup  []bool
	epoch   time.Time
}

func (c *claimState) settle(evDup, incDup []bool, epoch time.Time) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.settled, c.evDup, c.incDup, c.epoch = true, evDup, incDup, epoch
}

// get returns the settled state, or ok=false when the request-time claim did not (yet) succeed.
func (c *claimState) get() (evDup, incDup []bool, epoch time.Time, ok bool) {
	if c == nil {
		return nil, nil, time.Time{}, false
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.evDup, c.incDup, c.epoch, c.settled
}
