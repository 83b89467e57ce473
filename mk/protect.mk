# Protection: the bounded queues past saturation and the response cache, measured with Locust
# (docs/operations.md "Limits and the admin key"). Included by the main Makefile (PY, REPOSITORY, BENCH_OUT
# come from there and mk/benchmarks.mk).
OVERLOAD_ARGS ?=
CACHE_ARGS ?=

.PHONY: bench-overload bench-cache

bench-overload: engines ## Locust at 1x 2x 4x the saturating rate, bounded vs unbounded queues: table, ratios, PNG [OVERLOAD_ARGS="--run-time 30"]
	$(PY) -m benchmarks.overload --model-repository $(REPOSITORY) --out $(or $(BENCH_OUT),benchmarks/results)/overload $(OVERLOAD_ARGS)

bench-cache: engines ## response cache on repeated images: hit rate, throughput with vs without [CACHE_ARGS="--distinct 50"]
	$(PY) -m benchmarks.response_cache --model-repository $(REPOSITORY) --out $(or $(BENCH_OUT),benchmarks/results)/response_cache $(CACHE_ARGS)

GUARD_BENCH_ARGS ?=
.PHONY: bench-guard
bench-guard: engines $(PERF_STAMP) ## perf_analyzer over HTTP through the supervisor's HTTP guard and beside it: ratios, guard CPU/request [GUARD_BENCH_ARGS="--rounds 5"]
	$(PY) -m benchmarks.guard --model-repository $(REPOSITORY) --out $(or $(BENCH_OUT),benchmarks/results)/guard $(GUARD_BENCH_ARGS)

STALL_ARGS ?=
.PHONY: bench-stall
bench-stall: engines ## light load on the classifier, its queue policy and instances varied: stalls of Triton's batcher, PNG [STALL_ARGS="--seconds 20"]
	$(PY) -m benchmarks.stall --model-repository $(REPOSITORY) --out $(or $(BENCH_OUT),benchmarks/results)/stall $(STALL_ARGS)
