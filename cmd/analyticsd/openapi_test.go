package main

import (
	"encoding/json"
	"regexp"
	"strings"
	"testing"

	"github.com/gofiber/fiber/v2"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/analyticsd/analyticsd/api"
	"github.com/analyticsd/analyticsd/auth"
	"github.com/analyticsd/analyticsd/erasure"
	"github.com/analyticsd/analyticsd/ingest"
	"github.com/analyticsd/analyticsd/query"
	"github.com/analyticsd/analyticsd/quota"
	"github.com/analyticsd/analyticsd/rollup"
)

// Every registered route is in the OpenAPI document, and everything documented is registered.
func TestOpenAPIDocumentsEveryRoute(t *testing.T) {
	app := fiber.New()
	mount(app, api.Ops{Gatherer: prometheus.NewRegistry()}, auth.NewAuthenticator(nil, nil, auth.JWTConfig{}), nil,
		ingest.NewService(ingest.Config{}, nil, nil, ingest.NewMetrics(nil, 0), nil), query.NewService(query.Config{}, nil, nil, nil, nil),
		quota.NewService(quota.Config{}, nil, nil, nil, "", nil, nil, nil, nil),
		rollup.NewReconciler(nil, "", nil, nil, nil, nil, 90, nil), erasure.New(erasure.Config{}, nil, nil, nil, nil))
	var doc struct {
		OpenAPI string                    `json:"openapi"`
		Paths   map[string]map[string]any `json:"paths"`
	}
	if err := json.Unmarshal(api.OpenAPI(), &doc); err != nil {
		t.Fatalf("openapi.json is not valid JSON: %v", err)
	}
	if !strings.HasPrefix(doc.OpenAPI, "3.") {
		t.Errorf("openapi version %q, want 3.x", doc.OpenAPI)
	}
	param := regexp.MustCompile(`:([a-zA-Z_]+)`)
	registered := map[string]bool{}
	for _, r := range app.GetRoutes(true) {
		if r.Method == fiber.MethodHead || r.Method == fiber.MethodOptions {
			continue
		}
		path := param.ReplaceAllString(r.Path, "{$1}")
		key := strings.ToLower(r.Method) + " " + path
		registered[key] = true
		if _, ok := doc.Paths[path][strings.ToLower(r.Method)]; !ok {
			t.Errorf("route %s %s is not in api/openapi.json", r.Method, path)
		}
	}
	for path, ops := range doc.Paths {
		for method := range ops {
			if !registered[method+" "+path] {
				t.Errorf("api/openapi.json documents %s %s, which is not registered", strings.ToUpper(method), path)
			}
		}
	}
	if len(registered) < 10 {
		t.Errorf("only %d routes registered; mount looks broken", len(registered))
	}
}
