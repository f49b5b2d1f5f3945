package labels

import (
	"strings"
	"testing"
)

func TestCapped(t *testing.T) {
	c := NewCapped(2)
	got := []string{c.Value("a"), c.Value("b"), c.Value("c"), c.Value("a")}
	if strings.Join(got, ",") != "a,b,other,a" {
		t.Errorf("got %v, want a,b,other,a", got)
	}
}

// One key filling its cap leaves every other key's values alone.
func TestPerKey(t *testing.T) {
	p := NewPerKey(2)
	got := []string{p.Value("a", "x"), p.Value("a", "y"), p.Value("a", "z"), p.Value("b", "z"), p.Value("a", "x")}
	if strings.Join(got, ",") != "x,y,other,z,x" {
		t.Errorf("got %v, want x,y,other,z,x", got)
	}
}
