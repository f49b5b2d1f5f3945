// Package clock is the time analyticsd's own logic reads: when rows are received, which UTC day
// counts are on, which day a rollup or a quota belongs to. It is time.Now — except in binaries built
// with the testclock tag, where ANALYTICS_TEST_CLOCK_OFFSET shifts it, so the fault suite can run two
// instances whose clocks disagree and carry them across midnight UTC. Timeouts, backoff and other
// durations keep using time directly.
package clock

import "time"

// Now returns the current time.
var Now = time.Now

// MaxSkew is how far apart the clocks of analyticsd instances are assumed to be at most (they run NTP;
// the fault suite runs two instances 1.7 s apart). Decisions that compare a time stamped by one
// instance with one stamped by another keep this margin: ingest's shipping, and dedup's epochs under
// a restart floor.
const MaxSkew = 5 * time.Second
