package api

import (
	"regexp"
	"strings"
	"testing"
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
