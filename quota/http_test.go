package quota

import (
	"context"
	"net/http"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/analyticsd/analyticsd/audit"
	"github.com/analyticsd/analyticsd/ingest"
	"github.com/analyticsd/analyticsd/internal/testenv"
)

// Every refusal of the quota endpoints, byte for byte: clients parse the codes, show the messages
// and wait the Retry-After seconds, so none of them may change by accident.
func TestErrorResponses(t *testing.T) {
	t.Parallel()
	h := newHarness(t)
	s := h.service(t, Config{Enabled: true}, map[string]float64{"builds_daily": 1}, nil)
	s.now = func() time.Time { return time.Date(2031, 3, 4, 23, 59, 58, 0, time.UTC) }
	app := h.app(t, s, h.ingest)
	if st, _, raw := callRaw(t, app, http.MethodPost, "/api/analytics/quotas/builds_daily/consume", h.keyW, ""); st != 200 {
		t.Fatalf("first consume: %d %s", st, raw)
	}

	// ClickHouse unreachable and nothing counted today: no state to answer with.
	blind := NewService(Config{Enabled: true, EventMetrics: ingest.DefaultEventMetrics()}, NewCounters(h.env.Redis, h.env.Prefix+"blind:"),
		NewLimits(nil, h.tenants, time.Millisecond), h.env.CH, "no_such_db", h.env.PG, audit.New(h.env.PG), nil, nil)
	t.Cleanup(func() { blind.Close(context.Background()) })

	// Redis unreachable with QUOTA_FAIL_OPEN=false.
	rdb, proxy := testenv.CuttableRedis(t)
	proxy.SetDown(true)
	closedRedis := h.service(t, Config{Enabled: true}, nil, rdb)

	// The recorder (ingest) refuses the spend: its buffer is full, or it is shutting down.
	full, fullIngest, _ := h.recording(t, ingest.WriterConfig{Durability: ingest.DurabilityMemory, MaxBufferedRows: 1, FlushInterval: time.Hour, BatchRows: 1_000_000}, 100)
	if st, _, raw := callRaw(t, h.app(t, full, fullIngest), http.MethodPost, "/api/analytics/quotas/builds_daily/consume", h.keyW, ""); st != 200 {
		t.Fatalf("consume filling the buffer: %d %s", st, raw)
	}
	closing, closingIngest, w := h.recording(t, ingest.WriterConfig{}, 100)
	if err := w.Close(context.Background()); err != nil {
		t.Fatal(err)
	}

	const consume = "/api/analytics/quotas/builds_daily/consume"
	cases := []struct {
		name       string
		s          *Service
		method     string
		path       string
		status     int
		retryAfter string
		want       string
	}{
		{"unknown quota", s, http.MethodGet, "/api/analytics/quotas/nope_daily", 404, "",
			`{"error":{"code":"unknown_quota","message":"no quota is defined for \"nope_daily\"; GET /api/analytics/quotas lists them"},"success":false}`},
		{"consume unknown quota", s, http.MethodPost, "/api/analytics/quotas/nope_daily/consume", 404, "",
			`{"error":{"code":"unknown_quota","message":"no quota is defined for \"nope_daily\"; GET /api/analytics/quotas lists them"},"success":false}`},
		{"bad n", s, http.MethodPost, consume + "?n=0", 400, "",
			`{"error":{"code":"invalid_parameter","message":"n must be a whole number from 1 to 1000000000 (default 1)"},"success":false}`},
		{"consume a level", s, http.MethodPost, "/api/analytics/quotas/storage_gb/consume", 400, "",
			`{"error":{"code":"invalid_parameter","message":"storage_gb is a level, not a daily count: set it with POST /api/analytics/usage {\"metric\":\"storage_gb\",\"value\":N}"},"success":false}`},
		{"exceeded", s, http.MethodPost, consume, 429, "2",
			`{"error":{"code":"quota_exceeded","message":"quota builds_daily would be exceeded: 1 of 1 used today (UTC); it resets at 00:00 UTC","details":{"metric":"builds_daily","allowed":false,"current":1,"limit":1,"remaining":0,"exceeded":true}},"success":false}`},
		{"no state", blind, http.MethodGet, "/api/analytics/quotas", 503, "5",
			`{"error":{"code":"quota_unavailable","message":"quota state is unavailable right now; retry shortly"},"success":false}`},
		{"no state for one", blind, http.MethodGet, "/api/analytics/quotas/builds_daily", 503, "5",
			`{"error":{"code":"quota_unavailable","message":"quota state is unavailable right now; retry shortly"},"success":false}`},
		{"fail closed", closedRedis, http.MethodPost, consume, 503, "",
			`{"error":{"code":"quota_unavailable","message":"quota counters are unavailable and QUOTA_FAIL_OPEN=false; retry shortly"},"success":false}`},
		{"recorder full", full, http.MethodPost, consume, 503, "2",
			`{"error":{"code":"ingest_unavailable","message":"ingest is temporarily unable to accept events (in-memory buffer full while ClickHouse catches up); retry after 2s"},"success":false}`},
		{"recorder shutting down", closing, http.MethodPost, consume, 503, "1",
			`{"error":{"code":"shutting_down","message":"server is shutting down; retry on another instance"},"success":false}`},
	}
	apps := map[*Service]*ingest.Service{s: h.ingest, blind: h.ingest, closedRedis: h.ingest, full: fullIngest, closing: closingIngest}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			key := h.keyW
			if c.method == http.MethodGet {
				key = h.keyRead
			}
			st, hdr, raw := callRaw(t, h.app(t, c.s, apps[c.s]), c.method, c.path, key, "")
			if st != c.status || hdr.Get("Retry-After") != c.retryAfter || raw != c.want {
				t.Errorf("got %d, Retry-After %q:\n%s\nwant %d, Retry-After %q:\n%s", st, hdr.Get("Retry-After"), raw, c.status, c.retryAfter, c.want)
			}
		})
	}
}

// A level that cannot be stored (Postgres unreachable) is a 503 to retry, byte for byte (levels are
// answered by quota's part of POST /usage; ingest's TestErrorResponses held this case before).
func TestLevelNotStored(t *testing.T) {
	t.Parallel()
	h := newHarness(t)
	h.service(t, Config{Enabled: true}, nil, nil)
	down, err := pgxpool.New(context.Background(), "postgres://analyticsd@127.0.0.1:1/none?connect_timeout=1")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(down.Close)
	s := NewService(Config{Enabled: true, EventMetrics: ingest.DefaultEventMetrics()}, NewCounters(h.env.Redis, h.env.Prefix),
		NewLimits(map[string]float64{"storage_gb": 50}, h.tenants, time.Millisecond), h.env.CH, h.env.DB, down, audit.New(down), nil, nil)
	t.Cleanup(func() { s.Close(context.Background()) })
	st, hdr, raw := callRaw(t, h.app(t, s, h.ingest), http.MethodPost, "/api/analytics/usage", h.keyW, `{"metric":"storage_gb","value":1}`)
	want := `{"error":{"code":"storage_unavailable","message":"could not store the level; retry shortly"},"success":false}`
	if st != 503 || hdr.Get("Retry-After") != "5" || raw != want {
		t.Errorf("got %d, Retry-After %q:\n%s\nwant 503, Retry-After \"5\":\n%s", st, hdr.Get("Retry-After"), raw, want)
	}
}
