// Package labels bounds Prometheus label values: a tenant flood or a typo storm must not turn into
// unbounded time series.
package labels

import "sync"

// DefaultCap is how many distinct values a tenant or event label admits unless METRICS_LABEL_CAP
// says otherwise: enough for a fleet of tenants, few enough that a flood cannot blow up the series.
const DefaultCap = 500

// Capped keeps at most n distinct label values; once full, new values read as "other".
type Capped struct {
	mu   sync.RWMutex
	n    int
	seen map[string]struct{}
}

// NewCapped returns a Capped admitting n distinct values.
func NewCapped(n int) *Capped { return &Capped{n: n, seen: map[string]struct{}{}} }

// Value returns v if it is (or can become) one of the admitted values, else "other".
func (c *Capped) Value(v string) string {
	c.mu.RLock()
	_, ok := c.seen[v]
	c.mu.RUnlock()
	if ok {
		return v
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if _, ok := c.seen[v]; ok {
		return v
	}
	if len(c.seen) >= c.n {
		return "other"
	}
	c.seen[v] = struct{}{}
	return v
}
