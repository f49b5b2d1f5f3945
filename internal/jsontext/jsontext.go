// Package jsontext appends JSON text to byte slices without reflection, for the hot loops that
// write many small JSON values: the NDJSON and CSV exports and the benchmark's event generator.
package jsontext

import (
	"unicode/utf8"

	"github.com/google/uuid"
)

// AppendUUID appends id in its canonical text form (8-4-4-4-12 lowercase hex), unquoted, without
// the allocation of id.String().
func AppendUUID(b []byte, id uuid.UUID) []byte {
	const hex = "0123456789abcdef"
	for i, x := range id {
		if i == 4 || i == 6 || i == 8 || i == 10 {
			b = append(b, '-')
		}
		b = append(b, hex[x>>4], hex[x&0x0f])
	}
	return b
}

// AppendString appends s as a JSON string: quotes, backslashes and control characters escaped,
// invalid UTF-8 as U+FFFD (as encoding/json does), everything else as is. Runs that need no escaping
// are copied whole.
func AppendString(b []byte, s string) []byte {
	const hex = "0123456789abcdef"
	b = append(b, '"')
	start := 0
	for i := 0; i < len(s); {
		c := s[i]
		if c < utf8.RuneSelf {
			if c >= 0x20 && c != '"' && c != '\\' {
				i++
				continue
			}
			b = append(b, s[start:i]...)
			switch c {
			case '"', '\\':
				b = append(b, '\\', c)
			case '\n':
				b = append(b, '\\', 'n')
			case '\r':
				b = append(b, '\\', 'r')
			case '\t':
				b = append(b, '\\', 't')
			default:
				b = append(b, '\\', 'u', '0', '0', hex[c>>4], hex[c&0xf])
			}
			i++
			start = i
			continue
		}
		r, size := utf8.DecodeRuneInString(s[i:])
		if r == utf8.RuneError && size == 1 {
			b = append(b, s[start:i]...)
			b = append(b, "\uFFFD"...)
			i++
			start = i
			continue
		}
		i += size
	}
	b = append(b, s[start:]...)
	return append(b, '"')
}
