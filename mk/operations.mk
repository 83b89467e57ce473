# Operations: the supervisor `make serve` starts (stub watchdog, server restarts), and the soak run (docs/operations.md, self-healing).
# Included by the main Makefile (PY, STAMP, REPOSITORY, HTTP_PORT come from there).
DURATION ?= 10m
SOAK_ARGS ?=
WATCHDOG_PORT ?= 8003

.PHONY: soak watchdog-status drain

soak: engines ## Locust with good and bad images for DURATION (10m): failures, server errors, p99 drift, RSS growth per minute [SOAK_ARGS=--protocol grpc]
	$(PY) -m benchmarks.soak --model-repository $(REPOSITORY) --duration $(DURATION) --out $(BENCH_OUT)/soak $(SOAK_ARGS)

watchdog-status: ## the stub watchdog of `make serve`'s server: readiness, crashes seen, models reloaded
	@curl -sg http://$(ADDRESS_HOST):$(WATCHDOG_PORT)/status; echo

drain: ## unload the ensembles of `make serve`'s server so that in-flight requests finish (make stop does it first)
	$(PY) -m serving.watchdog --drain --http $(ADDRESS_HOST):$(HTTP_PORT)
