"""The CPU's integer dot-product path, which decides which INT8 CPU file answers right on it.

ONNX Runtime's U8S8 kernels multiply uint8 activations by int8 weights. With VNNI (AVX-512 VNNI,
AVX-VNNI, AMX) every product is added into a 32-bit sum exactly. Without it (AVX2 and older x86),
`vpmaddubsw` first adds *pairs* of products in 16 bits, saturating at 32767: two large activations
times two large 8-bit weights overflow, and the model answers differently from the one its gate
measured. Weights kept within 7 bits (|w| <= 64, ONNX Runtime's `reduce_range`) cannot overflow a pair
(2 x 255 x 64 < 32767), so that layout computes the same integers on every x86 CPU.

    "vnni": exact 8-bit products; either layout answers as gated.
    "avx2": saturating pairs; only the 7-bit layout ("avx2") answers as gated.

The INT8 CPU file says in its ONNX metadata which layout it is and which CPU flags it needs
(`int8_cpu_layout`, `int8_requires_cpu`); the served classifier calls `refusal` when it loads and
refuses a file this CPU would answer wrongly. `machine` is what the benchmark reports name their
CPU by (benchmarks/report.py). Standard library only: the build copies this file next to the
classifier's model.py.
"""
from __future__ import annotations

import os
import platform

VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")
PATHS = ("vnni", "avx2")
# the same flags as Kubernetes nodes carry them: Node Feature Discovery's CPUID labels (deploy/k8s/components/int8-vnni)
NODE_LABELS = {"avx512_vnni": "feature.node.kubernetes.io/cpu-cpuid.AVX512VNNI",
               "avx_vnni": "feature.node.kubernetes.io/cpu-cpuid.AVXVNNI",
               "amx_int8": "feature.node.kubernetes.io/cpu-cpuid.AMXINT8"}
LAYOUT_KEY = "int8_cpu_layout"
REQUIRES_KEY = "int8_requires_cpu"  # '|'-separated flags, any one of which is enough; '' = none
CPUINFO = "/proc/cpuinfo"
# the flags ONNX Runtime's kernels and libjpeg-turbo choose their code paths by: two CPUs that differ
# in these run the same benchmark at different speeds (every amx_* flag counts too)
SPEED_FLAGS = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_bf16", "avx512_fp16",
               "avx512_vnni", "avx_vnni", "asimd", "asimddp", "i8mm", "sve")


def _cpuinfo_field(names: tuple[str, ...], cpuinfo: str) -> str:
    try:
        with open(cpuinfo) as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in names:
                    return value.strip()
    except OSError:
        pass
    return ""


def cpu_flags(cpuinfo: str = CPUINFO) -> frozenset[str]:
    """The first processor's feature flags (x86 `flags`, Arm `Features`); empty where unreadable."""
    return frozenset(_cpuinfo_field(("flags", "Features"), cpuinfo).split())


def cpu_model(cpuinfo: str = CPUINFO) -> str:
    return _cpuinfo_field(("model name",), cpuinfo) or platform.processor() or platform.machine() or "unknown CPU"


def machine(cpuinfo: str = CPUINFO) -> dict:
    """What a benchmark report names its machine by: the CPU model, its speed flags (SPEED_FLAGS, amx_*),
    the cores online and those this process may run on (a container or taskset can hold fewer)."""
    flags = cpu_flags(cpuinfo)
    usable = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    return {"cpu": cpu_model(cpuinfo),
            "flags": sorted(f for f in flags if f in SPEED_FLAGS or f.startswith("amx")),
            "cores": os.cpu_count(), "cores_usable": len(usable) if usable else os.cpu_count()}


def integer_path(flags: frozenset[str] | set[str] | None = None) -> str:
    """'vnni' where a VNNI flag is present, else 'avx2' (the saturating path, and the safe assumption)."""
    flags = cpu_flags() if flags is None else flags
    return "vnni" if set(VNNI_FLAGS) & set(flags) else "avx2"


def describe(flags: frozenset[str] | set[str] | None = None, model: str | None = None) -> str:
    """One line: the CPU, the flags that decide its integer path, and the path."""
    flags = cpu_flags() if flags is None else flags
    deciding = sorted(set(flags) & {*VNNI_FLAGS, "avx2", "avx512f"})
    return f"{model or cpu_model()} ({', '.join(deciding) or 'no avx2/vnni flags'}: {integer_path(flags)} integer path)"


def requirement(layout: str) -> str:
    """The `int8_requires_cpu` value of a file in `layout`."""
    if layout not in PATHS:
        raise ValueError(f"INT8 CPU layout {layout!r} is not one of {PATHS}")
    return "|".join(VNNI_FLAGS) if layout == "vnni" else ""


def refusal(metadata: dict[str, str], flags: frozenset[str] | set[str] | None = None,
            model: str | None = None) -> str | None:
    """None if a model with this ONNX metadata answers on this CPU as its gate measured; else why not,
    in one line. Files without the keys (FP32, FP16, foreign files) carry no requirement."""
    needed = [f for f in metadata.get(REQUIRES_KEY, "").split("|") if f]
    flags = cpu_flags() if flags is None else flags
    if not needed or set(needed) & set(flags):
        return None
    layout = metadata.get(LAYOUT_KEY, "?")
    return (f"refusing the INT8 CPU model: its layout {layout!r} needs one of the CPU flags {', '.join(needed)}, "
            f"which this CPU ({describe(flags, model)}) lacks, so it would answer differently from what its accuracy "
            "gate measured; rebuild it for this CPU: make engines PRECISION=int8 INT8_CPU_LAYOUT=avx2")
