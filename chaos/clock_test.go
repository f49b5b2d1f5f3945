//go:build chaos

package chaos

import (
	"io"
	"net/http"
	"regexp"
	"strconv"
	"strings"
	"testing"

	"github.com/analyticsd/analyticsd/internal/testenv"
	"github.com/analyticsd/analyticsd/internal/testenv/fixture"
)

// An instance whose clock is further from Redis' than exactly-once allows (instances within 5 s of
// each other) says so: a /readiness warning (still 200: it serves), the offset in /metrics. Before,
// nothing measured it, and a retry or replay was silently judged by a wrong clock. An instance whose
// clock is right warns of nothing.
func TestAClockOffRedisIsAWarning(t *testing.T) {
	if !testenv.Required() && testenv.RedisURL(t) == "" {
		t.Skip("needs the local stack: run make chaos")
	}
	bin := build(t, "testclock")
	right := newSystem(t, bin, nil)
	off := right.sibling(t, map[string]string{"ANALYTICS_TEST_CLOCK_OFFSET": "-8s"})
	gauge := regexp.MustCompile(`(?m)^sbh_analytics_clock_offset_seconds (\S+)$`)
	offset := func(s *system) float64 {
		resp, err := http.Get(s.ops + "/metrics")
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		body, _ := io.ReadAll(resp.Body)
		m := gauge.FindSubmatch(body)
		if m == nil {
			t.Fatalf("no sbh_analytics_clock_offset_seconds in /metrics")
		}
		v, _ := strconv.ParseFloat(string(m[1]), 64)
		return v
	}
	if code, w := fixture.Readiness(t, off.ops); code != 200 || len(w) != 1 || !strings.Contains(w[0], "clock is -") || !strings.Contains(w[0], "NTP") {
		t.Errorf("an instance 8 s behind: /readiness %d, warnings %q; want 200 and a warning naming the offset (the gauge checks its size)", code, w)
	}
	if v := offset(off); v > -7.5 || v < -8.5 {
		t.Errorf("an instance 8 s behind: offset %v s in /metrics, want about -8", v)
	}
	if code, w := fixture.Readiness(t, right.ops); code != 200 || len(w) != 0 {
		t.Errorf("an instance on time: /readiness %d, warnings %q; want 200 and none", code, w)
	}
	if v := offset(right); v > 0.5 || v < -0.5 {
		t.Errorf("an instance on time: offset %v s, want about 0 (Redis runs on this machine)", v)
	}
}
