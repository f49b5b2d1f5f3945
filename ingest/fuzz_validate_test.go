package ingest

import (
	"encoding/json"
	"testing"
	"time"

	"github.com/google/uuid"
)

// FuzzValidate: any single event object either validates into a row that obeys every rule, or is
// refused with a message — never a panic, never a row that breaks a limit.
func FuzzValidate(f *testing.F) {
	for _, s := range []string{
		`{"event":"auth.user.login"}`,
		`{"event":"a.b","ts":1795780800000,"props":{"k":[1,{"x":null}]},"ip":"::ffff:1.2.3.4","user_id":"\u0000"}`,
		`{"event":"a.b","ts":"2026-11-27T11:59:59.999999999-00:30","source":"agent","id":"5f0c6d1e-8a1b-4c7e-9d2f-3a4b5c6d7e8f"}`,
		`{"event":"a.b","props":{"a":1,"a":2},"ts":-1}`,
		`{"event":"a.b","ts":1e308}`,
		`{"event":"a.b","tenant_id":"11111111-1111-4111-8111-111111111111"}`,
	} {
		f.Add([]byte(s))
	}
	tenant := uuid.MustParse("11111111-1111-4111-8111-111111111111")
	now := time.Date(2026, 11, 27, 12, 0, 0, 0, time.UTC)
	lim := DefaultLimits()
	f.Fuzz(func(t *testing.T, b []byte) {
		var e Event
		if json.Unmarshal(b, &e) != nil {
			return
		}
		r, err := lim.Validate(&e, tenant, now)
		if err != nil {
			if err.Error() == "" {
				t.Fatal("refusal without a message")
			}
			return
		}
		switch {
		case !ValidEventName(r.Event), !ValidSource(r.Source), r.TenantID != tenant, r.ID == uuid.Nil:
			t.Fatalf("accepted a bad row: %+v", r)
		case len(r.Props) > lim.MaxPropsBytes, !json.Valid([]byte(r.Props)), r.Props[0] != '{':
			t.Fatalf("accepted bad props %q", r.Props)
		case len(r.UserID) > lim.MaxUserID, len(r.RequestID) > lim.MaxRequestID:
			t.Fatalf("accepted an over-long id: %+v", r)
		case r.Ts.After(now.Add(lim.MaxFuture)), r.Ts.Before(now.AddDate(0, 0, -lim.RetentionDays)), r.Ts.Nanosecond() != 0:
			t.Fatalf("accepted ts %v", r.Ts)
		}
	})
}
