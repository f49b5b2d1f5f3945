package client_test

import (
	"bytes"
	"compress/gzip"
	"crypto/sha256"
	"encoding/json"
	"io"
	"log"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"strings"
	"sync"
	"testing"
	"time"
)

// fault is what the proxy does to one request instead of passing it through.
type fault int

const (
	pass        fault = iota
	refuse            // answer 503 + Retry-After without forwarding: the server never saw it
	loseAnswer        // forward, then answer 503 + Retry-After instead of the server's answer
	hangAfter         // forward, then hold the answer until the client gives up waiting
	holdUntilOK       // wait for the proxy's gate to open, then forward
	crashAfter        // forward, call onCrash (which kills the server), answer 502 as a proxy would
)

// injectedRetryAfter is the Retry-After of the proxy's own 503s.
const injectedRetryAfter = time.Second

// seen is one request as the proxy saw it, and what it answered.
type seen struct {
	method, path   string
	key            string // Idempotency-Key
	encoding       string // Content-Encoding
	bodySum        [32]byte
	events         int // events in a POST /events body
	fault          fault
	status         int
	retryAfter     string
	replayed       bool // Idempotent-Replayed: true
	received, sent time.Time
}

// proxy stands between a client and a real server: it records every request and, for the requests
// faultFor picks, plays a failure that a real server cannot be made to produce on demand.
type proxy struct {
	t        *testing.T
	srv      *httptest.Server
	rp       *httputil.ReverseProxy
	faultFor func(n int, r *http.Request) fault // n counts requests from 1
	gate     chan struct{}                      // holdUntilOK waits for it to close
	arrived  chan struct{}                      // one value per request held at the gate
	onCrash  func()                             // crashAfter calls it

	mu   sync.Mutex
	reqs []seen
}

func newProxy(t *testing.T, target string, faultFor func(n int, r *http.Request) fault) *proxy {
	t.Helper()
	u, err := url.Parse(target)
	if err != nil {
		t.Fatal(err)
	}
	p := &proxy{t: t, rp: httputil.NewSingleHostReverseProxy(u), faultFor: faultFor,
		gate: make(chan struct{}), arrived: make(chan struct{}, 100)}
	if p.faultFor == nil {
		p.faultFor = func(int, *http.Request) fault { return pass }
	}
	p.rp.ErrorLog = log.New(io.Discard, "", 0) // a killed server's refused connections are expected
	p.srv = httptest.NewServer(http.HandlerFunc(p.serve))
	t.Cleanup(p.srv.Close)
	return p
}

func (p *proxy) serve(w http.ResponseWriter, r *http.Request) {
	body, err := io.ReadAll(r.Body)
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	s := seen{method: r.Method, path: r.URL.Path, key: r.Header.Get("Idempotency-Key"),
		encoding: r.Header.Get("Content-Encoding"), bodySum: sha256.Sum256(body), received: time.Now()}
	if r.Method == http.MethodPost && r.URL.Path == "/api/analytics/events" {
		s.events = countEvents(p.t, body, s.encoding)
	}
	p.mu.Lock()
	n := len(p.reqs) + 1
	p.reqs = append(p.reqs, seen{}) // reserve the slot: requests are numbered in arrival order
	p.mu.Unlock()
	s.fault = p.faultFor(n, r)

	rec := httptest.NewRecorder()
	forward := func() {
		r.Body = io.NopCloser(bytes.NewReader(body))
		p.rp.ServeHTTP(rec, r)
	}
	switch s.fault {
	case pass:
		forward()
	case refuse:
		injected503(rec)
	case loseAnswer:
		forward()
		rec = httptest.NewRecorder()
		injected503(rec)
	case hangAfter:
		forward()
		<-r.Context().Done() // the client's timeout: its answer is lost
	case crashAfter:
		forward()
		p.onCrash()
		rec = httptest.NewRecorder()
		rec.WriteHeader(http.StatusBadGateway)
	case holdUntilOK:
		p.arrived <- struct{}{}
		<-p.gate
		forward()
	}
	s.status, s.retryAfter, s.sent = rec.Code, rec.Header().Get("Retry-After"), time.Now()
	s.replayed = rec.Header().Get("Idempotent-Replayed") == "true"
	p.mu.Lock()
	p.reqs[n-1] = s
	p.mu.Unlock()
	if r.Context().Err() != nil {
		return
	}
	for k, v := range rec.Header() {
		w.Header()[k] = v
	}
	w.WriteHeader(rec.Code)
	_, _ = w.Write(rec.Body.Bytes())
}

func injected503(w http.ResponseWriter) {
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Retry-After", "1")
	w.WriteHeader(http.StatusServiceUnavailable)
	_, _ = w.Write([]byte(`{"success":false,"error":{"code":"injected","message":"503 injected by the test proxy"}}`))
}

// requests returns what the proxy has seen so far (requests still in flight are left out).
func (p *proxy) requests() []seen {
	p.mu.Lock()
	defer p.mu.Unlock()
	out := make([]seen, 0, len(p.reqs))
	for _, s := range p.reqs {
		if s.method != "" {
			out = append(out, s)
		}
	}
	return out
}

// byKey groups the requests by Idempotency-Key, in arrival order.
func (p *proxy) byKey() map[string][]seen {
	m := map[string][]seen{}
	for _, s := range p.requests() {
		m[s.key] = append(m[s.key], s)
	}
	return m
}

// countEvents counts the events of a POST /events body (a JSON array, maybe gzipped).
func countEvents(t *testing.T, body []byte, encoding string) int {
	if strings.EqualFold(encoding, "gzip") {
		zr, err := gzip.NewReader(bytes.NewReader(body))
		if err != nil {
			t.Errorf("body sent with Content-Encoding gzip is not gzip: %v", err)
			return -1
		}
		if body, err = io.ReadAll(zr); err != nil {
			t.Errorf("gzip body: %v", err)
			return -1
		}
	}
	var evs []json.RawMessage
	if err := json.Unmarshal(body, &evs); err != nil {
		t.Errorf("POST /events body is not a JSON array: %v", err)
		return -1
	}
	return len(evs)
}
