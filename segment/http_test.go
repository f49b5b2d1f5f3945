package segment_test

import (
	"bytes"
	"compress/gzip"
	"encoding/json"
	"fmt"
	"net/http"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/analyticsd/analyticsd/ingest"
	"github.com/analyticsd/analyticsd/internal/testenv/fixture"
	"github.com/analyticsd/analyticsd/segment"
)

// Props are stored as sent — '<', '>', '&' and U+2028 as they are, keys in the client's order,
// duplicate keys kept — with "$segment" first. They were re-encoded with json.Marshal's HTML
// escaping (and sorted, duplicates collapsed): "<" was stored as \u003c, and 3,000 bytes of
// "<a>&" grew to 13,500 and were refused as props over 8 KiB.
func TestHTMLPropsStoredAsSentWithinTheLimit(t *testing.T) {
	s := newServer(t)
	html := strings.Repeat("<a>&", 750) + "\u2028"
	props := fmt.Sprintf(`{"html":%q,"z":1,"a":"x<y","z":2}`, html)
	body := `{"userId":"u","event":"Html <Seen> & Co","messageId":"html-1","properties":` + props + `}`
	if r := s.post(t, "/v1/track", basic(s.keyA), body); r.Status != http.StatusOK {
		t.Fatalf("3 KB of properties: %d %.300s", r.Status, r.Raw)
	}
	want := `{"$segment":{"type":"track","event":"Html <Seen> & Co","message_id":"html-1"},` + props[1:]
	if got := s.storedOnce(t, s.a.ID, []string{"html-1"})["html-1"].Props; got != want {
		t.Errorf("props stored as\n%.300s\nwant\n%.300s", got, want)
	}
}

// analytics.js (@segment/analytics-next) posts each call to <apiHost>/t, /i, /p, /s, /g or /a with
// Content-Type text/plain and the writeKey in the body; in batching mode, and the mobile libraries
// always, {"batch":[...],"writeKey":...} to <apiHost>/b. Those paths were 404.
func TestAnalyticsJSAndMobileShortPaths(t *testing.T) {
	s := newServer(t)
	plain := map[string]string{"Content-Type": "text/plain"}
	calls := map[string]string{
		"t": `"type":"track","event":"Clicked"`, "i": `"type":"identify","traits":{"plan":"pro"}`,
		"p": `"type":"page","name":"Home"`, "s": `"type":"screen","name":"Settings"`,
		"g": `"type":"group","groupId":"acme"`, "a": `"type":"alias","userId":"u1","previousId":"a1"`,
	}
	var ids []string
	for path, fields := range calls {
		id := "ajs-next-" + path
		body := fmt.Sprintf(`{%s,"anonymousId":"a1","messageId":%q,"writeKey":%q,"sentAt":%q}`, fields, id, s.keyA, time.Now().UTC().Format(time.RFC3339Nano))
		if r := s.post(t, "/v1/"+path, plain, body); r.Status != http.StatusOK || r.Raw != `{"success":true}` {
			t.Errorf("analytics.js call to /v1/%s: %d %.300s", path, r.Status, r.Raw)
		}
		ids = append(ids, id)
	}
	body := fmt.Sprintf(`{"batch":[{"type":"track","event":"Opened","anonymousId":"a1","messageId":"mob-1","writeKey":%[1]q},
		{"type":"screen","name":"Home","anonymousId":"a1","messageId":"mob-2","writeKey":%[1]q}],"writeKey":%[1]q,"sentAt":%[2]q}`,
		s.keyA, time.Now().UTC().Format(time.RFC3339Nano))
	if r := s.post(t, "/v1/b", plain, body); r.Status != http.StatusOK || r.Raw != `{"success":true}` {
		t.Errorf("batch to /v1/b: %d %.300s", r.Status, r.Raw)
	}
	rows := s.storedOnce(t, s.a.ID, append(ids, "mob-1", "mob-2"))
	for id, want := range map[string]string{"ajs-next-t": "segment.clicked", "ajs-next-i": "segment.identify", "ajs-next-p": "segment.page",
		"ajs-next-s": "segment.screen", "ajs-next-g": "segment.group", "ajs-next-a": "segment.alias", "mob-1": "segment.opened", "mob-2": "segment.screen"} {
		if rows[id].Event != want {
			t.Errorf("%s stored as %q, want %q", id, rows[id].Event, want)
		}
	}
}

