// Package dashboards owns what people look at: the built-in web dashboard, served by analyticsd at
// /dashboard from static files embedded in the binary, and the Grafana provisioning and dashboard JSON
// under grafana/ that analysts run against ClickHouse (mounted by docker-compose.yml, not served here).
//
// The web dashboard is plain HTML, CSS and JavaScript with one vendored charting library (web/vendor);
// it has no server side of its own. The browser signs in with an API key or host-app JWT kept in
// sessionStorage and calls the public read API (/api/analytics/*) like any other client, so it can do
// nothing a credential could not do with curl. This package does not own those endpoints.
package dashboards

import (
	"crypto/sha256"
	"embed"
	"encoding/hex"
	"io/fs"
	"path"
	"sort"
	"strings"

	"github.com/gofiber/fiber/v2"
)

//go:embed web/*
var webFS embed.FS

// Prefix is where the dashboard is mounted.
const Prefix = "/dashboard"

// versionPlaceholder in index.html is replaced by the assets' content hash, so a new binary's assets
// get new URLs and the old ones can be cached for a year.
const versionPlaceholder = "__ASSET_VERSION__"

// ContentSecurityPolicy allows only same-origin scripts, styles and API calls: no inline script, no
// inline style sheet, no CDN, no framing. Charts are drawn on canvas; a CSV export is a blob download.
const ContentSecurityPolicy = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; " +
	"connect-src 'self'; font-src 'self'; manifest-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"

// contentTypes names every extension the dashboard ships; anything else is served as bytes.
var contentTypes = map[string]string{
	".html": "text/html; charset=utf-8",
	".css":  "text/css; charset=utf-8",
	".js":   "text/javascript; charset=utf-8",
	".json": "application/json",
	".svg":  "image/svg+xml",
	".png":  "image/png",
	".ico":  "image/x-icon",
	".md":   "text/plain; charset=utf-8",
	".txt":  "text/plain; charset=utf-8",
}

type asset struct {
	body        []byte
	contentType string
	etag        string
}

// site is the embedded web/ tree, read once: name (relative to web/) → asset.
type site struct {
	files   map[string]asset
	version string
}

func load() site {
	root, err := fs.Sub(webFS, "web")
	if err != nil {
		panic(err) // the embed pattern guarantees web/ exists
	}
	s := site{files: map[string]asset{}}
	all := sha256.New()
	err = fs.WalkDir(root, ".", func(name string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		body, err := fs.ReadFile(root, name)
		if err != nil {
			return err
		}
		sum := sha256.Sum256(body)
		all.Write([]byte(name))
		all.Write(sum[:])
		ct, ok := contentTypes[path.Ext(name)]
		if !ok {
			ct = "application/octet-stream"
		}
		if strings.HasSuffix(name, "LICENSE") {
			ct = "text/plain; charset=utf-8"
		}
		s.files[name] = asset{body: body, contentType: ct, etag: `"` + hex.EncodeToString(sum[:8]) + `"`}
		return nil
	})
	if err != nil {
		panic(err) // reading an embedded FS cannot fail
	}
	s.version = hex.EncodeToString(all.Sum(nil)[:6])
	if idx, ok := s.files["index.html"]; ok {
		body := []byte(strings.ReplaceAll(string(idx.body), versionPlaceholder, s.version))
		sum := sha256.Sum256(body)
		idx.body, idx.etag = body, `"`+hex.EncodeToString(sum[:8])+`"`
		s.files["index.html"] = idx
	}
	return s
}

// Register mounts the page at GET (and HEAD) /dashboard and its assets at /dashboard/:file and
// /dashboard/<dir>/:file for each directory of web/ (today: vendor). Only files embedded from web/
// are served: a name is looked up in a map built at start-up, so no request can reach the file
// system, whatever it contains ("..", encoded slashes, NUL).
func Register(r fiber.Router) {
	s := load()
	r.Get(Prefix, s.serve)
	for _, dir := range s.dirs() {
		r.Get(path.Join(Prefix, dir, ":file"), s.serve)
	}
}

// dirs lists the directories holding assets, relative to web/ ("" for web/ itself), sorted.
func (s site) dirs() []string {
	seen := map[string]bool{}
	var out []string
	for name := range s.files {
		d := path.Dir(name)
		if d == "." {
			d = ""
		}
		if !seen[d] {
			seen[d] = true
			out = append(out, d)
		}
	}
	sort.Strings(out)
	return out
}

func (s site) serve(c *fiber.Ctx) error {
	setSecurityHeaders(c)
	name := "index.html"
	if file := c.Params("file"); file != "" {
		// The route is /dashboard[/<dir>]/:file; the asset's name is the path after the prefix.
		name = strings.TrimPrefix(strings.TrimPrefix(c.Path(), Prefix), "/")
	}
	a, ok := s.files[name]
	if !ok {
		c.Set(fiber.HeaderCacheControl, "no-store")
		return c.Status(fiber.StatusNotFound).Type("txt").SendString("not found: the dashboard is at " + Prefix + "\n")
	}
	switch {
	case name == "index.html":
		// Revalidate every time: the page names the current assets' version.
		c.Set(fiber.HeaderCacheControl, "no-cache")
	case c.Query("v") == s.version:
		c.Set(fiber.HeaderCacheControl, "public, max-age=31536000, immutable")
	default:
		c.Set(fiber.HeaderCacheControl, "no-cache")
	}
	c.Set(fiber.HeaderETag, a.etag)
	c.Set(fiber.HeaderContentType, a.contentType)
	if match := c.Get(fiber.HeaderIfNoneMatch); match != "" && etagMatches(match, a.etag) {
		return c.SendStatus(fiber.StatusNotModified)
	}
	return c.Send(a.body)
}

func etagMatches(header, etag string) bool {
	for _, v := range strings.Split(header, ",") {
		v = strings.TrimPrefix(strings.TrimSpace(v), "W/")
		if v == etag || v == "*" {
			return true
		}
	}
	return false
}

func setSecurityHeaders(c *fiber.Ctx) {
	c.Set("Content-Security-Policy", ContentSecurityPolicy)
	c.Set(fiber.HeaderXContentTypeOptions, "nosniff")
	c.Set(fiber.HeaderReferrerPolicy, "no-referrer")
	c.Set(fiber.HeaderXFrameOptions, "DENY")
	c.Set("Cross-Origin-Opener-Policy", "same-origin")
	c.Set("Cross-Origin-Resource-Policy", "same-origin")
	c.Set("Permissions-Policy", "camera=(), microphone=(), geolocation=(), payment=()")
}
