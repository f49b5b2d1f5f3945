package segment_test

import (
	"bytes"
	"compress/gzip"
	"context"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"log"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/uuid"
	analytics "gopkg.in/segmentio/analytics-go.v3"

	"github.com/analyticsd/analyticsd/api"
	"github.com/analyticsd/analyticsd/auth"
	"github.com/analyticsd/analyticsd/dedup"
	"github.com/analyticsd/analyticsd/ingest"
	"github.com/analyticsd/analyticsd/internal/testenv"
	"github.com/analyticsd/analyticsd/internal/testenv/fixture"
	"github.com/analyticsd/analyticsd/segment"
	"github.com/analyticsd/analyticsd/tenant"
)

// server is analyticsd's ingest path — spool, Redis claims, ClickHouse — behind the real auth
// middleware, with the Segment endpoints mounted as serve mounts them, and two tenants with write keys.
type server struct {
	env        testenv.Env
	srv        *fixture.Server
	w          *ingest.Writer
	a, b       tenant.Tenant
	keyA, keyB string
}

func newServer(t *testing.T) *server {
	t.Helper()
	return newServerWithLimits(t, ingest.DefaultLimits())
}

// newServerWithLimits is newServer with ingest's limits as given (INGEST_MAX_EVENTS, ...).
func newServerWithLimits(t *testing.T, limits ingest.Limits) *server {
	t.Helper()
	s := &server{env: testenv.Migrated(t)}
	s.a, s.b = fixture.Tenant(t, s.env.PG, "acme"), fixture.Tenant(t, s.env.PG, "globex")
	s.keyA, _ = fixture.Key(t, s.env.PG, s.a.ID, "segment", auth.ScopeEventsWrite)
	s.keyB, _ = fixture.Key(t, s.env.PG, s.b.ID, "segment", auth.ScopeEventsWrite)
	claims := dedup.NewStore(s.env.Redis, s.env.Prefix, 24*time.Hour, nil)
	var err error
	s.w, err = ingest.NewWriter(ingest.WriterConfig{Dir: t.TempDir(), FlushInterval: 50 * time.Millisecond, RetryMax: 200 * time.Millisecond},
		s.env.CH, s.env.DB, claims, ingest.NewMetrics(nil, 0), nil)
	if err != nil {
		t.Fatal(err)
	}
	s.w.Start()
	in := ingest.NewService(ingest.Config{Enabled: true, Limits: limits}, s.w, nil, ingest.NewMetrics(nil, 0), nil)
	t.Cleanup(func() {
		in.Close()
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		s.w.Close(ctx)
	})
	app := api.NewApp(api.Config{}, nil)
	authn := auth.NewAuthenticator(auth.NewKeys(s.env.PG), tenant.NewStore(s.env.PG), auth.JWTConfig{})
	segment.New(in).Register(app, authn.Require(auth.ScopeEventsWrite))
	s.srv = fixture.Serve(t, app)
	return s
}

// row is one stored event.
type row struct {
	ID, Event, UserID, Props, IP string
	Ts                           time.Time
}

// rows returns the tenant's stored events, by id (several when an id was stored more than once).
func (s *server) rows(t *testing.T, tenantID uuid.UUID) map[string][]row {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	rs, err := s.env.CH.Query(ctx, "SELECT toString(id), event, user_id, props, ip, ts FROM "+s.env.DB+".events WHERE tenant_id = ?", tenantID)
	if err != nil {
		t.Fatal(err)
	}
	defer rs.Close()
	out := map[string][]row{}
	for rs.Next() {
		var r row
		if err := rs.Scan(&r.ID, &r.Event, &r.UserID, &r.Props, &r.IP, &r.Ts); err != nil {
			t.Fatal(err)
		}
		out[r.ID] = append(out[r.ID], r)
	}
	return out
}

