# Moneta: `make run` brings the mesh up, `make test` proves it. Every target
# installs what it needs first: the virtualenv, generated code, infrastructure.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEPS_STAMP := $(VENV)/.deps-installed
PROTO_FILES := $(shell find protos -name '*.proto' | sort)
GEN_STAMP := gen/.generated
SERVICES := ledger wallet budget fraud gateway
PYTEST_ARGS ?=

export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
# Tests and benchmarks start services with fork+exec from processes that use
# gRPC; gRPC's fork handlers then restart its poller in the child, which
# aborts (epoll EBADF) once the child closes its inherited descriptors
# (grpc/grpc#43055). Nothing here forks to keep using gRPC in the child.
export GRPC_ENABLE_FORK_SUPPORT ?= false

.PHONY: help
help: ## List the targets.
	@grep -hE '^[a-z][a-z-]*:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-18s %s\n", $$1, $$2}'

$(DEPS_STAMP): requirements.txt requirements-dev.txt
	@bash deploy/local/python.sh "$(PYTHON)" "$(VENV)"
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	@# The repository root and the generated code are importable everywhere.
	@printf '%s\n%s\n' "$(CURDIR)" "$(CURDIR)/gen" > "$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/moneta.pth"
	@touch $@

.PHONY: deps
deps: $(DEPS_STAMP) ## Create .venv and install the pinned dependencies.

$(GEN_STAMP): $(PROTO_FILES) $(DEPS_STAMP)
	@rm -rf gen && mkdir -p gen
	$(PY) -m grpc_tools.protoc -Iprotos \
		--python_out=gen --grpc_python_out=gen \
		--mypy_out=gen --mypy_grpc_out=gen \
		$(PROTO_FILES)
	@touch $@

.PHONY: protos
protos: $(GEN_STAMP) ## Generate Python code and type stubs from protos/ into gen/.

.PHONY: infra
infra: ## Use PostgreSQL, RabbitMQ and Redis where they answer; start (or install) them otherwise.
	@bash deploy/local/infra.sh

.PHONY: migrate
migrate: protos infra ## Create each service's database and apply its migrations.
	@for s in ledger wallet budget fraud; do $(PY) -m services.$$s migrate || exit 1; done

.PHONY: run
run: protos infra ## Start the whole mesh with interleaved logs; Ctrl-C stops it.
	@MONETA_LOG_FORMAT=$${MONETA_LOG_FORMAT:-console} $(VENV)/bin/honcho -f deploy/local/Procfile start

.PHONY: test
test: protos infra ## Run the whole suite: unit, integration and end to end.
	$(PY) -m pytest $(PYTEST_ARGS)

.PHONY: test-unit
test-unit: protos ## Unit tests only (no infrastructure needed).
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

.PHONY: test-integration
test-integration: protos infra ## Integration tests against real PostgreSQL, RabbitMQ and Redis.
	$(PY) -m pytest tests/integration $(PYTEST_ARGS)

.PHONY: test-e2e
test-e2e: protos infra ## End-to-end tests: the five services as real processes.
	$(PY) -m pytest tests/e2e $(PYTEST_ARGS)

.PHONY: chaos
chaos: protos infra ## Fault tests: the mesh under load while a service or a (private) server fails; docs/chaos.md.
	MONETA_CHAOS=1 $(PY) -m pytest tests/chaos $(PYTEST_ARGS)

SOAK_ARGS ?=
.PHONY: soak
soak: protos infra ## Mixed load at 200 requests/s for 10 minutes (SOAK_ARGS="--minutes 1"); bench/results/soak.json.
	$(PY) -m bench.soak $(SOAK_ARGS)

node_modules/.bin/buf: package.json package-lock.json
	@command -v npm >/dev/null || (apt-get update -qq && apt-get install -y -qq npm)
	npm install --silent --no-audit --no-fund
	@touch $@

.PHONY: test-deploy
test-deploy: protos ## The image and Kubernetes manifests checks, and mutual TLS between services.
	$(PY) -m pytest tests/deploy tests/integration/test_tls.py $(PYTEST_ARGS)

OVERLAY ?= dev
.PHONY: manifests
manifests: deps ## Print the manifests of an overlay (OVERLAY=dev|prod), as kubectl apply -k would apply them.
	@if command -v kubectl >/dev/null; then kubectl kustomize deploy/k8s/overlays/$(OVERLAY); \
	else $(PY) -m tests.deploy.render deploy/k8s/overlays/$(OVERLAY); fi

IMAGE ?= moneta:dev
.PHONY: image
image: ## Build the container image (needs a Docker engine): IMAGE=moneta:dev.
	docker build -t $(IMAGE) .

.PHONY: lint
lint: protos node_modules/.bin/buf ## ruff, mypy and buf lint.
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	node_modules/.bin/buf lint

.PHONY: fmt
fmt: deps ## Format the code with ruff.
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

.PHONY: bench
bench: protos infra ## Run every benchmark; results go to bench/results/.
	$(PY) -m bench

.PHONY: clean
clean: ## Remove generated code and caches (keeps .venv).
	rm -rf gen .pytest_cache .mypy_cache .ruff_cache .hypothesis

.PHONY: demo
demo: protos ## Seed demo users on a running mesh (make run) and print curl commands.
	@$(PY) deploy/local/demo.py

.PHONY: bench-floor
bench-floor: protos infra ## The floor: a bare gRPC call, a SELECT 1, a Redis PING on this machine (bench/results/floor.json).
	$(PY) -m bench.floor

.PHONY: bench-ledger
bench-ledger: protos infra ## The ledger benchmark: ours against a naive baseline (bench/results/ledger.json).
	$(PY) -m bench.ledger

.PHONY: bench-history
bench-history: protos infra ## First-page latency of a wallet with 100,000 transactions (bench/results/history.json).
	$(PY) -m bench.history

.PHONY: bench-budget
bench-budget: protos infra ## Reserve+Commit pairs over gRPC at 500/s and flat out (bench/results/budget.json).
	$(PY) -m bench.budget

.PHONY: bench-fraud
bench-fraud: protos infra ## Score over gRPC at 500/s and flat out, precision/recall on held-out synthetic data (bench/results/fraud.json).
	$(PY) -m bench.fraud

.PHONY: bench-gateway
bench-gateway: protos infra ## P2P transfers and balance reads through the gateway, whole mesh running (bench/results/gateway.json).
	$(PY) -m bench.gateway

.PHONY: fraud-train
fraud-train: migrate ## Train the fraud model (history, or the synthetic set on a cold start) and store it; running services pick it up.
	$(PY) -m services.fraud train

.PHONY: chaos-consumer
chaos-consumer: protos infra ## Event consumers through real restarts of a private RabbitMQ node (about 30 s).
	MONETA_CHAOS=1 $(PY) -m pytest tests/integration/test_consumer.py -k real_broker_restart $(PYTEST_ARGS)
