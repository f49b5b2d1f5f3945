package api

import (
	"bytes"
	"errors"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"

	"github.com/gofiber/fiber/v2"
)

// A streamed body arrives whole, in order, with the handler's status and headers; a write that fails
// half-way leaves the body cut short for the client (an error, never a shorter body that looks
// complete); HEAD gets the headers without running the body.
func TestStream(t *testing.T) {
	app := fiber.New(fiber.Config{DisableStartupMessage: true})
	part := bytes.Repeat([]byte("0123456789abcdef\n"), 20_000) // 340 KB per write
	ran := make(chan string, 10)
	for _, path := range []string{"/ok", "/fail"} {
		app.Get(path, func(c *fiber.Ctx) error {
			c.Set("X-Test", "yes")
			c.Status(http.StatusOK).Type("txt")
			Stream(c, func(w io.Writer) error {
				ran <- path
				for i := 0; i < 10; i++ {
					if path == "/fail" && i == 5 {
						return errors.New("storage went away")
					}
					if _, err := w.Write(part); err != nil {
						return err
					}
				}
				return nil
			}, nil)
			return nil
		})
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go app.Listener(ln)
	t.Cleanup(func() { app.Shutdown() })
	base := "http://" + ln.Addr().String()

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
	req, _ := http.NewRequest(http.MethodHead, base+"/ok", nil)
	resp, err = http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 200 || resp.Header.Get("X-Test") != "yes" || len(ran) != 0 {
		t.Errorf("HEAD: status %d, headers %v, body ran %d times; want headers only", resp.StatusCode, resp.Header, len(ran))
	}
}
