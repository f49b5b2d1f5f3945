package clock

import (
	"context"
	"fmt"
	"time"
)

// Measure measures how far ahead of a reference clock Now runs, and the measurement's uncertainty
// (half the time the reference took to answer). analyticsd's instances share no clock of their own;
// serve measures against Redis' (TIME), which every instance reaches, so that an instance whose clock
// breaks the assumption MaxSkew states says so (Trouble) instead of silently weakening exactly-once.
func Measure(ctx context.Context, ref func(context.Context) (time.Time, error)) (offset, uncertainty time.Duration, err error) {
	t0 := Now()
	r, err := ref(ctx)
	t1 := Now()
	if err != nil {
		return 0, 0, err
	}
	half := t1.Sub(t0) / 2
	return t0.Add(half).Sub(r), half, nil
}

// Trouble describes an offset from the shared reference that can put this instance more than MaxSkew
// from another (each may be off by half of it, in opposite directions), or returns "".
func Trouble(offset, uncertainty time.Duration) string {
	if d := offset.Abs() - uncertainty; d > MaxSkew/2 {
		return fmt.Sprintf("this instance's clock is %v off Redis' (TIME): instances must be within %v of each other (run NTP; "+
			"if every instance says so, it is Redis' clock); until then a retry or replay may be judged against a claim history by a wrong clock",
			offset.Round(time.Millisecond), MaxSkew)
	}
	return ""
}
