# FREE-Fed: every target sets up what it needs on a fresh machine (as root, nothing by hand).
#   make test   install everything, then run the whole test suite (slow tests included)
#   make demo   install everything, then run the demo
#   make lint   ruff (lint + format check) and mypy
#   make benchmark-data   the benchmark fonts (Debian) and the glyph benchmark set
#   make proto  regenerate free_common/proto from proto/

SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# The CPU wheel of this release lies on the development machines' disk; installing it
# before the project keeps pip from fetching a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
# onnxruntime or onnxruntime-gpu, never both: gpu where CUDA is present.
ORT_EXTRA ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo gpu || echo cpu)
# The docker images leave out the development tools and Ray: EXTRAS=gpu (or cpu).
# `simulation` (Ray, for Flower's simulation engine) is there because a test runs it.
# `privacy` (Opacus) trains the DP teachers of `free-bench zoo --dp-epsilon` and its tests.
EXTRAS ?= $(ORT_EXTRA),dev,simulation,privacy
export FLWR_TELEMETRY_ENABLED=0
export FLWR_DISABLE_UPDATE_CHECK=1

.PHONY: install system-deps benchmark-data test test-fast lint format proto demo clean

# One line per install stage; pip's and setuptools' output goes to $(INSTALL_LOG), whose
# last lines are shown when a stage fails.
INSTALL_LOG ?= $(VENV)/install.log
STAGE = stage() { echo "$$1"; shift; "$$@" >>"$(INSTALL_LOG)" 2>&1 || { \
	echo "failed; the last lines of $(INSTALL_LOG):"; tail -n 40 "$(INSTALL_LOG)"; exit 1; }; }; stage

$(PY):
	@echo "creating the virtual environment $(VENV)"
	@python3 -m venv $(VENV)
	@$(STAGE) "upgrading pip" $(PIP) install --upgrade pip

$(VENV)/.torch: | $(PY)
	@$(PY) -c "import torch" 2>/dev/null || $(STAGE) "installing $(TORCH_SPEC)" $(PIP) install "$(TORCH_SPEC)"
	@touch $@

$(VENV)/.project: pyproject.toml $(VENV)/.torch
	@$(STAGE) "installing the project and its dependencies ($(EXTRAS))" \
		$(PIP) install -e ".[$(EXTRAS)]" --config-settings editable_mode=strict
	@touch $@

# Debian packages (fonts, dataset-fashion-mnist) the small glyph set and the tests need;
# with the development tools also Chromium and its driver, for the console's browser tests.
DEB_SETS ?= small $(if $(findstring dev,$(EXTRAS)),browser,)
system-deps: $(VENV)/.project
	@missing="$$($(PY) -W ignore::RuntimeWarning -m free_common.data.debian_packages --missing $(DEB_SETS))"; \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages: $$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

# The benchmark glyph set: every missing benchmark font package (about 440), then the build.
BENCHMARK_DATA ?= data-cache/benchmark
benchmark-data: install
	@missing="$$($(PY) -W ignore::RuntimeWarning -m free_common.data.debian_packages --missing benchmark)"; \
	if [ -n "$$missing" ]; then \
		echo "installing $$(echo $$missing | wc -w) Debian packages for the benchmark glyph set"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi
	$(VENV)/bin/free-bench data build --size benchmark --out $(BENCHMARK_DATA)

# The editable install is "strict" (a link tree mypy and pytest follow), so new modules
# need a re-install: it is cheap when nothing changed.
install: $(VENV)/.project system-deps
	@$(STAGE) "linking the project's modules" \
		$(PIP) install --no-deps -e . --config-settings editable_mode=strict

test: install
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not slow"

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

format: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

proto: install
	$(PY) proto/generate.py

# The whole story on loopback through the public commands (free_common/bench/demo.py):
# glyph set, six owners' teachers, server, keys, enrolment, join, submit, a meta round,
# push, fetch, finetune --export, inspect, release vs random init; tables on stdout,
# figures in demo-output/summary.json, every command's output in demo-output/logs/.
demo: install
	$(PY) -m free_common.bench.demo --data data-cache/small --out demo-output

clean:
	rm -rf $(VENV) build *.egg-info data-cache demo-output
