package ingest

import (
	"encoding/json"
	"fmt"
	"slices"
	"sort"
	"strings"

	"github.com/analyticsd/analyticsd/internal/excerpt"
)

// eventFields are the fields an event object may have, in the order error messages list them.
// tenant_id is known only to be refused by Validate with its own message.
var eventFields = []string{"id", "event", "user_id", "source", "ts", "props", "ip", "request_id", "tenant_id"}

// usageFields are the fields of a POST /usage body.
var usageFields = []string{"metric", "n", "value"}

// fieldSynonyms are the names other tracking APIs (Segment, Mixpanel, Amplitude, PostHog) and habit
// give analyticsd's fields, so an unknown one can be answered with the field it probably meant.
var fieldSynonyms = map[string]string{
	"userid": "user_id", "user": "user_id", "uid": "user_id", "distinctid": "user_id", "anonymousid": "user_id",
	"timestamp": "ts", "time": "ts", "createdat": "ts", "occurredat": "ts", "sentat": "ts", "date": "ts",
	"properties": "props", "property": "props", "data": "props", "attributes": "props", "traits": "props", "context": "props",
	"name": "event", "type": "event", "action": "event", "eventname": "event", "eventtype": "event",
	"messageid": "id", "eventid": "id", "uuid": "id", "insertid": "id",
	"ipaddress": "ip", "requestid": "request_id", "reqid": "request_id",
	"count": "n", "amount": "n", "quantity": "n", "increment": "n", "by": "n", "level": "value",
}

// squash folds a field name for comparison: lowercase, without '_', '-' or '$' (userId, user-id and
// $user_id all read "userid").
func squash(s string) string {
	return strings.Map(func(r rune) rune {
		switch r {
		case '_', '-', '$', ' ':
			return -1
		}
		return r
	}, strings.ToLower(s))
}

// didYouMean names the known field an unknown one probably meant, or "".
func didYouMean(field string, known []string) string {
	sq := squash(field)
	for _, k := range known {
		if squash(k) == sq {
			return k
		}
	}
	if k, ok := fieldSynonyms[sq]; ok && slices.Contains(known, k) {
		return k
	}
	return ""
}

// unknownField returns an error naming the first field of JSON object b (in sorted order, so the
// message is stable) that is not one of known, with the field it probably meant; nil when every
// field is known or b is not an object (other errors are reported elsewhere). Names match exactly:
// "Event" or "userId" are refused, not read as event and user_id.
func unknownField(b []byte, known []string) error {
	var obj map[string]json.RawMessage
	if err := json.Unmarshal(b, &obj); err != nil {
		return nil
	}
	var unknown []string
	for k := range obj {
		if !slices.Contains(known, k) {
			unknown = append(unknown, k)
		}
	}
	if len(unknown) == 0 {
		return nil
	}
	sort.Strings(unknown)
	f := unknown[0]
	msg := fmt.Sprintf("unknown field %q", excerpt.Short(f))
	if m := didYouMean(f, known); m != "" {
		msg += fmt.Sprintf(" (did you mean %q?)", m)
	}
	if len(unknown) > 1 {
		msg += fmt.Sprintf(" and %d more unknown", len(unknown)-1)
	}
	listed := make([]string, 0, len(known))
	for _, k := range known {
		if k != "tenant_id" { // known only to be refused
			listed = append(listed, k)
		}
	}
	return fmt.Errorf("%s; the fields are %s", msg, strings.Join(listed, ", "))
}

// setField names a field of e that was set, or "" when none was.
func (e *Event) setField() string {
	switch {
	case e.ID != "":
		return "id"
	case e.Event != "":
		return "event"
	case e.UserID != "":
		return "user_id"
	case e.Source != "":
		return "source"
	case e.Ts != nil:
		return "ts"
	case e.Props != nil:
		return "props"
	case e.IP != "":
		return "ip"
	case e.RequestID != "":
		return "request_id"
	case e.TenantID != "":
		return "tenant_id"
	}
	return ""
}
