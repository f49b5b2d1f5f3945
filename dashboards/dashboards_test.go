package dashboards

import (
	"io"
	"net/http"
	"net/http/httptest"
	"regexp"
	"strings"
	"testing"

	"github.com/gofiber/fiber/v2"
)

func testApp() *fiber.App {
	app := fiber.New(fiber.Config{DisableStartupMessage: true})
	Register(app)
	return app
}

type served struct {
	status int
	header http.Header
	body   string
}

func get(t *testing.T, app *fiber.App, method, target string, hdr map[string]string) served {
	t.Helper()
	req := httptest.NewRequest(method, "http://localhost"+target, nil)
	for k, v := range hdr {
		req.Header.Set(k, v)
	}
	res, err := app.Test(req, -1)
	if err != nil {
		t.Fatalf("%s %s: %v", method, target, err)
	}
	defer res.Body.Close()
	b, _ := io.ReadAll(res.Body)
	return served{res.StatusCode, res.Header, string(b)}
}

func TestPageAndAssets(t *testing.T) {
	app := testApp()
	s := load()
	check := func(path, wantType string) served {
		t.Helper()
		r := get(t, app, http.MethodGet, path, nil)
		if r.status != http.StatusOK {
			t.Fatalf("GET %s: got status %d, want 200", path, r.status)
		}
		if got := r.header.Get("Content-Type"); got != wantType {
			t.Errorf("GET %s: got Content-Type %q, want %q", path, got, wantType)
		}
		for k, want := range map[string]string{
			"Content-Security-Policy": ContentSecurityPolicy,
			"X-Content-Type-Options":  "nosniff",
			"Referrer-Policy":         "no-referrer",
			"X-Frame-Options":         "DENY",
		} {
			if got := r.header.Get(k); got != want {
				t.Errorf("GET %s: got %s %q, want %q", path, k, got, want)
			}
		}
		if r.header.Get("ETag") == "" {
			t.Errorf("GET %s: no ETag", path)
		}
		return r
	}
	for _, p := range []string{"/dashboard", "/dashboard/", "/dashboard/index.html"} {
		page := check(p, "text/html; charset=utf-8")
		if got := page.header.Get("Cache-Control"); got != "no-cache" {
			t.Errorf("GET %s: got Cache-Control %q, want no-cache", p, got)
		}
		if strings.Contains(page.body, versionPlaceholder) || !strings.Contains(page.body, "?v="+s.version) {
			t.Errorf("GET %s: asset URLs do not carry the version %s", p, s.version)
		}
	}
	js := check("/dashboard/app.js?v="+s.version, "text/javascript; charset=utf-8")
	if got := js.header.Get("Cache-Control"); got != "public, max-age=31536000, immutable" {
		t.Errorf("versioned asset: got Cache-Control %q, want a year, immutable", got)
	}
	unversioned := check("/dashboard/app.js", "text/javascript; charset=utf-8")
	if got := unversioned.header.Get("Cache-Control"); got != "no-cache" {
		t.Errorf("unversioned asset: got Cache-Control %q, want no-cache", got)
	}
	check("/dashboard/app.css", "text/css; charset=utf-8")
	check("/dashboard/vendor/uPlot.iife.min.js", "text/javascript; charset=utf-8")
	check("/dashboard/vendor/uPlot.min.css", "text/css; charset=utf-8")
	check("/dashboard/vendor/uPlot.LICENSE", "text/plain; charset=utf-8")
	check("/dashboard/favicon.svg", "image/svg+xml")

	head := get(t, app, http.MethodHead, "/dashboard", nil)
	if head.status != http.StatusOK || head.body != "" {
		t.Errorf("HEAD /dashboard: got %d with %d body bytes, want 200 and none", head.status, len(head.body))
	}
}

func TestConditionalGet(t *testing.T) {
	app := testApp()
	first := get(t, app, http.MethodGet, "/dashboard/app.js", nil)
	etag := first.header.Get("ETag")
	again := get(t, app, http.MethodGet, "/dashboard/app.js", map[string]string{"If-None-Match": etag})
	if again.status != http.StatusNotModified || again.body != "" {
		t.Errorf("If-None-Match %s: got %d with %d bytes, want 304 and none", etag, again.status, len(again.body))
	}
	other := get(t, app, http.MethodGet, "/dashboard/app.js", map[string]string{"If-None-Match": `"0000"`})
	if other.status != http.StatusOK {
		t.Errorf("stale If-None-Match: got %d, want 200", other.status)
	}
}

