"""ONNX -> deployable artifacts, in two halves joined by one command.

    build/precision/   the precision chain: model.onnx -> calibration cache -> INT8 / FP16 variants
                       (+ TensorRT plans where TensorRT and a GPU exist) -> the accuracy gate
    build/repository/  the repository generator: deployment spec + the passing variant ->
                       model_repository/ (every config.pbtxt rendered, the served code copied)
    build/engines.py   `make engines`: the chain, then the generator
"""
