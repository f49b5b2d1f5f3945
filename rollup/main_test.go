package rollup_test

import (
	"fmt"
	"os"
	"runtime"
	"strings"
	"testing"
	"time"
)

// TestMain fails the run when a goroutine of package rollup outlives the tests: every Start must be
// matched by a Stop that waits for the loop to end.
func TestMain(m *testing.M) {
	code := m.Run()
	if code == 0 {
		if leaked := leaked(); leaked != "" {
			fmt.Fprintf(os.Stderr, "goroutines of package rollup still running after the tests:\n\n%s\n", leaked)
			code = 1
		}
	}
	os.Exit(code)
}

func leaked() string {
	deadline := time.Now().Add(2 * time.Second)
	for {
		buf := make([]byte, 1<<20)
		buf = buf[:runtime.Stack(buf, true)]
		var found []string
		for _, g := range strings.Split(string(buf), "\n\n") {
			if strings.Contains(g, "analyticsd/rollup.") {
				found = append(found, g)
			}
		}
		if len(found) == 0 || time.Now().After(deadline) {
			return strings.Join(found, "\n\n")
		}
		time.Sleep(10 * time.Millisecond)
	}
}
