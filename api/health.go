package api

import (
	"context"
	_ "embed"
	"encoding/json"
	"net/http"
	"slices"
	"sync"
	"time"

	"github.com/gofiber/fiber/v2"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// Check is one dependency readiness looks at.
type Check struct {
	Name string
	Ping func(ctx context.Context) error
}

// Ops configures the operational routes.
type Ops struct {
	Checks   []Check
	Gatherer prometheus.Gatherer
	// Details, when set, adds extra sections to /readiness (e.g. the rollup job's last run). A section
	// may mark itself failing by returning ok=false; that does not make readiness 503 — dependencies do.
	Details      func(ctx context.Context) map[string]any
	CheckTimeout time.Duration
	Version      string
}

// CheckResult is one dependency's state in /readiness.
type CheckResult struct {
	Status    string  `json:"status"` // "up" or "down"
	LatencyMS float64 `json:"latency_ms"`
	Error     string  `json:"error,omitempty"`
}

// Readiness pings every dependency at once and reports each; ready only when all are up.
func (o Ops) Readiness(ctx context.Context) (bool, map[string]CheckResult) {
	timeout := o.CheckTimeout
	if timeout == 0 {
		timeout = 2 * time.Second
	}
	results := make(map[string]CheckResult, len(o.Checks))
	var mu sync.Mutex
	var wg sync.WaitGroup
	for _, ch := range o.Checks {
		wg.Add(1)
		go func() {
			defer wg.Done()
			cctx, cancel := context.WithTimeout(ctx, timeout)
			defer cancel()
			start := time.Now()
			err := ch.Ping(cctx)
			r := CheckResult{Status: "up", LatencyMS: float64(time.Since(start).Microseconds()) / 1000}
			if err != nil {
				r.Status, r.Error = "down", err.Error()
			}
			mu.Lock()
			results[ch.Name] = r
			mu.Unlock()
		}()
	}
	wg.Wait()
	ready := true
	for _, r := range results {
		ready = ready && r.Status == "up"
	}
	return ready, results
}

// Register mounts the public operational routes: /healthz (the process is alive) and /readiness
// (each dependency up or down as of at most a second ago, 503 when one is down — and nothing more:
// no error text, latencies or job details, which belong to operators). /metrics and the detailed
// readiness are on the operator listener (Private).
func (o Ops) Register(app fiber.Router) {
	app.Get("/healthz", func(c *fiber.Ctx) error {
		return c.JSON(fiber.Map{"status": "ok", "version": o.Version})
	})
	shared := &sharedReadiness{ops: o, every: time.Second}
	app.Get("/readiness", func(c *fiber.Ctx) error {
		status, body := shared.get(c.UserContext())
		return c.Status(status).JSON(body)
	})
}

// sharedReadiness is the public /readiness answer, computed at most once per `every` and once at a
// time for all callers: anyone can call it, and each call pinged ClickHouse, Postgres and Redis (a
// client looping on it sent them a query per request; found by review). A load balancer probing it
// every few seconds sees a state at most `every` old.
type sharedReadiness struct {
	ops   Ops
	every time.Duration

	mu       sync.Mutex
	at       time.Time
	status   int
	body     map[string]any
	inflight chan struct{} // closed when the check under way ends; nil when none is
}

func (s *sharedReadiness) get(ctx context.Context) (int, map[string]any) {
	for {
		s.mu.Lock()
		if s.body != nil && time.Since(s.at) < s.every {
			status, body := s.status, s.body
			s.mu.Unlock()
			return status, body
		}
		wait := s.inflight
		if wait == nil {
			s.inflight = make(chan struct{})
			s.mu.Unlock()
			// Not the caller's context: a caller that leaves must not cancel the others' answer.
			status, body := s.ops.readiness(context.WithoutCancel(ctx), false)
			s.mu.Lock()
			s.status, s.body, s.at = status, body, time.Now()
			close(s.inflight)
			s.inflight = nil
			s.mu.Unlock()
			return status, body
		}
		s.mu.Unlock()
		select {
		case <-wait:
		case <-ctx.Done():
			return http.StatusServiceUnavailable, map[string]any{"status": "not_ready"}
		}
	}
}

// readiness is the /readiness answer: public (up/down per dependency) or detailed (latency, error
// and the Details sections too).
func (o Ops) readiness(ctx context.Context, detailed bool) (int, map[string]any) {
	ready, checks := o.Readiness(ctx)
	body := map[string]any{"status": "ready"}
	if detailed {
		body["checks"] = checks
	} else {
		public := make(map[string]string, len(checks))
		for name, r := range checks {
			public[name] = r.Status
		}
		body["checks"] = public
	}
	status := http.StatusOK
	if !ready {
		status = http.StatusServiceUnavailable
		var down []string
		for name, r := range checks {
			if r.Status != "up" {
				down = append(down, name)
			}
		}
		body["status"] = "not_ready"
		slices.Sort(down)
		body["down"] = down
	}
	if detailed && o.Details != nil {
		for k, v := range o.Details(ctx) {
			body[k] = v
		}
	}
	return status, body
}

// Private is the operator listener's handler (ANALYTICS_METRICS_ADDR, loopback by default):
// /metrics (Prometheus: it names tenants and their event names and volumes), the detailed
// /readiness, and /healthz.
func (o Ops) Private() http.Handler {
	mux := http.NewServeMux()
	if o.Gatherer != nil {
		mux.Handle("GET /metrics", promhttp.HandlerFor(o.Gatherer, promhttp.HandlerOpts{}))
	}
	mux.HandleFunc("GET /readiness", func(w http.ResponseWriter, r *http.Request) {
		status, body := o.readiness(r.Context(), true)
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(status)
		_ = json.NewEncoder(w).Encode(body)
	})
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(map[string]string{"status": "ok", "version": o.Version})
	})
	return mux
}

//go:embed openapi.json
var openapi []byte

// OpenAPI returns the API's OpenAPI 3 document.
func OpenAPI() []byte { return openapi }

// RegisterOpenAPI serves the document at /api/openapi.json.
func RegisterOpenAPI(app fiber.Router) {
	app.Get("/api/openapi.json", func(c *fiber.Ctx) error {
		c.Set(fiber.HeaderContentType, fiber.MIMEApplicationJSON)
		return c.Send(openapi)
	})
}
