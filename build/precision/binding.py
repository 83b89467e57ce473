"""A TensorRT plan loads only on the TensorRT version and the GPU it was built for: bind it to its server.

    spec "target_server": {"image": "nvcr.io/nvidia/tritonserver:25.08-py3", "tensorrt": "10.13.2.6",
                           "compute_capability": "9.0"}
    plan's <plan>.json (build.precision.plans) -> check_plan() -> refuse, or the binding BUILD.json records

By default a plan runs only with the very TensorRT build (major.minor.patch.build) that made it and on the
kind of GPU that made it (NVIDIA/TensorRT#3862). A version-compatible plan (`--version-compatible`) also
runs on later TensorRT versions, when the server allows it (`--backend-config=tensorrt,version-compatible=true`);
a hardware-compatible one (`--hardware-compatibility ampere_plus`) on every GPU of compute capability 8.0+,
or (`same_compute_capability`) on other GPUs of the same compute capability. Both cost speed
(docs/gpu.md). Without a stated target, the target is this machine's TensorRT and GPU 0: right when the
repository is written inside the server's own container.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

HARDWARE_LEVELS = ("none", "ampere_plus", "same_compute_capability")
MIN_VERSION_COMPATIBLE = (8, 6)  # version-compatible plans exist from TensorRT 8.6
AMPERE = (8, 0)


class PlanBindingError(ValueError):
    """The plan cannot load on the target server: the message says which mismatch and how to rebuild."""


@dataclasses.dataclass(frozen=True)
class Target:
    tensorrt: str | None
    compute_capability: str | None
    image: str = ""
    source: str = "the spec's target_server"

    def name(self) -> str:
        return self.image or f"the target server ({self.source})"


def version_tuple(version: str) -> tuple[int, ...]:
    try:
        return tuple(int(p) for p in str(version).strip().split("."))
    except ValueError:
        raise PlanBindingError(f"{version!r} is not a TensorRT version such as 10.13.2.6") from None


def capability_tuple(cc: str) -> tuple[int, int]:
    parts = version_tuple(cc)
    if len(parts) != 2:
        raise PlanBindingError(f"{cc!r} is not a compute capability such as 9.0")
    return parts[0], parts[1]


def resolve_target(target_server: dict, local_tensorrt: str | None, local_compute_capability: str | None) -> Target:
    """The server a plan must load on: the spec's target_server, each missing field from this machine."""
    tensorrt = target_server.get("tensorrt") or local_tensorrt
    cc = target_server.get("compute_capability") or local_compute_capability
    stated = [k for k in ("tensorrt", "compute_capability") if target_server.get(k)]
    source = ("the spec's target_server" if len(stated) == 2 else
              "this machine" if not stated else f"the spec's target_server ({stated[0]}) and this machine")
    return Target(tensorrt, cc, str(target_server.get("image", "")), source)


def read_plan_metadata(plan: Path) -> dict:
    meta_path = plan.with_name(plan.name + ".json")
    if not meta_path.is_file():
        raise PlanBindingError(f"{plan} has no {meta_path.name}: which TensorRT and GPU built it is unknown, so it "
                               "cannot be bound to a server; build it with python -m build.precision.plans")
    return json.loads(meta_path.read_text())


def _rebuild_hint(target: Target, option: str) -> str:
    where = f"inside {target.image}" if target.image else "with the server's TensorRT on the server's GPU"
    return (f"rebuild it {where} (make plans PRECISION=..., or make engines BACKEND=tensorrt), or accept the cost "
            f"of a portable plan: {option} (docs/gpu.md)")


