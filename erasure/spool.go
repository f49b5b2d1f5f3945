package erasure

import (
	"context"
	"fmt"
	"time"

	"github.com/analyticsd/analyticsd/ingest/spool"
)

// SpoolBarrier is the Barrier of the spool in dir: it notes the newest segment there when called and
// returns once no segment up to it is left, i.e. every row acknowledged before the call has been
// shipped to ClickHouse (a segment file is removed only after ClickHouse took all its rows) or set
// aside in the quarantine. It waits at most max: a ClickHouse outage keeps rows in the spool, and the
// job then fails this step and is retried.
//
// It covers this instance's spool; every other live instance runs its own before acknowledging the
// job (acks.go), and the job deletes only once all have.
func SpoolBarrier(dir string, poll, max time.Duration) Barrier {
	return func(ctx context.Context) error {
		newest, any, err := newestSegment(dir)
		if err != nil || !any {
			return err
		}
		ctx, cancel := context.WithTimeout(ctx, max)
		defer cancel()
		for {
			segs, err := spool.List(dir)
			// A segment removed while it was listed makes List fail; look again.
			if err == nil && (len(segs) == 0 || segs[0].Seq > newest) {
				return nil
			}
			select {
			case <-ctx.Done():
				if err == nil {
					return fmt.Errorf("segment %d of the spool %s has not shipped within %s (is ClickHouse up?)", segs[0].Seq, dir, max)
				}
				return fmt.Errorf("list the spool %s: %w", dir, err)
			case <-time.After(poll):
			}
		}
	}
}

func newestSegment(dir string) (uint64, bool, error) {
	var err error
	for range 10 {
		var segs []*spool.Segment
		if segs, err = spool.List(dir); err == nil {
			if len(segs) == 0 {
				return 0, false, nil
			}
			return segs[len(segs)-1].Seq, true, nil
		}
		time.Sleep(10 * time.Millisecond)
	}
	return 0, false, fmt.Errorf("list the spool %s: %w", dir, err)
}
