package quota

import (
	"slices"
	"time"

	"github.com/analyticsd/analyticsd/internal/labels"
)

// DefaultConfig returns the documented defaults: quotas on, consume allowed while Redis is down,
// alerts at 80% and 100% of a limit, live counters reconciled every 30 s. EventMetrics,
// IdempotencyWindow and Webhook have no default here: they are ingest's event map, the dedup window
// and the operator's endpoint.
func DefaultConfig() Config {
	return Config{
		Enabled:        true,
		FailOpen:       true,
		Thresholds:     []int{80, 100},
		LabelCap:       labels.DefaultCap,
		ReconcileEvery: 30 * time.Second,
		Webhook:        WebhookConfig{Timeout: 5 * time.Second},
	}
}

// defaults gives the fields left zero their DefaultConfig value. Enabled and FailOpen are left as
// they are: false is a choice.
func (c *Config) defaults() {
	d := DefaultConfig()
	if len(c.Thresholds) == 0 {
		c.Thresholds = d.Thresholds
	}
	// In order, each once: alerts of one crossing are recorded in this order ("100,80" warned after
	// it said exceeded).
	c.Thresholds = slices.Compact(slices.Sorted(slices.Values(c.Thresholds)))
	if c.LabelCap <= 0 {
		c.LabelCap = d.LabelCap
	}
	if c.ReconcileEvery <= 0 {
		c.ReconcileEvery = d.ReconcileEvery
	}
}
