package schema

import (
	"flag"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

var update = flag.Bool("update", false, "rewrite the golden DDL files in testdata/")

func TestParseVersion(t *testing.T) {
	check := func(in string, want Version, wantErr bool) {
		t.Helper()
		got, err := ParseVersion(in)
		if (err != nil) != wantErr {
			t.Fatalf("ParseVersion(%q) error = %v, want error %v", in, err, wantErr)
		}
		if got != want {
			t.Errorf("ParseVersion(%q) = %v, want %v", in, got, want)
		}
	}
	check("18.16.1", Version{18, 16, 1}, false)
	check("25.8.2.29", Version{25, 8, 2}, false)
	check("25.8", Version{25, 8, 0}, false)
	check("25", Version{}, true)
	check("x.1", Version{}, true)
}

func TestFeaturesGate(t *testing.T) {
	check := func(v Version, want Features) {
		t.Helper()
		if got := FeaturesFor(v); got != want {
			t.Errorf("FeaturesFor(%v) = %+v, want %+v", v, got, want)
		}
	}
	check(Version{18, 16, 1}, Features{})
	check(Version{20, 2, 9}, Features{})
	check(Version{20, 3, 0}, Features{TTL: true, LowCardinality: true, Codecs: true})
	check(Version{25, 8, 1}, Features{TTL: true, LowCardinality: true, Codecs: true, AsyncInsert: true})
}

// TestClickHouseGolden pins the exact DDL each supported server gets. Run with -update after an
// intended schema change and review the diff.
func TestClickHouseGolden(t *testing.T) {
	for _, c := range []struct {
		v       Version
		cluster string
	}{{Version{18, 16, 1}, ""}, {Version{25, 8, 1}, ""}, {Version{18, 16, 1}, "analytics_cluster"}, {Version{25, 8, 1}, "analytics_cluster"}} {
		v := c.v
		name := v.String()
		if c.cluster != "" {
			name += "-cluster"
		}
		t.Run(name, func(t *testing.T) {
			ms, err := ClickHouse(Params{DB: "analytics", Cluster: c.cluster, RetentionDays: 90, Features: FeaturesFor(v)})
			if err != nil {
				t.Fatal(err)
			}
			var b strings.Builder
			for _, m := range ms {
				for _, s := range m.Statements {
					b.WriteString(s)
					b.WriteString(";\n\n")
				}
			}
			suffix := ""
			if c.cluster != "" {
				suffix = "-cluster"
			}
			path := filepath.Join("testdata", "clickhouse-"+strings.Join(strings.Split(v.String(), ".")[:2], ".")+suffix+".golden.sql")
			if *update {
				if err := os.WriteFile(path, []byte(b.String()), 0o644); err != nil {
					t.Fatal(err)
				}
			}
			want, err := os.ReadFile(path)
			if err != nil {
				t.Fatalf("read golden file (run go test ./schema -update to create it): %v", err)
			}
			if b.String() != string(want) {
				t.Errorf("DDL for %v differs from %s; got:\n%s", v, path, b.String())
			}
		})
	}
}

func TestClickHouseTTLFollowsRetention(t *testing.T) {
	ms, err := ClickHouse(Params{DB: "x", RetentionDays: 30, Features: FeaturesFor(Version{25, 8, 0})})
	if err != nil {
		t.Fatal(err)
	}
	if got := ms[0].Statements[0]; !strings.Contains(got, "TTL ts + INTERVAL 30 DAY") {
		t.Errorf("events DDL lacks a 30-day TTL:\n%s", got)
	}
}

func TestClickHouseRejectsBadParams(t *testing.T) {
	if _, err := ClickHouse(Params{DB: "analytics", Cluster: "c ON CLUSTER x", RetentionDays: 90}); err == nil {
		t.Error("a cluster name that is not an identifier must be refused")
	}
	if _, err := ClickHouse(Params{DB: "a;DROP", RetentionDays: 90}); err == nil {
		t.Error("database name with ';' accepted, want error")
	}
	if _, err := ClickHouse(Params{DB: "analytics", RetentionDays: 0}); err == nil {
		t.Error("retention 0 accepted, want error")
	}
}

func TestSplitStatements(t *testing.T) {
	got := SplitStatements("-- c\nCREATE A (\n x;y\n);\n\n-- d\nCREATE B;\nCREATE C")
	want := []string{"CREATE A (\n x;y\n)", "CREATE B", "CREATE C"}
	if strings.Join(got, "|") != strings.Join(want, "|") {
		t.Errorf("got %q, want %q", got, want)
	}
}

func TestPostgresMigrationsLoad(t *testing.T) {
	ms, err := Postgres()
	if err != nil {
		t.Fatal(err)
	}
	if len(ms) == 0 || ms[0].Version != 1 {
		t.Fatalf("got %d postgres migrations starting at %v, want version 1 first", len(ms), ms)
	}
}

// What a connection to each layout carries: nothing on one server; synchronous distributed inserts
// and the 1 s replica-delay bound on a cluster; shard pruning only where the server has it.
func TestConnSettings(t *testing.T) {
	if s := (Layout{DB: "a"}).ConnSettingsFor(Version{25, 8, 1}); s != nil {
		t.Errorf("one server: %v, want none", s)
	}
	c := Layout{DB: "a", Cluster: "c"}
	old, modern := c.ConnSettingsFor(Version{18, 16, 1}), c.ConnSettingsFor(Version{25, 8, 1})
	if old["insert_distributed_sync"] != 1 || old["max_replica_delay_for_distributed_queries"] != 1 || old["optimize_skip_unused_shards"] != nil {
		t.Errorf("cluster of 18.16: %v", old)
	}
	if modern["optimize_skip_unused_shards"] != 1 || modern["insert_distributed_sync"] != 1 {
		t.Errorf("cluster of 25.8: %v", modern)
	}
}
