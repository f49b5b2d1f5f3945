package main

import (
	"context"
	"log/slog"
	"sync/atomic"
	"time"
)

// watch re-checks one assumption analyticsd relies on but does not enforce (instance clocks close
// together, a Redis that never evicts claims), at start-up and every interval, and keeps what is
// wrong for /readiness — a warning: the instance still serves — and the log, once when it appears
// and once when it clears.
type watch struct {
	name string // what is watched, for the log line when it clears
	// check answers the warning, "" when all is well; ok false when it could not tell (the
	// previous answer stands).
	check   func(context.Context) (warning string, ok bool)
	log     *slog.Logger
	warning atomic.Pointer[string]
}

// once checks now, within 2 s.
func (w *watch) once(ctx context.Context) {
	ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	msg, ok := w.check(ctx)
	if !ok {
		return
	}
	if prev := w.warning.Swap(&msg); msg != "" && (prev == nil || *prev == "") {
		w.log.Warn(msg)
	} else if msg == "" && prev != nil && *prev != "" {
		w.log.Info(w.name + ": no longer a concern")
	}
}

// Warning is the latest answer's warning, or "".
func (w *watch) Warning() string {
	if p := w.warning.Load(); p != nil {
		return *p
	}
	return ""
}

// runWatches checks each watch every interval until ctx ends.
func runWatches(ctx context.Context, every time.Duration, ws ...*watch) {
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			for _, w := range ws {
				w.once(ctx)
			}
		}
	}
}