// storedOnce waits until every message id is stored and the writer has shipped all it holds, then
// checks that each is stored exactly once and nothing else is; it returns the rows by message id.
func (s *server) storedOnce(t *testing.T, tenantID uuid.UUID, messageIDs []string) map[string]row {
	t.Helper()
	want := map[string]string{} // event id → messageId
	for _, m := range messageIDs {
		id, ok := segment.EventID(m)
		if !ok {
			t.Fatalf("message without a messageId")
		}
		want[id.String()] = m
	}
	testenv.Eventually(t, 20*time.Second, func() error {
		got := s.rows(t, tenantID)
		n := 0
		for id := range want {
			if len(got[id]) > 0 {
				n++
			}
		}
		if n < len(want) {
			return fmt.Errorf("stored %d of %d messages", n, len(want))
		}
		if st := s.w.Stats(); st.PendingSegments > 0 || st.BufferedRows > 0 {
			return fmt.Errorf("writer still holds %d segments", st.PendingSegments)
		}
		return nil
	})
	out := map[string]row{}
	for id, rs := range s.rows(t, tenantID) {
		m, ok := want[id]
		switch {
		case !ok:
			t.Errorf("event %s (%s) stored, which no message sent", id, rs[0].Event)
		case len(rs) != 1:
			t.Errorf("message %s stored %d times", m, len(rs))
		default:
			out[m] = rs[0]
		}
	}
	return out
}

// collector records what the Go SDK reports delivered or failed.
type collector struct {
	mu     sync.Mutex
	ok     []string
	failed []error
}

func (c *collector) Success(m analytics.Message) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.ok = append(c.ok, messageIDOf(m))
}

func (c *collector) Failure(m analytics.Message, err error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.failed = append(c.failed, fmt.Errorf("%s: %w", messageIDOf(m), err))
}

func messageIDOf(m analytics.Message) string {
	switch m := m.(type) {
	case analytics.Track:
		return m.MessageId
	case analytics.Identify:
		return m.MessageId
	case analytics.Page:
		return m.MessageId
	case analytics.Screen:
		return m.MessageId
	case analytics.Group:
		return m.MessageId
	case analytics.Alias:
		return m.MessageId
	}
	return ""
}

