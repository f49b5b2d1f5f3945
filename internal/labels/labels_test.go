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
