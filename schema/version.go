package schema

import (
	"fmt"
	"strconv"
	"strings"
)

// Version is a ClickHouse server version, as reported by the native protocol handshake.
type Version struct {
	Major, Minor, Patch int
}

// ParseVersion reads "18.16.1", "25.8.2.29" or "25.8"; parts beyond the third are ignored.
func ParseVersion(s string) (Version, error) {
	parts := strings.Split(strings.TrimSpace(s), ".")
	if len(parts) < 2 {
		return Version{}, fmt.Errorf("parse clickhouse version %q: want major.minor[.patch]", s)
	}
	var n [3]int
	for i := 0; i < len(parts) && i < 3; i++ {
		v, err := strconv.Atoi(parts[i])
		if err != nil || v < 0 {
			return Version{}, fmt.Errorf("parse clickhouse version %q: part %d is not a number", s, i+1)
		}
		n[i] = v
	}
	return Version{n[0], n[1], n[2]}, nil
}

func (v Version) String() string { return fmt.Sprintf("%d.%d.%d", v.Major, v.Minor, v.Patch) }

// AtLeast reports whether v >= major.minor.
func (v Version) AtLeast(major, minor int) bool {
	return v.Major > major || (v.Major == major && v.Minor >= minor)
}

// Features is the one version gate: everything analyticsd does differently on newer ClickHouse servers
// is decided here, from the server version read at start-up, and nowhere else.
type Features struct {
	// TTL: the events and usage_increments tables carry "TTL ts + INTERVAL n DAY" with
	// ttl_only_drop_parts=1, so the server drops whole expired day-parts by itself. Without it,
	// the retention sweeper drops daily partitions.
	TTL bool
	// LowCardinality: dictionary-encoded event, source and metric columns.
	LowCardinality bool
	// Codecs: per-column compression codecs (ZSTD for the props JSON).
	Codecs bool
	// AsyncInsert: the server can buffer small inserts itself (async_insert setting).
	AsyncInsert bool
}

// modern is the oldest release line with every feature above: 20.3 LTS has table TTL with
// ttl_only_drop_parts, non-experimental LowCardinality and column codecs; async inserts came in 21.11.
// Anything older (our build machines' 18.16.1) gets the plain shared subset.
func FeaturesFor(v Version) Features {
	modern := v.AtLeast(20, 3)
	return Features{
		TTL:            modern,
		LowCardinality: modern,
		Codecs:         modern,
		AsyncInsert:    v.AtLeast(21, 11),
	}
}

// LightweightDelete reports whether the server has "DELETE FROM t WHERE ...", which marks rows
// deleted at once (masked from reads, removed by later merges) instead of rewriting every part that
// holds them as an "ALTER TABLE t DELETE" mutation does, and the mutations_sync setting, which makes a
// statement wait until every replica applied it. Generally available from 23.3. It is a function
// beside Features rather than a field of it: only erasure asks, and it asks with the version it read.
func LightweightDelete(v Version) bool { return v.AtLeast(23, 3) }
