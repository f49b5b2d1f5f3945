package query

import (
	"errors"
	"fmt"
	"testing"

	"github.com/ClickHouse/clickhouse-go/v2"

	"github.com/analyticsd/analyticsd/api"
)

// A cluster with a whole shard down answers code 279; the read is refused with a 503 that says a
// shard is unreachable, not the generic storage error, and never with a partial sum.
func TestShardDownIsNamed(t *testing.T) {
	for _, c := range []struct {
		err  error
		code string
	}{
		{fmt.Errorf("query usage: %w", &clickhouse.Exception{Code: 279, Message: "All connection tries failed"}), "shard_unavailable"},
		{&clickhouse.Exception{Code: 241, Message: "Memory limit"}, "storage_unavailable"},
		{errors.New("dial tcp: connection refused"), "storage_unavailable"},
	} {
		var e *api.Error
		if !errors.As(httpError(c.err), &e) || e.Status != 503 || e.Code != c.code {
			t.Errorf("%v: got %+v, want 503 %s", c.err, e, c.code)
		}
	}
}
