//go:build testclock

package clock

import (
	"fmt"
	"os"
	"time"
)

// Offset is how far this process's clock is from the machine's: ANALYTICS_TEST_CLOCK_OFFSET, a Go
// duration (e.g. -2s, 3h59m30s). Only binaries built with -tags testclock read it.
var Offset time.Duration

func init() {
	v := os.Getenv("ANALYTICS_TEST_CLOCK_OFFSET")
	if v == "" {
		return
	}
	d, err := time.ParseDuration(v)
	if err != nil {
		fmt.Fprintf(os.Stderr, "ANALYTICS_TEST_CLOCK_OFFSET=%q: %v\n", v, err)
		os.Exit(2)
	}
	Offset = d
	Now = func() time.Time { return time.Now().Add(Offset) }
}
