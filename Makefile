# analyticsd — run `make` for the list of targets.
SHELL := /bin/bash
.DEFAULT_GOAL := help
export PATH := $(PATH):/usr/local/go/bin

STACK   := deploy/local/stack.sh
WITHENV := eval "$$($(STACK) env)" &&
BIN     := bin/analyticsd
VERSION ?= $(shell git describe --always --dirty 2>/dev/null || echo dev)
GOFLAGS_BUILD := -trimpath -ldflags "-X main.version=$(VERSION)"

.PHONY: help run test build lint fmt up down stack-up stack-down stack-status chaos fuzz bench bench-quick

FUZZTIME ?= 2m
FUZZ_TARGETS := ingest:FuzzDecode ingest:FuzzValidate query:FuzzParseCursor query:FuzzParseParams

help: ## list the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "} {printf "  %-14s %s\n", $$1, $$2}'

build: ## build bin/analyticsd
	go build $(GOFLAGS_BUILD) -o $(BIN) ./cmd/analyticsd

run: build ## start ClickHouse, Postgres and Redis locally, migrate, create the demo tenant and key, serve on :8080
	$(STACK) up
	$(WITHENV) deploy/local/demo.sh $(BIN)
	$(WITHENV) exec $(BIN) serve

test: ## start the local stack, then every test against the real servers (race detector on), then the short fault suite
	$(STACK) up
	deploy/local/chromium.sh
	$(WITHENV) ANALYTICS_REQUIRE_SERVICES=1 go test -race -count=1 -timeout 20m ./...
	@echo "== fault suite, short form (stops and starts the local stack's services)"
	$(WITHENV) ANALYTICS_REQUIRE_SERVICES=1 go test -tags chaos -count=1 -timeout 20m ./chaos/
	@echo "== benchmark harness, quick mode (proves it runs; asserts nothing about speed)"
	$(WITHENV) go run ./cmd/analytics-bench --quick --out test-output/bench-quick.json

bench: ## the full benchmark: every scenario as a ratio against baselines measured in the same run (see BENCHMARKS.md)
	$(STACK) up
	$(WITHENV) go run ./cmd/analytics-bench

bench-quick: ## the benchmark harness in CI mode (~30 s; asserts nothing about speed)
	$(STACK) up
	$(WITHENV) go run ./cmd/analytics-bench --quick

chaos: ## the full fault suite (ClickHouse, Redis, Postgres outages, kill -9, full spool, slow ClickHouse); stops and starts the local stack
	$(STACK) up
	$(WITHENV) ANALYTICS_REQUIRE_SERVICES=1 go test -tags chaos -count=1 -v -timeout 60m ./chaos/ -args -long

fuzz: ## run every fuzz target for FUZZTIME (default 2m) and keep up to 200 inputs it found in testdata/fuzz
	@set -e; cache=$$(go env GOCACHE)/fuzz/github.com/analyticsd/analyticsd; \
	for t in $(FUZZ_TARGETS); do pkg=$${t%%:*}; fn=$${t##*:}; \
	  echo "== $$pkg $$fn for $(FUZZTIME)"; \
	  go test -run '^$$' -fuzz "^$$fn$$" -fuzztime $(FUZZTIME) ./$$pkg; \
	  mkdir -p $$pkg/testdata/fuzz/$$fn; \
	  for f in $$(ls $$cache/$$pkg/$$fn 2>/dev/null | head -n 200); do cp -n $$cache/$$pkg/$$fn/$$f $$pkg/testdata/fuzz/$$fn/; done; \
	done

lint: ## go vet and a gofmt check
	go vet ./...
	@out=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi

fmt: ## gofmt every Go file
	gofmt -w $$(git ls-files '*.go')

stack-up: ## start only the local stack (no Docker)
	$(STACK) up

stack-down: ## stop the local stack started by stack-up / run / test
	$(STACK) down

stack-status: ## show the local stack
	$(STACK) status

up: ## production-like stack with docker compose (ClickHouse 25.8, Grafana, Prometheus)
	docker compose up -d --build

down: ## stop the docker compose stack
	docker compose down
