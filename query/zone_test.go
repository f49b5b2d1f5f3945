package query

import (
	"context"
	"reflect"
	"testing"
	"time"

	"github.com/google/uuid"
)

func mustZone(t *testing.T, name string) Zone {
	t.Helper()
	z, err := ParseZone(name)
	if err != nil {
		t.Fatal(err)
	}
	return z
}

func instant(s string) time.Time {
	t, err := time.Parse(time.RFC3339, s)
	if err != nil {
		panic(err)
	}
	return t
}

func date(s string) time.Time {
	t, err := time.Parse(time.DateOnly, s)
	if err != nil {
		panic(err)
	}
	return t
}

// The expected instants are written out by hand from each zone's published rules, not computed.
func TestDayStart(t *testing.T) {
	for _, c := range []struct {
		name, zone, day, want string
	}{
		{"utc", "UTC", "2026-03-29", "2026-03-29T00:00:00Z"},
		{"berlin before spring forward", "Europe/Berlin", "2026-03-29", "2026-03-28T23:00:00Z"},
		{"berlin after spring forward", "Europe/Berlin", "2026-03-30", "2026-03-29T22:00:00Z"},
		{"berlin before fall back", "Europe/Berlin", "2026-10-25", "2026-10-24T22:00:00Z"},
		{"berlin after fall back", "Europe/Berlin", "2026-10-26", "2026-10-25T23:00:00Z"},
		{"new york spring forward", "America/New_York", "2026-03-09", "2026-03-09T04:00:00Z"},
		{"kolkata +05:30", "Asia/Kolkata", "2026-04-01", "2026-03-31T18:30:00Z"},
		{"kathmandu +05:45", "Asia/Kathmandu", "2026-04-01", "2026-03-31T18:15:00Z"},
		{"st johns -03:30", "America/St_Johns", "2026-01-15", "2026-01-15T03:30:00Z"},
		{"st johns -02:30 in summer", "America/St_Johns", "2026-07-15", "2026-07-15T02:30:00Z"},
		{"santiago: midnight skipped, the day starts at 01:00", "America/Santiago", "2026-09-06", "2026-09-06T04:00:00Z"},
		{"havana: midnight skipped", "America/Havana", "2026-03-08", "2026-03-08T05:00:00Z"},
		{"havana: midnight repeated, the first one", "America/Havana", "2026-11-01", "2026-11-01T04:00:00Z"},
		{"sydney spring forward (southern)", "Australia/Sydney", "2026-10-05", "2026-10-04T13:00:00Z"},
		{"kiritimati +14", "Pacific/Kiritimati", "2026-01-01", "2025-12-31T10:00:00Z"},
		{"pago pago -11", "Pacific/Pago_Pago", "2026-01-01", "2026-01-01T11:00:00Z"},
	} {
		t.Run(c.name, func(t *testing.T) {
			if got := mustZone(t, c.zone).DayStart(date(c.day)); !got.Equal(instant(c.want)) {
				t.Errorf("DayStart(%s) in %s: got %s, want %s", c.day, c.zone, got.UTC().Format(time.RFC3339), c.want)
			}
		})
	}
}

func TestSpans(t *testing.T) {
	check := func(zone, from, to string, want []span) {
		t.Helper()
		got := mustZone(t, zone).spans(instant(from), instant(to))
		for i := range got {
			got[i].start = got[i].start.UTC()
		}
		if !reflect.DeepEqual(got, want) {
			t.Errorf("%s %s..%s: got %v, want %v", zone, from, to, got, want)
		}
	}
	check("Asia/Kolkata", "2026-01-01T00:00:00Z", "2026-12-31T00:00:00Z", []span{{instant("2026-01-01T00:00:00Z"), 19800}})
	check("Europe/Berlin", "2026-03-01T00:00:00Z", "2026-11-30T00:00:00Z", []span{
		{instant("2026-03-01T00:00:00Z"), 3600}, {instant("2026-03-29T01:00:00Z"), 7200}, {instant("2026-10-25T01:00:00Z"), 3600}})
	check("America/St_Johns", "2026-10-31T00:00:00Z", "2026-11-02T00:00:00Z", []span{
		{instant("2026-10-31T00:00:00Z"), -9000}, {instant("2026-11-01T04:30:00Z"), -12600}})
	// A change exactly at the range's end is outside it.
	check("Europe/Berlin", "2026-03-28T00:00:00Z", "2026-03-29T01:00:00Z", []span{{instant("2026-03-28T00:00:00Z"), 3600}})
	// One second earlier it is inside.
	check("Europe/Berlin", "2026-03-28T00:00:00Z", "2026-03-29T01:00:01Z", []span{
		{instant("2026-03-28T00:00:00Z"), 3600}, {instant("2026-03-29T01:00:00Z"), 7200}})
}

