package segment

import (
	"bytes"
	"encoding/json"
	"fmt"
	"reflect"
	"strings"

	"github.com/analyticsd/analyticsd/internal/excerpt"
)

// The JSON names of the fields a message and a batch body are read into.
var (
	messageFields = jsonNames(message{})
	batchFields   = jsonNames(batch{})
)

func jsonNames(v any) []string {
	t := reflect.TypeOf(v)
	names := make([]string, 0, t.NumField())
	for i := range t.NumField() {
		if name, _, _ := strings.Cut(t.Field(i).Tag.Get("json"), ","); name != "" && name != "-" {
			names = append(names, name)
		}
	}
	return names
}

// strictKeys refuses, in a JSON object's own keys, one sent twice and one that spells a field of
// fields in another case. encoding/json takes the last of two equal keys and matches keys without
// regard to case, so before, {"batch":[A],"batch":[B]} stored B and dropped A without a word, and
// "UserID" overrode "userId". Segment's fields are case-sensitive; other keys pass (Segment's
// libraries send many analyticsd does not read). What is not an object is left to the decoding
// that follows, which names the problem.
func strictKeys(raw []byte, fields []string) error {
	dec := json.NewDecoder(bytes.NewReader(raw))
	if tok, err := dec.Token(); err != nil || tok != json.Delim('{') {
		return nil
	}
	seen := make(map[string]bool, 16)
	for dec.More() {
		tok, err := dec.Token()
		if err != nil {
			return nil
		}
		k, _ := tok.(string)
		if seen[k] {
			return fmt.Errorf("key %q appears twice; send each field once", excerpt.Short(k))
		}
		seen[k] = true
		for _, f := range fields {
			if k != f && strings.EqualFold(k, f) {
				return fmt.Errorf("key %q: Segment's field is %q (field names are case-sensitive)", excerpt.Short(k), f)
			}
		}
		var skip json.RawMessage
		if err := dec.Decode(&skip); err != nil {
			return nil
		}
	}
	return nil
}
