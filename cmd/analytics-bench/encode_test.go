package main

import (
	"encoding/json"
	"testing"
	"time"

	"github.com/google/uuid"
)

func TestEncodersProduceTheGuidesShapes(t *testing.T) {
	g := NewGenerator(3, testBase, 50)
	var e Event
	g.Fill(&e, streamMain, 11)

	var rest struct {
		ID, Event, UserID, Source, Ts, IP, RequestID string
		Props                                        map[string]any
	}
	b := appendRESTEvent(nil, &e)
	if err := json.Unmarshal(b, &struct {
		ID        *string         `json:"id"`
		Event     *string         `json:"event"`
		UserID    *string         `json:"user_id"`
		Source    *string         `json:"source"`
		Ts        *string         `json:"ts"`
		Props     *map[string]any `json:"props"`
		IP        *string         `json:"ip"`
		RequestID *string         `json:"request_id"`
	}{&rest.ID, &rest.Event, &rest.UserID, &rest.Source, &rest.Ts, &rest.Props, &rest.IP, &rest.RequestID}); err != nil {
		t.Fatalf("REST event is not JSON: %v\n%s", err, b)
	}
	ts, err := time.Parse(time.RFC3339, rest.Ts)
	if err != nil || ts.Unix() != e.Ts {
		t.Errorf("ts %q does not encode %d", rest.Ts, e.Ts)
	}
	if rest.ID != e.ID.String() || rest.Event != e.Name() || rest.Source != e.Source() || rest.UserID != e.UserID || len(rest.Props) == 0 {
		t.Errorf("REST event %s does not match %+v", b, e)
	}

	tenant := uuid.MustParse("5f0c6d1e-8a1b-4c7e-9d2f-3a4b5c6d7e8f")
	var raw map[string]string
	rb := appendRawRow(nil, &e, tenant, testBase)
	if rb[len(rb)-1] != '\n' {
		t.Fatal("JSONEachRow row must end with a newline")
	}
	if err := json.Unmarshal(rb, &raw); err != nil {
		t.Fatalf("raw row is not a JSON object of strings: %v\n%s", err, rb)
	}
	want := map[string]string{"tenant_id": tenant.String(), "id": e.ID.String(), "event": e.Name(), "source": e.Source(),
		"user_id": e.UserID, "props": e.Props, "ip": e.IP, "request_id": e.RequestID,
		"ts": time.Unix(e.Ts, 0).UTC().Format("2006-01-02 15:04:05"), "received_at": time.Unix(testBase, 0).UTC().Format("2006-01-02 15:04:05")}
	for k, v := range want {
		if raw[k] != v {
			t.Errorf("raw row %s = %q, want %q", k, raw[k], v)
		}
	}
	if len(raw) != len(want) {
		t.Errorf("raw row has %d columns, want %d (analyticsd's events table)", len(raw), len(want))
	}
}

func TestEncodeBatchIsAJSONArray(t *testing.T) {
	g := NewGenerator(3, testBase, 50)
	ev := make([]Event, 3)
	for i := range ev {
		g.Fill(&ev[i], streamMain, uint64(i))
	}
	var out []map[string]any
	if err := json.Unmarshal(encodeBatch(ev, []int32{0, 2}), &out); err != nil || len(out) != 2 {
		t.Fatalf("batch: %v, %d items", err, len(out))
	}
	if out[1]["id"] != ev[2].ID.String() {
		t.Error("batch holds the wrong events")
	}
}
