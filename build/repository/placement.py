"""Which CPUs a built repository answers right on, and where it may therefore run.

    python -m build.repository.placement --model-repository model_repository

An INT8 CPU file in the `vnni` layout answers as its gate measured only on CPUs with a VNNI flag, and the
classifier refuses to load anywhere else (common/cpu.py, docs/precision.md). Every model file of the
repository says in its ONNX metadata which flags it needs (`int8_requires_cpu`); this reads them and says
where to run it: any x86-64 CPU, or (on Kubernetes) nodes that Node Feature Discovery labels with one of
those flags, which deploy/k8s/overlays/cpu-vnni selects. `make publish` and `make image` print the same line.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

from build.repository.writer import read_manifest
from common import cpu

ANY_CPU_OVERLAY = "deploy/k8s/overlays/cpu"
GPU_OVERLAY = "deploy/k8s/overlays/gpu"  # TensorRT plans: the GPU they were built for decides (docs/gpu.md)
VNNI_OVERLAY = "deploy/k8s/overlays/cpu-vnni"  # overlays/cpu + components/int8-vnni


def requirements(repository: str | Path) -> dict[str, tuple[str, tuple[str, ...]]]:
    """{model file relative to the repository: (its INT8 layout, the CPU flags any one of which it needs)}
    for every model file that needs one (FP32, FP16 and `avx2`-layout files need none)."""
    repository = Path(repository)
    read_manifest(repository)  # only a repository build.engines wrote
    needs = {}
    for path in sorted(repository.glob("*/[0-9]*/*.onnx")):
        metadata = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
        flags = tuple(f for f in metadata.get(cpu.REQUIRES_KEY, "").split("|") if f)
        if flags:
            needs[path.relative_to(repository).as_posix()] = (metadata.get(cpu.LAYOUT_KEY, "?"), flags)
    return needs


def advice(repository: str | Path) -> str:
    """One line: where the repository answers as gated, and the Kubernetes overlay that keeps it there."""
    if read_manifest(repository).get("backend") == "tensorrt":
        return (f"{repository}: TensorRT plans, built for one GPU model and TensorRT version "
                f"(Kubernetes: {GPU_OVERLAY}, on nodes with that GPU)")
    needs = requirements(repository)
    if not needs:
        return (f"{repository}: no model file needs a particular CPU: it answers as gated on any x86-64 CPU "
                f"(Kubernetes: {ANY_CPU_OVERLAY})")
    files = ", ".join(f"{name} (INT8 layout {layout})" for name, (layout, _) in needs.items())
    flag_sets = {flags for _, flags in needs.values()}
    if len(flag_sets) > 1 or any(f not in cpu.NODE_LABELS for f in next(iter(flag_sets))):
        wanted = "; ".join(f"{name}: one of {', '.join(flags)}" for name, (_, flags) in needs.items())
        return (f"{repository}: the INT8 file(s) {files} answer as gated only on CPUs with {wanted} "
                "(no overlay of this project selects such nodes)")
    (flags,) = flag_sets
    labels = " or ".join(f"{cpu.NODE_LABELS[f]}=true" for f in flags)
    return (f"{repository}: the INT8 file(s) {files} answer as gated only on CPUs with one of {', '.join(flags)}, "
            f"and are refused elsewhere (Kubernetes: {VNNI_OVERLAY}, nodes labelled {labels} by Node Feature "
            "Discovery); for a fleet of mixed CPUs rebuild with make engines PRECISION=int8 INT8_CPU_LAYOUT=avx2")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Say which CPUs a built model repository answers right on.")
    p.add_argument("--model-repository", type=Path, default=Path("model_repository"), help="(default: %(default)s)")
    return p


if __name__ == "__main__":
    try:
        print(advice(get_args_parser().parse_args().model_repository))
    except (OSError, DecodeError) as exc:  # no BUILD.json; a model file that is not ONNX
        sys.exit(f"build.repository.placement: {exc}")
