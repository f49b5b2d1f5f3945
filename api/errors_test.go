package api

import (
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"regexp"
	"strings"
	"testing"

	"github.com/gofiber/fiber/v2"
)

// oneWay matches the ways around api's constructors: an error type that carries its own HTTP
// status (what StatusError was), and an *Error built by hand.
var oneWay = regexp.MustCompile(`\) HTTPStatus\(\) int|&api\.Error\{|\bapi\.Error\{`)

// A refusal is made one way: domain code returns its own errors, and its package's http.go maps
// them with the constructors in api.go. A second way (a status on a domain error, a hand-built
// *Error with its own Retry-After map) is how the five ways this replaced began.
func TestErrorsAreMadeOneWay(t *testing.T) {
	sourceLines(t, func(file, line string) {
		if !strings.HasPrefix(file, "api/") && oneWay.MatchString(line) {
			t.Errorf("%s: %s\n\treturn a domain error and map it in the package's httpError with api's constructors (BadRequest, NotFound, TooMany, Unavailable, ...)", file, strings.TrimSpace(line))
		}
	})
}

// A handler that panics answered nothing and took the whole process down with it (no recover
// middleware): every tenant's requests in flight were lost. It is now a 500, and the server goes on.
func TestAPanickingHandlerIsA500(t *testing.T) {
	app := NewApp(Config{}, slog.New(slog.DiscardHandler))
	app.Get("/boom", func(*fiber.Ctx) error { panic("index out of range") })
	app.Get("/ok", func(c *fiber.Ctx) error { return c.SendString("ok") })
	for _, c := range []struct {
		path   string
		status int
	}{{"/boom", 500}, {"/ok", 200}, {"/boom", 500}} {
		resp, err := app.Test(httptest.NewRequest(http.MethodGet, c.path, nil))
		if err != nil || resp.StatusCode != c.status {
			t.Fatalf("GET %s: %v %v, want %d", c.path, resp, err, c.status)
		}
		body, _ := io.ReadAll(resp.Body)
		if c.status == 500 && !strings.Contains(string(body), `"code":"internal"`) {
			t.Errorf("GET %s: %s, want the internal error body", c.path, body)
		}
	}
}