func TestDayExpr(t *testing.T) {
	sql, args := mustZone(t, "Asia/Kathmandu").dayExpr("ts", instant("2026-01-01T00:00:00Z"), instant("2026-02-01T00:00:00Z"))
	if want := "toDate(addSeconds(ts, 20700))"; sql != want || len(args) != 0 {
		t.Errorf("kathmandu: got %s %v, want %s and no args", sql, args, want)
	}
	sql, args = mustZone(t, "Europe/Berlin").dayExpr("ts", instant("2026-03-01T00:00:00Z"), instant("2026-11-30T00:00:00Z"))
	if want := "toDate(addSeconds(ts, multiIf(ts < ?, 3600, ts < ?, 7200, 3600)))"; sql != want {
		t.Errorf("berlin: got %s, want %s", sql, want)
	}
	if want := []any{instant("2026-03-29T01:00:00Z"), instant("2026-10-25T01:00:00Z")}; len(args) != 2 ||
		!args[0].(time.Time).Equal(want[0].(time.Time)) || !args[1].(time.Time).Equal(want[1].(time.Time)) {
		t.Errorf("berlin args: got %v, want %v", args, want)
	}
}

func TestParseZone(t *testing.T) {
	// localtime (on Debian a link to the server's /etc/localtime), posixrules, right/ (leap seconds),
	// posix/ and path forms all loaded before (found by review).
	for _, bad := range []string{"", "Local", "Mars/Olympus", "../../etc/passwd", "Europe/Berlin\x00",
		"localtime", "posixrules", "right/UTC", "posix/Europe/Berlin", "./UTC", "Etc//UTC", "/UTC", "Europe/Berlin/"} {
		if _, err := ParseZone(bad); err == nil {
			t.Errorf("ParseZone(%q): got no error, want one", bad)
		}
	}
	for _, good := range []string{"UTC", "Asia/Kolkata", "America/St_Johns", "Etc/GMT+3", "Etc/GMT-14", "America/Argentina/Buenos_Aires", "EST5EDT"} {
		if z, err := ParseZone(good); err != nil || z.Name() != good {
			t.Errorf("ParseZone(%q): got %v, %v; want the zone", good, z.Name(), err)
		}
	}
}

