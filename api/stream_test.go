package api

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/gofiber/fiber/v2"
)

// A streamed body arrives whole, in order, with the handler's status and headers; a write that fails
// half-way leaves the body cut short for the client (an error, never a shorter body that looks
// complete); HEAD gets the headers without running the body.
func TestStream(t *testing.T) {
	app := fiber.New(fiber.Config{DisableStartupMessage: true})
	part := bytes.Repeat([]byte("0123456789abcdef\n"), 20_000) // 340 KB per write
	ran := make(chan string, 10)
	ended := make(chan error, 10)
	for _, path := range []string{"/ok", "/fail", "/slow"} {
		app.Get(path, func(c *fiber.Ctx) error {
			c.Set("X-Test", "yes")
			c.Status(http.StatusOK).Type("txt")
			max := time.Duration(0)
			if path == "/slow" {
				max = 300 * time.Millisecond
			}
			Stream(c, max, func(w io.Writer) error {
				ran <- path
				for i := 0; i < 10; i++ {
					if path == "/fail" && i == 5 {
						return errors.New("storage went away")
					}
					if path == "/slow" && i == 2 {
						time.Sleep(400 * time.Millisecond) // past the whole body's deadline
					}
					if _, err := w.Write(part); err != nil {
						return err
					}
				}
				return nil
			}, func(err error) { ended <- err })
			return nil
		})
	}
	base := listen(t, app)

	resp, err := http.Get(base + "/ok")
	if err != nil {
		t.Fatal(err)
	}
	body, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	if err != nil || !bytes.Equal(body, bytes.Repeat(part, 10)) {
		t.Errorf("/ok: %d bytes, err %v; want %d bytes, the parts in order", len(body), err, 10*len(part))
	}
	if resp.StatusCode != 200 || resp.Header.Get("X-Test") != "yes" || !strings.HasPrefix(resp.Header.Get("Content-Type"), "text/plain") {
		t.Errorf("/ok: status %d, headers %v", resp.StatusCode, resp.Header)
	}
	if len(resp.TransferEncoding) != 1 || resp.TransferEncoding[0] != "chunked" {
		t.Errorf("/ok: Transfer-Encoding %v, want chunked", resp.TransferEncoding)
	}

	resp, err = http.Get(base + "/fail")
	if err != nil {
		t.Fatal(err)
	}
	body, err = io.ReadAll(resp.Body)
	resp.Body.Close()
	if !errors.Is(err, io.ErrUnexpectedEOF) {
		t.Errorf("/fail: read %d bytes, err %v; want the body cut short (unexpected EOF)", len(body), err)
	}

	<-ran
	<-ran
	if err := <-ended; err != nil {
		t.Errorf("/ok ended with %v", err)
	}
	if err := <-ended; err == nil {
		t.Error("/fail ended without an error")
	}

	// The whole body's deadline: a stream still writing after it is cut short.
	resp, err = http.Get(base + "/slow")
	if err != nil {
		t.Fatal(err)
	}
	body, err = io.ReadAll(resp.Body)
	resp.Body.Close()
	<-ran
	if e := <-ended; e == nil || err == nil || len(body) >= 10*len(part) {
		t.Errorf("/slow: read %d bytes (%v), stream ended with %v; want it cut at its deadline", len(body), err, e)
	}

	// HTTP/1.0 has no chunks: the body is unframed and ends with the connection.
	conn, err := net.Dial("tcp", strings.TrimPrefix(base, "http://"))
	if err != nil {
		t.Fatal(err)
	}
	fmt.Fprintf(conn, "GET /ok HTTP/1.0\r\nHost: x\r\n\r\n")
	raw, err := io.ReadAll(conn)
	conn.Close()
	<-ran
	<-ended
	head, got, _ := bytes.Cut(raw, []byte("\r\n\r\n"))
	if err != nil || !bytes.Equal(got, bytes.Repeat(part, 10)) || bytes.Contains(bytes.ToLower(head), []byte("chunked")) {
		t.Errorf("HTTP/1.0: head %q, %d body bytes, err %v; want the parts unframed", head, len(got), err)
	}

	req, _ := http.NewRequest(http.MethodHead, base+"/ok", nil)
	resp, err = http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	<-ended
	if resp.StatusCode != 200 || resp.Header.Get("X-Test") != "yes" || len(ran) != 0 {
		t.Errorf("HEAD: status %d, headers %v, body ran %d times; want headers only", resp.StatusCode, resp.Header, len(ran))
	}
}

// fasthttp runs a streamed body in a goroutine of its own, past NewApp's recover: a writer that
// panicked ended the process. It now ends only its own response, cut short, and done hears why.
func TestStreamWriterPanicEndsOnlyItsResponse(t *testing.T) {
	app := fiber.New(fiber.Config{DisableStartupMessage: true})
	ended := make(chan error, 2)
	app.Get("/panic", func(c *fiber.Ctx) error {
		Stream(c, 0, func(w io.Writer) error {
			if _, err := w.Write([]byte("first part\n")); err != nil {
				return err
			}
			panic("index out of range")
		}, func(err error) { ended <- err })
		return nil
	})
	base := listen(t, app)
	for i := 0; i < 2; i++ { // the second request proves the process lived on
		resp, err := http.Get(base + "/panic")
		if err != nil {
			t.Fatal(err)
		}
		_, err = io.ReadAll(resp.Body)
		resp.Body.Close()
		if err == nil {
			t.Errorf("request %d: the body read as complete, want it cut short", i)
		}
		select {
		case err := <-ended:
			if err == nil || !strings.Contains(err.Error(), "panicked") {
				t.Errorf("request %d: done(%v), want the panic", i, err)
			}
		case <-time.After(5 * time.Second):
			t.Fatalf("request %d: done never called", i)
		}
	}
}

// listen serves app on a loopback port until the test ends and returns its base URL.
func listen(t *testing.T, app *fiber.App) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go app.Listener(ln)
	t.Cleanup(func() { app.Shutdown() })
	return "http://" + ln.Addr().String()
}
