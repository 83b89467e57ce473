# Precision variants: calibration cache, INT8/FP16 ONNX, TensorRT plans, accuracy gate.
.PHONY: calibrate quantize fp16 validate plans bench-precision bench-compression

calibrate: $(STAMP) $(ARTIFACTS)/model.onnx ## TensorRT-format calibration cache [METHOD=max|percentile|entropy]
	$(PY) -m build.precision.calibrate --artifacts $(ARTIFACTS) --method $(METHOD)

quantize: calibrate ## INT8 Q/DQ ONNX for TensorRT and U8S8 for CPU, from the cache
	$(PY) -m build.precision.quantize --artifacts $(ARTIFACTS) --method $(METHOD) --cpu-layout $(INT8_CPU_LAYOUT)

fp16: $(STAMP) $(ARTIFACTS)/model.onnx ## mixed-precision FP16 ONNX with FP32 IO
	$(PY) -m build.precision.fp16 --artifacts $(ARTIFACTS)

validate: $(STAMP) ## accuracy gate table: every variant present vs FP32 on held-out images
	$(PY) -m build.precision.validate --artifacts $(ARTIFACTS)

plans: $(STAMP) ## TensorRT plan for PRECISION (needs TensorRT and a GPU; says so in one line otherwise)
	$(PY) -m build.precision.plans --artifacts $(ARTIFACTS) --precision $(or $(PRECISION),fp32)

bench-precision: $(STAMP) $(ARTIFACTS)/model.onnx ## every variant's speed (batch 1, 8) and agreement, then the compression table
	$(PY) -m benchmarks.precision --artifacts $(ARTIFACTS) --out $(BENCH_OUT) $(BENCH_PRECISION_ARGS)

bench-compression: $(STAMP) $(ARTIFACTS)/model.onnx ## compression table of ARTIFACTS and its -pruned/-student/-qat folders [COMPRESSION_ARGS="--held-out DIR ..."]
	$(PY) -m benchmarks.compression --artifacts $(ARTIFACTS) --out $(BENCH_OUT) $(COMPRESSION_ARGS)
