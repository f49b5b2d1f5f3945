package client_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/analyticsd/analyticsd/client"
)

// Before: the endpoint answers 301 (an http→https redirect, a moved host). Go's http.Client turns the
// POST into a GET of /api/analytics/events, the server lists events with 200, and the client counts
// the batch as acknowledged: nothing stored, nothing handed to OnFailure, Flush says nil.
func TestARedirectIsNotADelivery(t *testing.T) {
	ten := newTenant(t)
	sv := startServer(t)
	front := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		http.Redirect(w, r, sv.url+r.URL.RequestURI(), http.StatusMovedPermanently)
	}))
	defer front.Close()
	rec := &recorder{}
	// Same host name (127.0.0.1) as the server, as with http://host → https://host: Authorization is kept.
	c := newClient(t, front.URL, ten.key, rec, client.Config{})
	ids := trackIDs(t, c, "goclient.redirect", 3)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	err := c.Flush(ctx)
	st := c.Stats()
	t.Logf("Flush: %v; stats %+v; failures %d", err, st, len(rec.Failures()))
	sv.stop()
	got := storedCounts(t, ten, "goclient.redirect")
	stored := 0
	for _, id := range ids {
		stored += got[id]
	}
	if stored != 3 && (err == nil || st.FailedEvents != 3) {
		t.Fatalf("%d of 3 events stored, yet Flush returned %v, stats %+v (Sent %d, FailedEvents %d), OnFailure got %d failures: events lost silently",
			stored, err, st, st.Sent, st.FailedEvents, len(rec.Failures()))
	}
}

// Before: json.Marshal escapes <, > and & as \u003c etc. (6 bytes for 1), and the server measures props
// as sent against its 8 KiB limit, so props well under 8 KiB are rejected when sent by this client
// (the same event sent with plain encoding is stored).
func TestPropsAreNotHTMLEscaped(t *testing.T) {
	ten := newTenant(t)
	sv := startServer(t)
	rec := &recorder{}
	c := newClient(t, sv.url, ten.key, rec, client.Config{})
	props := map[string]any{"html": strings.Repeat("<b>&</b>", 250)} // 2,000 bytes of text
	plain, _ := json.Marshal(props)
	var unescaped bytes.Buffer
	enc := json.NewEncoder(&unescaped)
	enc.SetEscapeHTML(false)
	_ = enc.Encode(props)
	t.Logf("props: %d bytes as JSON text with HTML escaping, %d without", len(plain), unescaped.Len()-1)
	if err := c.Track(client.Event{Event: "goclient.escape", Props: props}); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if err := c.Flush(ctx); err != nil {
		for _, f := range rec.Failures() {
			t.Logf("failure: %d events: %v", len(f.Events), f.Err)
		}
		// The same event, its props not HTML-escaped (as curl, JS or Segment's SDKs send it), is stored.
		body := `[{"id":"` + client.NewID() + `","event":"goclient.escape","props":` + strings.TrimSpace(unescaped.String()) + `}]`
		req, _ := http.NewRequest(http.MethodPost, sv.url+"/api/analytics/events", strings.NewReader(body))
		req.Header.Set("Authorization", "Bearer "+ten.key)
		req.Header.Set("Content-Type", "application/json")
		if resp, err := http.DefaultClient.Do(req); err == nil {
			t.Logf("same props unescaped, posted directly: %s", resp.Status)
			resp.Body.Close()
		}
		t.Fatalf("Flush: %v — an event with 2,000 bytes of text in props (2,011 bytes of JSON unescaped) was refused", err)
	}
}

