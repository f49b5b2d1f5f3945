package excerpt

import (
	"strings"
	"testing"
	"unicode/utf8"
)

// A cut never splits a character (the copy in query cut "用户" mid-rune into invalid UTF-8).
func TestOf(t *testing.T) {
	for _, tc := range []struct {
		in   string
		max  int
		want string
	}{
		{"short", 64, "short"},
		{strings.Repeat("a", 70), 64, strings.Repeat("a", 64) + "…"},
		{strings.Repeat("a", 63) + "用户", 64, strings.Repeat("a", 63) + "…"},
		{"用户", 4, "用…"},
		{"用户", 2, "…"},
		// Invalid UTF-8 is replaced, cut or not: rollup_runs.error (Postgres text) refused it and the
		// failed run stayed "running".
		{"bad \xff byte", 64, "bad \uFFFD byte"},
		{"bad \xff" + strings.Repeat("a", 70), 8, "bad \uFFFDaaa…"},
	} {
		got := Of(tc.in, tc.max)
		if got != tc.want || !utf8.ValidString(got) {
			t.Errorf("Of(%q, %d) = %q, want %q", tc.in, tc.max, got, tc.want)
		}
	}
}
