package ingest

import (
	"bytes"
	"context"
	"strings"
	"testing"
)

// Every refusal of the write endpoints, byte for byte: clients parse the codes, show the messages
// and wait the Retry-After seconds, so none of them may change by accident.
func TestErrorResponses(t *testing.T) {
	t.Parallel()
	h := newHarness(t, opts{ingest: func(c *Config) { c.Limits.MaxEvents = 2; c.Limits.MaxBodyBytes = 1000 }})
	full := h.newInstance(t, opts{writer: func(c *WriterConfig) { c.Durability = DurabilityMemory; c.MaxBufferedRows = 1 }})
	closed := h.newInstance(t, opts{})
	if err := closed.w.Close(context.Background()); err != nil {
		t.Fatal(err)
	}
	const events, usage = "/api/analytics/events", "/api/analytics/usage"
	two := []byte(`[{"event":"a.b"},{"event":"a.b"}]`)
	cases := []struct {
		name       string
		in         *instance
		path       string
		body       []byte
		headers    map[string]string
		status     int
		retryAfter string
		want       string
	}{
		{"unsupported type", h.instance, events, two, map[string]string{"Content-Type": "text/csv"}, 415, "",
			`{"error":{"code":"unsupported_media_type","message":"Content-Type \"text/csv\" is not supported; send application/json or application/x-ndjson"},"success":false}`},
		{"unparsable type", h.instance, events, two, map[string]string{"Content-Type": "a/"}, 415, "",
			`{"error":{"code":"unsupported_media_type","message":"Content-Type \"a/\" cannot be parsed; send application/json or application/x-ndjson"},"success":false}`},
		{"unsupported encoding", h.instance, events, two, map[string]string{"Content-Encoding": "br"}, 415, "",
			`{"error":{"code":"unsupported_media_type","message":"Content-Encoding \"br\" is not supported; send gzip or no encoding"},"success":false}`},
		{"too large", h.instance, events, bytes.Repeat([]byte(" "), 1001), nil, 413, "",
			`{"error":{"code":"payload_too_large","message":"request body is 1001 bytes; the limit is 1000"},"success":false}`},
		{"too large unzipped", h.instance, events, gz(bytes.Repeat([]byte(" "), 1001)), map[string]string{"Content-Encoding": "gzip"}, 413, "",
			`{"error":{"code":"payload_too_large","message":"decompressed body exceeds the limit of 1000 bytes; send smaller batches"},"success":false}`},
		{"too many events", h.instance, events, []byte(`[{"event":"a.b"},{"event":"a.b"},{"event":"a.b"}]`), nil, 413, "",
			`{"error":{"code":"payload_too_large","message":"more than 2 events in one request; split the batch"},"success":false}`},
		{"not gzip", h.instance, events, two, map[string]string{"Content-Encoding": "gzip"}, 400, "",
			`{"error":{"code":"invalid_body","message":"body is not valid gzip: gzip: invalid header"},"success":false}`},
		{"malformed", h.instance, events, []byte(`[{"event":`), nil, 400, "",
			`{"error":{"code":"invalid_body","message":"body is not a valid JSON array: unexpected end of JSON input"},"success":false}`},
		{"no events", h.instance, events, []byte(` `), nil, 400, "",
			`{"error":{"code":"invalid_body","message":"no events in body; send an event object, an array of them, {\"events\":[...]} or NDJSON"},"success":false}`},
		{"every event invalid", h.instance, events, []byte(`[{"event":"nodot"},{}]`), nil, 400, "",
			`{"error":{"code":"invalid_events","message":"no event was accepted: 2 rejected; see details.rejected for each one","details":{"accepted":0,"rejected":[{"index":0,"error":"event \"nodot\" must be lowercase domain.action form, e.g. \"auth.user.login\" (letters, digits, '_' or '-', separated by dots)"},{"index":1,"error":"event is required, e.g. \"auth.user.login\""}],"duplicates":[]}},"success":false}`},
		{"buffer full", full, events, two, nil, 503, "2",
			`{"error":{"code":"ingest_unavailable","message":"ingest is temporarily unable to accept events (in-memory buffer full while ClickHouse catches up); retry after 2s"},"success":false}`},
		{"shutting down", closed, events, two, nil, 503, "1",
			`{"error":{"code":"shutting_down","message":"server is shutting down; retry on another instance"},"success":false}`},
		{"usage not json", h.instance, usage, []byte(`{`), nil, 400, "",
			`{"error":{"code":"invalid_body","message":"body must be JSON like {\"metric\":\"api_requests_daily\",\"n\":1}"},"success":false}`},
		{"usage bad n", h.instance, usage, []byte(`{"metric":"builds_daily","n":0}`), nil, 400, "",
			`{"error":{"code":"invalid_n","message":"n must be a whole number from 1 to 1000000000 (default 1); usage cannot be taken back"},"success":false}`},
		{"usage unsupported encoding", h.instance, usage, []byte(`{"metric":"builds_daily"}`), map[string]string{"Content-Encoding": "br"}, 415, "",
			`{"error":{"code":"unsupported_media_type","message":"Content-Encoding \"br\" is not supported; send gzip or no encoding"},"success":false}`},
		{"usage not gzip", h.instance, usage, []byte(`{"metric":"builds_daily"}`), map[string]string{"Content-Encoding": "gzip"}, 400, "",
			`{"error":{"code":"invalid_body","message":"body is not valid gzip: gzip: invalid header"},"success":false}`},
		{"usage while shutting down", closed, usage, []byte(`{"metric":"builds_daily"}`), nil, 503, "1",
			`{"error":{"code":"shutting_down","message":"server is shutting down; retry on another instance"},"success":false}`},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			r := c.in.post(t, h.keyA, c.path, c.body, c.headers)
			if r.Status != c.status || r.Header.Get("Retry-After") != c.retryAfter || r.Raw != c.want {
				t.Errorf("got %d, Retry-After %q:\n%s\nwant %d, Retry-After %q:\n%s", r.Status, r.Header.Get("Retry-After"), r.Raw, c.status, c.retryAfter, c.want)
			}
		})
	}
}

// POST /usage takes a gzip body as POST /events does (it was read as JSON, compressed, and refused
// with "body must be JSON").
func TestUsageTakesGzip(t *testing.T) {
	t.Parallel()
	h := newHarness(t, opts{})
	r := h.instance.post(t, h.keyA, "/api/analytics/usage", gz([]byte(`{"metric":"builds_daily","n":3}`)), map[string]string{"Content-Encoding": "gzip"})
	if r.Status != 202 || !strings.Contains(r.Raw, `"accepted":1`) || !strings.Contains(r.Raw, `"n":3`) {
		t.Fatalf("gzipped usage: got %d %s, want 202 with accepted 1 and n 3", r.Status, r.Raw)
	}
}