// goClient is the Go SDK pointed at endpoint with key.
func goClient(t *testing.T, endpoint, key string, col *collector) analytics.Client {
	t.Helper()
	c, err := analytics.NewWithConfig(key, analytics.Config{
		Endpoint:   endpoint,
		Interval:   50 * time.Millisecond,
		BatchSize:  25,
		Callback:   col,
		RetryAfter: func(int) time.Duration { return 20 * time.Millisecond },
		Logger:     analytics.StdLogger(log.New(testWriter{t}, "analytics-go: ", 0)),
	})
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// sendAll enqueues one message of each type and n tracks with free-text names, calls settle (when
// not nil), then closes the client (which flushes) and returns the delivered messageIds.
func sendAll(t *testing.T, c analytics.Client, col *collector, n int, settle func()) []string {
	t.Helper()
	enqueue := func(m analytics.Message) {
		if err := c.Enqueue(m); err != nil {
			t.Fatal(err)
		}
	}
	for i := 0; i < n; i++ {
		enqueue(analytics.Track{UserId: fmt.Sprintf("go-user-%d", i%5), Event: "Order Completed",
			Properties: analytics.NewProperties().Set("i", i).SetRevenue(float64(i))})
	}
	enqueue(analytics.Identify{UserId: "go-user-1", Traits: analytics.NewTraits().Set("plan", "pro")})
	enqueue(analytics.Page{AnonymousId: "go-anon-1", Name: "Pricing", Properties: analytics.NewProperties().SetPath("/pricing")})
	enqueue(analytics.Screen{UserId: "go-user-2", Name: "Settings"})
	enqueue(analytics.Group{UserId: "go-user-3", GroupId: "acme", Traits: analytics.NewTraits().Set("seats", 5)})
	enqueue(analytics.Alias{UserId: "go-user-4", PreviousId: "go-anon-4"})
	if settle != nil {
		settle()
	}
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	col.mu.Lock()
	defer col.mu.Unlock()
	if len(col.failed) > 0 {
		t.Fatalf("the SDK failed to deliver %d messages, first: %v", len(col.failed), col.failed[0])
	}
	if len(col.ok) != n+5 {
		t.Fatalf("the SDK delivered %d messages, want %d", len(col.ok), n+5)
	}
	return slicesClone(col.ok)
}

func slicesClone(s []string) []string { return append([]string(nil), s...) }

// The Go library, as an app uses it, against the real server: every message it reports delivered is
// stored exactly once, under the documented names, users and props.
func TestGoSDKEveryMessageStoredOnce(t *testing.T) {
	s := newServer(t)
	col := &collector{}
	ids := sendAll(t, goClient(t, s.srv.URL, s.keyA, col), col, 60, nil)
	rows := s.storedOnce(t, s.a.ID, ids)
	names := map[string]int{}
	for _, r := range rows {
		names[r.Event]++
	}
	want := map[string]int{"segment.order_completed": 60, "segment.identify": 1, "segment.page": 1, "segment.screen": 1, "segment.group": 1, "segment.alias": 1}
	for name, n := range want {
		if names[name] != n {
			t.Errorf("%d events %s, want %d (all: %v)", names[name], name, n, names)
		}
	}
	for _, r := range rows {
		var props map[string]any
		if err := json.Unmarshal([]byte(r.Props), &props); err != nil {
			t.Fatalf("props %s: %v", r.Props, err)
		}
		meta, _ := props["$segment"].(map[string]any)
		switch r.Event {
		case "segment.order_completed":
			if meta["event"] != "Order Completed" || props["revenue"] == nil || !strings.HasPrefix(r.UserID, "go-user-") {
				t.Errorf("track stored as %+v", r)
			}
		case "segment.page":
			if r.UserID != "go-anon-1" || meta["name"] != "Pricing" || props["path"] != "/pricing" {
				t.Errorf("page stored as %+v", r)
			}
		case "segment.group":
			if meta["group_id"] != "acme" || props["seats"] != 5.0 {
				t.Errorf("group stored as %+v", r)
			}
		case "segment.alias":
			if r.UserID != "go-user-4" || meta["previous_id"] != "go-anon-4" {
				t.Errorf("alias stored as %+v", r)
			}
		}
		// The SDK stamps each message and the batch with the same clock: corrected, ts is about now.
		if d := time.Since(r.Ts); d < -2*time.Second || d > time.Minute {
			t.Errorf("%s stored at %v, %v from now", r.Event, r.Ts, d)
		}
	}
}

// The SDK retries a batch whose answer it did not get (here: the server stored it, then the
// connection's answer was replaced by a 502): the retry's messages have the same messageIds, and
// each is stored once.
func TestGoSDKRetryStoresOnce(t *testing.T) {
	s := newServer(t)
	target, _ := url.Parse(s.srv.URL)
	proxy := httputil.NewSingleHostReverseProxy(target)
	var calls atomic.Int32
	front := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if calls.Add(1) > 1 {
			proxy.ServeHTTP(w, r)
			return
		}
		rec := httptest.NewRecorder()
		proxy.ServeHTTP(rec, r)
		if rec.Code != http.StatusOK {
			t.Errorf("first attempt: %d %s", rec.Code, rec.Body)
		}
		http.Error(w, "lost on the way back", http.StatusBadGateway)
	}))
	defer front.Close()
	col := &collector{}
	// One batch of all 25 messages, sent when the 25th is enqueued; Close would cut the retry short
	// (the SDK drops a batch waiting to retry when closed), so the test waits for its delivery first.
	c, err := analytics.NewWithConfig(s.keyA, analytics.Config{Endpoint: front.URL, Interval: time.Hour, BatchSize: 25, Callback: col,
		RetryAfter: func(int) time.Duration { return 20 * time.Millisecond }, Logger: analytics.StdLogger(log.New(testWriter{t}, "analytics-go: ", 0))})
	if err != nil {
		t.Fatal(err)
	}
	ids := sendAll(t, c, col, 20, func() {
		testenv.Eventually(t, 10*time.Second, func() error {
			col.mu.Lock()
			defer col.mu.Unlock()
			if len(col.ok)+len(col.failed) < 25 {
				return fmt.Errorf("the SDK reported %d of 25 messages", len(col.ok)+len(col.failed))
			}
			return nil
		})
	})
	if calls.Load() < 2 {
		t.Fatalf("%d requests reached the server; the SDK did not retry", calls.Load())
	}
	s.storedOnce(t, s.a.ID, ids)
}

