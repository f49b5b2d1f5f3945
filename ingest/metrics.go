package ingest

import (
	"sync/atomic"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/analyticsd/analyticsd/internal/labels"
)

// Metrics are the ingest path's Prometheus collectors: the contract's event and usage counters (docs/contract.md), and the
// writer's internals (buffer, spool, batches, errors).
type Metrics struct {
	Events        *prometheus.CounterVec // sbh_analytics_events_total{tenant,event,source}
	Usage         *prometheus.CounterVec // sbh_usage_count_total{tenant,metric}
	Rejected      *prometheus.CounterVec // events refused by validation, by reason
	Refused       *prometheus.CounterVec // requests answered 503, by reason
	BufferedRows  prometheus.Gauge
	SpoolBytes    prometheus.Gauge
	SpoolSegments prometheus.Gauge
	BatchRows     prometheus.Histogram
	FlushDuration prometheus.Histogram
	RowsWritten   prometheus.Counter
	InsertErrors  prometheus.Counter
	CounterErrors prometheus.Counter
	Duplicates    *prometheus.CounterVec // duplicates not stored, by where they were found
	CheckedRows   prometheus.Counter
	Quarantined   prometheus.Counter
	ClaimErrors   prometheus.Counter
	SpoolWrites   prometheus.Counter // group commits written to the spool (each one write and, with fsync, one fsync)
	SpoolAppends  prometheus.Counter // requests those writes carried

	tenants *labels.Capped
	// events caps the event and metric label values per tenant label: one tenant sending many
	// distinct names turns its own into "other", never another tenant's.
	events *labels.PerKey
	// quarantine reads the quarantine at scrape time (set by the writer that owns the spool).
	quarantine atomic.Pointer[func() (files, rows int)]
}

// NewMetrics builds and registers the collectors; reg may be nil (tests). labelCap bounds the distinct
// tenant and event label values (default 500): later values are counted under "other".
func NewMetrics(reg prometheus.Registerer, labelCap int) *Metrics {
	if labelCap <= 0 {
		labelCap = labels.DefaultCap
	}
	m := &Metrics{
		Events: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "sbh_analytics_events_total", Help: "Events accepted, by tenant, event and source.",
		}, []string{"tenant", "event", "source"}),
		Usage: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "sbh_usage_count_total", Help: "Usage counted, by tenant and metric (mapped events and explicit increments).",
		}, []string{"tenant", "metric"}),
		Rejected: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "sbh_ingest_rejected_events_total", Help: "Events refused by validation.",
		}, []string{"reason"}),
		Refused: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "sbh_ingest_unavailable_total", Help: "Ingest requests answered 503, by reason.",
		}, []string{"reason"}),
		BufferedRows: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "sbh_ingest_buffer_rows", Help: "Rows held in memory awaiting ClickHouse.",
		}),
		SpoolBytes: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "sbh_ingest_spool_bytes", Help: "Bytes in the on-disk spool awaiting ClickHouse.",
		}),
		SpoolSegments: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "sbh_ingest_spool_segments", Help: "Spool segments (batches) awaiting ClickHouse.",
		}),
		BatchRows: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "sbh_ingest_batch_rows", Help: "Rows per ClickHouse insert.",
			Buckets: prometheus.ExponentialBuckets(10, 4, 8),
		}),
		FlushDuration: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "sbh_ingest_flush_duration_seconds", Help: "Time to insert one batch into ClickHouse.",
			Buckets: prometheus.ExponentialBuckets(0.005, 2, 12),
		}),
		RowsWritten: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "sbh_ingest_rows_written_total", Help: "Rows inserted into ClickHouse.",
		}),
		InsertErrors: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "sbh_ingest_clickhouse_errors_total", Help: "Failed ClickHouse inserts (each is retried).",
		}),
		CounterErrors: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "sbh_ingest_counter_errors_total", Help: "Failed live quota counter updates (ingest goes on).",
		}),
		Duplicates: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "sbh_ingest_duplicates_total",
			Help: "Events and increments acknowledged but not stored again because their id was already taken: found at request time (request), when shipping (ship), or in ClickHouse itself (clickhouse).",
		}, []string{"stage"}),
		CheckedRows: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "sbh_ingest_checked_rows_total", Help: "Rows looked up in ClickHouse before insert (retried or replayed segments, unprovable claims).",
		}),
		Quarantined: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "sbh_ingest_quarantined_rows_total", Help: "Rows moved to the spool's quarantine because ClickHouse kept refusing them.",
		}),
		ClaimErrors: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "sbh_ingest_claim_errors_total", Help: "Requests whose ids could not be claimed at once (Redis unavailable); they are checked when shipped.",
		}),
		SpoolWrites: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "sbh_ingest_spool_writes_total", Help: "Group commits written to the spool: one write and, with INGEST_DURABILITY=fsync, one fsync each.",
		}),
		SpoolAppends: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "sbh_ingest_spool_appends_total", Help: "Requests carried by the spool's group commits (divided by sbh_ingest_spool_writes_total: requests per fsync).",
		}),
		tenants: labels.NewCapped(labelCap),
		events:  labels.NewPerKey(labelCap),
	}
	quarantined := func(rows bool) func() float64 {
		return func() float64 {
			f := m.quarantine.Load()
			if f == nil {
				return 0
			}
			files, n := (*f)()
			if rows {
				return float64(n)
			}
			return float64(files)
		}
	}
	if reg != nil {
		reg.MustRegister(m.Events, m.Usage, m.Rejected, m.Refused, m.BufferedRows, m.SpoolBytes, m.SpoolSegments,
			m.BatchRows, m.FlushDuration, m.RowsWritten, m.InsertErrors, m.CounterErrors, m.Duplicates, m.CheckedRows,
			m.Quarantined, m.ClaimErrors, m.SpoolWrites, m.SpoolAppends,
			prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "sbh_ingest_quarantine_rows", Help: "Rows in the spool's quarantine, waiting for `analyticsd spool requeue`."}, quarantined(true)),
			prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "sbh_ingest_quarantine_files", Help: "Files in the spool's quarantine."}, quarantined(false)))
	}
	return m
}
