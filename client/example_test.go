package client_test

import (
	"context"
	"errors"
	"fmt"
	"log"
	"os"
	"sync/atomic"
	"time"

	"github.com/analyticsd/analyticsd/client"
)

// Track events from app code, and send what is queued before the program exits. (These examples run
// as tests against a real server: ANALYTICS_URL and ANALYTICS_KEY are set by the test harness.)
func Example() {
	c, err := client.New(client.Config{
		Endpoint: os.Getenv("ANALYTICS_URL"), // e.g. http://localhost:8080
		APIKey:   os.Getenv("ANALYTICS_KEY"), // scopes events:write,analytics:read
	})
	if err != nil {
		log.Fatal(err)
	}
	// Track returns at once; the event is sent in the background, batched with others.
	err = c.Track(client.Event{
		Event:  "business.order.completed",
		UserID: "user-456",
		Source: "app",
		Props:  map[string]any{"order_id": "o-1001", "amount": 49.90, "items_count": 3},
	})
	if err != nil {
		log.Print(err) // ErrQueueFull: dropped and counted; never blocks the request
	}

	// On shutdown: send everything queued, within a deadline.
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := c.Close(ctx); err != nil {
		log.Print(err)
	}
	st := c.Stats()
	fmt.Printf("tracked %d, sent %d, dropped %d, failed %d\n", st.Tracked, st.Sent, st.Dropped, st.FailedEvents)
	// Output: tracked 1, sent 1, dropped 0, failed 0
}

// Guard an expensive action with a hard daily limit: the check and the spend are one atomic step.
func ExampleClient_Consume() {
	c, err := client.New(client.Config{Endpoint: os.Getenv("ANALYTICS_URL"), APIKey: os.Getenv("ANALYTICS_KEY")})
	if err != nil {
		log.Fatal(err)
	}
	defer c.Close(context.Background())
	ctx := context.Background()

	res, err := c.Consume(ctx, "builds_daily", 1)
	switch {
	case errors.Is(err, client.ErrQuotaExceeded):
		fmt.Printf("refused: %v of %v builds used today\n", res.Current, res.Limit)
	case err != nil:
		log.Print(err) // the server could not answer: decide whether to allow without it
	default:
		fmt.Printf("allowed: %v of %v builds used today\n", res.Current, res.Limit)
	}
	// Output: allowed: 1 of 200 builds used today
}

// Count usage the way the guide's increment_usage does, and read the quota back (check_quota).
func ExampleClient_CheckQuota() {
	c, err := client.New(client.Config{Endpoint: os.Getenv("ANALYTICS_URL"), APIKey: os.Getenv("ANALYTICS_KEY")})
	if err != nil {
		log.Fatal(err)
	}
	defer c.Close(context.Background())
	ctx := context.Background()

	if err := c.IncrementUsage(ctx, "emails_daily", 3); err != nil {
		log.Fatal(err)
	}
	q, err := c.CheckQuota(ctx, "emails_daily")
	if err != nil {
		log.Fatal(err)
	}
	fmt.Printf("emails_daily: %v of %v, exceeded: %v\n", q.Current, q.Limit, q.Exceeded)
	// Output: emails_daily: 3 of 5000, exceeded: false
}

// counters is a Metrics hook; in production it would add to Prometheus counters.
type counters struct{ sent, retried, dropped, failed atomic.Int64 }

func (m *counters) EventsSent(n int)       { m.sent.Add(int64(n)) }
func (m *counters) BatchRetried(int)       { m.retried.Add(1) }
func (m *counters) EventsDropped(n int)    { m.dropped.Add(int64(n)) }
func (m *counters) BatchFailed(events int) { m.failed.Add(int64(events)) }

// Nothing is lost silently: an event the server rejects reaches OnFailure with the reason, while the
// rest of its batch is stored; Flush says that something was not delivered.
func ExampleConfig_hooks() {
	m := &counters{}
	c, err := client.New(client.Config{
		Endpoint: os.Getenv("ANALYTICS_URL"),
		APIKey:   os.Getenv("ANALYTICS_KEY"),
		Metrics:  m,
		OnFailure: func(f client.Failure) {
			var rejected *client.RejectedError
			for _, e := range f.Events {
				fmt.Printf("not stored: %q (rejected by the server: %v)\n", e.Event, errors.As(f.Err, &rejected))
			}
		},
	})
	if err != nil {
		log.Fatal(err)
	}
	defer c.Close(context.Background())

	_ = c.Track(client.Event{Event: "auth.user.login", UserID: "user-1"})
	_ = c.Track(client.Event{Event: "Signup Completed"}) // not lowercase domain.action
	err = c.Flush(context.Background())
	fmt.Println("flush:", errors.Is(err, client.ErrUndelivered))
	fmt.Printf("sent %d, failed %d\n", m.sent.Load(), m.failed.Load())
	// Output:
	// not stored: "Signup Completed" (rejected by the server: true)
	// flush: true
	// sent 1, failed 1
}