// Two tenants sending equal messageIds (a UUID and free text) both keep their events: ids are
// deduplicated per tenant, and the mapping does not depend on the tenant.
func TestEqualMessageIDsOfTwoTenantsBothStored(t *testing.T) {
	s := newServer(t)
	ids := []string{uuid.NewString(), "order-42-retry-safe"}
	body := fmt.Sprintf(`{"batch":[{"type":"track","event":"Order Completed","userId":"u","messageId":%q},
		{"type":"identify","userId":"u","messageId":%q}]}`, ids[0], ids[1])
	for _, key := range []string{s.keyA, s.keyB} {
		for range 2 { // the second time is a retry: stored once
			if r := s.post(t, "/v1/batch", basic(key), body); r.Status != http.StatusOK || r.Raw != `{"success":true}` {
				t.Fatalf("batch: %d %s", r.Status, r.Raw)
			}
		}
	}
	a, b := s.storedOnce(t, s.a.ID, ids), s.storedOnce(t, s.b.ID, ids)
	if len(a) != 2 || len(b) != 2 || a[ids[0]].ID != b[ids[0]].ID {
		t.Errorf("tenant A %v, tenant B %v; want both messages in each, under the same ids", a, b)
	}
}

func basic(key string) map[string]string {
	return map[string]string{"Authorization": "Basic " + base64.StdEncoding.EncodeToString([]byte(key+":"))}
}

func (s *server) post(t *testing.T, path string, hdr map[string]string, body string) fixture.Response {
	t.Helper()
	h := map[string]string{"Content-Type": "application/json"}
	for k, v := range hdr {
		h[k] = v
	}
	return s.srv.Do(t, fixture.Request{Method: http.MethodPost, Path: path, Body: []byte(body), Header: h})
}

// Credentials as Segment documents them, and wrong ones.
func TestCredentials(t *testing.T) {
	s := newServer(t)
	track := func(id string) string {
		return fmt.Sprintf(`{"event":"Signed Up","userId":"u1","messageId":%q}`, id)
	}
	check := func(name string, hdr map[string]string, body string, want int, wantMsg string) {
		t.Helper()
		r := s.post(t, "/v1/track", hdr, body)
		if r.Status != want || !strings.Contains(r.Raw, wantMsg) {
			t.Errorf("%s: %d %s, want %d with %q", name, r.Status, r.Raw, want, wantMsg)
		}
	}
	check("basic", basic(s.keyA), track("c1"), 200, `{"success":true}`)
	check("basic without the colon", map[string]string{"Authorization": "Basic " + base64.StdEncoding.EncodeToString([]byte(s.keyA))}, track("c2"), 200, `"success":true`)
	check("writeKey in the body", nil, fmt.Sprintf(`{"event":"Signed Up","userId":"u1","messageId":"c3","writeKey":%q}`, s.keyA), 200, `"success":true`)
	check("bearer", map[string]string{"Authorization": "Bearer " + s.keyA}, track("c4"), 200, `"success":true`)
	check("wrong key", basic("ak_000000000000_"+strings.Repeat("x", 43)), track("c5"), 401, "invalid API key")
	check("not a key", basic("segment-write-key"), track("c6"), 401, "unauthorized")
	check("wrong body key", nil, `{"event":"x","userId":"u","writeKey":"nope"}`, 401, "unauthorized")
	check("none", nil, track("c7"), 401, "missing write key")
	// The credential is checked before the body is read: a wrong key is a 401 whatever it sends.
	check("wrong key, bad body", basic("ak_000000000000_"+strings.Repeat("x", 43)), `{"event":`, 401, "invalid API key")
	check("no key, bad body", nil, `{"event":`, 401, "missing write key")
	check("empty user", map[string]string{"Authorization": "Basic " + base64.StdEncoding.EncodeToString([]byte(":"+s.keyA))}, track("c8"), 401, "user is empty")
	check("bad base64", map[string]string{"Authorization": "Basic %%%"}, track("c9"), 401, "base64")
	s.storedOnce(t, s.a.ID, []string{"c1", "c2", "c3", "c4"})
}

