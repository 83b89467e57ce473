# Benchmarks: perf_analyzer, Locust, the reference points, the configuration search.
# Included by the main Makefile (PY, STAMP, REPOSITORY, SPEC, ARTIFACTS come from there).
PERF_VENV := .venv-perf
PERF_STAMP := $(PERF_VENV)/.installed
BENCH_OUT ?= benchmarks/results
CONCURRENCY ?= 1 2 4 8
USERS ?= 8
RUN_TIME ?= 20
BENCH_ARGS ?=
TUNE_ARGS ?=
SCENARIO_ARGS ?=

.PHONY: perf-setup perf locust bench bench-quick bench-scenario tune profile

perf-setup: $(PERF_STAMP) ## .venv-perf: perf_analyzer (tritonclient 2.51, pinned) + libcudart + Debian libb64-0d (+ linux-perf for make profile)

# perf_analyzer links libb64.so.0d (Debian libb64-0d) and libcudart.so.12 (pip; no GPU needed).
$(PERF_STAMP): requirements/perf.txt
	@if ! ldconfig -p | grep -q 'libb64\.so\.0d'; then \
	    if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq libb64-0d; \
	    else echo "perf-setup: perf_analyzer needs the Debian package libb64-0d: sudo apt-get install libb64-0d" >&2; exit 1; fi; \
	fi
	@if ! command -v perf >/dev/null; then \
	    if [ "$$(id -u)" = 0 ]; then { apt-get update -qq && apt-get install -y -qq linux-perf; } || echo "perf-setup: no linux-perf: make profile will say so" >&2; \
	    else echo "perf-setup: make profile needs Linux perf: sudo apt-get install linux-perf" >&2; fi; \
	fi
	$(PYTHON) -m venv $(PERF_VENV)
	$(PERF_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(PERF_VENV)/bin/python -m pip install -r requirements/perf.txt
	touch $@

perf: engines $(PERF_STAMP) ## perf_analyzer sweep (gRPC, real photos) on the ensemble and each member [CONCURRENCY="1 2 4 8"]
	$(PY) -m benchmarks.perf --model-repository $(REPOSITORY) --concurrency $(CONCURRENCY) --out $(BENCH_OUT)/perf

locust: engines ## headless Locust, Triton gRPC + HTTP users, CSV + HTML report [USERS=8 RUN_TIME=20]
	$(PY) -m benchmarks.locust_run --model-repository $(REPOSITORY) --users $(USERS) --run-time $(RUN_TIME) \
	    --out $(BENCH_OUT)/locust

bench: engines $(PERF_STAMP) ## everything side by side, then 3 paired rounds of the goal ratios: table, ratios, plot in benchmarks/results/ [BENCH_ARGS="--rounds 5"]
	$(PY) -m benchmarks.bench --model-repository $(REPOSITORY) --out $(BENCH_OUT) $(BENCH_ARGS)

bench-quick: engines $(PERF_STAMP) ## the same, shorter (short windows, concurrency 2 and 8, 1 round)
	$(PY) -m benchmarks.bench --quick --model-repository $(REPOSITORY) --out $(BENCH_OUT) $(BENCH_ARGS)

bench-scenario: engines $(PERF_STAMP) ## MLPerf's Server scenario: the highest Poisson rate the ensemble answers within a p99 budget, beside its closed-loop capacity [SCENARIO_ARGS="--p99-budget-ms 50"]
	$(PY) -m benchmarks.scenario --model-repository $(REPOSITORY) --out $(BENCH_OUT)/scenario $(SCENARIO_ARGS)

tune: $(STAMP) $(PERF_STAMP) ## search instances/batching/threads with perf_analyzer, write the winner to SPEC [TUNE_ARGS=--quick PRECISION=int8]
	$(PY) -m benchmarks.tune --spec $(SPEC) --artifacts $(ARTIFACTS) --model-repository $(REPOSITORY) \
	    --out $(BENCH_OUT)/tune $(if $(filter-out auto,$(BACKEND)),--backend $(BACKEND)) \
	    $(if $(PRECISION),--precision $(PRECISION)) $(TUNE_ARGS)

profile: engines $(PERF_STAMP) ## serving CPU per image by process and library, both pipelines (Linux perf, as root) [PROFILE_ARGS=--seconds 5]
	$(PY) -m benchmarks.profile --model-repository $(REPOSITORY) --out $(BENCH_OUT)/profile $(PROFILE_ARGS)
