package query

import "github.com/prometheus/client_golang/prometheus"

// metrics are the read API's collectors, both named by the contract (docs/contract.md has why the
// names start with sbh_).
type metrics struct {
	duration *prometheus.HistogramVec // sbh_analytics_query_duration_seconds{endpoint}
	exports  *prometheus.CounterVec   // sbh_analytics_export_requests_total{tenant}
}

// newMetrics builds the collectors and registers them with reg unless it is nil.
func newMetrics(reg prometheus.Registerer) *metrics {
	m := &metrics{
		duration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name: "sbh_analytics_query_duration_seconds", Help: "Read API query duration, by endpoint.",
			Buckets: prometheus.ExponentialBuckets(0.001, 2, 15),
		}, []string{"endpoint"}),
		exports: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "sbh_analytics_export_requests_total", Help: "Export requests (CSV and NDJSON pages), by tenant.",
		}, []string{"tenant"}),
	}
	if reg != nil {
		reg.MustRegister(m.duration, m.exports)
	}
	return m
}