// A gzipped batch (Segment's API takes Content-Encoding: gzip), here with the write key in its body.
func TestGzipBatch(t *testing.T) {
	s := newServer(t)
	var buf bytes.Buffer
	zw := gzip.NewWriter(&buf)
	fmt.Fprintf(zw, `{"writeKey":%q,"batch":[{"type":"track","event":"Zipped","userId":"u","messageId":"z1"},{"type":"screen","userId":"u","messageId":"z2"}]}`, s.keyA)
	zw.Close()
	r := s.srv.Do(t, fixture.Request{Method: http.MethodPost, Path: "/v1/batch", Body: buf.Bytes(),
		Header: map[string]string{"Content-Type": "application/json", "Content-Encoding": "gzip"}})
	if r.Status != http.StatusOK {
		t.Fatalf("gzipped batch: %d %s", r.Status, r.Raw)
	}
	rows := s.storedOnce(t, s.a.ID, []string{"z1", "z2"})
	if rows["z1"].Event != "segment.zipped" || rows["z2"].Event != "segment.screen" {
		t.Errorf("stored %v", rows)
	}
}

// What Segment's API refuses gets a 4xx that says why; nothing is dropped silently: a message
// refused in a batch is named, and the others are stored.
func TestBadInput(t *testing.T) {
	s := newServer(t)
	auth := basic(s.keyA)
	check := func(name, path string, hdr map[string]string, body string, want int, wantMsg string) fixture.Response {
		t.Helper()
		h := map[string]string{}
		for k, v := range auth {
			h[k] = v
		}
		for k, v := range hdr {
			h[k] = v
		}
		r := s.post(t, path, h, body)
		if r.Status != want || !strings.Contains(r.Raw, wantMsg) {
			t.Errorf("%s: %d %.400s, want %d with %q", name, r.Status, r.Raw, want, wantMsg)
		}
		return r
	}
	check("not JSON", "/v1/batch", nil, `{"batch":[`, 400, "invalid_body")
	check("empty batch", "/v1/batch", nil, `{"batch":[]}`, 400, "batch is empty")
	check("not JSON content", "/v1/track", map[string]string{"Content-Type": "application/xml"}, `{}`, 415, "application/json")
	check("gzip that is not", "/v1/track", map[string]string{"Content-Encoding": "gzip"}, `{}`, 400, "gzip")
	// Decoded with each bad byte as U+FFFD before: the user id was stored altered.
	check("not UTF-8", "/v1/track", nil, "{\"event\":\"x\",\"userId\":\"\xff\xfe\"}", 400, "not valid UTF-8")
	big := strings.Repeat("x", segment.MaxMessageBytes)
	check("message over 32 KB", "/v1/track", nil, `{"event":"x","userId":"u","properties":{"s":"`+big+`"}}`, 413, "32 KB")
	check("batch message over 32 KB", "/v1/batch", nil, `{"batch":[{"type":"track","event":"x","userId":"u","properties":{"s":"`+big+`"}}]}`, 413, "message 0 is")
	var msgs []string
	for i := 0; i < 20; i++ {
		msgs = append(msgs, `{"type":"track","event":"x","userId":"u","properties":{"s":"`+big[:30<<10]+`"}}`)
	}
	check("batch over 500 KB", "/v1/batch", nil, `{"batch":[`+strings.Join(msgs, ",")+`]}`, 413, "500 KB")
	check("wrong type for the endpoint", "/v1/track", nil, `{"type":"identify","userId":"u"}`, 400, "sent to /v1/track")

	r := check("some refused", "/v1/batch", nil, `{"batch":[
		{"type":"track","event":"Kept","userId":"u","messageId":"kept-1"},
		{"type":"track","userId":"u","messageId":"no-event"},
		{"type":"track","event":"Old","userId":"u","messageId":"too-old","timestamp":"2001-01-01T00:00:00Z"},
		{"type":"purchase","userId":"u"},
		{"type":"page","anonymousId":"a","messageId":"kept-2"}]}`, 400, "3 of 5 messages were refused")
	var body struct {
		Error struct {
			Details segment.Result `json:"details"`
		} `json:"error"`
	}
	if err := json.Unmarshal([]byte(r.Raw), &body); err != nil {
		t.Fatal(err)
	}
	d := body.Error.Details
	var idx []int
	for _, f := range d.Refused {
		idx = append(idx, f.Index)
	}
	sort.Ints(idx)
	if d.Stored != 2 || fmt.Sprint(idx) != "[1 2 3]" || d.Refused[0].MessageID != "no-event" || !strings.Contains(d.Refused[1].Error, "retention") {
		t.Errorf("details %+v; want 2 stored and messages 1, 2 and 3 refused, each with its reason", d)
	}
	// A refusal names the field the client sent, not the event field it became.
	if !strings.HasPrefix(d.Refused[1].Error, "timestamp") {
		t.Errorf("refusal of an old timestamp says %q, want it to name timestamp", d.Refused[1].Error)
	}
	s.storedOnce(t, s.a.ID, []string{"kept-1", "kept-2"})
}

