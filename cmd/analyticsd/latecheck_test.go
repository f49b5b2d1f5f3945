package main

import (
	"context"
	"errors"
	"log/slog"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/ClickHouse/clickhouse-go/v2/lib/driver"
	"github.com/ClickHouse/clickhouse-go/v2/lib/proto"

	"github.com/analyticsd/analyticsd/internal/testenv"
)

// laterConn is a ClickHouse that cannot be reached until up is set, and then runs in zone.
type laterConn struct {
	driver.Conn
	up   atomic.Bool
	zone string
}

func (c *laterConn) Ping(context.Context) error {
	if !c.up.Load() {
		return errors.New("connection refused")
	}
	return nil
}

func (c *laterConn) ServerVersion() (*driver.ServerVersion, error) {
	return &driver.ServerVersion{Version: proto.Version{Major: 18, Minor: 16, Patch: 1}}, nil
}

func (c *laterConn) QueryRow(_ context.Context, q string, _ ...any) driver.Row {
	if strings.Contains(q, "timezone()") {
		return stringRow(c.zone)
	}
	return stringRow("CREATE TABLE x.events (`ts` DateTime) ENGINE = MergeTree ORDER BY ts") // no TTL
}

type stringRow string

func (r stringRow) Err() error             { return nil }
func (r stringRow) Scan(dest ...any) error { *(dest[0].(*string)) = string(r); return nil }
func (r stringRow) ScanStruct(any) error   { return nil }

// A ClickHouse unreachable at start-up is checked once it can be reached, before anything is
// written to it: one outside UTC is refused then, for good, and what waits on the check (the
// writer's shipping, the rollup and retention jobs) never starts. Before, the checks were skipped
// for the life of the process and such a server was written to and swept by UTC day. (Fails on the
// code before this change: serve had no later check.)
func TestClickHouseUnreachableAtStartIsCheckedOnceReachable(t *testing.T) {
	e := testenv.Migrated(t)
	for _, tc := range []struct {
		zone   string
		passes bool
	}{{"America/Chicago", false}, {"Etc/UTC", true}} {
		t.Run(tc.zone, func(t *testing.T) {
			ch := &laterConn{zone: tc.zone}
			cfg, err := loadConfig(stackEnv(t, e, nil))
			if err != nil {
				t.Fatal(err)
			}
			if _, err := checkClickHouse(context.Background(), &cfg, ch, e.PG, slog.Default()); !errors.Is(err, errUnchecked) {
				t.Fatalf("unreachable at start: %v, want errUnchecked", err)
			}
			late := &lateCheck{log: slog.Default(), every: 10 * time.Millisecond,
				run: func(ctx context.Context) error {
					_, err := checkClickHouse(ctx, &cfg, ch, e.PG, slog.Default())
					return err
				}}
			var started atomic.Bool
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			stop := whenChecked(ctx, late, func() { started.Store(true) })
			defer stop()
			time.Sleep(50 * time.Millisecond)
			if err := late.Check(ctx); !errors.Is(err, errUnchecked) || started.Load() {
				t.Fatalf("still unreachable: check %v, jobs started %v; want errUnchecked, not started", err, started.Load())
			}
			ch.up.Store(true)
			time.Sleep(100 * time.Millisecond)
			err = late.Check(ctx)
			if tc.passes {
				if err != nil || !started.Load() {
					t.Errorf("a UTC server once reachable: check %v, jobs started %v; want passed and started", err, started.Load())
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), "America/Chicago") || started.Load() {
				t.Errorf("a server outside UTC once reachable: check %v, jobs started %v; want a refusal naming its zone, nothing started", err, started.Load())
			}
		})
	}
}

// ttlConn is a ClickHouse whose events table expires rows after days.
type ttlConn struct {
	driver.Conn
	days string
}

func (c *ttlConn) QueryRow(_ context.Context, _ string, args ...any) driver.Row {
	return stringRow("CREATE TABLE a." + args[1].(string) + " (`ts` DateTime) ENGINE = MergeTree ORDER BY ts TTL ts + toIntervalDay(" + c.days + ")")
}

// The spool commands guard rows which may be stored already with the table's own TTL, whatever
// RETENTION_DAYS their shell has. Before, they asked retention.Effective, which fails when the two
// differ: with the variable unset (90) against a table keeping 30, every checked row failed and
// drain retried until its timeout, its error telling the operator to run a migrate that would then
// lengthen the TTL. (Fails on the code before this change.)
func TestSpoolCommandsGuardWithTheTablesTTL(t *testing.T) {
	e := testenv.Migrated(t)
	cfg, err := loadConfig(stackEnv(t, e, nil)) // RETENTION_DAYS unset: 90
	if err != nil {
		t.Fatal(err)
	}
	floor, closeFloor := retentionGuard(cfg, &ttlConn{days: "30"})
	defer closeFloor()
	f, err := floor(context.Background())
	if want := time.Now().UTC().Truncate(24*time.Hour).AddDate(0, 0, -30); err != nil || f.Before(want) {
		t.Errorf("guard %v %v, want at least the 30-day TTL's cutoff %v", f, err, want)
	}
}

// Check never waits for a run of the checks: a shipping flusher asks it, and shutdown waits for the
// flushers. (A second review found Check holding its lock through a run of up to 10 s, so a flusher's
// 3 s bound did not hold.)
func TestLateCheckNeverWaitsForARun(t *testing.T) {
	release := make(chan struct{})
	late := &lateCheck{log: slog.New(slog.DiscardHandler), every: time.Millisecond,
		run: func(context.Context) error { <-release; return nil }}
	done := make(chan error, 2)
	go func() { done <- late.Check(context.Background()); done <- late.Check(context.Background()) }()
	for i := 0; i < 2; i++ {
		select {
		case err := <-done:
			if !errors.Is(err, errUnchecked) {
				t.Errorf("check while a run is under way: %v, want errUnchecked", err)
			}
		case <-time.After(5 * time.Second):
			t.Fatal("Check waited for the run")
		}
	}
	close(release)
	testenv.Eventually(t, 5*time.Second, func() error { return late.Check(context.Background()) })
}