// Before: one event whose props hold a json.RawMessage with half a UTF-16 surrogate pair (valid JSON to
// encoding/json, refused by the server as a body-level 400) makes the server refuse the whole batch:
// the valid events tracked with it are not stored, although the package doc says a rejected event's
// batch is otherwise stored.
func TestOneUnreadableEventFailsOnlyItself(t *testing.T) {
	ten := newTenant(t)
	sv := startServer(t)
	rec := &recorder{}
	c := newClient(t, sv.url, ten.key, rec, client.Config{FlushInterval: time.Hour})
	good := trackIDs(t, c, "goclient.poison", 3)
	if err := c.Track(client.Event{Event: "goclient.poison", Props: map[string]any{"raw": json.RawMessage(`"\ud83d"`)}}); err != nil {
		t.Fatalf("Track: %v", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	err := c.Flush(ctx)
	for _, f := range rec.Failures() {
		t.Logf("failure: %d events: %v", len(f.Events), f.Err)
	}
	sv.stop()
	t.Logf("valid events stored: %d of %d", len(storedCounts(t, ten, "goclient.poison")), len(good))
	if st := c.Stats(); st.FailedEvents != 1 {
		t.Fatalf("Flush: %v; %d events given up on, want only the bad one (the 3 valid events of its batch should be stored)", err, st.FailedEvents)
	}
}

// Before: Failure.Events are documented as "the events as tracked", but Props is the caller's map: a
// change made after Track (which the doc says is not sent) shows up in OnFailure, so re-sending a
// failed event sends other props than were tracked — and OnFailure reading the map races the
// caller writing it.
func TestFailureEventsAreAsTracked(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(http.StatusUnauthorized)
		_, _ = w.Write([]byte(`{"success":false,"error":{"code":"unauthorized","message":"invalid API key"}}`))
	}))
	defer srv.Close()
	got := make(chan client.Failure, 1)
	release := make(chan struct{})
	c, err := client.New(client.Config{Endpoint: srv.URL, APIKey: "k", FlushInterval: time.Hour,
		OnFailure: func(f client.Failure) { <-release; got <- f }})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close(context.Background())
	props := map[string]any{"plan": "pro"}
	if err := c.Track(client.Event{Event: "a.b", Props: props}); err != nil {
		t.Fatal(err)
	}
	go c.Flush(context.Background())
	props["plan"] = "free" // allowed: "later changes to e.Props are not sent"
	close(release)
	f := <-got
	if p := f.Events[0].Props["plan"]; p != "pro" {
		t.Fatalf("OnFailure's event has props plan=%v, want %q as tracked", p, "pro")
	}
}

// Before: when no event of a batch is accepted, the server answers 400 invalid_events and the reason of
// each rejection is only in APIError.Details: the Failure's error names no reason, and is not the
// *RejectedError the package doc promises for an event the server rejects.
func TestAWholeBatchRejectionNamesEachReason(t *testing.T) {
	ten := newTenant(t)
	sv := startServer(t)
	rec := &recorder{}
	c := newClient(t, sv.url, ten.key, rec, client.Config{})
	if err := c.Track(client.Event{Event: "goclient.reason", Source: "mobile"}); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	_ = c.Flush(ctx)
	fs := rec.Failures()
	if len(fs) != 1 {
		t.Fatalf("failures: %+v", fs)
	}
	var rej *client.RejectedError
	if !errors.As(fs[0].Err, &rej) || !strings.Contains(fs[0].Err.Error(), "source") {
		t.Fatalf("OnFailure error %q (%T): want a *RejectedError naming the bad field (source)", fs[0].Err, fs[0].Err)
	}
}

// Config.Timeout bounds each attempt, as documented, whatever Timeout the caller's HTTPClient has.
// Before, the copy kept that Timeout: a 100 ms one, in front of a server answering in 300 ms, timed
// out every attempt and the events never arrived. (Fails on the code before this change.)
func TestHTTPClientTimeoutDoesNotOverrideConfigTimeout(t *testing.T) {
	ten := newTenant(t)
	sv := startServer(t)
	target, err := url.Parse(sv.url)
	if err != nil {
		t.Fatal(err)
	}
	proxy := httputil.NewSingleHostReverseProxy(target)
	slow := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		time.Sleep(300 * time.Millisecond)
		proxy.ServeHTTP(w, r)
	}))
	defer slow.Close()
	rec := &recorder{}
	c := newClient(t, slow.URL, ten.key, rec, client.Config{HTTPClient: &http.Client{Timeout: 100 * time.Millisecond}, Timeout: 5 * time.Second})
	ids := trackIDs(t, c, "goclient.slow", 3)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := c.Flush(ctx); err != nil {
		t.Fatalf("Flush: %v (stats %+v)", err, c.Stats())
	}
	sv.stop() // ships what it acknowledged
	got := storedCounts(t, ten, "goclient.slow")
	for _, id := range ids {
		if got[id] != 1 {
			t.Errorf("event %s stored %d times, want once", id, got[id])
		}
	}
}
