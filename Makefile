# extproc: two commands matter. `make run` brings the stack up; `make test` installs and tests.
# Everything installs into .venv/ at the repo root; nothing is assumed but Python 3.11+ and make.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install compile system-tools codex-cli oidc-provider run test fuzz lint format bench proto clean image push

install: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "extproc needs Python 3.11+ (found %s)" % sys.version.split()[0])'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	@# xds-protos bundles an older copy of the opentelemetry.proto package in the same
	@# directory; whichever wheel lands last wins. The OTLP exporter needs the real one.
	$(PY) -m pip install --quiet --disable-pip-version-check --force-reinstall --no-deps \
		"opentelemetry-proto==$$($(PY) -c 'from importlib.metadata import version; print(version("opentelemetry-proto"))')"
	@touch $(STAMP)

# The request path compiled with mypyc (extproc/compiled.py says how and why). A no-op while
# the build matches the sources; without a C compiler (or if mypyc refuses a module) it says
# so in one line and everything runs as Python. `make run` uses the build when it is current.
compile: install
	$(PY) -m extproc.compile build

run: install
	$(PY) -m extproc stack

# Real Prometheus (telemetry e2e), kubectl's built-in kustomize (deploy tests), `ip` (the pod
# test's network namespace: tests/deploy/kubelet.py) and Chromium
# (console browser tests, driven by Playwright from PyPI: no browser download), from Debian.
system-tools:
	@missing=""; \
	command -v prometheus >/dev/null || missing="$$missing prometheus"; \
	command -v kubectl >/dev/null || missing="$$missing kubernetes-client"; \
	command -v chromium >/dev/null || missing="$$missing chromium"; \
	command -v ip >/dev/null || missing="$$missing iproute2"; \
	if [ -n "$$missing" ]; then \
		sudo=$$([ "$$(id -u)" = 0 ] || echo sudo); \
		echo "installing from Debian:$$missing"; \
		$$sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
			$$sudo apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

# The real Codex CLI (npm ships its native binary), for the end-to-end test that drives it.
CODEX := .tools/node_modules/.bin/codex
codex-cli: $(CODEX)
$(CODEX):
	npm install --silent --no-audit --no-fund --prefix .tools @openai/codex

# A real OpenID Connect provider (npm's oidc-provider, run under node) for the console's
# sign-in tests; its own directory, apart from .tools (which worktrees may share).
OIDC_PROVIDER := .tools-oidc/node_modules/oidc-provider/package.json
oidc-provider: $(OIDC_PROVIDER)
$(OIDC_PROVIDER):
	npm install --silent --no-audit --no-fund --prefix .tools-oidc oidc-provider@9

# The unit tests run twice: pure Python first (what runs without a C compiler, and where a
# test may patch a module), then everything against the compiled build, as shipped.
test: install compile system-tools codex-cli oidc-provider lint
	EXTPROC_PURE=1 $(PY) -m pytest -q tests/unit
	EXTPROC_EXPECT_COMPILED=1 $(PY) -m pytest -q

# `make test` runs the property tests on fixed examples (the same every run). This is the long
# randomised hunt: 2,000 fresh examples through the real stack (EXTPROC_FUZZ_EXAMPLES=N to
# change); add what it finds to tests/e2e/test_e2e_fuzz.py as an @example.
fuzz: install
	EXTPROC_FUZZ=hunt $(PY) -m pytest -q tests/e2e/test_e2e_fuzz.py

lint: install
	$(VENV)/bin/ruff check extproc tests bench
	$(VENV)/bin/ruff format --check extproc tests bench

format: install
	$(VENV)/bin/ruff check --fix extproc tests bench
	$(VENV)/bin/ruff format extproc tests bench

# The sidecar image (Dockerfile), named as deploy/base/kustomization.yaml names it: the
# registry there, the package version as the tag. `make image push IMAGE=my.registry/extproc`
# for your own registry (then set the same newName in the kustomization).
IMAGE   ?= registry.example.com/platform/extproc
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
DOCKER  ?= docker
image:
	$(DOCKER) build --pull -t $(IMAGE):$(VERSION) .
push: image
	$(DOCKER) push $(IMAGE):$(VERSION)

# Full run by default; `make bench BENCH_ARGS=--quick` for direction while iterating.
BENCH_ARGS ?=
bench: compile
	$(PY) bench/bench.py $(BENCH_ARGS)

# Regenerate the Python code for our own protobuf API (committed, so installs need no codegen).
proto: install
	$(PY) -m grpc_tools.protoc -Iproto --python_out=. --pyi_out=. proto/extproc/v1/ledger.proto

clean:
	-$(PY) -m extproc.compile clean
	rm -rf $(VENV) .data build *.egg-info
