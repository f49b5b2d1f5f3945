package schema

import (
	"context"
	"fmt"
	"time"

	"github.com/ClickHouse/clickhouse-go/v2/lib/driver"
)

// CheckTimeZone refuses a ClickHouse server whose time zone is not UTC. The server computes every
// day analyticsd relies on in its own zone — the daily partitions (toYYYYMMDD(ts)), the days of
// daily_usage (toDate(ts)), the partitions the retention sweeper drops — so on a server at UTC-5 the
// sweeper would drop five hours of events still inside the window, and daily counts would straddle
// UTC days.
func CheckTimeZone(ctx context.Context, ch driver.Conn) error {
	var tz string
	if err := ch.QueryRow(ctx, "SELECT timezone()").Scan(&tz); err != nil {
		return fmt.Errorf("read the clickhouse server's time zone: %w", err)
	}
	if !alwaysUTC(tz) {
		return fmt.Errorf("the clickhouse server's time zone is %q, not UTC: analyticsd partitions, counts and expires data by UTC day, "+
			"and in another zone the retention sweeper would drop days still inside the window. Set <timezone>UTC</timezone> in the "+
			"server's config.xml (or run it with TZ=UTC) and restart it", tz)
	}
	return nil
}

// alwaysUTC reports whether zone tz is UTC all year (UTC, Etc/UTC, GMT, Zulu and their aliases).
func alwaysUTC(tz string) bool {
	loc, err := time.LoadLocation(tz)
	if err != nil {
		return false
	}
	year := time.Now().Year()
	for _, m := range []time.Month{time.January, time.April, time.July, time.October} {
		if _, off := time.Date(year, m, 1, 12, 0, 0, 0, loc).Zone(); off != 0 {
			return false
		}
	}
	return true
}

// binarySettingsRevision is the last protocol revision whose servers take query settings in binary
// form (18.16 here); newer ones take them as strings.
const binarySettingsRevision = 54429

// DDLTaskTimeout is the setting that bounds how long an ON CLUSTER statement sent on ch waits for
// every host (distributed_ddl_task_timeout; a host that is down runs the statement when it returns,
// and the wait ends in code 159, "…going to execute the query in background").
//
// The setting is signed, and servers that take settings in binary form read a signed setting as a
// zigzag varint while clickhouse-go writes every number as an unsigned one: 3 arrives as -2, which is
// "wait forever". Measured on 18.16 with a replica down: 3 waited past a 40 s deadline, 6 arrived as 3
// and returned after 3.3 s. So for those servers the value is sent zigzag-encoded.
func DDLTaskTimeout(ch driver.Conn, d time.Duration) map[string]any {
	secs := max(int(d.Seconds()), 1)
	if sv, err := ch.ServerVersion(); err == nil && sv.Revision <= binarySettingsRevision {
		secs *= 2 // zigzag of a positive n
	}
	return map[string]any{"distributed_ddl_task_timeout": secs}
}
