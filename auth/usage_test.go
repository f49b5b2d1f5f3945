package auth_test

import (
	"context"
	"testing"
	"time"
)

// A key's last use reaches api_keys.last_used_at through FlushUsage, not on the request's path: after
// requests nothing is written yet; a flush writes the key once; a flush with no new use writes nothing.
// Before, last_used_at was never written and LAST USED always read "-".
func TestLastUseIsWrittenByFlushNotByRequests(t *testing.T) {
	f := newAuthFixture(t)
	ctx := context.Background()
	lastUsed := func() *time.Time {
		t.Helper()
		var at *time.Time
		if err := f.env.PG.QueryRow(ctx, "SELECT last_used_at FROM api_keys WHERE tenant_id = $1", f.tenant.ID).Scan(&at); err != nil {
			t.Fatal(err)
		}
		return at
	}
	start := time.Now().Truncate(time.Second)
	for range 3 {
		if code, msg := f.status(t, f.key); code != 200 {
			t.Fatalf("got %d %s", code, msg)
		}
	}
	if at := lastUsed(); at != nil {
		t.Fatalf("last_used_at = %s right after requests, want it written in the background only", at)
	}
	if n, err := f.authn.FlushUsage(ctx); err != nil || n != 1 {
		t.Fatalf("flush: %d keys, %v; want 1 key written", n, err)
	}
	at := lastUsed()
	if at == nil || at.Before(start) || at.After(time.Now()) {
		t.Fatalf("last_used_at = %v after the flush, want the time of the requests (from %s)", at, start)
	}
	if n, err := f.authn.FlushUsage(ctx); err != nil || n != 0 {
		t.Errorf("flush without new use: %d keys, %v; want nothing written", n, err)
	}

	// RecordUsage flushes once more when it is stopped, so a clean shutdown loses no use.
	time.Sleep(1100 * time.Millisecond) // the next second, so the use is newer
	if code, _ := f.status(t, f.key); code != 200 {
		t.Fatal("key refused")
	}
	rctx, stop := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() { defer close(done); f.authn.RecordUsage(rctx, time.Hour, discardLog()) }()
	stop()
	<-done
	if later := lastUsed(); later == nil || !later.After(*at) {
		t.Errorf("last_used_at = %v after RecordUsage stopped, want later than %s", later, at)
	}
}
