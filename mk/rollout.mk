# Versioned rollout on the server `make serve` started (explicit model control; docs/operations.md).
#   make rollout ARTIFACTS=artifacts/mine [MODEL_FILE=...] [HELD_OUT=DIR]   then   make rollback
#   make ab ARTIFACTS=artifacts/mine; make ab-run [SPLIT=0.2] [AB_DURATION=20]; make ab-promote | make ab-stop
MODEL_FILE ?=
HELD_OUT ?=
SPLIT ?= 0.2
AB_DURATION ?= 20
ROLLOUT_ARGS ?=
CANDIDATE_ARGS = --artifacts $(ARTIFACTS) $(if $(MODEL_FILE),--model-file $(MODEL_FILE)) $(if $(HELD_OUT),--held-out $(HELD_OUT))

.PHONY: rollout rollback rollout-status ab ab-run ab-stop ab-promote bench-rollout

rollout: $(STAMP) ## gate ARTIFACTS (or MODEL_FILE) against the version in service, serve it as the next version, live
	$(PY) -m serving.rollout add $(CANDIDATE_ARGS) $(ROLLOUT_ARGS)

rollback: $(STAMP) ## retire the classifier version in service and serve the previous one, live
	$(PY) -m serving.rollout rollback

rollout-status: $(STAMP) ## classifier versions in the repository and on the server, recent rollouts
	$(PY) -m serving.rollout status

ab: $(STAMP) ## A/B: serve ARTIFACTS (or MODEL_FILE) as <classifier>_candidate beside the version in service
	$(PY) -m serving.rollout ab start $(CANDIDATE_ARGS)

ab-run: $(STAMP) ## A/B traffic: SPLIT of AB_DURATION seconds of requests to the candidate; each arm's answers and latency
	$(PY) -m serving.rollout ab run --split $(SPLIT) --duration $(AB_DURATION)

ab-stop: $(STAMP) ## A/B: unload and remove the candidate
	$(PY) -m serving.rollout ab stop

ab-promote: $(STAMP) ## A/B: roll the candidate out (gated) and stop the test
	$(PY) -m serving.rollout ab promote

bench-rollout: $(STAMP) $(ARTIFACTS)/model.onnx ## rollouts and rollbacks under Locust load on an own server: requests, failures, switch times [BENCH_ROLLOUT_ARGS="--cycles 3"]
	$(PY) -m benchmarks.rollout_bench --artifacts $(ARTIFACTS) --out $(BENCH_OUT) $(BENCH_ROLLOUT_ARGS)
