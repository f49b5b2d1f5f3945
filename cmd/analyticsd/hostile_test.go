package main

import (
	"bufio"
	"bytes"
	"compress/gzip"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/analyticsd/analyticsd/auth"
	"github.com/analyticsd/analyticsd/internal/testenv"
	"github.com/analyticsd/analyticsd/internal/testenv/fixture"
)

// Hostile input against the real server: every answer is a 2xx or a clear 4xx, never a 5xx, a hang
// or a crash, and the server still serves afterwards.
func TestHostileInput(t *testing.T) {
	e := testenv.Migrated(t)
	tn := fixture.Tenant(t, e.PG, "acme")
	key, _ := fixture.Key(t, e.PG, tn.ID, "all", auth.AllScopes...)
	addr := freeAddr(t)
	base := serveInProcess(t, stackEnv(t, e, map[string]string{"ANALYTICS_ADDR": addr, "ANALYTICS_SPOOL_DIR": t.TempDir(),
		"ANALYTICS_READ_TIMEOUT": "1s", "INGEST_FLUSH_INTERVAL": "50ms"}))

	post := func(body []byte, hdr map[string]string) (int, string) {
		req, _ := http.NewRequest(http.MethodPost, base+"/api/analytics/events", bytes.NewReader(body))
		req.Header.Set("Authorization", "Bearer "+key)
		req.Header.Set("Content-Type", "application/json")
		for k, v := range hdr {
			req.Header.Set(k, v)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			// The server may answer 413 and close before a huge body is fully written: the client
			// then sees a broken pipe instead of the status.
			return -1, err.Error()
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	var bomb bytes.Buffer
	zw := gzip.NewWriter(&bomb)
	zw.Write(bytes.Repeat([]byte("["), 64<<20))
	zw.Close()
	cases := []struct {
		name    string
		body    []byte
		hdr     map[string]string
		status  int
		contain string
	}{
		{"deep nesting in props", []byte(`{"event":"a.b","props":{"x":` + strings.Repeat("[", 20000) + strings.Repeat("]", 20000) + `}}`), nil, 400, "depth"},
		{"deep nesting as the body", []byte(strings.Repeat("[", 1<<20)), nil, 400, "JSON"},
		{"huge number as ts", []byte(`{"event":"a.b","ts":1e400}`), nil, 400, "epoch milliseconds"},
		{"huge numbers in props", []byte(`{"event":"a.b","props":{"n":1e400,"m":-99999999999999999999999999999}}`), nil, 202, ""},
		{"invalid UTF-8 in the name", []byte("{\"event\":\"a.\xff\xfe\"}"), nil, 400, "not valid UTF-8"},
		// Stored as "u\ufffd" before: altered without a word.
		{"invalid UTF-8 in user_id", []byte("{\"event\":\"a.b\",\"user_id\":\"u\xff\"}"), nil, 400, "not valid UTF-8 (byte 27"},
		{"NUL bytes", []byte(`{"event":"a.b","user_id":"u\u0000x","request_id":"\u0000"}`), nil, 202, ""},
		{"duplicate keys", []byte(`{"event":"a.b","event":"c.d","source":"app","source":"nope"}`), nil, 400, "source"},
		{"enormous string", []byte(`{"event":"a.b","user_id":"` + strings.Repeat("u", 9<<20) + `"}`), nil, 400, "user_id is"},
		{"enormous event name", []byte(`{"event":"a.` + strings.Repeat("b", 1<<20) + `"}`), nil, 400, "limit is 128"},
		{"gzip bomb", bomb.Bytes(), map[string]string{"Content-Encoding": "gzip"}, 413, "limit"},
		{"body over the limit", bytes.Repeat([]byte(" "), 11<<20), nil, 413, ""},
	}
	for _, tc := range cases {
		status, body := post(tc.body, tc.hdr)
		if status == -1 && tc.status == 413 && (strings.Contains(body, "broken pipe") || strings.Contains(body, "reset")) {
			continue
		}
		if status != tc.status || (tc.contain != "" && !strings.Contains(body, tc.contain)) {
			t.Errorf("%s: got %d %.300s, want %d mentioning %q", tc.name, status, body, tc.status, tc.contain)
		}
	}

	// NUL bytes round-trip through storage and the JSON API.
	testenv.Eventually(t, 10*time.Second, func() error {
		req, _ := http.NewRequest(http.MethodGet, base+"/api/analytics/events?user_id="+"u%00x", nil)
		req.Header.Set("Authorization", "Bearer "+key)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		var page struct {
			Data struct {
				Events []struct {
					UserID string `json:"user_id"`
				} `json:"events"`
			} `json:"data"`
		}
		json.NewDecoder(resp.Body).Decode(&page)
		resp.Body.Close()
		if len(page.Data.Events) != 1 || page.Data.Events[0].UserID != "u\x00x" {
			return fmt.Errorf("the NUL-bearing event did not round-trip: %+v", page)
		}
		return nil
	})

	// Oversized headers: refused with 431, not a crash.
	req, _ := http.NewRequest(http.MethodGet, base+"/api/analytics/events", nil)
	req.Header.Set("Authorization", "Bearer "+key)
	req.Header.Set("X-Padding", strings.Repeat("p", 64<<10))
	if resp, err := http.DefaultClient.Do(req); err == nil {
		resp.Body.Close()
		if resp.StatusCode != http.StatusRequestHeaderFieldsTooLarge {
			t.Errorf("64 KiB header: got %d, want 431", resp.StatusCode)
		}
	}

	// Slowloris: a request that never finishes is cut off by the read timeout.
	conn, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	conn.Write([]byte("POST /api/analytics/events HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"eve"))
	conn.SetReadDeadline(time.Now().Add(10 * time.Second))
	_, _ = bufio.NewReader(conn).ReadString('\n')
	conn.Close()
	if took := time.Since(start); took > 5*time.Second {
		t.Errorf("a stalled body held the connection %s; want it closed after the 1 s read timeout", took)
	}

	// Path traversal on the dashboard's static files never reaches the file system.
	for _, p := range []string{"/dashboard/../go.mod", "/dashboard/%2e%2e/%2e%2e/etc/passwd", "/dashboard/vendor/..%2f..%2f..%2fgo.mod",
		"/dashboard/..%5c..%5cgo.mod", "/dashboard/vendor/%2e%2e%2fapp.js", "/dashboard//etc/passwd"} {
		resp, err := http.Get(base + p)
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode >= 500 || strings.Contains(string(b), "module github.com") || strings.Contains(string(b), "root:") {
			t.Errorf("%s: got %d %.100s", p, resp.StatusCode, b)
		}
	}

	// Still serving.
	if status, body := post([]byte(`{"event":"a.b"}`), nil); status != 202 {
		t.Errorf("after the hostile inputs: %d %s", status, body)
	}
}
