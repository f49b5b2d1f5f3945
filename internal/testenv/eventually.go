package testenv

import (
	"testing"
	"time"
)

// Eventually calls cond every 20 ms until it returns nil, and fails the test if it still returns an
// error after timeout: the message says how long it waited and what cond last reported ("stored 3
// of 5 events"), so a test that polls fails with the state it was waiting for, not a bare timeout.
// cond runs on the test's goroutine and may itself call t.Fatal.
func Eventually(t testing.TB, timeout time.Duration, cond func() error) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		err := cond()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("still not true after %v: %v", timeout, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}
