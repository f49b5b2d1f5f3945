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

// PerKey keeps a Capped of n values for each key (a tenant's label value): one key's flood of new
// values fills its own cap only, never another's. Keys should come from a Capped themselves, so
// that they are bounded too.
type PerKey struct {
	mu   sync.RWMutex
	n    int
	caps map[string]*Capped
}

// NewPerKey returns a PerKey admitting n distinct values per key.
func NewPerKey(n int) *PerKey { return &PerKey{n: n, caps: map[string]*Capped{}} }

// Value returns v if it is (or can become) one of key's admitted values, else "other".
func (p *PerKey) Value(key, v string) string {
	p.mu.RLock()
	c := p.caps[key]
	p.mu.RUnlock()
	if c == nil {
		p.mu.Lock()
		if c = p.caps[key]; c == nil {
			c = NewCapped(p.n)
			p.caps[key] = c
		}
		p.mu.Unlock()
	}
	return c.Value(v)
}