// Keys encoding/json would have read loosely are refused, and so is a second message under a
// messageId with a different body. Before (each fails on that code): {"batch":[A],"batch":[B]}
// stored B and dropped A with 200; "UserID" overrode "userId" and the event was stored under the
// wrong user; two different messages under one messageId stored the first and answered 200 for the
// second; and 500 KB of "{}" made an 18 MB answer listing 170,000 refusals.
func TestLooseJSONAndConflictingMessageIDsAreRefused(t *testing.T) {
	s := newServer(t)
	auth := basic(s.keyA)
	for _, tc := range []struct{ name, path, body, want string }{
		{"batch key twice", "/v1/batch", `{"batch":[{"type":"track","event":"A","userId":"u"}],"batch":[{"type":"track","event":"B","userId":"u"}]}`,
			`key \"batch\" appears twice`},
		{"field in another case", "/v1/track", `{"event":"A","userId":"right","UserID":"wrong"}`, `Segment's field is \"userId\"`},
		{"message key twice", "/v1/track", `{"event":"A","userId":"u","event":"B"}`, `key \"event\" appears twice`},
		{"batch key in another case", "/v1/batch", `{"Batch":[{"type":"track","event":"A","userId":"u"}]}`, `Segment's field is \"batch\"`},
	} {
		if r := s.post(t, tc.path, auth, tc.body); r.Status != 400 || !strings.Contains(r.Raw, tc.want) {
			t.Errorf("%s: %d %s, want 400 with %s", tc.name, r.Status, r.Raw, tc.want)
		}
	}
	id := uuid.NewString()
	r := s.post(t, "/v1/batch", auth, `{"batch":[
		{"type":"track","event":"First","userId":"u","messageId":"`+id+`"},
		{"type":"track","event":"First","userId":"u","messageId":"`+id+`"},
		{"type":"track","event":"Second","userId":"u","messageId":"`+id+`"}]}`)
	if r.Status != 400 || !strings.Contains(r.Raw, "message 0's too") || !strings.Contains(r.Raw, `"index":2`) {
		t.Errorf("a messageId on two different messages: %d %s, want message 2 refused", r.Status, r.Raw)
	}
	if got := s.storedOnce(t, s.a.ID, []string{id}); got[id].Event != "segment.first" {
		t.Errorf("stored %+v, want the first message's event", got[id])
	}
	many := `{"batch":[` + strings.TrimSuffix(strings.Repeat(`{},`, 5000), ",") + `]}`
	r = s.post(t, "/v1/batch", auth, many)
	var body struct {
		Error struct {
			Details segment.Result `json:"details"`
		} `json:"error"`
	}
	if err := json.Unmarshal([]byte(r.Raw), &body); err != nil || r.Status != 400 {
		t.Fatalf("5,000 empty messages: %d %v %.300s", r.Status, err, r.Raw)
	}
	if d := body.Error.Details; len(d.Refused) != 100 || d.RefusedCount != 5000 || len(r.Raw) > 64<<10 {
		t.Errorf("5,000 refusals: %d listed, count %d, %d bytes; want the first 100 listed, the count 5000, a short answer",
			len(d.Refused), d.RefusedCount, len(r.Raw))
	}
}

