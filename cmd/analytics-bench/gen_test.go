package main

import (
	"encoding/json"
	"math"
	"testing"
)

const testBase = 1_795_000_000

func TestGeneratorIsDeterministic(t *testing.T) {
	g1 := NewGenerator(42, testBase, 50)
	g2 := NewGenerator(42, testBase, 50)
	// Event i is the same whether generated alone, in order, or backwards.
	var forward [500]Event
	for i := range forward {
		g1.Fill(&forward[i], streamMain, uint64(i))
	}
	for i := len(forward) - 1; i >= 0; i-- {
		var e Event
		g2.Fill(&e, streamMain, uint64(i))
		if e != forward[i] {
			t.Fatalf("event %d differs between runs:\n%+v\n%+v", i, e, forward[i])
		}
	}
	// The parallel path the bench uses gives the same events too.
	b := &bench{gen: g2}
	par := make([]Event, len(forward))
	b.generate(par, streamMain, 0)
	for i := range par {
		if par[i] != forward[i] {
			t.Fatalf("event %d differs when generated in parallel", i)
		}
	}
	// Another seed, or another stream, gives other events.
	var other Event
	NewGenerator(43, testBase, 50).Fill(&other, streamMain, 0)
	if other.ID == forward[0].ID || other.Props == forward[0].Props {
		t.Fatal("seed 43 produced seed 42's first event")
	}
	g1.Fill(&other, streamAck, 0)
	if other.ID == forward[0].ID {
		t.Fatal("stream 2 produced stream 0's first event")
	}
}

func TestGeneratedEventsAreRealistic(t *testing.T) {
	const n = 200_000
	g := NewGenerator(7, testBase, 50)
	ids := make(map[[16]byte]bool, n)
	perTenant := make([]int, 50)
	perKind := make([]int, len(catalog))
	minProps, maxProps, sumProps := math.MaxInt, 0, 0
	var e Event
	for i := 0; i < n; i++ {
		g.Fill(&e, streamMain, uint64(i))
		if ids[e.ID] {
			t.Fatalf("duplicate id %s at %d", e.ID, i)
		}
		ids[e.ID] = true
		if e.ID.Version() != 4 {
			t.Fatalf("id %s is not a version 4 UUID", e.ID)
		}
		if e.Ts > testBase || e.Ts <= testBase-Window {
			t.Fatalf("ts %d outside (base-30d, base]", e.Ts)
		}
		perTenant[e.Tenant]++
		perKind[e.Kind]++
		l := len(e.Props)
		minProps, maxProps, sumProps = min(minProps, l), max(maxProps, l), sumProps+l
		if i < 20_000 {
			var m map[string]any
			if err := json.Unmarshal([]byte(e.Props), &m); err != nil {
				t.Fatalf("props of %s is not a JSON object: %v: %s", e.Name(), err, e.Props)
			}
			if e.UserID == "" || e.IP == "" {
				t.Fatalf("event without user or ip: %+v", e)
			}
		}
	}
	if minProps < 100 || maxProps > 300 {
		t.Errorf("props sizes %d..%d bytes, want within 100..300", minProps, maxProps)
	}
	t.Logf("props: %d..%d bytes, mean %d; busiest tenant %.1f%%, smallest %.2f%%", minProps, maxProps, sumProps/n,
		100*float64(perTenant[0])/n, 100*float64(perTenant[49])/n)
	// Skewed share: the busiest tenant gets about a quarter, each next one less (allowing noise).
	if share := float64(perTenant[0]) / n; math.Abs(share-g.TenantShare(0)) > 0.01 || share < 0.2 {
		t.Errorf("busiest tenant share %.3f, want ≈ %.3f", share, g.TenantShare(0))
	}
	if perTenant[0] < 5*perTenant[9] || perTenant[9] < perTenant[49] {
		t.Errorf("tenant shares are not skewed: %v", perTenant)
	}
	// Catalog frequencies follow the weights.
	total := 0.0
	for _, k := range catalog {
		total += k.weight
	}
	for i, k := range catalog {
		want := k.weight / total
		if got := float64(perKind[i]) / n; math.Abs(got-want) > 0.01 {
			t.Errorf("%s: share %.3f, want ≈ %.3f", k.name, got, want)
		}
	}
}

func TestCatalogCoversTheGuide(t *testing.T) {
	guide := []string{"auth.user.registered", "auth.user.login", "builder.generate.started", "builder.generate.completed",
		"files.uploaded", "apikey.request", "apikey.rate_limited", "webhook.delivered", "webhook.failed", "email.sent",
		"email.failed", "payments.checkout.created", "payments.subscription.active", "payments.subscription.canceled"}
	have := map[string]bool{}
	for _, k := range catalog {
		have[k.name] = true
	}
	for _, name := range guide {
		if !have[name] {
			t.Errorf("catalog lacks %s", name)
		}
	}
}
