package quota

import (
	"encoding/json"
	"math"
	"testing"
)

// The consume's hand-written body is what api.OK's encoding/json writes, for every kind of value
// it takes by hand, and it declines the ones it does not.
func TestConsumeBodyIsEncodingJSONs(t *testing.T) {
	for _, r := range []ConsumeResult{
		{Metric: "api_requests_daily", Allowed: true, Current: 1, Limit: 100000, Remaining: 99999},
		{Metric: "builds_daily", Current: 200, Limit: 200, Exceeded: true},
		{Metric: "x.y-z:w_daily", Allowed: true, Current: 1e12, Limit: 1e21, Remaining: 1e21 - 1e12, Degraded: true},
		{Metric: "a_daily", Allowed: true, Current: 3, Limit: 2.5, Remaining: 0, Exceeded: true, Disabled: true},
		{Metric: "a_daily", Current: 0, Limit: 1e-7, Remaining: 1.5e-300},
		{Metric: "a_daily", Current: 123456789012345678, Limit: 0.1 + 0.2, Remaining: 4.5e22},
		{Metric: "a_daily", Current: -0.0, Limit: 9.999999999999999e20, Remaining: 1e-6},
	} {
		want, err := json.Marshal(map[string]any{"success": true, "data": r})
		if err != nil {
			t.Fatal(err)
		}
		got, ok := r.appendEnvelope(nil)
		if !ok || string(got) != string(want) {
			t.Errorf("%+v:\n got %s (%v)\nwant %s", r, got, ok, want)
		}
	}
	for _, r := range []ConsumeResult{
		{Metric: "quote\"_daily"}, {Metric: "<b>_daily"}, {Metric: "é_daily"},
		{Metric: "a_daily", Limit: math.Inf(1)}, {Metric: "a_daily", Current: math.NaN()},
	} {
		if _, ok := r.appendEnvelope(nil); ok {
			t.Errorf("%+v written by hand; want it left to encoding/json", r)
		}
	}
}
