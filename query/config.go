package query

import (
	"time"

	"github.com/analyticsd/analyticsd/internal/labels"
)

// DefaultTimeout is a read's ClickHouse max_execution_time when NewStore is given none
// (ANALYTICS_QUERY_TIMEOUT).
const DefaultTimeout = 30 * time.Second

// DefaultConfig returns the documented defaults: export pages of 50,000 rows.
func DefaultConfig() Config {
	return Config{MaxExportRows: 50_000, LabelCap: labels.DefaultCap}
}

// defaults gives the fields left zero their DefaultConfig value.
func (c *Config) defaults() {
	d := DefaultConfig()
	if c.MaxExportRows <= 0 {
		c.MaxExportRows = d.MaxExportRows
	}
	if c.LabelCap <= 0 {
		c.LabelCap = d.LabelCap
	}
}
