# One command for the main job, one for the tests. Both create .venv and install what they need.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin

TRITON_VENV := .venv-triton
TRITON_PY := $(TRITON_VENV)/bin/python

# no wheel cache: the pinned torch build is several GB and a cached copy would double it on disk
export PIP_NO_CACHE_DIR := 1
# sam2 (SAM 2.1 models) is an sdist: skip its optional CUDA extension
export SAM2_BUILD_CUDA := 0

.PHONY: demo demo-local test test-envs test-fast typecheck lint install protos system triton-env scan-env

$(BIN)/samforge: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch/torchvision first, exactly the pinned pair (served from local disk on our machines)
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	# sam2's build imports torch: build it against the pinned torch, not a second one in an isolated env
	$(BIN)/pip install -q setuptools wheel
	$(BIN)/pip install -q --no-build-isolation sam2==1.1.0
	$(BIN)/pip install -q -e ".[cpu,dev]"
	touch $(BIN)/samforge

install: $(BIN)/samforge

# system packages the tests use: a real Redis server (shared L2 cache) and tcmalloc (benchmarks)
system:
	@command -v redis-server >/dev/null 2>&1 || { apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server libtcmalloc-minimal4 >/dev/null; }

# the Triton test environment: a real tritonserver (nvidia-pytriton) for the triton encoder backend's
# tests and benchmark; separate because pytriton needs numpy<2 and protobuf<7 (see deploy/triton/)
$(TRITON_VENV)/.installed: deploy/triton/requirements-pytriton.txt
	test -x $(TRITON_PY) || $(PY) -m venv $(TRITON_VENV)
	$(TRITON_VENV)/bin/pip install -q --upgrade pip
	$(TRITON_VENV)/bin/pip install -q -r deploy/triton/requirements-pytriton.txt
	touch $@

triton-env: $(TRITON_VENV)/.installed

# the scan environment: checkov (pinned with its dependencies) for tests/deploy/test_scans.py; separate
# because checkov's own pins conflict with samforge's. bandit runs from .venv (dev extra).
SCAN_VENV := .venv-scan
$(SCAN_VENV)/.installed: .ci/requirements-scan.txt
	test -x $(SCAN_VENV)/bin/python || $(PY) -m venv $(SCAN_VENV)
	$(SCAN_VENV)/bin/pip install -q --upgrade pip
	$(SCAN_VENV)/bin/pip install -q -r .ci/requirements-scan.txt
	touch $@

scan-env: $(SCAN_VENV)/.installed

# main job: the whole local stack (trainer, encoder, decoder) on LiteMedSAM, then the demo client
demo: install
	$(BIN)/samforge up --demo --base-port 0 --var out/stack

# the in-process predictor demo (no services)
demo-local: install
	$(BIN)/samforge demo --out out/demo

protos: install
	$(BIN)/python protos/generate.py

# the environments the tests need, built side by side (mostly downloads and unpacking)
test-envs:
	$(MAKE) -j4 install system triton-env scan-env

# SAMFORGE_REQUIRE_SCANS: the checkov/bandit tests fail instead of skipping when their tools are missing.
# Two pytest-xdist workers: much of the suite waits on servers starting and polling rather than computing, and
# each test file stays on one worker (tests/conftest.py groups them, heaviest first) so its module fixtures start
# once.
test: test-envs
	$(MAKE) typecheck
	$(BIN)/ruff check .
	$(BIN)/python protos/generate.py --check
	SAMFORGE_TEST_TRITON_PYTHON=$(abspath $(TRITON_PY)) SAMFORGE_REQUIRE_SCANS=1 $(BIN)/pytest -q -n 2 --dist loadgroup --no-loadscope-reorder

# the edit loop: lint, types and the tests that need no real weights, servers or training runs (~1 min)
test-fast: install typecheck
	$(BIN)/ruff check .
	$(BIN)/pytest -q -m "not slow and not integration"

# mypy --strict over sam_core and services (configuration in pyproject.toml)
typecheck: install
	$(BIN)/mypy

lint: install
	$(BIN)/ruff check .
