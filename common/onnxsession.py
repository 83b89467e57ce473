"""The one ONNX Runtime CPU session the serving path uses, so that every measurement runs the same kernels.

Used by the python-backend classifier models (the build copies this file and common/cpu.py next to
their model.py, so it must depend on nothing but onnxruntime and that file), the accuracy gate, the
in-process bound, the FastAPI baseline and the precision bench. It refuses an INT8 file whose integer
layout this CPU cannot compute exactly (common/cpu.py): such a file would answer differently from
what its accuracy gate measured.
"""
from __future__ import annotations

import onnxruntime as ort

try:
    from common.cpu import refusal
except ImportError:  # inside a model repository: cpu.py sits next to this file
    from cpu import refusal


class CpuCannotServe(RuntimeError):
    """The model's INT8 layout needs CPU flags this CPU lacks."""


class CannotLoad(RuntimeError):
    """ONNX Runtime refused the model (an IR version or opset it does not have, a broken graph)."""


def cpu_session(model, intra_op_threads: int = 1, allow_spinning: bool = False,
                optimize: bool = True, weights_folder: str | None = None) -> ort.InferenceSession:
    """A CPU session over `model` (a path, or serialized ONNX bytes): `intra_op_threads` threads for one
    model call (0: ONNX Runtime's default), one inter-op thread, sequential execution, all graph
    optimisations (`optimize=False`: none, so every node runs as written: calibration reads every
    tensor, the gate runs Q/DQ pairs in float). No spinning by default: ONNX Runtime's busy-waiting
    threads would steal the cores that decoding needs. `weights_folder`: where serialized bytes' external data
    lies (the folder of the file they were read from; a path finds its own)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = int(intra_op_threads)
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if allow_spinning else "0")
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    if weights_folder is not None:
        options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(weights_folder))
    source = model if isinstance(model, bytes) else str(model)
    try:
        session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ONNX Runtime's own errors derive from Exception alone
        if isinstance(exc, OSError):
            raise
        name = "the model" if isinstance(model, bytes) else model
        raise CannotLoad(f"{name}: ONNX Runtime {ort.__version__} cannot load it: {exc}") from None
    why = refusal(session.get_modelmeta().custom_metadata_map)
    if why:
        raise CpuCannotServe(f"{'the model' if isinstance(model, bytes) else model}: {why}")
    return session
