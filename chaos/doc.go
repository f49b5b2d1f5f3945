// Package chaos holds the fault suite: analyticsd under steady ingest load while ClickHouse, Redis,
// Postgres, the spool's disk and analyticsd itself fail, followed by a full accounting of every
// acknowledged event. Its tests stop and start the shared local stack, so they only build with
// -tags chaos and run on their own: `make chaos` (full length) or the short form in `make test`.
package chaos
