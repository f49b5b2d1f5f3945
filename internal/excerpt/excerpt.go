// Package excerpt cuts text that came from outside (a client's value quoted in an error message, a
// driver's error kept in an audit row) to a bounded length, on a rune boundary, marking the cut.
package excerpt

import (
	"strings"
	"unicode/utf8"
)

// Short is s as error messages quote a client's value: at most 64 bytes.
func Short(s string) string { return Of(s, 64) }

// Of returns s cut to at most max bytes (on a rune boundary) followed by "…" when it was longer,
// always valid UTF-8: invalid bytes (a driver quoting raw input back) read as U+FFFD, so the result
// can go into a Postgres text column (which refuses invalid UTF-8) or a JSON message as it is.
func Of(s string, max int) string {
	if len(s) > max {
		cut := max
		for cut > 0 && !utf8.RuneStart(s[cut]) {
			cut--
		}
		s = s[:cut] + "…"
	}
	return strings.ToValidUTF8(s, "\uFFFD")
}
