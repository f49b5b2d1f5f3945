// Package api holds the HTTP conventions every analyticsd endpoint shares — the fiber app, the
// {"success":...} envelope, the one way to refuse a request (an *Error, built by the constructors
// for its kind: BadRequest, NotFound, TooMany, Unavailable, ...) — and the operational routes
// (/healthz, /readiness, /metrics). Endpoints themselves live beside their data (ingest, query,
// quota) and are mounted by cmd/analyticsd; this package imports none of them. Domain code returns
// its own errors, and only the HTTP layer makes an *Error: each package's http.go, whose httpError
// maps the package's errors and whose handlers refuse what they check themselves, and the middleware
// in front (auth's, dedup's Idempotency-Key). So an endpoint's refusals are read in its http.go.
package api

import (
	"errors"
	"log/slog"
	"net/http"
	"runtime/debug"
	"strconv"
	"strings"
	"time"

	"github.com/gofiber/fiber/v2"
	"github.com/gofiber/fiber/v2/middleware/recover"

	"github.com/analyticsd/analyticsd/internal/logger"
)

// Error is an error a client sees: an HTTP status, a stable machine-readable code and a message that
// says what was wrong and how to fix it. Build one with the constructors below, one per kind of
// refusal; domain packages return their own errors and each package's http.go maps them to these.
// ErrorHandler renders an *Error (also wrapped) and fiber's own errors; anything else is a 500 with a
// generic message, and is logged.
type Error struct {
	Status  int
	Code    string
	Message string
	// Details, when set, is rendered as error.details (e.g. per-item validation failures).
	Details any
	// Header is set on the response (e.g. Retry-After).
	Header map[string]string
	// Cause is logged, never shown to the client.
	Cause error
}

func (e *Error) Error() string { return e.Message }

// Unwrap returns the cause.
func (e *Error) Unwrap() error { return e.Cause }

// WithDetails sets what is rendered as error.details (e.g. the per-item rejections) and returns e.
func (e *Error) WithDetails(details any) *Error {
	e.Details = details
	return e
}

// The kinds of refusal. code is the stable name clients match on; kinds with one code take only the
// message. retryAfter, in whole seconds, becomes the Retry-After header (0: none).

// BadRequest (400): the request is malformed or a parameter is invalid; msg names it and the fix.
func BadRequest(code, msg string) *Error { return newError(http.StatusBadRequest, code, msg) }

// Unauthorized (401, code unauthorized): no credential, or not a valid one.
func Unauthorized(msg string) *Error { return newError(http.StatusUnauthorized, "unauthorized", msg) }

// Forbidden (403): a valid credential that may not do this.
func Forbidden(code, msg string) *Error { return newError(http.StatusForbidden, code, msg) }

// NotFound (404): what the request names does not exist.
func NotFound(code, msg string) *Error { return newError(http.StatusNotFound, code, msg) }

// Conflict (409): the request collides with one still in progress.
func Conflict(code, msg string, retryAfter int) *Error {
	return newError(http.StatusConflict, code, msg).retryAfter(retryAfter)
}

// TooLarge (413, code payload_too_large): the body, or what it holds, is over a limit.
func TooLarge(msg string) *Error {
	return newError(http.StatusRequestEntityTooLarge, "payload_too_large", msg)
}

// Unsupported (415, code unsupported_media_type): a Content-Type or Content-Encoding not served.
func Unsupported(msg string) *Error {
	return newError(http.StatusUnsupportedMediaType, "unsupported_media_type", msg)
}

// Unprocessable (422): well-formed, but it contradicts what the server already holds.
func Unprocessable(code, msg string) *Error {
	return newError(http.StatusUnprocessableEntity, code, msg)
}

// TooMany (429): a limit on how much or how often; retry after retryAfter seconds.
func TooMany(code, msg string, retryAfter int) *Error {
	return newError(http.StatusTooManyRequests, code, msg).retryAfter(retryAfter)
}

// Unavailable (503): something the request needs did not answer, or has no room; retry after
// retryAfter seconds. cause, when set, is logged with the request, never shown.
func Unavailable(code, msg string, retryAfter int, cause error) *Error {
	e := newError(http.StatusServiceUnavailable, code, msg).retryAfter(retryAfter)
	e.Cause = cause
	return e
}

func newError(status int, code, msg string) *Error {
	return &Error{Status: status, Code: code, Message: msg}
}

func (e *Error) retryAfter(seconds int) *Error {
	if seconds > 0 {
		e.Header = map[string]string{fiber.HeaderRetryAfter: strconv.Itoa(seconds)}
	}
	return e
}

// OK writes {"success":true,"data":data} with status 200.
func OK(c *fiber.Ctx, data any) error { return Respond(c, http.StatusOK, data) }

// Respond writes {"success":true,"data":data} with the given status.
func Respond(c *fiber.Ctx, status int, data any) error {
	return c.Status(status).JSON(fiber.Map{"success": true, "data": data})
}

type errorBody struct {
	Code    string `json:"code"`
	Message string `json:"message"`
	Details any    `json:"details,omitempty"`
}

