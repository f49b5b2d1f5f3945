package api

import (
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
)

// rawRequest matches reads that go around fiber to fasthttp's request, where Immutable does not
// reach: what they return is a view into a pooled buffer.
var rawRequest = regexp.MustCompile(`\.Request\(\)\.|\.Context\(\)\.(QueryArgs|PostArgs|Request|URI)|\.Peek(Multi|Bytes)?\(`)

// rawAllowed lists every such read, each checked to keep nothing past its handler: the ingest body
// is decoded into fresh values (the decoder copies strings, Validate copies ts and props; the usage
// body's field check decodes into a fresh map, and so does quota's level part of it; the usage body's
// gunzip copies the Content-Encoding with string(...) before deleting it, and SetBody copies the
// decompressed body into the request), the idempotency middleware hashes the request,
// metric[] values and the repeated- and unknown-parameter checks' keys are converted with string(...), and the
// export's Link header is built from a copy of the query arguments (fasthttp.Args.CopyTo); Stream
// reads only whether the request is HTTP/1.1 (a bool); segment reads its body (twice: the writeKey,
// then the messages) into fresh values — json.Unmarshal copies, a single call's body is cloned —
// and writes the rest: the translated body, Authorization, Content-Type, Content-Encoding;
// ClientAddr converts each X-Forwarded-For hop with string(...) and keeps only a netip.Addr, and
// auth's client address only asks whether the request has the header.
var rawAllowed = map[string]int{
	"api/clientaddr.go":    1,
	"auth/http.go":         1,
	"api/params.go":        2,
	"api/stream.go":        1,
	"ingest/http.go":       8,
	"dedup/idempotency.go": 2,
	"query/http.go":        3,
	"quota/http.go":        1,
	"segment/http.go":      6,
}

// No new code reads the raw request without being looked at: a borrowed value kept past its
// handler is silently rewritten by the next request (see TestRequestStringsOutliveTheRequest).
func TestNoNewRawRequestReads(t *testing.T) {
	found := map[string]int{}
	sourceLines(t, func(file, line string) {
		if rawRequest.MatchString(line) {
			found[file]++
		}
	})
	for f, n := range found {
		if n != rawAllowed[f] {
			t.Errorf("%s reads fasthttp's request directly %d times (%d reviewed): check that nothing it reads outlives the handler, copy what does, then update rawAllowed", f, n, rawAllowed[f])
		}
	}
	for f, n := range rawAllowed {
		if found[f] == 0 {
			t.Errorf("%s no longer reads the raw request (%d expected): drop it from rawAllowed", f, n)
		}
	}
}

// sourceLines calls f with every line of the repository's Go code that is not a test or a comment,
// and its file relative to the repository root.
func sourceLines(t *testing.T, f func(file, line string)) {
	t.Helper()
	err := filepath.WalkDir("..", func(path string, d os.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() && (d.Name() == "node_modules" || strings.HasPrefix(d.Name(), ".")) && path != ".." {
			return filepath.SkipDir
		}
		if d.IsDir() || !strings.HasSuffix(path, ".go") || strings.HasSuffix(path, "_test.go") {
			return nil
		}
		b, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		for _, line := range strings.Split(string(b), "\n") {
			if !strings.HasPrefix(strings.TrimSpace(line), "//") {
				f(filepath.ToSlash(strings.TrimPrefix(path, "../")), line)
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}
