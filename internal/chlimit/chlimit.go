// Package chlimit bounds a ClickHouse query by its server-side max_execution_time, as configured.
// clickhouse-go replaces that setting with a context's remaining time + 5 s whenever the context has
// a deadline, so a query run under a long-lived context (a 30-minute rollup run, an export stream)
// was allowed far longer than the limit (1,805 s instead of 60 s). Context keeps the caller's
// cancellation but hides its deadline from the driver.
package chlimit

import (
	"context"
	"time"

	"github.com/ClickHouse/clickhouse-go/v2"
)

// Context returns ctx carrying max_execution_time = limit (whole seconds, at least 1) plus any extra
// integer settings, cancelled when ctx is, with no deadline for the driver to turn into a longer
// limit.
func Context(ctx context.Context, limit time.Duration, extra clickhouse.Settings) context.Context {
	settings := clickhouse.Settings{"max_execution_time": max(int(limit.Seconds()), 1)}
	for k, v := range extra {
		settings[k] = v
	}
	return clickhouse.Context(noDeadline{ctx}, clickhouse.WithSettings(settings))
}

// Limit is a configured max_execution_time, for readers that apply the same one to every query
// (query's Store, rollup's Reconciler).
type Limit time.Duration

// Context is Context(ctx, l, nil).
func (l Limit) Context(ctx context.Context) context.Context {
	return Context(ctx, time.Duration(l), nil)
}

// noDeadline is ctx without its deadline: Done and Err still end it when the deadline passes.
type noDeadline struct{ context.Context }

func (noDeadline) Deadline() (time.Time, bool) { return time.Time{}, false }
