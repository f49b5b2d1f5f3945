package ratelimit

import (
	"context"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/analyticsd/analyticsd/api"
	"github.com/analyticsd/analyticsd/internal/testenv"
)

func TestTokenBucketSharedAcrossInstances(t *testing.T) {
	rdb, prefix := testenv.Redis(t)
	a := New(Config{Rate: 2, Burst: 5}, rdb, prefix)
	b := New(Config{Rate: 2, Burst: 5}, rdb, prefix)
	ctx := context.Background()
	allowed := 0
	for i := 0; i < 8; i++ {
		l := a
		if i%2 == 1 {
			l = b
		}
		d, err := l.Allow(ctx, "t1", "apikey:x")
		if err != nil {
			t.Fatal(err)
		}
		if d.Allowed {
			allowed++
		} else if d.Retry <= 0 || d.Retry > 500*time.Millisecond {
			t.Errorf("refused with Retry %v, want at most 500ms (one token at 2/s)", d.Retry)
		}
	}
	if allowed != 5 {
		t.Errorf("allowed %d of 8 back-to-back requests, want the burst of 5 across both instances", allowed)
	}
	// At 2/s, 1.1 s refills two tokens, with 0.4 s of slack for a loaded machine before a third.
	time.Sleep(1100 * time.Millisecond)
	allowed = 0
	for i := 0; i < 5; i++ {
		if d, _ := a.Allow(ctx, "t1", "apikey:x"); d.Allowed {
			allowed++
		}
	}
	if allowed != 2 {
		t.Errorf("after 1.1s at 2/s: allowed %d, want 2", allowed)
	}
	if d, _ := a.Allow(ctx, "t1", "apikey:other"); !d.Allowed || d.Remaining != 4 {
		t.Errorf("another credential has its own bucket: %+v", d)
	}
	if d, _ := New(Config{}, rdb, prefix).Allow(ctx, "t1", "apikey:x"); !d.Allowed {
		t.Error("a disabled limiter refused")
	}
}

// OnLimited (the tenant's apikey.rate_limited event) is told once a minute per credential. It was
// keyed by actor alone, and a JWT's actor is "jwt:<sub>": tenant A's user being limited silenced
// the event of tenant B's user with the same sub for a minute.
func TestRateLimitedEventIsPerTenantAndActor(t *testing.T) {
	l := New(Config{Rate: 1, Burst: 1}, nil, "")
	now := time.Now()
	a := api.Principal{TenantID: uuid.New(), Actor: "jwt:user-1"}
	b := api.Principal{TenantID: uuid.New(), Actor: "jwt:user-1"}
	if !l.firstInAMinute(a, now) {
		t.Fatal("tenant A's first refusal not told")
	}
	if l.firstInAMinute(a, now.Add(time.Second)) {
		t.Error("tenant A told twice within a minute")
	}
	if !l.firstInAMinute(b, now.Add(time.Second)) {
		t.Error("tenant B's first refusal not told: silenced by tenant A's, same sub")
	}
	if !l.firstInAMinute(a, now.Add(61*time.Second)) {
		t.Error("tenant A not told again after a minute")
	}
}
