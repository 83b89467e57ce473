"""What this machine and its Triton server can run: decided once, reported in one line.

    python -m build.repository.capabilities
"""
from __future__ import annotations

import ctypes
import dataclasses
import os
from pathlib import Path

from serving.tritonserver import ServerNotInstalled, backend_names, default_backend_directory


@dataclasses.dataclass(frozen=True)
class Capabilities:
    server_backends: tuple[str, ...]  # folders in the server's backend directory
    tensorrt: str | None  # TensorRT version, if importable
    tensorrt_reason: str
    gpus: int
    gpu_reason: str

    def line(self) -> str:
        trt = f"TensorRT {self.tensorrt}" if self.tensorrt else f"TensorRT: no ({self.tensorrt_reason})"
        gpu = f"{self.gpus} GPU(s)" if self.gpus else f"GPU: none ({self.gpu_reason})"
        backends = ", ".join(self.server_backends) or "none found"
        return f"server backends: {backends}; {trt}; {gpu}"


def detect_tensorrt() -> tuple[str | None, str]:
    try:
        import tensorrt  # type: ignore[import-not-found]
    except ImportError as exc:
        return None, f"cannot import tensorrt: {exc}"
    return tensorrt.__version__, "ok"


def detect_gpus() -> tuple[int, str]:
    """CUDA devices through the driver API (no framework import)."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return 0, "no NVIDIA driver (libcuda.so.1 not found)"
    if cuda.cuInit(0) != 0:
        return 0, "the NVIDIA driver found no usable device (cuInit failed)"
    count = ctypes.c_int(0)
    if cuda.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return 0, "cuDeviceGetCount failed"
    return count.value, "ok"


# Where NGC's tritonserver images (and the project's CPU image, deploy/images/) keep the server: the
# binary in bin/, one folder per backend in backends/. TRITON_SERVER_ROOT names another such root.
NGC_SERVER_ROOT = Path("/opt/tritonserver")


def server_backend_directory(server_root: Path | None = None) -> Path:
    """The backend directory of the server that will run here: an NGC-layout install (bin/tritonserver
    + backends/) where there is one, else the pip server's (prepared by the launcher)."""
    root = Path(server_root or os.environ.get("TRITON_SERVER_ROOT") or NGC_SERVER_ROOT)
    if (root / "bin" / "tritonserver").is_file() and (root / "backends").is_dir():
        return root / "backends"
    from serving.tritonserver import locate_server, prepare_backend_directory

    try:
        return prepare_backend_directory(locate_server(), default_backend_directory())
    except ServerNotInstalled:
        return default_backend_directory()


def detect(backend_directory: Path | None = None, server_root: Path | None = None) -> Capabilities:
    if backend_directory is None:
        backend_directory = server_backend_directory(server_root)
    trt, trt_reason = detect_tensorrt()
    gpus, gpu_reason = detect_gpus()
    return Capabilities(tuple(backend_names(backend_directory)), trt, trt_reason, gpus, gpu_reason)


def resolve_backend(requested: str, caps: Capabilities, pipeline: str = "ensemble") -> tuple[str, str]:
    """'auto' -> the best classifier backend this server can run for `pipeline`, with the reason."""
    if requested != "auto":
        return requested, "requested explicitly"
    if pipeline == "fused" and "python" in caps.server_backends:
        return "python-onnxruntime", "the fused pipeline decodes and classifies in one python model"
    if "tensorrt" in caps.server_backends and caps.tensorrt and caps.gpus:
        return "tensorrt", "server has the tensorrt backend, TensorRT and a GPU are present"
    if "onnxruntime" in caps.server_backends:
        return "onnxruntime", "server has the onnxruntime backend"
    if "python" in caps.server_backends:
        return "python-onnxruntime", "server has only the python backend: ONNX Runtime inside it, on CPU"
    raise RuntimeError(f"the server can run no classifier backend ({caps.line()})")


if __name__ == "__main__":
    import sys

    try:
        caps = detect()
        backend, why = resolve_backend("auto", caps)
    except (OSError, RuntimeError, ValueError) as exc:  # ServerNotInstalled is a RuntimeError
        sys.exit(f"build.repository.capabilities: {exc}")
    print(f"{caps.line()} -> classifier backend: {backend} ({why})")
