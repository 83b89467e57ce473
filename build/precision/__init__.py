"""The precision chain: `python -m build.precision.<stage>`, one module per stage.

    calibrate  model.onnx + images -> calibration/<method>.cache (TensorRT format) + .json
    quantize   cache -> model.int8.trt.onnx (TensorRT's Q/DQ form, trt_qdq.py's rules) and
               model.int8.cpu.onnx (ONNX Runtime U8S8, in the layout the target CPU computes exactly)
    fp16       model.onnx -> model.fp16.onnx (FP32 IO)
    plans      *.onnx -> model.<precision>.plan (TensorRT and a GPU only)
    validate   the accuracy gate: every variant against FP32 on held-out images
    variants   the chain behind `make engines PRECISION=...`: build, gate, pick the file to serve
    imagesets  calibration and held-out image sets through the serving preprocessing
"""
