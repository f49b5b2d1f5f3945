package jsontext

import (
	"encoding/json"
	"strings"
	"testing"

	"github.com/google/uuid"
)

// NDJSON strings are lossless: whatever encoding/json makes of a string, AppendString matches.
func TestJSONString(t *testing.T) {
	for _, in := range []string{"", "plain", `q"uote`, `back\slash`, "nl\nr\rt\t", "\x00\x01\x1f\x7f", "用户", "bad\xffutf8", "</script>"} {
		got := AppendString(nil, in)
		var back string
		if err := json.Unmarshal(got, &back); err != nil {
			t.Errorf("%q encoded as %s, not JSON: %v", in, got, err)
			continue
		}
		want := strings.ToValidUTF8(in, "\uFFFD")
		if back != want {
			t.Errorf("%q round-trips as %q, want %q", in, back, want)
		}
	}
}

func TestAppendUUID(t *testing.T) {
	id := uuid.MustParse("0190b0b0-1234-7abc-8def-0123456789ab")
	if got := string(AppendUUID([]byte("x"), id)); got != "x"+id.String() {
		t.Errorf("AppendUUID = %q, want x%s", got, id)
	}
}
