package rollup

import (
	"github.com/prometheus/client_golang/prometheus"

	"github.com/analyticsd/analyticsd/schema"
)

// reconcileMetrics are the Reconciler's collectors: the contract's run counter and duration
// histogram (docs/contract.md has why the names start with sbh_), and how many aggregate rows had to
// be repaired.
type reconcileMetrics struct {
	runs     *prometheus.CounterVec // sbh_analytics_rollup_runs_total{status}
	duration prometheus.Histogram   // sbh_analytics_rollup_duration_seconds
	repairs  prometheus.Counter     // sbh_analytics_rollup_repairs_total
}

func newReconcileMetrics(reg prometheus.Registerer) *reconcileMetrics {
	m := &reconcileMetrics{
		runs: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "sbh_analytics_rollup_runs_total", Help: "Rollup runs (one date, all tenants or one), by status: ok or failed.",
		}, []string{"status"}),
		duration: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "sbh_analytics_rollup_duration_seconds", Help: "Duration of one rollup run (one date).",
			Buckets: prometheus.ExponentialBuckets(0.01, 2.5, 12),
		}),
		repairs: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "sbh_analytics_rollup_repairs_total",
			Help: "ClickHouse daily_usage rows (tenant, date, metric) found to differ from the raw events and corrected.",
		}),
	}
	// Both statuses exist from the start, so rate() and alerts see a zero rather than no series.
	m.runs.WithLabelValues("ok")
	m.runs.WithLabelValues("failed")
	if reg != nil {
		reg.MustRegister(m.runs, m.duration, m.repairs)
	}
	return m
}

// sweepMetrics are the Sweeper's collectors.
type sweepMetrics struct {
	dropped *prometheus.CounterVec // sbh_analytics_retention_partitions_dropped_total{table}
	failed  prometheus.Counter     // sbh_analytics_retention_sweep_failures_total
}

func newSweepMetrics(reg prometheus.Registerer) *sweepMetrics {
	m := &sweepMetrics{
		dropped: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "sbh_analytics_retention_partitions_dropped_total",
			Help: "Daily partitions of raw tables (and usage_quarter_hour) dropped by the retention sweeper, by table.",
		}, []string{"table"}),
		failed: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "sbh_analytics_retention_sweep_failures_total", Help: "Retention sweeps that failed.",
		}),
	}
	for _, t := range schema.Retained {
		m.dropped.WithLabelValues(t.Name)
	}
	if reg != nil {
		reg.MustRegister(m.dropped, m.failed)
	}
	return m
}
