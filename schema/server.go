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
