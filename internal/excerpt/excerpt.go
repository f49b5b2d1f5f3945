// Package excerpt cuts text that came from outside (a client's value quoted in an error message, a
// driver's error kept in an audit row) to a bounded length, on a rune boundary, marking the cut.
package excerpt

import "unicode/utf8"

// Short is s as error messages quote a client's value: at most 64 bytes.
func Short(s string) string { return Of(s, 64) }

// Of returns s cut to at most max bytes (on a rune boundary) followed by "…" when it was longer.
func Of(s string, max int) string {
	if len(s) <= max {
		return s
	}
	cut := max
	for cut > 0 && !utf8.RuneStart(s[cut]) {
		cut--
	}
	return s[:cut] + "…"
}
