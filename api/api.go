// Package api holds the HTTP conventions every analyticsd endpoint shares — the fiber app, the
// {"success":...} envelope, mapping errors to statuses — and the operational routes (/healthz,
// /readiness, /metrics). Endpoints themselves live beside their data (ingest, query, quota) and are
// mounted by cmd/analyticsd; this package imports none of them.
package api

import (
	"errors"
	"log/slog"
	"net/http"
	"time"

	"github.com/gofiber/fiber/v2"
)

// Error is an error a client sees: an HTTP status, a stable machine-readable code and a message that
// says what was wrong and how to fix it. Packages return their own errors; anything that implements
// StatusError is rendered with its status and code, anything else is a 500 with a generic message.
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

// HTTPStatus implements StatusError.
func (e *Error) HTTPStatus() int { return e.Status }

// ErrorCode implements StatusError.
func (e *Error) ErrorCode() string { return e.Code }

// StatusError is implemented by domain errors that know their HTTP status and code.
type StatusError interface {
	error
	HTTPStatus() int
	ErrorCode() string
}

// Errorf-style constructors for the common cases.
func BadRequest(code, msg string) *Error {
	return &Error{Status: http.StatusBadRequest, Code: code, Message: msg}
}
func Unauthorized(msg string) *Error {
	return &Error{Status: http.StatusUnauthorized, Code: "unauthorized", Message: msg}
}
func Forbidden(msg string) *Error {
	return &Error{Status: http.StatusForbidden, Code: "forbidden", Message: msg}
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

// ErrorHandler renders every error as {"success":false,"error":{"code","message"}}.
func ErrorHandler(log *slog.Logger) fiber.ErrorHandler {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return func(c *fiber.Ctx, err error) error {
		status, body := http.StatusInternalServerError, errorBody{Code: "internal", Message: "internal error; it has been logged"}
		var apiErr *Error
		var se StatusError
		var fe *fiber.Error
		switch {
		case errors.As(err, &apiErr):
			status, body = apiErr.Status, errorBody{Code: apiErr.Code, Message: apiErr.Message, Details: apiErr.Details}
			for k, v := range apiErr.Header {
				c.Set(k, v)
			}
		case errors.As(err, &se):
			status, body = se.HTTPStatus(), errorBody{Code: se.ErrorCode(), Message: se.Error()}
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
	return app
}