// A batch within Segment's limits but over ingest's 10,000 events per request is stored in parts.
// It was refused whole: 413 "more than 10000 events in one request".
func TestBatchOverIngestsEventLimitIsStoredInParts(t *testing.T) {
	s := newServer(t)
	var b strings.Builder
	var ids []string
	b.WriteString(`{"batch":[`)
	for i := range 10_001 {
		if i > 0 {
			b.WriteByte(',')
		}
		fmt.Fprintf(&b, `{"type":"page","userId":"u","messageId":"%d"}`, i)
		ids = append(ids, fmt.Sprint(i))
	}
	b.WriteString(`]}`)
	if b.Len() > segment.MaxBatchBytes {
		t.Fatalf("the batch is %d bytes, over Segment's limit", b.Len())
	}
	for range 2 { // the second time is a retry: each message is recognised by its messageId
		if r := s.post(t, "/v1/batch", basic(s.keyA), b.String()); r.Status != http.StatusOK || r.Raw != `{"success":true}` {
			t.Fatalf("a %d-byte batch of 10,001 messages: %d %.300s", b.Len(), r.Status, r.Raw)
		}
	}
	s.storedOnce(t, s.a.ID, ids)
}

// Stored in parts, the batch's report still names each refused message by its own index, and counts
// a duplicate whose first copy went in an earlier part; sent again, every message is recognised.
func TestBatchStoredInPartsReportsEachMessage(t *testing.T) {
	limits := ingest.DefaultLimits()
	limits.MaxEvents = 4
	s := newServerWithLimits(t, limits)
	msgs := make([]string, 10)
	for i := range msgs {
		msgs[i] = fmt.Sprintf(`{"type":"track","event":"Part","userId":"u","messageId":"p-%d"}`, i)
	}
	msgs[2] = `{"type":"track","userId":"u","messageId":"p-2"}`                                                   // no event: refused here
	msgs[6] = `{"type":"track","event":"Part","userId":"u","messageId":"p-6","timestamp":"2001-01-01T00:00:00Z"}` // refused by ingest
	msgs[8] = `{"type":"track","event":"Part","userId":"u","messageId":"p-1"}`                                    // p-1 again, in another part
	body := `{"batch":[` + strings.Join(msgs, ",") + `]}`
	check := func(stored, duplicates int) {
		t.Helper()
		r := s.post(t, "/v1/batch", basic(s.keyA), body)
		var out struct {
			Error struct {
				Details segment.Result `json:"details"`
			} `json:"error"`
		}
		if err := json.Unmarshal([]byte(r.Raw), &out); err != nil || r.Status != http.StatusBadRequest {
			t.Fatalf("%d %.300s", r.Status, r.Raw)
		}
		d := out.Error.Details
		var idx []int
		for _, f := range d.Refused {
			idx = append(idx, f.Index)
		}
		if d.Stored != stored || d.Duplicates != duplicates || !slices.Equal(idx, []int{2, 6}) || d.Refused[1].MessageID != "p-6" {
			t.Errorf("details %+v; want %d stored, %d duplicates, messages 2 and 6 refused", d, stored, duplicates)
		}
	}
	check(7, 1)
	check(0, 8)
	s.storedOnce(t, s.a.ID, []string{"p-0", "p-1", "p-3", "p-4", "p-5", "p-7", "p-9"})
}

