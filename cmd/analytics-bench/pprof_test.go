package main

import (
	"context"
	"testing"
)

// The profiling hook is source in a string, compiled only when a run asks for --pprof: a mistake in
// it (an import left out) would surface in the middle of someone's benchmark. Build it here.
func TestPprofOverlayBuilds(t *testing.T) {
	if testing.Short() {
		t.Skip("compiles analyticsd")
	}
	root, err := moduleRoot()
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	overlay, err := pprofOverlay(root, dir)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := buildAnalyticsd(context.Background(), root, dir, overlay); err != nil {
		t.Fatal(err)
	}
}
