package query

import (
	"encoding/csv"
	"strings"
	"testing"
	"time"

	"github.com/google/uuid"
)

func TestParseRange(t *testing.T) {
	now := time.Date(2026, 11, 27, 15, 4, 5, 0, time.UTC)
	d := func(s string) time.Time { t, _ := time.Parse(time.RFC3339, s); return t }
	check := func(from, to string, wantFrom, wantTo time.Time, wantErr string) {
		t.Helper()
		r, err := ParseRange(from, to, now)
		if wantErr != "" {
			if err == nil || !strings.Contains(err.Error(), wantErr) {
				t.Errorf("ParseRange(%q, %q) error = %v, want %q", from, to, err, wantErr)
			}
			return
		}
		if err != nil || !r.From.Equal(wantFrom) || !r.To.Equal(wantTo) {
			t.Errorf("ParseRange(%q, %q) = %v..%v, %v; want %v..%v", from, to, r.From, r.To, err, wantFrom, wantTo)
		}
	}
	check("", "", d("2026-10-29T00:00:00Z"), d("2026-11-28T00:00:00Z"), "")
	check("2024-01-01", "2024-01-31", d("2024-01-01T00:00:00Z"), d("2024-02-01T00:00:00Z"), "")
	check("2024-01-15T10:30:00+02:00", "2024-01-15T12:00:00Z", d("2024-01-15T08:30:00Z"), d("2024-01-15T12:00:00Z"), "")
	check("2024-01-31", "2024-01-01", time.Time{}, time.Time{}, "must be before")
	check("2020-01-01", "2024-01-01", time.Time{}, time.Time{}, "longer than 366 days")
	check("yesterday", "", time.Time{}, time.Time{}, `from="yesterday" is not a date`)
	check("", "2024-13-01", time.Time{}, time.Time{}, "to=")
	check("' OR 1=1 --", "", time.Time{}, time.Time{}, "is not a date")
	// Plain dates are held to ClickHouse's years like RFC3339 times (they once reached storage: 503).
	check("9999-12-01", "9999-12-31", time.Time{}, time.Time{}, "outside the years 1970-2105")
	check("0001-01-01", "0001-01-05", time.Time{}, time.Time{}, "outside the years 1970-2105")
	check("2105-12-01", "2105-12-31", d("2105-12-01T00:00:00Z"), d("2106-01-01T00:00:00Z"), "")
	check("1969-12-31T23:00:00Z", "", time.Time{}, time.Time{}, "outside the years")
}

func TestCursorRoundTrip(t *testing.T) {
	c := Cursor{Ts: time.Unix(1705314600, 0).UTC(), ID: uuid.MustParse("5f0c6d1e-8a1b-4c7e-9d2f-3a4b5c6d7e8f")}
	got, err := ParseCursor(c.Encode())
	if err != nil || got != c {
		t.Fatalf("round trip: got %+v, %v; want %+v", got, err, c)
	}
	bare, err := ParseCursor("2024-01-15T09:30:00Z")
	if err != nil || !bare.Ts.Equal(time.Date(2024, 1, 15, 9, 30, 0, 0, time.UTC)) || bare.ID != uuid.Nil {
		t.Errorf("bare RFC3339 cursor: got %+v, %v", bare, err)
	}
	frac, _ := ParseCursor("2024-01-15T09:30:00.5Z")
	if !frac.Ts.Equal(time.Date(2024, 1, 15, 9, 30, 1, 0, time.UTC)) {
		t.Errorf("fractional cursor: got %v, want rounded up to 09:30:01", frac.Ts)
	}
	for _, bad := range []string{"9999-12-31T00:00:00Z", "0001-01-01T00:00:00Z", "x", "eA", "' OR 1=1", "MTIzOm5vdC1hLXV1aWQ", "LTE6NWYwYzZkMWUtOGExYi00YzdlLTlkMmYtM2E0YjVjNmQ3ZThm"} {
		if _, err := ParseCursor(bad); err == nil {
			t.Errorf("ParseCursor(%q) accepted", bad)
		}
	}
}

func TestParseLimit(t *testing.T) {
	for in, want := range map[string]int{"": 100, "1": 1, "1000": 1000} {
		if got, err := ParseLimit(in); err != nil || got != want {
			t.Errorf("ParseLimit(%q) = %d, %v; want %d", in, got, err, want)
		}
	}
	for _, bad := range []string{"0", "1001", "-1", "ten", "1e3"} {
		if _, err := ParseLimit(bad); err == nil {
			t.Errorf("ParseLimit(%q) accepted", bad)
		}
	}
}