// @segment/analytics-node, driven by a Node script as an app would use it: every message it reports
// delivered is stored exactly once. npm ci installs the locked version when node_modules is missing.
func TestNodeSDKEveryMessageStoredOnce(t *testing.T) {
	node, err := exec.LookPath("node")
	if err != nil {
		if testenv.Required() {
			t.Fatal("node is not installed: the Node SDK test needs node and npm (deploy/local installs them)")
		}
		t.Skip("node is not installed")
	}
	dir, _ := filepath.Abs(filepath.Join("testdata", "node"))
	if _, err := os.Stat(filepath.Join(dir, "node_modules", "@segment", "analytics-node")); err != nil {
		cmd := exec.Command("npm", "ci", "--no-audit", "--no-fund")
		cmd.Dir = dir
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("npm ci in %s: %v\n%s", dir, err, out)
		}
	}
	s := newServer(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, node, "send.js")
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), "ANALYTICSD_URL="+s.srv.URL, "WRITE_KEY="+s.keyA, "COUNT=75")
	cmd.Stderr = testWriter{t}
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("node send.js: %v\n%s", err, out)
	}
	var res struct {
		Delivered []struct{ MessageID, Type, Event string }
		Errors    []string
	}
	if err := json.Unmarshal(out, &res); err != nil {
		t.Fatalf("node send.js printed %q: %v", out, err)
	}
	if len(res.Errors) > 0 || len(res.Delivered) != 80 {
		t.Fatalf("the Node SDK delivered %d of 80 messages; errors: %v", len(res.Delivered), res.Errors)
	}
	var ids []string
	for _, d := range res.Delivered {
		ids = append(ids, d.MessageID)
	}
	rows := s.storedOnce(t, s.a.ID, ids)
	for _, d := range res.Delivered {
		want := "segment." + d.Type
		if d.Type == "track" {
			want = segment.EventName(d.Event)
		}
		if got := rows[d.MessageID].Event; got != want {
			t.Errorf("%s %q stored as %q, want %q", d.Type, d.Event, got, want)
		}
	}
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimSpace(string(p)))
	return len(p), nil
}

var _ io.Writer = testWriter{}

// The Segment endpoints are not behind the Idempotency-Key middleware (messageId is Segment's
// retry key), yet an Idempotency-Key header reached ingest, which derived the ids of messages without
// a messageId from it: a second, different batch under the same header was answered
// {"success":true} and dropped as a duplicate of the first. The header is now ignored there.
func TestIdempotencyKeyHeaderIgnoredOnSegmentEndpoints(t *testing.T) {
	s := newServer(t)
	hdr := basic(s.keyA)
	hdr["Idempotency-Key"] = "K-seg-1"
	for _, user := range []string{"u1", "u2"} {
		body := fmt.Sprintf(`{"batch":[{"type":"track","userId":%q,"event":"One"},{"type":"track","userId":%q,"event":"Two"}]}`, user, user)
		if r := s.post(t, "/v1/batch", hdr, body); r.Status != http.StatusOK || r.Raw != `{"success":true}` {
			t.Fatalf("batch of %s: %d %s", user, r.Status, r.Raw)
		}
	}
	testenv.Eventually(t, 20*time.Second, func() error {
		users := map[string]int{}
		for _, rs := range s.rows(t, s.a.ID) {
			for _, r := range rs {
				users[r.UserID]++
			}
		}
		if users["u1"] != 2 || users["u2"] != 2 {
			return fmt.Errorf("stored events by user %v, want 2 of u1 and 2 of u2", users)
		}
		return nil
	})
}