func TestParseRangeInZone(t *testing.T) {
	z := mustZone(t, "Europe/Berlin")
	// 23:30 UTC on the 28th is already the 29th in Berlin (CET, +1).
	now := instant("2026-03-28T23:30:00Z")
	r, err := ParseRangeIn("", "", now, z)
	if err != nil {
		t.Fatal(err)
	}
	if want := instant("2026-03-29T22:00:00Z"); !r.To.Equal(want) {
		t.Errorf("default to: got %s, want %s (tomorrow's local midnight, after the change to CEST)", r.To, want)
	}
	if want := instant("2026-02-27T23:00:00Z"); !r.From.Equal(want) {
		t.Errorf("default from: got %s, want %s", r.From, want)
	}
	if first, last := r.Days(); !first.Equal(date("2026-02-28")) || !last.Equal(date("2026-03-29")) {
		t.Errorf("days: got %s..%s, want 2026-02-28..2026-03-29", first, last)
	}
	r, err = ParseRangeIn("2026-03-29", "2026-03-29", now, z)
	if err != nil {
		t.Fatal(err)
	}
	if got := r.To.Sub(r.From); got != 23*time.Hour {
		t.Errorf("the spring-forward day: got %s long, want 23h", got)
	}
	r, err = ParseRangeIn("2026-10-25", "2026-10-25", now, z)
	if err != nil {
		t.Fatal(err)
	}
	if got := r.To.Sub(r.From); got != 25*time.Hour {
		t.Errorf("the fall-back day: got %s long, want 25h", got)
	}
	// to at a local midnight, from left out: 30 local days back, across the spring-forward change
	// (720 hours landed at 23:00 local, which /usage, counting whole days, refused naming from).
	r, err = ParseRangeIn("", "2026-04-10T00:00:00+02:00", now, z)
	if err != nil || !r.From.Equal(instant("2026-03-10T23:00:00Z")) {
		t.Errorf("default from before a local midnight: got %v, %v; want 2026-03-10T23:00:00Z (midnight of the 11th, CET)", r.From, err)
	}
	// RFC3339 bounds stay instants.
	r, err = ParseRangeIn("2026-03-01T10:00:00Z", "2026-03-02T10:00:00Z", now, z)
	if err != nil || !r.From.Equal(instant("2026-03-01T10:00:00Z")) || !r.To.Equal(instant("2026-03-02T10:00:00Z")) {
		t.Errorf("instants: got %v..%v, %v", r.From, r.To, err)
	}
}

func TestOnSlots(t *testing.T) {
	for _, c := range []struct {
		zone, first, last string
		want              bool
	}{
		{"Asia/Kathmandu", "2026-01-01", "2026-03-01", true},
		{"Asia/Kolkata", "2026-01-01", "2026-03-01", true},
		{"America/St_Johns", "2026-03-01", "2026-11-30", true},
		{"Australia/Lord_Howe", "2026-03-01", "2026-11-30", true}, // a 30-minute DST shift
		{"Pacific/Chatham", "2026-03-01", "2026-11-30", true},     // +12:45/+13:45
		{"Asia/Kolkata", "1900-01-01", "1900-01-05", false},       // local mean time, +5:53:28
		{"Europe/Amsterdam", "1930-01-01", "1930-01-05", false},   // +0:19:32
	} {
		z := mustZone(t, c.zone)
		if got := z.onSlots(z.windows(date(c.first), date(c.last))); got != c.want {
			t.Errorf("%s %s..%s: got %v, want %v", c.zone, c.first, c.last, got, c.want)
		}
	}
}

// countingLookup answers a tenant's stored zone name and counts the lookups.
type countingLookup struct {
	name  string
	calls int
}

func (l *countingLookup) TimeZone(context.Context, uuid.UUID) (string, error) {
	l.calls++
	return l.name, nil
}

// Zones stored before names had to be canonical still read: posix/ and right/ as the zone they
// name; a name that reads as no zone (localtime) falls back to UTC, says so, and is cached like any
// answer. Found by review: such tenants read in UTC, and every read asked Postgres again.
func TestZoneCacheReadsNamesStoredBefore(t *testing.T) {
	for stored, want := range map[string]string{"posix/Europe/Berlin": "Europe/Berlin", "right/Asia/Tokyo": "Asia/Tokyo", "Europe/Berlin": "Europe/Berlin"} {
		c := &zoneCache{lookup: &countingLookup{name: stored}}
		if z, ok := c.get(context.Background(), uuid.New()); !ok || z.Name() != want {
			t.Errorf("stored %q: read in %s (ok %v), want %s", stored, z.Name(), ok, want)
		}
	}
	l := &countingLookup{name: "localtime"}
	c := &zoneCache{lookup: l}
	id := uuid.New()
	for range 3 {
		if z, ok := c.get(context.Background(), id); ok || z.Name() != "UTC" {
			t.Errorf("stored localtime: read in %s (ok %v), want UTC and not ok", z.Name(), ok)
		}
	}
	if l.calls != 1 {
		t.Errorf("%d lookups for three reads within the cache's TTL, want 1", l.calls)
	}
}
