package schema

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/ClickHouse/clickhouse-go/v2/lib/driver"
)

// tzConn answers SELECT timezone() from a script: the test server runs in UTC.
type tzConn struct {
	driver.Conn
	tz string
}

func (c tzConn) QueryRow(context.Context, string, ...any) driver.Row { return tzRow(c.tz) }

type tzRow string

func (r tzRow) Err() error             { return nil }
func (r tzRow) Scan(dest ...any) error { *(dest[0].(*string)) = string(r); return nil }
func (r tzRow) ScanStruct(any) error   { return nil }

// Finding 9: a server outside UTC computes partitions and days in its own zone; analyticsd refuses it.
func TestCheckTimeZone(t *testing.T) {
	for _, tz := range []string{"UTC", "Etc/UTC", "Etc/UCT", "GMT", "Zulu"} {
		if err := CheckTimeZone(context.Background(), tzConn{tz: tz}); err != nil {
			t.Errorf("%s: %v", tz, err)
		}
	}
	for _, tz := range []string{"Europe/London", "America/New_York", "Asia/Kolkata", "Etc/GMT+5", "Nowhere/Else"} {
		err := CheckTimeZone(context.Background(), tzConn{tz: tz})
		if err == nil || !strings.Contains(err.Error(), "<timezone>UTC</timezone>") || !strings.Contains(err.Error(), tz) {
			t.Errorf("%s: %v, want a refusal that says how to fix it", tz, err)
		}
	}
}

type revisionConn struct {
	driver.Conn
	revision uint64
}

func (c revisionConn) ServerVersion() (*driver.ServerVersion, error) {
	return &driver.ServerVersion{Revision: c.revision}, nil
}

// 18.16 reads the signed setting as a zigzag varint (see DDLTaskTimeout): 30 s is sent as 60 there,
// and as 30 to a server that takes settings as strings.
func TestDDLTaskTimeout(t *testing.T) {
	for _, c := range []struct {
		revision uint64
		want     int
	}{{54413, 60}, {54429, 60}, {54430, 30}, {54479, 30}} {
		got := DDLTaskTimeout(revisionConn{revision: c.revision}, 30*time.Second)["distributed_ddl_task_timeout"]
		if got != c.want {
			t.Errorf("revision %d: %v, want %d", c.revision, got, c.want)
		}
	}
}
