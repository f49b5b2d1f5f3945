package spool

import (
	"bufio"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// TestKillDuringAppendsLosesNothingAcknowledged runs a child process that appends records as fast
// as it can, printing each one's number once Append returned (acknowledged), then kills it with
// SIGKILL at a random moment, several times over one directory. Every acknowledged record must
// come back intact, in order, and nothing else but at most the one record in flight.
func TestKillDuringAppendsLosesNothingAcknowledged(t *testing.T) {
	if os.Getenv("SPOOL_CRASH_CHILD") != "" {
		t.Skip("child process")
	}
	dir := t.TempDir()
	var acked []string
	for round := 0; round < 5; round++ {
		cmd := exec.Command(os.Args[0], "-test.run=^TestSpoolCrashChild$", "-test.v")
		cmd.Env = append(os.Environ(), "SPOOL_CRASH_CHILD="+dir, "SPOOL_CRASH_ROUND="+strconv.Itoa(round))
		out, err := cmd.StdoutPipe()
		if err != nil {
			t.Fatal(err)
		}
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		sc := bufio.NewScanner(out)
		// The kill comes a random moment after the child's first acknowledgement (not after its
		// start, which a loaded machine can make slower than any fixed delay).
		var deadline <-chan time.Time
		lines := make(chan string)
		go func() {
			for sc.Scan() {
				lines <- sc.Text()
			}
			close(lines)
		}()
		killed := false
	read:
		for {
			select {
			case l, ok := <-lines:
				if !ok {
					break read
				}
				if rec, found := strings.CutPrefix(l, "ack "); found {
					acked = append(acked, rec)
					if deadline == nil && !killed {
						deadline = time.After(time.Duration(20+rand.IntN(150)) * time.Millisecond)
					}
				}
			case <-deadline:
				cmd.Process.Signal(syscall.SIGKILL)
				deadline, killed = nil, true
			}
		}
		cmd.Wait()
	}
	if len(acked) < 20 {
		t.Fatalf("only %d records acknowledged across 5 runs; the child did not run", len(acked))
	}
	s := open(t, dir, nil)
	var got []string
	for _, g := range s.Recovered() {
		r, err := g.Open()
		if err != nil {
			t.Fatal(err)
		}
		for r.Next() {
			rec := string(r.Record())
			if round, i, ok := strings.Cut(rec, "-"); !ok || strings.Trim(round+i, "0123456789") != "" {
				t.Fatalf("segment %d holds a garbled record %q", g.Seq, rec)
			}
			got = append(got, rec)
		}
		r.Close()
	}
	have := map[string]bool{}
	for _, v := range got {
		if have[v] {
			t.Errorf("record %s replayed twice", v)
		}
		have[v] = true
	}
	for _, v := range acked {
		if !have[v] {
			t.Errorf("acknowledged record %s lost", v)
		}
	}
	if extra := len(got) - len(acked); extra < 0 || extra > 5 {
		t.Errorf("%d records replayed for %d acknowledged: at most one unacknowledged per kill may remain", len(got), len(acked))
	}
}

// TestSpoolCrashChild is the child of the test above; it does nothing on its own.
func TestSpoolCrashChild(t *testing.T) {
	dir := os.Getenv("SPOOL_CRASH_CHILD")
	if dir == "" {
		t.Skip("only run as the child of TestKillDuringAppendsLosesNothingAcknowledged")
	}
	round := os.Getenv("SPOOL_CRASH_ROUND")
	s, err := Open(Options{Dir: dir, Sync: true, Format: 2})
	if err != nil {
		fmt.Println("open:", err)
		os.Exit(1)
	}
	g, err := s.Create()
	if err != nil {
		fmt.Println("create:", err)
		os.Exit(1)
	}
	for i := 0; ; i++ {
		if i%50 == 49 {
			g.Seal()
			if g, err = s.Create(); err != nil {
				fmt.Println("create:", err)
				os.Exit(1)
			}
		}
		rec := round + "-" + strconv.Itoa(i)
		if err := g.Append(frame(rec)); err != nil {
			fmt.Println("append:", err)
			os.Exit(1)
		}
		fmt.Println("ack " + rec)
	}
}
