package zzexp

import (
	"bufio"
	"context"
	"io"
	"os"
	"runtime"
	"sync/atomic"
	"testing"
	"time"

	"github.com/ClickHouse/clickhouse-go/v2"
	"github.com/ClickHouse/clickhouse-go/v2/lib/driver"
	"github.com/google/uuid"

	"github.com/analyticsd/analyticsd/query"
)

type wrap struct {
	driver.Conn
	opts []clickhouse.QueryOption
}

func (w wrap) Query(ctx context.Context, q string, args ...any) (driver.Rows, error) {
	return w.Conn.Query(clickhouse.Context(ctx, w.opts...), q, args...)
}

func TestExportMemory(t *testing.T) {
	db, tenant := os.Getenv("EXP_DB"), uuid.MustParse(os.Getenv("EXP_TENANT"))
	ch, _ := clickhouse.Open(&clickhouse.Options{Addr: []string{"127.0.0.1:19000"}})
	variants := []struct {
		name string
		opts []clickhouse.QueryOption
	}{
		{"as shipped", nil},
		{"max_block_size=8192", []clickhouse.QueryOption{clickhouse.WithSettings(clickhouse.Settings{"max_execution_time": 30, "max_block_size": 8192})}},
		{"max_block_size=8192 + block buffer 1", []clickhouse.QueryOption{clickhouse.WithSettings(clickhouse.Settings{"max_execution_time": 30, "max_block_size": 8192}), clickhouse.WithBlockBufferSize(1)}},
		{"as shipped", nil},
	}
	r, _ := query.ParseRange("", "", time.Now())
	for _, v := range variants {
		runtime.GC()
		st := query.NewStore(wrap{ch, v.opts}, db, nil, 30*time.Second)
		var ms runtime.MemStats
		runtime.ReadMemStats(&ms)
		base := ms.HeapInuse
		var peak atomic.Uint64
		stop := make(chan struct{})
		go func() {
			for {
				var m runtime.MemStats
				runtime.ReadMemStats(&m)
				if m.HeapInuse > peak.Load() {
					peak.Store(m.HeapInuse)
				}
				select {
				case <-stop:
					return
				case <-time.After(5 * time.Millisecond):
				}
			}
		}()
		start := time.Now()
		exp, err := st.StartExport(query.EventFilter{Tenant: tenant, Range: r}, 1_000_000)
		if err != nil {
			t.Fatal(err)
		}
		w := bufio.NewWriterSize(io.Discard, 4096)
		n, err := exp.Write(w)
		close(stop)
		if err != nil {
			t.Fatal(err)
		}
		d := time.Since(start)
		t.Logf("%-40s rows=%d %.0f rows/s peak heap growth %.0f MiB", v.name, n, float64(n)/d.Seconds(), float64(peak.Load()-base)/(1<<20))
	}
}

func TestPageOneClamp(t *testing.T) {
	db, tenant := os.Getenv("EXP_DB"), uuid.MustParse(os.Getenv("EXP_TENANT"))
	ch, _ := clickhouse.Open(&clickhouse.Options{Addr: []string{"127.0.0.1:19000"}})
	st := query.NewStore(ch, db, nil, 30*time.Second)
	r, _ := query.ParseRange("", "", time.Now())
	clamped := r
	clamped.To = time.Now().Add(time.Second).Truncate(time.Second)
	for _, v := range []struct {
		name string
		r    query.Range
	}{{"range end (tomorrow 00:00)", r}, {"now + 1s", clamped}, {"range end (tomorrow 00:00)", r}, {"now + 1s", clamped}} {
		f := query.EventFilter{Tenant: tenant, Range: v.r, Limit: 100}
		var lat []time.Duration
		for i := 0; i < 60; i++ {
			s := time.Now()
			p, err := st.Events(context.Background(), f)
			if err != nil || len(p.Events) != 100 {
				t.Fatal(err)
			}
			lat = append(lat, time.Since(s))
		}
		slicesSort(lat)
		t.Logf("%-28s page 1 p50 %.1f ms p99 %.1f ms", v.name, float64(lat[30])/1e6, float64(lat[59])/1e6)
	}
}

func slicesSort(d []time.Duration) {
	for i := range d {
		for j := i + 1; j < len(d); j++ {
			if d[j] < d[i] {
				d[i], d[j] = d[j], d[i]
			}
		}
	}
}
