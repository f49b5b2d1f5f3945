package main

import (
	"testing"
	"time"
)

func TestPercentileNearestRank(t *testing.T) {
	ms := func(v ...int) []time.Duration {
		out := make([]time.Duration, len(v))
		for i, x := range v {
			out[i] = time.Duration(x) * time.Millisecond
		}
		return out
	}
	hundred := make([]int, 100)
	for i := range hundred {
		hundred[i] = 100 - i // 100..1, unsorted on purpose
	}
	cases := []struct {
		samples []time.Duration
		p       float64
		want    time.Duration
	}{
		{nil, 50, 0},
		{ms(7), 50, 7 * time.Millisecond},
		{ms(7), 99, 7 * time.Millisecond},
		{ms(3, 1, 2), 50, 2 * time.Millisecond},
		{ms(3, 1, 2), 100, 3 * time.Millisecond},
		{ms(1, 2, 3, 4), 50, 2 * time.Millisecond},
		{ms(1, 2, 3, 4), 75, 3 * time.Millisecond},
		{ms(1, 2, 3, 4), 76, 4 * time.Millisecond},
		{ms(hundred...), 50, 50 * time.Millisecond},
		{ms(hundred...), 99, 99 * time.Millisecond},
		{ms(hundred...), 99.5, 100 * time.Millisecond},
		{ms(hundred...), 1, 1 * time.Millisecond},
	}
	for _, c := range cases {
		if got := Percentile(c.samples, c.p); got != c.want {
			t.Errorf("Percentile(%v, %v) = %v, want %v", c.samples, c.p, got, c.want)
		}
	}
	in := ms(3, 1, 2)
	Percentile(in, 50)
	if in[0] != 3*time.Millisecond {
		t.Error("Percentile reordered its input")
	}
}

func TestSummarize(t *testing.T) {
	var s []time.Duration
	for i := 1; i <= 1000; i++ {
		s = append(s, time.Duration(i)*time.Microsecond)
	}
	got := Summarize(s)
	if got.N != 1000 || got.P50 != 0.5 || got.P99 != 0.99 || got.Max != 1 || got.P90 != 0.9 {
		t.Errorf("Summarize = %+v", got)
	}
	if (Summarize(nil) != Summary{}) {
		t.Error("empty input should give a zero Summary")
	}
}

func TestRatio(t *testing.T) {
	if ratio(1, 0) != 0 || ratio(3, 2) != 1.5 {
		t.Error("ratio")
	}
}

func TestTargetsEvaluate(t *testing.T) {
	r := &Result{Scenarios: []*Scenario{
		{Name: "rest_ingest", Figures: map[string]float64{"ratio_vs_a": 0.6, "ratio_vs_b_copy": 2}},
		{Name: "ack_latency", Figures: map[string]float64{}, Latency: map[string]Summary{"ack": {N: 10, P99: 20}}},
	}}
	r.evaluate()
	byFigure := map[string]Target{}
	for _, tg := range r.Targets {
		byFigure[tg.Scenario+"/"+tg.Figure] = tg
	}
	check := func(key string, pass *bool) {
		t.Helper()
		tg, ok := byFigure[key]
		if !ok {
			t.Fatalf("no target %s", key)
		}
		switch {
		case pass == nil && tg.Pass != nil:
			t.Errorf("%s: want not measured, got %v", key, *tg.Pass)
		case pass != nil && (tg.Pass == nil || *tg.Pass != *pass):
			t.Errorf("%s: want pass=%v, got %v", key, *pass, tg.Pass)
		}
	}
	yes, no := true, false
	check("rest_ingest/events/s vs (a) raw clickhouse-client", &yes)
	check("rest_ingest/events/s vs (b) Postgres COPY", &no)
	check("ack_latency/ack p99 at half the max rate", &yes)
	check("freshness/ack → queryable p99", nil)
}
