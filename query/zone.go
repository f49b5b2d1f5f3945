package query

import (
	"context"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/google/uuid"

	"github.com/analyticsd/analyticsd/internal/excerpt"
	"github.com/analyticsd/analyticsd/tenant"
)

// Zone is the time zone whose local midnight starts a read's days: date-only from/to, the default
// "last 30 days", today/week/month and every daily bucket. The zero Zone is UTC.
//
// Days are computed from Go's zone rules alone: the range is cut into spans of constant UTC offset
// (a DST change starts a new span) and ClickHouse is told each span's offset, so it never needs to
// know the zone itself, and the Go code and the SQL agree on every local midnight.
type Zone struct {
	name string
	loc  *time.Location
}

// UTC is the default zone.
var UTC = Zone{}

// ParseZone reads an IANA zone name (tenant.LoadTimeZone's rules).
func ParseZone(name string) (Zone, error) {
	if name == "UTC" {
		return UTC, nil
	}
	loc, err := tenant.LoadTimeZone(name)
	if err != nil {
		return UTC, paramErr("tz=%q is not an IANA time zone (e.g. Europe/Berlin, Asia/Kolkata, America/St_Johns, UTC)", excerpt.Short(name))
	}
	return Zone{name: name, loc: loc}, nil
}

// Name is the zone's IANA name.
func (z Zone) Name() string {
	if z.loc == nil {
		return "UTC"
	}
	return z.name
}

func (z Zone) location() *time.Location {
	if z.loc == nil {
		return time.UTC
	}
	return z.loc
}

// Date is the local calendar date of instant t, as midnight UTC of that date (how dates travel here).
func (z Zone) Date(t time.Time) time.Time {
	y, m, d := t.In(z.location()).Date()
	return time.Date(y, m, d, 0, 0, 0, 0, time.UTC)
}

// DayStart is the first instant of local date d (given as midnight UTC): local midnight, or the
// moment the clocks jump to when a DST change skips midnight.
func (z Zone) DayStart(d time.Time) time.Time {
	d = time.Date(d.Year(), d.Month(), d.Day(), 0, 0, 0, 0, time.UTC)
	if z.loc == nil {
		return d
	}
	// Every zone's offset lies within -12h..+14h, so the day starts within 15 h of midnight UTC;
	// the local date only grows with time there, so the first second at or past d is found by
	// bisection.
	lo := d.Add(-15 * time.Hour)
	n := sort.Search(30*3600, func(i int) bool {
		return !z.Date(lo.Add(time.Duration(i) * time.Second)).Before(d)
	})
	return lo.Add(time.Duration(n) * time.Second)
}

// span is a stretch of time with one UTC offset: from start up to the next span's start.
type span struct {
	start  time.Time
	offset int // seconds east of UTC
}

// spans cuts [from, to) into stretches of constant UTC offset. A DST change is found to the second
// by bisection between two probes 6 h apart (no zone changes its offset twice within 6 h).
func (z Zone) spans(from, to time.Time) []span {
	offset := func(t time.Time) int { _, o := t.In(z.location()).Zone(); return o }
	out := []span{{from, offset(from)}}
	for t := from; t.Before(to); {
		next := t.Add(6 * time.Hour)
		if next.After(to) {
			next = to
		}
		if cur := out[len(out)-1].offset; offset(next) != cur {
			width := int(next.Sub(t) / time.Second)
			i := sort.Search(width, func(i int) bool { return offset(t.Add(time.Duration(i+1)*time.Second)) != cur })
			if at := t.Add(time.Duration(i+1) * time.Second); at.Before(to) {
				out = append(out, span{at, offset(at)})
			}
		}
		t = next
	}
	return out
}

// UTCOver reports whether the zone's offset is zero all through [from, to): its days are UTC days
// there, and the pre-aggregated UTC tables answer exactly.
func (z Zone) UTCOver(from, to time.Time) bool {
	if z.loc == nil {
		return true
	}
	for _, s := range z.spans(from, to) {
		if s.offset != 0 {
			return false
		}
	}
	return true
}