// A batch over ingest's limit with messages without a messageId is not split: a part stored before
// another failed would be stored again when the client resends the batch. It is refused whole,
// saying why; it was refused with ingest's "more than N events in one request", which named
// neither Segment's messages nor what to do about them.
func TestBatchOverIngestsEventLimitWithoutMessageIDsIsRefusedWhole(t *testing.T) {
	limits := ingest.DefaultLimits()
	limits.MaxEvents = 4
	s := newServerWithLimits(t, limits)
	msgs := []string{`{"type":"identify","userId":"u"}`}
	for i := range 5 {
		msgs = append(msgs, fmt.Sprintf(`{"type":"identify","userId":"u","messageId":"w-%d"}`, i))
	}
	r := s.post(t, "/v1/batch", basic(s.keyA), `{"batch":[`+strings.Join(msgs, ",")+`]}`)
	if r.Status != http.StatusRequestEntityTooLarge || !strings.Contains(r.Raw, "1 of its messages have no messageId") || !strings.Contains(r.Raw, "nothing was stored") {
		t.Errorf("%d %.400s; want 413 naming the messages without messageId", r.Status, r.Raw)
	}
	if st := s.w.Stats(); st.PendingSegments > 0 || st.BufferedRows > 0 || len(s.rows(t, s.a.ID)) > 0 {
		t.Errorf("something was stored: %+v", st)
	}
}

// An event that alone is over ingest's body limit (INGEST_MAX_BODY_BYTES set low) is refused as
// itself; the batch's other messages are stored.
func TestEventOverIngestsBodyLimitIsRefusedAlone(t *testing.T) {
	limits := ingest.DefaultLimits()
	limits.MaxBodyBytes = 2048
	s := newServerWithLimits(t, limits)
	big := strings.Repeat("x", 3000)
	body := `{"batch":[{"type":"track","event":"Small","userId":"u","messageId":"s-0"},
		{"type":"track","event":"Big","userId":"u","messageId":"s-1","properties":{"big":"` + big + `"}},
		{"type":"track","event":"Small","userId":"u","messageId":"s-2"}]}`
	r := s.post(t, "/v1/batch", basic(s.keyA), body)
	if r.Status != http.StatusBadRequest || !strings.Contains(r.Raw, `"index":1,"messageId":"s-1"`) || !strings.Contains(r.Raw, "1 of 3 messages") {
		t.Errorf("%d %.400s; want message 1 refused, the others stored", r.Status, r.Raw)
	}
	s.storedOnce(t, s.a.ID, []string{"s-0", "s-2"})
}

// A body whose writeKey cannot be read because the body itself is refused gets that refusal:
// over 500 KB once gunzipped 413, an encoding other than gzip 415, broken gzip 400. They were all
// 401 "missing write key", to clients that had sent one.
func TestBodyRefusedBeforeItsWriteKeyIsReadSaysWhy(t *testing.T) {
	s := newServer(t)
	var big bytes.Buffer
	zw := gzip.NewWriter(&big)
	fmt.Fprintf(zw, `{"writeKey":%q,"batch":[`, s.keyA)
	for i := range 20 {
		if i > 0 {
			fmt.Fprint(zw, ",")
		}
		fmt.Fprintf(zw, `{"type":"track","event":"x","userId":"u","properties":{"p":"%s"}}`, strings.Repeat("x", 30<<10))
	}
	fmt.Fprint(zw, `]}`)
	zw.Close()
	key := fmt.Sprintf(`{"writeKey":%q,"batch":[{"type":"track","event":"x","userId":"u"}]}`, s.keyA)
	for _, c := range []struct {
		name, encoding string
		body           []byte
		status         int
		msg            string
	}{
		{"gzip over 500 KB", "gzip", big.Bytes(), http.StatusRequestEntityTooLarge, "500 KB"},
		{"plain over 500 KB", "", []byte(key + strings.Repeat(" ", segment.MaxBatchBytes)), http.StatusRequestEntityTooLarge, "500 KB"},
		{"brotli", "br", []byte(key), http.StatusUnsupportedMediaType, "Content-Encoding"},
		{"broken gzip", "gzip", []byte(key), http.StatusBadRequest, "gzip"},
	} {
		r := s.srv.Do(t, fixture.Request{Method: http.MethodPost, Path: "/v1/batch", Body: c.body,
			Header: map[string]string{"Content-Type": "application/json", "Content-Encoding": c.encoding}})
		if r.Status != c.status || !strings.Contains(r.Raw, c.msg) {
			t.Errorf("%s with writeKey in the body: %d %.300s, want %d with %q", c.name, r.Status, r.Raw, c.status, c.msg)
		}
	}
}