// ErrorHandler renders every error as {"success":false,"error":{"code","message"}}: an *Error (also
// wrapped) as it says, a fiber error (unknown route, body over the limit) with the code for its
// status, anything else as a 500 that gives nothing away. 500s, and errors with a Cause, are logged.
func ErrorHandler(log *slog.Logger) fiber.ErrorHandler {
	log = logger.Or(log)
	return func(c *fiber.Ctx, err error) error {
		status, body := http.StatusInternalServerError, errorBody{Code: "internal", Message: "internal error; it has been logged"}
		var apiErr *Error
		var fe *fiber.Error
		switch {
		case errors.As(err, &apiErr):
			status, body = apiErr.Status, errorBody{Code: apiErr.Code, Message: apiErr.Message, Details: apiErr.Details}
			for k, v := range apiErr.Header {
				c.Set(k, v)
			}
		case errors.As(err, &fe):
			status, body = fe.Code, errorBody{Code: codeFor(fe.Code), Message: fe.Message}
			if fe.Code == http.StatusRequestEntityTooLarge {
				body.Message = "request body too large"
			}
		}
		if status == http.StatusInternalServerError || (apiErr != nil && apiErr.Cause != nil) {
			log.Error("request failed", "method", c.Method(), "path", c.Path(), "status", status, "err", err)
		}
		return c.Status(status).JSON(fiber.Map{"success": false, "error": body})
	}
}

func codeFor(status int) string {
	switch status {
	case http.StatusBadRequest:
		return "bad_request"
	case http.StatusUnauthorized:
		return "unauthorized"
	case http.StatusForbidden:
		return "forbidden"
	case http.StatusNotFound:
		return "not_found"
	case http.StatusMethodNotAllowed:
		return "method_not_allowed"
	case http.StatusRequestEntityTooLarge:
		return "payload_too_large"
	case http.StatusUnsupportedMediaType:
		return "unsupported_media_type"
	case http.StatusTooManyRequests:
		return "rate_limited"
	case http.StatusServiceUnavailable:
		return "unavailable"
	case http.StatusRequestTimeout:
		return "timeout"
	}
	if status >= 500 {
		return "internal"
	}
	return "error"
}

// Config shapes the fiber app.
type Config struct {
	// BodyLimit caps a request body on the wire (compressed); ingest checks the decompressed size itself.
	BodyLimit    int
	ReadTimeout  time.Duration
	WriteTimeout time.Duration
	IdleTimeout  time.Duration
}

// NewApp returns a fiber app with analyticsd's error handling and limits.
func NewApp(cfg Config, log *slog.Logger) *fiber.App {
	if cfg.BodyLimit == 0 {
		cfg.BodyLimit = 10 << 20
	}
	app := fiber.New(fiber.Config{
		AppName:               "analyticsd",
		DisableStartupMessage: true,
		BodyLimit:             cfg.BodyLimit,
		// Room for long query strings (many metric[] values); larger request heads are refused.
		ReadBufferSize: 16 << 10,
		ReadTimeout:    cfg.ReadTimeout,
		WriteTimeout:   cfg.WriteTimeout,
		IdleTimeout:    cfg.IdleTimeout,
		ErrorHandler:   ErrorHandler(log),
		// Every string and byte slice a handler reads from the request (Params, Query, Get, Cookies,
		// Body, ...) is a copy: by default they are views into a buffer the next request on the
		// connection overwrites, and a value kept past the handler (a usage increment's metric, an
		// alert, a metric label) was once silently rewritten that way. Copying them all costs a few
		// small allocations per request; ingest reads its large body through fasthttp's
		// Request().Body() and copies only what it keeps (TestRequestStringsOutliveTheRequest).
		Immutable: true,
	})
	// Every answer is what its Content-Type says (no sniffing), and the API's, which carry a tenant's
	// data and strings its clients wrote, are neither cached nor rendered as a page nor framed. The
	// dashboard's own pages set their own policy over these (package dashboards).
	app.Use(func(c *fiber.Ctx) error {
		c.Set(fiber.HeaderXContentTypeOptions, "nosniff")
		// Routing ignores case, so /API/analytics/events is the API too (it went without these
		// headers; found by review).
		if p := c.Path(); len(p) >= 4 && (strings.EqualFold(p[:4], "/v1/") || len(p) >= 5 && strings.EqualFold(p[:5], "/api/")) {
			c.Set(fiber.HeaderCacheControl, "no-store")
			c.Set(fiber.HeaderContentSecurityPolicy, "default-src 'none'; frame-ancestors 'none'")
		}
		return c.Next()
	})
	// A handler that panics answers 500 (logged with its stack) instead of ending the process and
	// every other request in it. Nothing should panic; a replayed consume once did.
	rlog := logger.Or(log)
	app.Use(recover.New(recover.Config{EnableStackTrace: true, StackTraceHandler: func(c *fiber.Ctx, e any) {
		rlog.Error("handler panicked", "method", c.Method(), "path", c.Path(), "panic", e, "stack", string(debug.Stack()))
	}}))
	return app
}
