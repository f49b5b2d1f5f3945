package ingest

// DefaultConfig returns the ingest API's documented defaults: ingest on, DefaultLimits, and events
// counted toward the quota metrics of DefaultEventMetrics. CounterEvery stays zero: the live counter
// feed picks its own interval (100 ms). The writer's defaults are DefaultWriterConfig.
func DefaultConfig() Config {
	return Config{Enabled: true, Limits: DefaultLimits(), EventMetrics: DefaultEventMetrics()}
}