def check_version(built: str, compatibility: dict, target: Target) -> str:
    if not target.tensorrt:
        raise PlanBindingError("the target server's TensorRT version is unknown (no TensorRT here and none stated): set "
                               "target_server.tensorrt in the deployment spec, e.g. \"10.13.2.6\" (docs/gpu.md)")
    have, want = version_tuple(built), version_tuple(target.tensorrt)
    if compatibility.get("version_compatible"):
        if have[:2] < MIN_VERSION_COMPATIBLE or want < have:
            raise PlanBindingError(f"the plan is version-compatible from TensorRT {built} on, but {target.name()} has "
                                   f"TensorRT {target.tensorrt}; {_rebuild_hint(target, '--version-compatible')}")
        return f"version-compatible plan from TensorRT {built}, server TensorRT {target.tensorrt} (later or equal)"
    if len(want) < 3:
        raise PlanBindingError(f"target TensorRT {target.tensorrt!r} is too vague: a plan needs the same "
                               "major.minor.patch(.build); state it in full")
    n = min(len(have), len(want))
    if have[:n] != want[:n]:
        raise PlanBindingError(f"the plan was built by TensorRT {built} but {target.name()} has TensorRT "
                               f"{target.tensorrt}: a plan loads only with the TensorRT that built it; "
                               + _rebuild_hint(target, "--version-compatible"))
    return f"TensorRT {built} = server's {target.tensorrt}"


def check_hardware(built_cc: str | None, gpu_name: str | None, compatibility: dict, target: Target) -> str:
    level = compatibility.get("hardware_compatibility", "none") or "none"
    if level not in HARDWARE_LEVELS:
        raise PlanBindingError(f"hardware_compatibility {level!r} is not one of {HARDWARE_LEVELS}")
    if not target.compute_capability:
        raise PlanBindingError("the target server's GPU is unknown (no GPU here and none stated): set "
                               "target_server.compute_capability in the deployment spec, e.g. \"9.0\" (docs/gpu.md)")
    if not built_cc:
        raise PlanBindingError("the plan's metadata does not say which GPU built it; rebuild it with "
                               "python -m build.precision.plans")
    want = capability_tuple(target.compute_capability)
    if level == "ampere_plus":
        if want < AMPERE:
            raise PlanBindingError(f"the plan runs on Ampere and later GPUs (compute capability 8.0+), but "
                                   f"{target.name()} has compute capability {target.compute_capability}; "
                                   + _rebuild_hint(target, "nothing portable reaches it"))
        return f"hardware-compatible plan (ampere_plus), server GPU {target.compute_capability}"
    if capability_tuple(built_cc) != want:
        option = "--hardware-compatibility ampere_plus" if want >= AMPERE else "none reaches it"
        raise PlanBindingError(f"the plan was built for GPU {gpu_name} (compute capability {built_cc}) but "
                               f"{target.name()} has compute capability {target.compute_capability}; "
                               + _rebuild_hint(target, option))
    if level == "same_compute_capability":
        return f"plan for compute capability {built_cc} (any GPU of it), server GPU {target.compute_capability}"
    return (f"plan built on {gpu_name} ({built_cc}), server GPU compute capability {target.compute_capability}: "
            "same architecture (a default plan also expects the same GPU model)")


def check_plan(plan: Path, target: Target) -> dict:
    """What BUILD.json records about the plan's binding; raises PlanBindingError when it cannot load there."""
    meta = read_plan_metadata(plan)
    compatibility = meta.get("compatibility", {})
    gpu = meta.get("gpu", {})
    checks = [check_version(str(meta.get("tensorrt")), compatibility, target),
              check_hardware(gpu.get("compute_capability"), gpu.get("name"), compatibility, target)]
    flags = ["--backend-config=tensorrt,version-compatible=true"] if compatibility.get("version_compatible") else []
    return {"plan": str(plan), "built_with": {"tensorrt": meta.get("tensorrt"), "gpu": gpu.get("name"),
                                              "compute_capability": gpu.get("compute_capability")},
            "compatibility": compatibility, "target": dataclasses.asdict(target), "checks": checks,
            "server_flags": flags}


def local_target(target_server: dict) -> Target:
    """resolve_target with this machine's TensorRT and GPU 0 filling what the spec leaves out."""
    from build.precision import plans
    from build.repository import capabilities

    try:
        local_trt, _ = capabilities.detect_tensorrt()
    except (OSError, RuntimeError):
        local_trt = None
    gpu = plans.gpu_info() if capabilities.detect_gpus()[0] else {}
    return resolve_target(target_server, local_trt, gpu.get("compute_capability"))