// Nothing outside the embedded web/ tree is reachable, however the path is spelled.
func TestNoTraversal(t *testing.T) {
	app := testApp()
	for _, p := range []string{
		"/dashboard/../go.mod",
		"/dashboard/..%2fdashboards.go",
		"/dashboard/%2e%2e/dashboards.go",
		"/dashboard/%2e%2e%2f%2e%2e%2fgo.mod",
		"/dashboard/vendor/../../dashboards.go",
		"/dashboard/web/app.js",
		"/dashboard/vendor",
		"/dashboard/vendor/",
		"/dashboard//etc/passwd",
		"/dashboard/app.js%00.html",
		"/dashboard/nope.js",
	} {
		r := get(t, app, http.MethodGet, p, nil)
		if r.status == http.StatusOK && !strings.Contains(r.body, "<!doctype html>") {
			t.Errorf("GET %s: got 200 with %.60q, want 404", p, r.body)
		}
		if strings.Contains(r.body, "package dashboards") || strings.Contains(r.body, "module github.com") || strings.Contains(r.body, "root:") {
			t.Errorf("GET %s: leaked a file outside web/", p)
		}
	}
	// A miss inside the dashboard's routes still carries the security headers.
	r := get(t, app, http.MethodGet, "/dashboard/vendor/nope.js", nil)
	if r.status != http.StatusNotFound || r.header.Get("X-Content-Type-Options") != "nosniff" || r.header.Get("Content-Security-Policy") == "" {
		t.Errorf("GET /dashboard/vendor/nope.js: got %d with headers %v, want 404 with the security headers", r.status, r.header)
	}
}

// The routes are the page plus one :file route per asset directory, so OpenAPI can list them.
func TestRoutes(t *testing.T) {
	var got []string
	for _, r := range testApp().GetRoutes(true) {
		if r.Method == http.MethodGet {
			got = append(got, r.Path)
		}
	}
	want := []string{"/dashboard", "/dashboard/:file", "/dashboard/vendor/:file"}
	if strings.Join(got, " ") != strings.Join(want, " ") {
		t.Errorf("got routes %v, want %v", got, want)
	}
}

// The page must work under its own CSP: no inline scripts, inline styles or style attributes, no
// third-party URLs, and every asset it names must exist.
func TestPageHonoursCSP(t *testing.T) {
	s := load()
	page := string(s.files["index.html"].body)
	for _, bad := range []*regexp.Regexp{
		regexp.MustCompile(`<script(?:\s[^>]*)?>\s*[^<\s]`), // a script with a body
		regexp.MustCompile(`<script(?:\s(?:[^s>]|s[^r>]|sr[^c>])*)?>`),
		regexp.MustCompile(`<style`),
		regexp.MustCompile(`\sstyle=`),
		regexp.MustCompile(`\son[a-z]+=`),
		regexp.MustCompile(`(?:src|href)="(?:https?:)?//`),
	} {
		if m := bad.FindString(page); m != "" {
			t.Errorf("index.html: %q breaks the content security policy", m)
		}
	}
	for _, m := range regexp.MustCompile(`(?:src|href)="/dashboard/([^"?]+)`).FindAllStringSubmatch(page, -1) {
		if _, ok := s.files[m[1]]; !ok {
			t.Errorf("index.html names /dashboard/%s, which is not embedded", m[1])
		}
	}
	js := string(s.files["app.js"].body)
	for _, bad := range []string{"innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function", "setAttribute('style'"} {
		if strings.Contains(js, bad) {
			t.Errorf("app.js uses %s", bad)
		}
	}
}

// The vendored library's version, as its file states, is the one vendor/README.md records.
func TestVendoredVersionRecorded(t *testing.T) {
	s := load()
	head := string(s.files["vendor/uPlot.iife.min.js"].body[:120])
	m := regexp.MustCompile(`uPlot \(v([0-9.]+)\)`).FindStringSubmatch(head)
	if m == nil {
		t.Fatalf("uPlot.iife.min.js has no version banner: %q", head)
	}
	readme := string(s.files["vendor/README.md"].body)
	if !strings.Contains(readme, "| "+m[1]+" |") {
		t.Errorf("vendor/README.md does not record uPlot %s", m[1])
	}
	if _, ok := s.files["vendor/uPlot.LICENSE"]; !ok {
		t.Error("vendor/uPlot.LICENSE is missing")
	}
}
