package ingest

import (
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/analyticsd/analyticsd/ingest/spool"
)

func TestScrubQuarantine(t *testing.T) {
	sp, err := spool.Open(spool.Options{Dir: t.TempDir(), Format: recordFormat})
	if err != nil {
		t.Fatal(err)
	}
	defer sp.Close()
	a, b := uuid.New(), uuid.New()
	ev := func(tn uuid.UUID, user string) Row {
		return Row{ID: uuid.New(), TenantID: tn, Ts: time.Unix(1764460800, 0), ReceivedAt: time.Unix(1764460800, 0), Event: "auth.user.login",
			Source: "app", UserID: user, Props: `{"email":"` + user + `@example.com"}`}
	}
	inc := Increment{ID: uuid.New(), TenantID: a, Ts: time.Unix(1764460800, 0), Metric: "api_requests_daily", N: 3}
	recs := [][]byte{
		appendRecord(nil, 7, []Row{ev(a, "alice"), ev(a, "bob"), ev(b, "alice")}, []Increment{inc})[spool.FrameOverhead:],
		appendRecord(nil, 8, []Row{ev(a, "alice")}, nil)[spool.FrameOverhead:],
	}
	if _, err := sp.Quarantine(spool.QuarantineInfo{Segment: "s1", Reason: "refused", Events: 4, Increments: 1}, recs); err != nil {
		t.Fatal(err)
	}
	rows := func() (out []string, infos []spool.QuarantineInfo) {
		t.Helper()
		infos, err := spool.ListQuarantine(sp.Dir())
		if err != nil {
			t.Fatal(err)
		}
		for _, q := range infos {
			r, info, err := spool.OpenQuarantine(sp.Dir(), q.Name)
			if err != nil {
				t.Fatal(err)
			}
			for r.Next() {
				_, events, incs, err := decodeRecord(r.Record(), info.Format, nil, nil)
				if err != nil {
					t.Fatal(err)
				}
				for _, e := range events {
					who := "a"
					if e.TenantID == b {
						who = "b"
					}
					out = append(out, who+"/"+e.UserID)
				}
				for range incs {
					out = append(out, "a/increment")
				}
			}
			r.Close()
		}
		return out, infos
	}
	if n, err := ScrubQuarantine(sp, a, "alice"); err != nil || n != 2 {
		t.Fatalf("scrub alice of a: got %d %v, want 2 rows removed", n, err)
	}
	got, infos := rows()
	if want := "[a/bob b/alice a/increment]"; len(infos) != 1 || fmtRows(got) != want || infos[0].Events != 2 || infos[0].Increments != 1 {
		t.Errorf("after scrubbing alice of a: got %v in %d files (%+v), want %s in one file with 2 events and 1 increment", got, len(infos), infos, want)
	}
	if n, err := ScrubQuarantine(sp, a, "alice"); err != nil || n != 0 {
		t.Errorf("a second scrub: got %d %v, want nothing removed", n, err)
	}
	if n, err := ScrubQuarantine(sp, a, ""); err != nil || n != 2 {
		t.Errorf("scrub tenant a: got %d %v, want 2 rows (bob's event and the increment)", n, err)
	}
	if got, _ := rows(); fmtRows(got) != "[b/alice]" {
		t.Errorf("after scrubbing tenant a: got %v, want b's alice only", got)
	}
	if n, err := ScrubQuarantine(sp, b, ""); err != nil || n != 1 {
		t.Errorf("scrub tenant b: got %d %v, want 1", n, err)
	}
	if _, infos := rows(); len(infos) != 0 {
		t.Errorf("an emptied file is removed, got %d files", len(infos))
	}
}

func fmtRows(rows []string) string {
	s := "["
	for i, r := range rows {
		if i > 0 {
			s += " "
		}
		s += r
	}
	return s + "]"
}
