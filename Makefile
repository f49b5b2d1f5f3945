# analyticsd — run `make` for the list of targets.
SHELL := /bin/bash
.DEFAULT_GOAL := help
export PATH := $(PATH):/usr/local/go/bin

STACK   := deploy/local/stack.sh
CLUSTER := deploy/local/cluster.sh
WITHENV := eval "$$($(STACK) env)" &&
# The local cluster's environment, with the single stack's ClickHouse and Redis kept as SINGLE_* for
# the test that compares the two layouts' answers.
WITHCLUSTER := $(WITHENV) export SINGLE_CLICKHOUSE_DSN="$$CLICKHOUSE_DSN" SINGLE_REDIS_URL="$$REDIS_URL" && eval "$$($(CLUSTER) env)" &&
# What runs on the cluster: every package that reads or writes ClickHouse or Redis, and from the
# server's own tests the tenant-isolation suite and the single-vs-cluster comparison.
CLUSTER_PKGS := ./schema/ ./ingest/... ./query/ ./quota/ ./rollup/ ./dedup/ ./retention/ ./erasure/ ./internal/scriptbatch/
# After a failed cluster step: the servers' state (stuck DDL, long queries, ZooKeeper) into CI's log,
# which is all that is left of a CI machine.
DIAGNOSE_CLUSTER := || { $(CLUSTER) diagnose; exit 1; }
CLUSTER_RUN  := TestClusterAnswersAsOneServerDoes|TestMoveToCluster|TestRandomCredentialMixesNeverCrossTenants|TestRevokedKeyRefusedEverywhere
BIN     := bin/analyticsd
VERSION ?= $(shell git describe --always --dirty 2>/dev/null || echo dev)
GOFLAGS_BUILD := -trimpath -ldflags "-X main.version=$(VERSION)"

.PHONY: test-cluster cluster-up cluster-down bench-cluster help run test build lint fmt up down stack-up stack-down stack-status chaos fuzz bench bench-quick

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
	@# The Segment Node SDK test (segment/sdk_test.go) drives @segment/analytics-node from npm.
	command -v node >/dev/null && command -v npm >/dev/null || apt-get install -y --no-install-recommends nodejs npm
	cd segment/testdata/node && { [ node_modules/.package-lock.json -nt package-lock.json ] || npm ci --no-audit --no-fund; }
	$(WITHENV) ANALYTICS_REQUIRE_SERVICES=1 go test -race -count=1 -timeout 20m ./...
	@echo "== the Go client module (its own go.mod, so ./... above does not reach it), against a real server"
	$(WITHENV) cd client && ANALYTICS_REQUIRE_SERVICES=1 go test -race -count=1 -timeout 10m ./...
	@echo "== fault suite, short form (stops and starts the local stack's services)"
	$(WITHENV) ANALYTICS_REQUIRE_SERVICES=1 go test -tags chaos -count=1 -timeout 20m ./chaos/
	@echo "== benchmark harness, quick mode (proves it runs; asserts nothing about speed)"
	$(WITHENV) go run ./cmd/analytics-bench --quick --out test-output/bench-quick.json
	@echo "== the same suites on the local cluster (2 shards x 2 replicas, ZooKeeper, Redis Cluster)"
	$(MAKE) --no-print-directory test-cluster

test-cluster: ## start the local ClickHouse cluster and Redis Cluster, then the storage suites, tenant isolation and a single-vs-cluster comparison on them
	$(STACK) up
	$(CLUSTER) up
	$(WITHCLUSTER) ANALYTICS_REQUIRE_SERVICES=1 go test -count=1 -timeout 20m $(CLUSTER_PKGS) $(DIAGNOSE_CLUSTER)
	$(WITHCLUSTER) ANALYTICS_REQUIRE_SERVICES=1 go test -count=1 -timeout 10m -run '$(CLUSTER_RUN)' ./cmd/analyticsd/ $(DIAGNOSE_CLUSTER)
	@echo "== cluster faults, short form (kills and restarts the local cluster's servers)"
	$(WITHCLUSTER) ANALYTICS_REQUIRE_SERVICES=1 go test -tags chaos -count=1 -timeout 15m -run TestClusterFaults -v ./chaos/ | grep -E '^(=== RUN|\s+---|--- |\s+cluster_test|PASS|FAIL|ok)'; test $${PIPESTATUS[0]} -eq 0 $(DIAGNOSE_CLUSTER)

cluster-up: ## start only the local cluster (deploy/local/cluster.sh up); `eval "$$(deploy/local/cluster.sh env)"` points a shell at it
	$(CLUSTER) up

cluster-down: ## stop the local cluster
	$(CLUSTER) down

bench: ## the full benchmark: every scenario as a ratio against baselines measured in the same run (see BENCHMARKS.md)
	$(STACK) up
	$(WITHENV) go run ./cmd/analytics-bench

bench-cluster: ## the benchmark against the local cluster (2 shards x 2 replicas, Redis Cluster): ceilings through the Distributed tables (see BENCHMARKS.md, "Cluster")
	$(STACK) up
	$(CLUSTER) up
	$(WITHCLUSTER) go run ./cmd/analytics-bench $(BENCH_ARGS)

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
	cd client && go vet ./...
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
