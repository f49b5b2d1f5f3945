package ratelimit

import (
	"context"
	"testing"
	"time"

	"github.com/analyticsd/analyticsd/internal/testenv"
)

func TestTokenBucketSharedAcrossInstances(t *testing.T) {
	rdb, prefix := testenv.Redis(t)
	a := New(Config{Rate: 10, Burst: 5}, rdb, prefix)
	b := New(Config{Rate: 10, Burst: 5}, rdb, prefix)
	ctx := context.Background()
	allowed := 0
	for i := 0; i < 8; i++ {
		l := a
		if i%2 == 1 {
			l = b
		}
		d, err := l.Allow(ctx, "apikey:x")
		if err != nil {
			t.Fatal(err)
		}
		if d.Allowed {
			allowed++
		} else if d.Retry <= 0 || d.Retry > 150*time.Millisecond {
			t.Errorf("refused with Retry %v, want about 100ms (one token at 10/s)", d.Retry)
		}
	}
	if allowed != 5 {
		t.Errorf("allowed %d of 8 back-to-back requests, want the burst of 5 across both instances", allowed)
	}
	time.Sleep(250 * time.Millisecond) // refills ~2.5 tokens
	allowed = 0
	for i := 0; i < 5; i++ {
		if d, _ := a.Allow(ctx, "apikey:x"); d.Allowed {
			allowed++
		}
	}
	if allowed != 2 {
		t.Errorf("after 250ms at 10/s: allowed %d, want 2", allowed)
	}
	if d, _ := a.Allow(ctx, "apikey:other"); !d.Allowed || d.Remaining != 4 {
		t.Errorf("another credential has its own bucket: %+v", d)
	}
	if d, _ := New(Config{}, rdb, prefix).Allow(ctx, "apikey:x"); !d.Allowed {
		t.Error("a disabled limiter refused")
	}
}
