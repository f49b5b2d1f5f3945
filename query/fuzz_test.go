package query

import (
	"testing"
	"time"

	"github.com/google/uuid"
)

// FuzzParseCursor: any string either parses to a cursor that round-trips, or is refused — never a panic.
func FuzzParseCursor(f *testing.F) {
	for _, s := range []string{"", "2024-01-15T09:30:00Z", "2024-01-15T09:30:00.5+02:00", Cursor{Ts: time.Unix(1705314600, 0)}.Encode(),
		Cursor{Ts: time.Unix(1705314600, 0), ID: uuid.MustParse("5f0c6d1e-8a1b-4c7e-9d2f-3a4b5c6d7e8f"), From: time.Unix(1702722600, 0)}.Encode(),
		"MTcwNTMxNDYwMDo1ZjBjNmQxZS04YTFiLTRjN2UtOWQyZi0zYTRiNWM2ZDdlOGY", "' OR 1=1 --", "\x00", "LTE6eA"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		c, err := ParseCursor(s)
		if err != nil || c.IsZero() || c.ID.String() == "00000000-0000-0000-0000-000000000000" {
			return
		}
		back, err := ParseCursor(c.Encode())
		if err != nil || !back.Ts.Equal(c.Ts) || back.ID != c.ID || !back.From.Equal(c.From) {
			t.Fatalf("cursor %q → %+v does not round-trip: %+v, %v", s, c, back, err)
		}
	})
}

// FuzzParseParams: from/to/limit parsing never panics, and an accepted range is ordered and capped.
func FuzzParseParams(f *testing.F) {
	f.Add("2024-01-01", "2024-01-31", "100")
	f.Add("2024-01-15T10:30:00+02:00", "", "1000")
	f.Add("", "", "")
	f.Add("9999-12-31", "0000-01-01", "-1")
	f.Add("2024-02-30", "2024-13-01", "1e3")
	now := time.Date(2026, 11, 27, 12, 0, 0, 0, time.UTC)
	f.Fuzz(func(t *testing.T, from, to, limit string) {
		r, err := ParseRange(from, to, now)
		if err == nil {
			if !r.From.Before(r.To) || r.To.Sub(r.From) > MaxRangeDays*24*time.Hour {
				t.Fatalf("accepted range %v..%v from %q %q", r.From, r.To, from, to)
			}
			first, last := r.Days()
			if last.Before(first) {
				t.Fatalf("days %v..%v", first, last)
			}
		}
		if n, err := ParseLimit(limit); err == nil && (n < 1 || n > 1000) {
			t.Fatalf("limit %q accepted as %d", limit, n)
		}
		_ = ValidName(from)
	})
}
