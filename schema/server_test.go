package schema

import (
	"context"
	"strings"
	"testing"

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
