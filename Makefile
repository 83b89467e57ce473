# Image classification on Triton: every stage is `python -m <folder>.<stage>`; these targets call them.
#   make demo     set up, export, build the repository, serve it and classify sample photos (CPU)
#   make test     the test suite (real tritonserver on loopback ports)
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

SPEC ?= configs/deployment.json
BUNDLED := artifacts/efficientnet_lite0
# The model: ARTIFACTS=... on the command line, else the spec's "artifacts" (else the bundled model).
ifeq ($(origin ARTIFACTS),undefined)
ARTIFACTS := $(or $(shell $(PYTHON) -c 'import json, sys; print(json.load(open(sys.argv[1])).get("artifacts", ""))' \
                   $(SPEC) 2>/dev/null),$(BUNDLED))
endif
BACKEND ?= auto
PRECISION ?=
METHOD ?= max
INT8_CPU_LAYOUT ?= auto
REPOSITORY ?= model_repository
HTTP_PORT ?= 8000
GRPC_PORT ?= 8001
METRICS_PORT ?= 8002
ADDRESS ?= 127.0.0.1
RESTARTS ?= 3
INFERENCE_KEY ?= 0
PYTEST_ARGS ?=

# Each area's targets live in mk/<area>.mk (training, precision, benchmarks).
.DEFAULT_GOAL := help
-include $(sort $(wildcard mk/*.mk))

.PHONY: help setup export engines serve stop status demo classify test test-fast valgrind-setup capabilities clean distclean

help:
	@sed -n 's/^\([a-z0-9-]*\):.*## \(.*\)/  make \1\t\2/p' $(MAKEFILE_LIST) | expand -t 24

setup: $(STAMP) ## create .venv with the pinned dependencies and the `tritonserver` launcher

$(STAMP): requirements/main.txt pyproject.toml
	@$(PYTHON) -c 'import sys; sys.path.insert(0, "serving"); from tritonserver import setup_problem; \
	  problem = setup_problem(sys.version_info[:2]); sys.exit(problem and "make setup: " + problem)'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install -r requirements/main.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $@

export: $(BUNDLED)/model.onnx ## export the bundled pretrained model to ONNX (+ labels, preprocess.json)

$(BUNDLED)/model.onnx: $(STAMP) training/export.py training/onnx_export.py training/onnx_graph.py training/artifacts.py \
                       training/parity.py training/models.py common/preprocessing.py common/samples.py \
                       common/labels.py
	$(PY) -m training.export --output-dir $(BUNDLED)

# Any other model folder is the user's: say how to make one rather than "No rule to make target".
%/model.onnx:
	@echo "no $@: export a model into $(@D) first: make export-run RUN=runs/<name> ARTIFACTS=$(@D), or python -m training.export --onnx my.onnx ... --output-dir $(@D) (README: One command per stage)" >&2; exit 1

engines: $(STAMP) $(ARTIFACTS)/model.onnx ## build model_repository/ from the deployment spec
	$(PY) -m build.engines --spec $(SPEC) --artifacts $(ARTIFACTS) --out $(REPOSITORY) \
	    $(if $(filter-out auto,$(BACKEND)),--backend $(BACKEND)) $(if $(PRECISION),--precision $(PRECISION)) \
	    --calibration-method $(METHOD) --int8-cpu-layout $(INT8_CPU_LAYOUT) $(ENGINES_ARGS)

valgrind-setup: ## Debian valgrind (as root): the tests run INT8 kernels on its virtual AVX2 CPU without VNNI
	@command -v valgrind >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get update -qq && apt-get install -y -qq valgrind; } \
	    || { echo "valgrind-setup: needs root to apt-get install valgrind (sudo apt-get install valgrind)" >&2; exit 1; }

capabilities: $(STAMP) ## what the local server and machine can run
	$(PY) -m build.repository.capabilities

serve: $(STAMP) ## start tritonserver in the background on REPOSITORY (model_repository) under its supervisor (stub watchdog, RESTARTS) and wait until ready; INFERENCE_KEY=1: inference behind a key too
	$(PY) -m serving.server start --model-repository $(REPOSITORY) --address $(ADDRESS) \
	    --http-port $(HTTP_PORT) --grpc-port $(GRPC_PORT) --metrics-port $(METRICS_PORT) \
	    $(if $(WATCHDOG_PORT),--watchdog-port $(WATCHDOG_PORT)) $(if $(GUARD_PORT),--guard-port $(GUARD_PORT)) \
	    --restarts $(RESTARTS) $(if $(filter-out 0,$(INFERENCE_KEY)),--inference-key)

stop: ## stop the server started by `make serve`
	@$(PY) -m serving.server stop

status:
	@$(PY) -m serving.server status

demo: engines ## end to end on CPU: serve the repository and classify the bundled photos (HTTP + gRPC)
	$(PY) -m clients.demo --model-repository $(REPOSITORY)

# `make classify` names a server only when told (URL=, or ADDRESS / HTTP_PORT / GRPC_PORT on the command
# line); otherwise clients.classify finds the one `make serve` started, else Triton's default ports.
PROTOCOL ?=
URL ?=
CLASSIFY_PORT = $(if $(filter grpc,$(PROTOCOL)),$(GRPC_PORT),$(HTTP_PORT))
ADDRESS_HOST = $(if $(findstring :,$(ADDRESS)),[$(ADDRESS)],$(ADDRESS))
CLASSIFY_URL = $(or $(URL),$(if $(filter command line,$(origin ADDRESS) $(origin HTTP_PORT) $(origin GRPC_PORT)),$(ADDRESS_HOST):$(CLASSIFY_PORT)))

classify: ## classify IMAGES="a.jpg b.png" (default: two photos) [PROTOCOL=grpc] [URL=host:port] [TLS_CA=ca.pem [TLS_CERT=c.pem TLS_KEY=k.pem]] with `make serve`'s server
	$(PY) -m clients.classify $(or $(IMAGES),$$($(PY) -m common.samples --paths chelsea coffee)) \
	    $(if $(PROTOCOL),--protocol $(PROTOCOL)) $(if $(CLASSIFY_URL),--url $(CLASSIFY_URL)) \
	    $(if $(TLS_CA),--tls-ca $(TLS_CA)) $(if $(TLS_CERT),--tls-cert $(TLS_CERT)) $(if $(TLS_KEY),--tls-key $(TLS_KEY))

test: $(STAMP) ## run the test suite (sets up perf_analyzer's and DALI's tool envs, valgrind, Prometheus first, best effort)
	@$(MAKE) --no-print-directory perf-setup || echo "make test: perf_analyzer could not be set up; its tests will skip and say why"
	@$(MAKE) --no-print-directory valgrind-setup || echo "make test: no valgrind; the tests that emulate a CPU without VNNI will skip and say why"
	@$(MAKE) --no-print-directory prometheus-setup || echo "make test: no prometheus/promtool; the monitoring tests will skip and say why"
	@$(MAKE) --no-print-directory dali-setup || echo "make test: no .venv-dali; the DALI parity tests will skip and say why"
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: $(STAMP) ## the tests not marked slow
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

clean: ## remove generated artifacts and the repository (keeps .venv and the repository's committed README.md)
	rm -rf artifacts $(REPOSITORY).tmp .run .pytest_cache
	if [ -d $(REPOSITORY) ]; then find $(REPOSITORY) -mindepth 1 -maxdepth 1 ! -name README.md -exec rm -rf {} +; fi

distclean: clean
	rm -rf $(VENV)