// Each cell, read back by a CSV parser, is what a spreadsheet may show safely: formula starts (ASCII
// and fullwidth, tab and line breaks) get a leading ', control characters and invalid UTF-8 read as
// U+FFFD, and quoting carries commas, quotes and line breaks through.
func TestCSVCell(t *testing.T) {
	for in, want := range map[string]string{
		"=HYPERLINK(\"x\")": "'=HYPERLINK(\"x\")", "+1": "'+1", "-2": "'-2", "@SUM(A1)": "'@SUM(A1)",
		"\tx": "'\tx", "\rx": "'\rx", "\nx": "'\nx", "\uFF1D1+1": "'\uFF1D1+1", "\uFF0B1": "'\uFF0B1",
		"\uFF0D1": "'\uFF0D1", "\uFF20x": "'\uFF20x", "\uFF21": "\uFF21", "用户": "用户",
		"a\x00b": "a\uFFFDb", "\x01=x": "\uFFFD=x", "a\x7fb": "a\uFFFDb", "a\xffb": "a\uFFFDb",
		"a,b": "a,b", `say "hi"`: `say "hi"`, "two\nlines": "two\nlines", " lead": " lead",
		"user-1": "user-1", "": "", `{"a":1}`: `{"a":1}`, " =1+1": "' =1+1", "  @x": "'  @x",
		"x\t=1+1": "x\t=1+1",
	} {
		line := string(appendCell(nil, in)) + ",end\n"
		rec, err := csv.NewReader(strings.NewReader(line)).Read()
		if err != nil || len(rec) != 2 || rec[0] != want || rec[1] != "end" {
			t.Errorf("cell %q written as %q, read back as %q (%v); want %q", in, line, rec, err, want)
		}
	}
	// A tab inside a cell is quoted: an importer splitting on tabs as well as commas read
	// "x<TAB>=1+1" unquoted as the cells "x" and "=1+1", a formula past the check of the start.
	if got := string(appendCell(nil, "x\t=1+1")); got != "\"x\t=1+1\"" {
		t.Errorf("a cell with a tab written as %q, want it quoted", got)
	}
}

// The exact SQL: tenant predicate first, every user value bound, no value in the text.
func TestEventsSQL(t *testing.T) {
	tenant := uuid.MustParse("11111111-1111-4111-8111-111111111111")
	lo, hi := time.Unix(100, 0).UTC(), time.Unix(200, 0).UTC()
	f := EventFilter{Tenant: tenant, Event: "a.b", Source: "app", UserID: "u'1", Cursor: Cursor{Ts: hi, ID: uuid.MustParse("5f0c6d1e-8a1b-4c7e-9d2f-3a4b5c6d7e8f")}}
	q, args := f.SQL("analytics", lo, hi, 101)
	want := "SELECT id, ts, event, source, user_id, props, ip, request_id FROM analytics.events WHERE tenant_id = ? AND ts >= ? AND ts < ? " +
		"AND (ts < ? OR (ts = ? AND id < toUUID(?))) AND event = ? AND source = ? AND user_id = ? ORDER BY ts DESC, id DESC LIMIT 101"
	if q != want {
		t.Errorf("SQL:\n got %s\nwant %s", q, want)
	}
	if len(args) != 9 || args[0] != tenant || args[8] != "u'1" {
		t.Errorf("args: %v", args)
	}
}

// BenchmarkExportEncode is the CSV and NDJSON encoding of one realistic row (150-byte props).
func BenchmarkExportEncode(b *testing.B) {
	id := uuid.MustParse("0190b0b0-1234-7abc-8def-0123456789ab")
	ts := time.Date(2026, 11, 29, 12, 0, 0, 0, time.UTC)
	props := []byte(`{"plan":"pro","n":12345,"path":"/projects/977/builds","ok":true,"dur_ms":2999,"note":"lorem ipsum dolor sit amet consectetur adipiscing elit sed do"}`)
	for _, f := range []struct {
		name string
		fn   func([]byte, uuid.UUID, time.Time, string, string, string, []byte, string, string) []byte
	}{{"csv", appendCSVLine}, {"ndjson", appendJSONLine}} {
		b.Run(f.name, func(b *testing.B) {
			buf := make([]byte, 0, 1024)
			for b.Loop() {
				buf = f.fn(buf[:0], id, ts, "build.step7", "builder", "user-4711", props, "10.0.0.1", "req-123456")
			}
			b.SetBytes(int64(len(buf)))
		})
	}
}

// A cursor carries the range its first page was read with: past midnight UTC the default range
// ("the last 30 days") moves on a day, and a client paging with next_cursor alone would never see
// the oldest day's events. An explicit from wins; a carried from cannot widen past MaxRangeDays.
func TestCursorPinsTheDefaultRange(t *testing.T) {
	before := time.Date(2026, 11, 29, 23, 59, 30, 0, time.UTC)
	r1, err := ParseRange("", "", before)
	if err != nil {
		t.Fatal(err)
	}
	c, err := ParseCursor(Cursor{Ts: before.Add(-time.Hour), ID: uuid.New(), From: r1.From}.Encode())
	if err != nil || !c.From.Equal(r1.From) {
		t.Fatalf("cursor from %v (%v), want %v", c.From, err, r1.From)
	}
	r2, _ := ParseRange("", "", before.Add(time.Minute)) // after midnight
	if r2.From.Equal(r1.From) {
		t.Fatal("the default range did not move at midnight; the test proves nothing")
	}
	c.PinFrom(&r2, "")
	if !r2.From.Equal(r1.From) {
		t.Errorf("page 2's range starts %v, want the first page's %v", r2.From, r1.From)
	}
	r3, _ := ParseRange("2026-11-20", "", before.Add(time.Minute))
	c.PinFrom(&r3, "2026-11-20")
	if !r3.From.Equal(time.Date(2026, 11, 20, 0, 0, 0, 0, time.UTC)) {
		t.Errorf("an explicit from was overridden: %v", r3.From)
	}
	old := Cursor{From: time.Unix(0, 0)}
	r4, _ := ParseRange("", "", before)
	old.PinFrom(&r4, "")
	if !r4.From.Equal(r1.From) {
		t.Errorf("a carried from of 1970 widened the range to %v", r4.From)
	}
}
