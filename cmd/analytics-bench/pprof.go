package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"time"
)

// Profiling the real binary. analyticsd serves no pprof endpoint, and the bench may not change it, so
// with --pprof DIR the bench compiles analyticsd with one extra file passed through `go build
// -overlay` (the checkout is untouched): when BENCH_PPROF_ADDR is set, it listens there and starts and
// stops CPU profiles on request. Everything else is the exact binary and wiring that ships.
const pprofOverlaySource = `package main

import (
	"io"
	"net/http"
	"os"
	"runtime"
	"runtime/pprof"
	"runtime/trace"
	"sync"
)

// Added by cmd/analytics-bench through go build -overlay; never part of the checkout.
func init() {
	addr := os.Getenv("BENCH_PPROF_ADDR")
	if addr == "" {
		return
	}
	var mu sync.Mutex
	mux := http.NewServeMux()
	// record serves /<name>/start?file=F (start writing into F) and /<name>/stop.
	record := func(name string, start func(io.Writer) error, stop func()) {
		var f *os.File
		mux.HandleFunc("/"+name+"/start", func(w http.ResponseWriter, r *http.Request) {
			mu.Lock()
			defer mu.Unlock()
			var err error
			if f, err = os.Create(r.URL.Query().Get("file")); err == nil {
				err = start(f)
			}
			if err != nil {
				http.Error(w, err.Error(), 500)
			}
		})
		mux.HandleFunc("/"+name+"/stop", func(w http.ResponseWriter, r *http.Request) {
			mu.Lock()
			defer mu.Unlock()
			stop()
			if f != nil {
				f.Close()
				f = nil
			}
		})
	}
	record("cpu", pprof.StartCPUProfile, pprof.StopCPUProfile)
	record("trace", trace.Start, trace.Stop)
	mux.HandleFunc("/allocs", func(w http.ResponseWriter, r *http.Request) {
		runtime.GC()
		out, err := os.Create(r.URL.Query().Get("file"))
		if err == nil {
			err = pprof.Lookup("allocs").WriteTo(out, 0)
			out.Close()
		}
		if err != nil {
			http.Error(w, err.Error(), 500)
		}
	})
	go http.ListenAndServe(addr, mux)
}
`

// pprofOverlay writes the overlay file and its JSON map into dir; the result is go build's -overlay.
func pprofOverlay(root, dir string) (string, error) {
	src := filepath.Join(dir, "bench_pprof.go")
	if err := os.WriteFile(src, []byte(pprofOverlaySource), 0o644); err != nil {
		return "", err
	}
	m := map[string]map[string]string{"Replace": {filepath.Join(root, "cmd", "analyticsd", "zz_bench_pprof.go"): src}}
	b, _ := json.Marshal(m)
	overlay := filepath.Join(dir, "overlay.json")
	return overlay, os.WriteFile(overlay, b, 0o644)
}

// profiler drives the overlay's endpoints; a nil profiler does nothing.
type profiler struct {
	addr string
	dir  string
}

func (p *profiler) call(ctx context.Context, path, file string) error {
	if p == nil {
		return nil
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+p.addr+path+"?file="+url.QueryEscape(file), nil)
	if err != nil {
		return err
	}
	c := &http.Client{Timeout: time.Minute}
	resp, err := c.Do(req)
	if err != nil {
		return fmt.Errorf("pprof %s: %w", path, err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("pprof %s: status %d", path, resp.StatusCode)
	}
	return nil
}

// cpu profiles fn's duration into DIR/<name>.cpu.pprof and DIR/<name>.allocs.pprof.
func (p *profiler) cpu(ctx context.Context, s *Scenario, name string, fn func() error) error {
	if p == nil {
		return fn()
	}
	file := filepath.Join(p.dir, name+".cpu.pprof")
	err := p.around(ctx, "cpu", file, fn)
	if errors.Is(err, errNotStarted) {
		return err
	}
	allocs := filepath.Join(p.dir, name+".allocs.pprof")
	if aerr := p.call(context.Background(), "/allocs", allocs); aerr != nil && err == nil {
		err = aerr
	}
	s.note("profiles: %s, %s (go tool pprof -top %s)", file, allocs, file)
	return err
}

// trace records an execution trace of the server for fn's duration into DIR/<name>.trace: where a
// slow request waited (run queue, system call, network, lock) is in it, which a CPU profile cannot
// say (go tool trace -pprof=sched|syscall|net|sync DIR/<name>.trace).
func (p *profiler) trace(ctx context.Context, s *Scenario, name string, fn func() error) error {
	if p == nil {
		return fn()
	}
	file := filepath.Join(p.dir, name+".trace")
	err := p.around(ctx, "trace", file, fn)
	s.note("execution trace: %s (go tool trace %s)", file, file)
	return err
}

// errNotStarted marks around's error when the recording never started (fn did not run).
var errNotStarted = errors.New("recording not started")

// around has the server record kind ("cpu", "trace") into file while fn runs.
func (p *profiler) around(ctx context.Context, kind, file string, fn func() error) error {
	if err := p.call(ctx, "/"+kind+"/start", file); err != nil {
		return fmt.Errorf("%w: %w", errNotStarted, err)
	}
	err := fn()
	if serr := p.call(context.Background(), "/"+kind+"/stop", ""); serr != nil && err == nil {
		err = serr
	}
	return err
}

func (b *bench) pprofSetup() (*profiler, error) {
	dir, err := filepath.Abs(b.opt.pprofDir)
	if err != nil {
		return nil, err
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	addr, err := freeAddr()
	if err != nil {
		return nil, err
	}
	return &profiler{addr: addr, dir: dir}, nil
}
