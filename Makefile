# One command for the main job, one for the tests. Both create .venv and install what they need.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo demo-local test lint install protos system

$(BIN)/samforge: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch/torchvision first, exactly the pinned pair (served from local disk on our machines)
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e ".[cpu,dev]"
	touch $(BIN)/samforge

install: $(BIN)/samforge

# system packages the tests use: a real Redis server (shared L2 cache) and tcmalloc (benchmarks)
system:
	@command -v redis-server >/dev/null 2>&1 || { apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server libtcmalloc-minimal4 >/dev/null; }

# main job: the whole local stack (trainer, encoder, decoder) on LiteMedSAM, then the demo client
demo: install
	$(BIN)/samforge up --demo --base-port 0 --var out/stack

# the in-process predictor demo (no services)
demo-local: install
	$(BIN)/samforge demo --out out/demo

protos: install
	$(BIN)/python protos/generate.py

test: install system
	$(BIN)/ruff check .
	$(BIN)/python protos/generate.py --check
	$(BIN)/pytest -q

lint: install
	$(BIN)/ruff check .
