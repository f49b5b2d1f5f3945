package clock

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"
)

func TestMeasureAgainstAReference(t *testing.T) {
	for _, ahead := range []time.Duration{0, 3 * time.Second, -4 * time.Second} {
		ref := func(context.Context) (time.Time, error) {
			time.Sleep(2 * time.Millisecond) // the round trip
			return time.Now().Add(-ahead), nil
		}
		off, unc, err := Measure(context.Background(), ref)
		if err != nil {
			t.Fatal(err)
		}
		if unc < time.Millisecond || (off-ahead).Abs() > unc+time.Millisecond {
			t.Errorf("a clock %v ahead: offset %v ± %v", ahead, off, unc)
		}
	}
	if _, _, err := Measure(context.Background(), func(context.Context) (time.Time, error) { return time.Time{}, errors.New("down") }); err == nil {
		t.Error("a reference that fails: no error")
	}
}

func TestTroubleBeyondHalfTheAllowedSkew(t *testing.T) {
	for _, c := range []struct {
		offset, uncertainty time.Duration
		trouble             bool
	}{
		{0, 0, false},
		{MaxSkew / 2, 0, false},
		{-MaxSkew / 2, 0, false},
		{MaxSkew/2 + time.Millisecond, 0, true},
		{-(MaxSkew/2 + time.Millisecond), 0, true},
		{MaxSkew/2 + 100*time.Millisecond, 200 * time.Millisecond, false}, // the round trip could explain it
		{3 * time.Hour, time.Millisecond, true},
	} {
		got := Trouble(c.offset, c.uncertainty)
		if (got != "") != c.trouble || (got != "" && !strings.Contains(got, "NTP")) {
			t.Errorf("Trouble(%v, %v) = %q, want trouble %v", c.offset, c.uncertainty, got, c.trouble)
		}
	}
}
