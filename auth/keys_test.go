package auth

import (
	"strings"
	"testing"
)

func TestParseScopes(t *testing.T) {
	check := func(in, want string, wantErr bool) {
		t.Helper()
		got, err := ParseScopes(in)
		if (err != nil) != wantErr {
			t.Fatalf("ParseScopes(%q) error = %v, want error %v", in, err, wantErr)
		}
		var s []string
		for _, sc := range got {
			s = append(s, string(sc))
		}
		if strings.Join(s, ",") != want {
			t.Errorf("ParseScopes(%q) = %v, want %s", in, s, want)
		}
	}
	check("events:write,analytics:read", "events:write,analytics:read", false)
	check(" analytics:admin , analytics:admin ", "analytics:admin", false)
	check("events:write,admin", "", true)
	check("", "", true)
}

func TestSplitKey(t *testing.T) {
	good := "ak_0123456789ab_" + strings.Repeat("A", 43)
	check := func(in string, ok bool) {
		t.Helper()
		if _, got := splitKey(in); got != ok {
			t.Errorf("splitKey(%q) ok = %v, want %v", in, got, ok)
		}
	}
	check(good, true)
	check(good[:len(good)-1], false)
	check("ak_0123456789zz_"+strings.Repeat("A", 43), false)
	check("sk_0123456789ab_"+strings.Repeat("A", 43), false)
	check("eyJhbGciOiJIUzI1NiJ9.e30.x", false)
	check("", false)
}
