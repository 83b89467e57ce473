# The GPU path: TensorRT plans checked end to end, and DALI preprocessing (docs/gpu.md).
# Included by the main Makefile (PY, STAMP, SPEC, ARTIFACTS, PYTHON come from there).
GPU_CHECK_OUT ?= benchmarks/results/gpu-check
GPU_CHECK_ARGS ?=
DALI_VENV := .venv-dali
DALI_STAMP := $(DALI_VENV)/.installed
BENCH_PREPROCESS_ARGS ?=

.PHONY: gpu-check gpu-preflight dali-setup bench-preprocess

# gpu-preflight comes before the model's export: without TensorRT or a GPU, stop in seconds saying which.
gpu-check: $(STAMP) gpu-preflight $(ARTIFACTS)/model.onnx ## with a GPU and TensorRT (NGC container): FP32/FP16/INT8 plans vs ORT, INT8 layers, img/s, Triton; report in GPU_CHECK_OUT
	$(PY) -m build.gpu_check --spec $(SPEC) --artifacts $(ARTIFACTS) --out $(GPU_CHECK_OUT) $(GPU_CHECK_ARGS)

gpu-preflight: $(STAMP)
	@$(PY) -m build.gpu_check --preflight

dali-setup: $(DALI_STAMP) ## .venv-dali: NVIDIA DALI (pinned; numpy 2, so apart from .venv) for the DALI parity test and bench-preprocess

$(DALI_STAMP): requirements/dali.txt
	$(PYTHON) -m venv $(DALI_VENV)
	$(DALI_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(DALI_VENV)/bin/python -m pip install --quiet -r requirements/dali.txt
	touch $@

bench-preprocess: $(STAMP) $(DALI_STAMP) ## DALI on CPU vs the Pillow path: ms per image and img/s per core, bundled photos [BENCH_PREPROCESS_ARGS=--repeat 5]
	$(PY) -m benchmarks.preprocess_dali --artifacts $(ARTIFACTS) --dali-python $(DALI_VENV)/bin/python --out $(BENCH_OUT)/preprocess_dali $(BENCH_PREPROCESS_ARGS)