// dayExpr is the SQL of the local date of column col (a DateTime) for rows in [from, to), and its
// arguments (the instants where the offset changes; the offsets are numbers this package computed,
// written in).
func (z Zone) dayExpr(col string, from, to time.Time) (string, []any) {
	ss := z.spans(from, to)
	if len(ss) == 1 {
		return "toDate(addSeconds(" + col + ", " + strconv.Itoa(ss[0].offset) + "))", nil
	}
	var b strings.Builder
	var args []any
	b.WriteString("toDate(addSeconds(" + col + ", multiIf(")
	for i, s := range ss[:len(ss)-1] {
		if i > 0 {
			b.WriteString(", ")
		}
		b.WriteString(col + " < ?, " + strconv.Itoa(s.offset))
		args = append(args, ss[i+1].start)
	}
	b.WriteString(", " + strconv.Itoa(ss[len(ss)-1].offset) + ")))")
	return b.String(), args
}

// slotSeconds is usage_quarter_hour's grain.
const slotSeconds = 15 * 60

// onSlots reports whether every local midnight and offset change in [from, to) falls on a quarter hour
// (UTC): then each slot of usage_quarter_hour lies whole inside one local day. True of every zone's
// rules since the 1970s (offsets and DST shifts are whole quarter hours: Kathmandu +5:45, Chatham
// +12:45, Lord Howe's 30-minute DST); historical local mean times are not.
func (z Zone) onSlots(windows [][2]time.Time) bool {
	if len(windows) == 0 {
		return true
	}
	for _, w := range windows {
		if w[0].Unix()%slotSeconds != 0 || w[1].Unix()%slotSeconds != 0 {
			return false
		}
	}
	for _, s := range z.spans(windows[0][0], windows[len(windows)-1][1]) {
		if s.start.Unix()%slotSeconds != 0 && s.start.After(windows[0][0]) {
			return false
		}
	}
	return true
}

// storedZoneName reads a zone name a tenant was given before tenant.LoadTimeZone took only
// canonical names: "posix/Europe/Berlin" is Europe/Berlin, and "right/Europe/Berlin" is too, its
// leap seconds aside (civil time, which reads are in, counts none).
func storedZoneName(name string) string {
	for _, p := range []string{"posix/", "right/"} {
		if rest, ok := strings.CutPrefix(name, p); ok {
			return rest
		}
	}
	return name
}

// ZoneLookup finds a tenant's configured time zone (*tenant.Store).
type ZoneLookup interface {
	TimeZone(ctx context.Context, id uuid.UUID) (string, error)
}

// zoneCache remembers tenants' zones for zoneTTL, so a read costs no Postgres round trip; a changed
// zone is used within zoneTTL.
type zoneCache struct {
	lookup ZoneLookup
	mu     sync.Mutex
	m      map[uuid.UUID]cachedZone
}

type cachedZone struct {
	zone Zone
	at   time.Time
	ok   bool // false: the stored name is no zone this build reads (UTC stands in)
}

const zoneTTL = 10 * time.Second

// get returns the tenant's zone. When the lookup fails, the last known zone (or UTC) is returned with
// ok false, so a read still answers and can say it fell back.
func (c *zoneCache) get(ctx context.Context, id uuid.UUID) (Zone, bool) {
	if c == nil || c.lookup == nil {
		return UTC, true
	}
	c.mu.Lock()
	z, hit := c.m[id]
	c.mu.Unlock()
	if hit && time.Since(z.at) < zoneTTL {
		return z.zone, z.ok
	}
	name, err := c.lookup.TimeZone(ctx, id)
	if err != nil {
		return z.zone, false
	}
	zone, err := ParseZone(storedZoneName(name))
	ok := err == nil
	if !ok {
		zone = UTC // a zone this build's tzdata lacks: UTC until fixed, cached like any answer
	}
	c.mu.Lock()
	if c.m == nil {
		c.m = map[uuid.UUID]cachedZone{}
	}
	c.m[id] = cachedZone{zone, time.Now(), ok}
	c.mu.Unlock()
	return zone, ok
}
