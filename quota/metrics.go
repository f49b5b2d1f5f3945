package quota

import "github.com/prometheus/client_golang/prometheus"

// metrics are quota's collectors: the contract's sbh_quota_exceeded_total (docs/contract.md has why
// the names start with sbh_), alerts by threshold, the alert webhook's outcomes (RunWebhooks), and
// the periodic reconciliation (RunReconciler).
type metrics struct {
	exceeded         *prometheus.CounterVec // sbh_quota_exceeded_total{tenant,metric}
	alerts           *prometheus.CounterVec // sbh_quota_alerts_total{threshold}
	reconcileSeconds prometheus.Histogram   // sbh_quota_reconcile_seconds
	reconcileChanged prometheus.Counter     // sbh_quota_reconcile_changed_total
	webhooks         *prometheus.CounterVec // sbh_quota_alert_webhooks_total{outcome}
}

// newMetrics builds the collectors and registers them with reg unless it is nil; counters' consume
// batcher is read at scrape time (sbh_quota_consume_redis_round_trips_total and
// sbh_quota_consume_scripts_total: their ratio is the consumes a round trip carried).
func newMetrics(reg prometheus.Registerer, counters *Counters) *metrics {
	m := &metrics{
		exceeded: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "sbh_quota_exceeded_total", Help: "Quotas that reached 100% of their limit (once per tenant, metric and day).",
		}, []string{"tenant", "metric"}),
		alerts: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "sbh_quota_alerts_total", Help: "Quota alerts fired, by threshold percent.",
		}, []string{"threshold"}),
		reconcileSeconds: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "sbh_quota_reconcile_seconds", Help: "Time of one reconciliation round of the live counters with ClickHouse.",
			Buckets: prometheus.ExponentialBuckets(0.005, 2, 12),
		}),
		reconcileChanged: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "sbh_quota_reconcile_changed_total", Help: "Live counters a reconciliation round changed (rows that reached ClickHouse without being counted live, or live counts taken back).",
		}),
		webhooks: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "sbh_quota_alert_webhooks_total", Help: "Alert webhook attempts, by outcome: delivered, retried (failed, due again later), abandoned (the last attempt failed).",
		}, []string{"outcome"}),
	}
	if reg != nil {
		reg.MustRegister(m.exceeded, m.alerts, m.reconcileSeconds, m.reconcileChanged, m.webhooks)
		if b := counters.batcher(); b != nil {
			reg.MustRegister(
				prometheus.NewCounterFunc(prometheus.CounterOpts{
					Name: "sbh_quota_consume_redis_round_trips_total", Help: "Round trips to Redis that the consume scripts went in, as sent (concurrent consumes share one; go-redis' own retries and redirections are not counted).",
				}, func() float64 { n, _ := b.Stats(); return float64(n) }),
				prometheus.NewCounterFunc(prometheus.CounterOpts{
					Name: "sbh_quota_consume_scripts_total", Help: "Consume scripts sent to Redis (sent again, and counted again: the EVAL after a NOSCRIPT, a script Redis refused before running it such as TRYAGAIN during a resharding).",
				}, func() float64 { _, n := b.Stats(); return float64(n) }))
		}
	}
	return m
}
