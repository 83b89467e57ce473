"""The one ONNX Runtime CPU session the serving path uses, so that every measurement runs the same kernels.

Used by the python-backend classifier models (the build copies this file next to their model.py, so
it must depend on nothing but onnxruntime), the in-process bound, the FastAPI baseline and the
precision bench.
"""
from __future__ import annotations

import onnxruntime as ort


def cpu_session(path, intra_op_threads: int = 1, allow_spinning: bool = False) -> ort.InferenceSession:
    """A CPU session: `intra_op_threads` threads for one model call, one inter-op thread, sequential
    execution, all graph optimisations. No spinning by default: ONNX Runtime's busy-waiting threads
    would steal the cores that decoding needs."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = int(intra_op_threads)
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if allow_spinning else "0")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
