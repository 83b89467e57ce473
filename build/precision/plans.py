"""TensorRT plans from ONNX files that already carry their precision (TensorRT 10.x and 11.x).

    python -m build.precision.plans --precision int8        # artifacts/<model>/model.int8.trt.onnx -> model.int8.plan
    python -m build.precision.plans --onnx artifacts/efficientnet_lite0/model.int8.trt.onnx --precision int8 \\
        --out artifacts/efficientnet_lite0/model.int8.plan
    python -m build.precision.plans --check                 # one line: can plans be built here? (exit 0 / 3)

TensorRT 11 removed weak typing (no FP16/INT8 builder flags, no calibrator), so precision lives in the
graph: model.onnx (fp32), model.fp16.onnx (mixed precision, FP32 IO), model.int8.trt.onnx (Q/DQ).
Every network is built STRONGLY TYPED. Like TensorRT's EfficientNet sample, the network is parsed
first (every input/output and every parser error logged) and built second, with one optimization
profile from the deployment spec (min 1, opt = the classifier's largest preferred batch, max =
max_batch_size), a persisted timing cache and a progress display. `<plan>.json` records what was
built from what; an ONNX variant not built from the model.onnx beside it is refused
(build/precision/provenance.py). Without TensorRT or a GPU the stage raises `TensorRTUnavailable` (exit status 3)
with one line naming what is missing; it never writes a plan it did not build.
"""
from __future__ import annotations

import argparse
import ctypes
import datetime
import hashlib
import json
import logging
import threading
import time
from pathlib import Path

import onnx
from onnx import TensorProto

from build.repository import capabilities
from build.repository.configs import MODEL_INPUT
from build.repository.spec import DEFAULT_SPEC_PATH, PRECISIONS, DeploymentSpec
from common.contract import MODEL_ONNX
from common.files import write_whole
from common.onnxfiles import model_sha256
from build.precision import provenance
from build.precision.binding import HARDWARE_LEVELS
from serving.health import number

LOG = logging.getLogger("build.precision.plans")
ONNX_FILES = {"fp32": MODEL_ONNX, "fp16": "model.fp16.onnx", "int8": "model.int8.trt.onnx"}
TIMING_CACHE_NAME = "timing.cache"
MIN_TENSORRT_MAJOR = 10  # strongly typed networks + IProgressMonitor; 11.x has only strong typing
EXIT_UNAVAILABLE = 3


class TensorRTUnavailable(RuntimeError):
    """TensorRT or an NVIDIA GPU is missing: the message is one line saying which."""


# ---------------------------------------------------------------- what this machine has

def unavailable_reason(trt_version: str | None, trt_reason: str, gpus: int, gpu_reason: str) -> str | None:
    """The one line saying why plans cannot be built here (None when they can), e.g.
    "TensorRT plans not built: cannot import tensorrt (No module named 'tensorrt'); GPU: none (...)"."""
    missing, present = [], []
    if trt_version is None:
        prefix = "cannot import tensorrt: "
        missing.append(f"cannot import tensorrt ({trt_reason[len(prefix):]})" if trt_reason.startswith(prefix)
                       else f"TensorRT: {trt_reason}")
    elif int(trt_version.split(".")[0]) < MIN_TENSORRT_MAJOR:
        missing.append(f"TensorRT {trt_version} is too old (strongly typed builds need {MIN_TENSORRT_MAJOR}.0+)")
    else:
        present.append(f"TensorRT {trt_version}")
    if gpus < 1:
        missing.append(f"GPU: none ({gpu_reason})")
    else:
        present.append(f"{gpus} GPU(s)")
    if not missing:
        return None
    line = "TensorRT plans not built: " + "; ".join(missing) + (f" (present: {', '.join(present)})" if present else "")
    return " ".join(line.split())  # one line, whatever the import error printed


def require_tensorrt() -> str:
    """TensorRT's version if it and a GPU are usable; else raise TensorRTUnavailable (one line)."""
    try:
        version, trt_reason = capabilities.detect_tensorrt()
    except (OSError, RuntimeError) as exc:  # the module exists but its libraries do not load
        version, trt_reason = None, f"cannot import tensorrt: {exc}"
    gpus, gpu_reason = capabilities.detect_gpus()
    reason = unavailable_reason(version, trt_reason, gpus, gpu_reason)
    if reason:
        raise TensorRTUnavailable(reason)
    return version


def gpu_info(index: int = 0) -> dict:
    """Name, compute capability and driver of one CUDA device, via the driver API (no torch)."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return {"name": None, "reason": "no NVIDIA driver (libcuda.so.1 not found)"}
    device, major, minor, driver = ctypes.c_int(), ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
    name = ctypes.create_string_buffer(256)
    if cuda.cuInit(0) or cuda.cuDeviceGet(ctypes.byref(device), index):
        return {"name": None, "reason": f"CUDA device {index} not usable (cuInit/cuDeviceGet failed)"}
    cuda.cuDeviceGetName(name, len(name), device)
    cuda.cuDeviceGetAttribute(ctypes.byref(major), 75, device)  # CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR
    cuda.cuDeviceGetAttribute(ctypes.byref(minor), 76, device)  # CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR
    cuda.cuDriverGetVersion(ctypes.byref(driver))
    return {"index": index, "name": name.value.decode(errors="replace"),
            "compute_capability": f"{major.value}.{minor.value}",
            "cuda_driver": f"{driver.value // 1000}.{driver.value % 1000 // 10}"}


# ---------------------------------------------------------------- what the ONNX file says

def onnx_input_dims(model: onnx.ModelProto, name: str = MODEL_INPUT) -> tuple[int, ...]:
    """Per-image dims (C, H, W) of input `name`; its batch axis must be dynamic."""
    inputs = {i.name: i for i in model.graph.input}
    if name not in inputs:
        raise ValueError(f"the ONNX model has no input {name!r} (inputs: {sorted(inputs)}); export it with training.export")
    dims = inputs[name].type.tensor_type.shape.dim
    if len(dims) < 2:
        raise ValueError(f"input {name!r} has {len(dims)} dims; expected a batch axis and per-image dims")
    if dims[0].HasField("dim_value") and dims[0].dim_value > 0:
        raise ValueError(f"input {name!r} has a fixed batch of {dims[0].dim_value}; export it with a dynamic batch axis")
    per_image = tuple(d.dim_value if d.HasField("dim_value") else 0 for d in dims[1:])
    if not all(d > 0 for d in per_image):
        raise ValueError(f"input {name!r} must have static per-image dims, got {[str(d).strip() for d in dims[1:]]}")
    return per_image


def precision_summary(model: onnx.ModelProto) -> dict:
    """What precision the graph carries: Q/DQ nodes (explicit INT8) and FP16 tensors."""
    ops = [n.op_type for n in model.graph.node]
    fp16 = TensorProto.FLOAT16
    casts_fp16 = sum(1 for n in model.graph.node if n.op_type == "Cast"
                     and any(a.name == "to" and a.i == fp16 for a in n.attribute))
    return {
        "quantize_linear": ops.count("QuantizeLinear"),
        "dequantize_linear": ops.count("DequantizeLinear"),
        "fp16_initializers": sum(1 for t in model.graph.initializer if t.data_type == fp16),
        "fp16_casts": casts_fp16,
        "io_dtypes": {v.name: TensorProto.DataType.Name(v.type.tensor_type.elem_type)
                      for v in list(model.graph.input) + list(model.graph.output)},
    }


def check_precision(summary: dict, precision: str, source: str = "the ONNX model") -> None:
    """Refuse a graph whose precision is not the one asked for (no builder flag can change it)."""
    qdq = summary["quantize_linear"] + summary["dequantize_linear"]
    fp16 = summary["fp16_initializers"] + summary["fp16_casts"]
    if precision == "int8" and not qdq:
        raise ValueError(f"{source} has no QuantizeLinear/DequantizeLinear nodes: an int8 plan needs an "
                         "explicitly quantized graph (model.int8.trt.onnx from the quantize stage)")
    if precision == "fp16" and (qdq or not fp16):
        raise ValueError(f"{source} is not an FP16 graph ({fp16} FP16 initializers/casts, {qdq} Q/DQ nodes): "
                         "use model.fp16.onnx from the fp16 stage")
    if precision == "fp32" and (qdq or fp16):
        raise ValueError(f"{source} is not FP32 ({qdq} Q/DQ nodes, {fp16} FP16 initializers/casts): "
                         "pass the precision it carries")


# ---------------------------------------------------------------- build settings

def profile_shapes(spec: DeploymentSpec, per_image: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    """min 1, opt = largest preferred classifier batch (max_batch_size if none), max = max_batch_size."""
    opt = max(spec.classifier.preferred_batch_sizes, default=spec.max_batch_size)
    if not 1 <= opt <= spec.max_batch_size:
        raise ValueError(f"opt batch {opt} outside 1..max_batch_size ({spec.max_batch_size})")
    return {"min": (1, *per_image), "opt": (opt, *per_image), "max": (spec.max_batch_size, *per_image)}


def default_paths(artifacts: Path, precision: str) -> tuple[Path, Path]:
    """(ONNX in, plan out) for a precision inside an artifact folder."""
    return artifacts / ONNX_FILES[precision], artifacts / f"model.{precision}.plan"


def timing_cache_path(plan: Path, flag: str | None = None) -> Path:
    return Path(flag) if flag else plan.parent / TIMING_CACHE_NAME


def metadata_path(plan: Path) -> Path:
    return plan.with_name(plan.name + ".json")


def cache_key(tensorrt_version: str, gpu: dict) -> dict:
    """A timing cache is only valid for the TensorRT version and GPU that measured it."""
    return {"tensorrt": tensorrt_version, "gpu": gpu.get("name"), "compute_capability": gpu.get("compute_capability")}


def read_timing_cache(path: Path, key: dict) -> tuple[bytes | None, str]:
    """(bytes, status) of a cache written by write_timing_cache; None when absent, foreign or corrupt.
    Its sidecar `<cache>.json` holds the key and the bytes' sha256."""
    if not path.exists():
        return None, "absent: a new cache will be written"
    try:
        meta = json.loads(path.with_name(path.name + ".json").read_text())
    except (OSError, ValueError) as exc:
        return None, f"ignored (no readable key file: {exc.__class__.__name__}); rebuilding it"
    data = path.read_bytes()
    if {k: meta.get(k) for k in key} != key:
        theirs = {k: meta.get(k) for k in key}
        return None, f"ignored (made for {theirs}, this build is {key}); rebuilding it"
    if meta.get("sha256") != hashlib.sha256(data).hexdigest():
        return None, "ignored (corrupt: its sha256 does not match its key file); rebuilding it"
    return data, f"loaded ({len(data)} bytes)"


def write_timing_cache(path: Path, data: bytes, key: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_whole(path, data)
    sidecar = {**key, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    write_whole(path.with_name(path.name + ".json"), json.dumps(sidecar, indent=2) + "\n")


def plan_metadata(*, tensorrt_version: str, gpu: dict, onnx_path: Path, onnx_sha256: str, precision: str,
                  summary: dict, profile: dict, workspace_bytes: int, timing_cache: Path, timing_cache_status: str,
                  build_seconds: float, plan: Path, plan_sha256: str, network_io: list[dict],
                  options: dict, compatibility: dict | None = None) -> dict:
    """The record written beside each plan (`<plan>.json`)."""
    return {
        "generated_by": "python -m build.precision.plans",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "tensorrt": tensorrt_version,
        "gpu": gpu,
        "onnx": {"path": str(onnx_path), "sha256": onnx_sha256, "precision": summary},
        "precision": precision,
        "strongly_typed": True,
        "profile": {"input": MODEL_INPUT, **{k: list(v) for k, v in profile.items()}},
        "workspace_bytes": workspace_bytes,
        "timing_cache": {"path": str(timing_cache), "status": timing_cache_status},
        "build_seconds": round(build_seconds, 3),
        "plan": {"path": str(plan), "sha256": plan_sha256},
        "network_io": network_io,
        "options": options,
        "compatibility": compatibility or {"version_compatible": False, "hardware_compatibility": "none"},
    }


# ---------------------------------------------------------------- progress

class BuildProgress:
    """Builder phases as nested tqdm bars, or as log lines without tqdm. Called by TensorRT from
    its own threads through an IProgressMonitor (`trt_progress_monitor`), hence the lock."""

    def __init__(self, use_tqdm: bool = True, log_depth: int = 1, file=None):
        self._lock = threading.Lock()
        self._phases: dict[str, dict] = {}
        self._log_depth = log_depth
        self._file = file
        self._tqdm = None
        if use_tqdm:
            try:
                from tqdm import tqdm
                self._tqdm = tqdm
            except ImportError:
                LOG.info("tqdm not installed: logging builder phases instead")
        self.cancel = False  # set to True (e.g. from a signal handler) to stop the build

    def phase_start(self, phase: str, parent: str | None, steps: int) -> None:
        with self._lock:
            depth = self._phases[parent]["depth"] + 1 if parent in self._phases else 0
            entry = {"depth": depth, "start": time.monotonic(), "bar": None}
            if self._tqdm is not None:
                entry["bar"] = self._tqdm(total=steps, desc=phase, position=depth, leave=depth == 0,
                                          file=self._file, dynamic_ncols=True)
            elif depth <= self._log_depth:
                LOG.info("%s%s (%d steps)", "  " * depth, phase, steps)
            self._phases[phase] = entry

    def step_complete(self, phase: str, step: int) -> bool:
        with self._lock:
            entry = self._phases.get(phase)
            if entry and entry["bar"] is not None:
                entry["bar"].n = step + 1
                entry["bar"].refresh()
        return not self.cancel

    def phase_finish(self, phase: str) -> None:
        with self._lock:
            entry = self._phases.pop(phase, None)
            if entry is None:
                return
            if entry["bar"] is not None:
                entry["bar"].close()
            elif entry["depth"] <= self._log_depth:
                LOG.info("%s%s done in %.1f s", "  " * entry["depth"], phase, time.monotonic() - entry["start"])

    def close(self) -> None:
        for phase in list(self._phases):
            self.phase_finish(phase)


def trt_progress_monitor(trt, progress: BuildProgress):
    """A trt.IProgressMonitor (TensorRT >= 10.0) forwarding to `progress`; None when absent."""
    if not hasattr(trt, "IProgressMonitor"):
        return None

    class _Monitor(trt.IProgressMonitor):
        def __init__(self):
            trt.IProgressMonitor.__init__(self)

        def phase_start(self, phase_name, parent_phase, num_steps):
            progress.phase_start(phase_name, parent_phase, num_steps)

        def step_complete(self, phase_name, step):
            try:
                return progress.step_complete(phase_name, step)
            except KeyboardInterrupt:  # TensorRT callbacks must not raise: cancel the build instead
                return False

        def phase_finish(self, phase_name):
            progress.phase_finish(phase_name)

    return _Monitor()


# ---------------------------------------------------------------- TensorRT: parse, then build

def network_creation_flags(trt) -> int:
    """STRONGLY_TYPED: opt-in on 10.x, accepted and ignored on 11.x (always strongly typed).
    EXPLICIT_BATCH is never set: ignored/deprecated since 10.0 and removed in 11.0."""
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    if flag is None:
        raise TensorRTUnavailable(f"TensorRT plans not built: TensorRT {trt.__version__} has no "
                                  "NetworkDefinitionCreationFlag.STRONGLY_TYPED (needs 10.0+)")
    return 1 << int(flag)


def describe_parser_error(error) -> str:
    """One parser error with its node. ParserError.code()/desc()/node()/file()/line()/func() exist in
    every version; node_name()/node_operator() only in 10.x+ (IParserError::nodeName, nodeOperator)."""
    def call(name):
        fn = getattr(error, name, None)
        try:
            return fn() if callable(fn) else None
        except Exception:  # noqa: BLE001 - a binding missing in one version must not hide the error
            return None

    node, name, op = call("node"), call("node_name"), call("node_operator")
    where = f"node {node}" if node is not None and node >= 0 else "graph"
    if name or op:
        where += f" ({op or '?'} {name!r})" if name else f" ({op})"
    code, desc = call("code"), call("desc")
    source = f" [{call('file')}:{call('line')} {call('func')}]" if call("file") else ""
    return f"{where}: {code}: {desc or error}{source}"


def network_from_onnx_path(trt, logger, onnx_path: Path):
    """(builder, network, parser) for a strongly typed network parsed from `onnx_path`.
    Logs every input/output and every parser error; raises if parsing failed."""
    builder = trt.Builder(logger)
    network = builder.create_network(network_creation_flags(trt))  # flags argument: all versions
    parser = trt.OnnxParser(network, logger)
    ok = parser.parse_from_file(str(onnx_path))  # TRT >= 8.0; resolves external data beside the file
    errors = [describe_parser_error(parser.get_error(i)) for i in range(parser.num_errors)]
    for message in errors:
        LOG.error("ONNX parser: %s", message)
    if not ok or errors:
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {len(errors)} parser error(s)"
                           + (f"; first: {errors[0]}" if errors else ""))
    return builder, network, parser


def network_io(network) -> list[dict]:
    tensors = [("input", network.get_input(i)) for i in range(network.num_inputs)]
    tensors += [("output", network.get_output(i)) for i in range(network.num_outputs)]
    io = [{"kind": kind, "name": t.name, "shape": list(t.shape), "dtype": str(t.dtype).split(".")[-1]}
          for kind, t in tensors]
    for t in io:
        LOG.info("network %s %r shape %s dtype %s", t["kind"], t["name"], t["shape"], t["dtype"])
    return io


def engine_bytes_from_network(trt, builder, network, *, profile: dict, workspace_bytes: int,
                              timing_cache: bytes | None, progress: BuildProgress | None,
                              optimization_level: int | None = None, compatibility: dict | None = None,
                              detailed_profile: bool = False) -> tuple[bytes, bytes | None]:
    """(serialized plan, serialized timing cache) built from a parsed network."""
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)  # TRT >= 8.4
    if optimization_level is not None:
        config.builder_optimization_level = optimization_level  # TRT >= 8.6
    apply_compatibility(trt, config, compatibility or {})
    if detailed_profile:  # layer names, precisions and tactics in the engine inspector (gpu_check)
        config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED  # TRT >= 8.2

    inputs = [network.get_input(i).name for i in range(network.num_inputs)]
    if inputs != [MODEL_INPUT]:
        raise ValueError(f"network inputs {inputs}; expected [{MODEL_INPUT!r}] (export with training.export)")
    shape_profile = builder.create_optimization_profile()
    shape_profile.set_shape(MODEL_INPUT, profile["min"], profile["opt"], profile["max"])
    if config.add_optimization_profile(shape_profile) < 0:
        raise RuntimeError(f"TensorRT rejected the optimization profile {profile}")

    # Timing cache: create_timing_cache / set_timing_cache / get_timing_cache, TRT >= 8.0. The sidecar
    # key already keeps caches from other TensorRT versions or GPUs away; this catches what it cannot.
    try:
        cache = config.create_timing_cache(timing_cache or b"")
        accepted = cache is not None and config.set_timing_cache(cache, ignore_mismatch=False)
    except (RuntimeError, TypeError, ValueError) as exc:
        LOG.warning("TensorRT could not read the timing cache (%s)", exc)
        accepted = False
    if not accepted:
        if timing_cache:
            LOG.warning("TensorRT refused the timing cache; building with an empty one (it will be rewritten)")
        config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)

    monitor = trt_progress_monitor(trt, progress) if progress is not None else None
    if monitor is not None:
        try:
            config.progress_monitor = monitor  # TRT >= 10.0; `monitor` stays alive until the build returns
        except AttributeError:
            monitor = None
    if progress is not None and monitor is None:
        LOG.info("this TensorRT has no IProgressMonitor: building without a progress display")
    try:
        plan = builder.build_serialized_network(network, config)  # TRT >= 8.0; None on failure
    finally:
        if progress is not None:
            progress.close()
    if plan is None:
        raise RuntimeError("TensorRT failed to build the plan; see the TensorRT log above")
    final_cache = config.get_timing_cache()
    cache_bytes = bytes(memoryview(final_cache.serialize())) if final_cache is not None else None
    return bytes(memoryview(plan)), cache_bytes


def apply_compatibility(trt, config, compatibility: dict) -> None:
    """Portable plans, at a cost in speed (build.precision.binding): BuilderFlag.VERSION_COMPATIBLE (TRT >= 8.6)
    runs on later TensorRT versions; HardwareCompatibilityLevel AMPERE_PLUS (TRT >= 8.6) or
    SAME_COMPUTE_CAPABILITY (TRT >= 10.x) on other GPUs."""
    if compatibility.get("version_compatible"):
        config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
    level = compatibility.get("hardware_compatibility", "none")
    if level not in HARDWARE_LEVELS:
        raise ValueError(f"hardware compatibility {level!r} is not one of {HARDWARE_LEVELS}")
    if level != "none":
        value = getattr(trt.HardwareCompatibilityLevel, level.upper(), None)
        if value is None:
            raise TensorRTUnavailable(f"TensorRT {trt.__version__} has no HardwareCompatibilityLevel.{level.upper()}")
        config.hardware_compatibility_level = value


def runtime_for(trt, logger, version_compatible: bool = False):
    """A Runtime that may load a version-compatible plan (it embeds a lean runtime: host code)."""
    runtime = trt.Runtime(logger)
    if version_compatible:
        runtime.engine_host_code_allowed = True  # TRT >= 8.6
    return runtime


def engine_profile(trt, logger, plan: bytes, version_compatible: bool = False) -> dict:
    """The profile an engine was built with, read back from the deserialized plan
    (ICudaEngine.get_tensor_profile_shape: name-based API, TRT >= 8.5; the only one left in 10.x/11.x)."""
    engine = runtime_for(trt, logger, version_compatible).deserialize_cuda_engine(plan)
    if engine is None:
        raise RuntimeError("TensorRT could not deserialize the plan it just built")
    shapes = engine.get_tensor_profile_shape(MODEL_INPUT, 0)
    return {k: tuple(s) for k, s in zip(("min", "opt", "max"), shapes)}


def trt_runner(plan: Path | bytes, name: str = "tensorrt"):
    """A polygraphy TrtRunner over a plan: `with runner: runner.infer({"images": x})` returns
    {"logits": ..., "probabilities": ...}, the same infer(dict) -> dict as the other runners."""
    require_tensorrt()
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner

    data = plan if isinstance(plan, (bytes, bytearray)) else Path(plan).read_bytes()
    return TrtRunner(EngineFromBytes(bytes(data)), name=name)


# ---------------------------------------------------------------- the stage

def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, add_help=add_help,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--spec", default=str(DEFAULT_SPEC_PATH), help="deployment spec JSON (default: %(default)s)")
    p.add_argument("--artifacts", default=None, help="exported model folder (default: the spec's)")
    p.add_argument("--precision", default=None, choices=PRECISIONS,
                   help="precision the ONNX graph carries (default: the spec's)")
    p.add_argument("--onnx", default=None,
                   help="ONNX to build (default: <artifacts>/" + " | ".join(ONNX_FILES.values()) + " by precision)")
    p.add_argument("--out", default=None, help="plan to write (default: <artifacts>/model.<precision>.plan)")
    p.add_argument("--timing-cache", default=None, help=f"timing cache (default: {TIMING_CACHE_NAME} beside the plan)")
    p.add_argument("--workspace-mib", type=number(int, 1), default=4096,
                   help="builder workspace memory limit in MiB (default: %(default)s)")
    p.add_argument("--optimization-level", type=int, default=None, choices=range(6),
                   help="builder optimization level 0-5 (default: TensorRT's, 3)")
    p.add_argument("--version-compatible", action="store_true",
                   help="a plan that also loads on later TensorRT versions (slower; the server needs "
                        "--backend-config=tensorrt,version-compatible=true) (default: off)")
    p.add_argument("--hardware-compatibility", default="none", choices=HARDWARE_LEVELS,
                   help="a plan for other GPUs: ampere_plus (compute capability 8.0+) or same_compute_capability "
                        "(slower) (default: %(default)s)")
    p.add_argument("--detailed-profile", action="store_true",
                   help="keep layer precisions and tactics in the plan for the engine inspector (default: off)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars during the build")
    p.add_argument("--verbose", action="store_true", help="TensorRT's verbose log")
    p.add_argument("--check", action="store_true", help="only say whether plans can be built here (exit 0 or 3)")
    return p


def resolve(args: argparse.Namespace) -> tuple[DeploymentSpec, str, Path, Path, Path]:
    """(spec, precision, onnx, plan, timing cache) from the arguments and the spec."""
    spec, _ = DeploymentSpec.load_or_default(args.spec)
    artifacts = Path(args.artifacts or spec.artifacts)
    precision = args.precision or spec.precision
    onnx_default, plan_default = default_paths(artifacts, precision)
    plan = Path(args.out) if args.out else plan_default
    return spec, precision, Path(args.onnx) if args.onnx else onnx_default, plan, timing_cache_path(plan, args.timing_cache)


def main(args: argparse.Namespace) -> dict:
    tensorrt_version = require_tensorrt()  # first: without it nothing else matters (exit 3)
    if args.check:
        LOG.info("TensorRT %s and a GPU are present: plans can be built", tensorrt_version)
        return {"tensorrt": tensorrt_version}
    spec, precision, onnx_path, plan_path, cache_path = resolve(args)
    if args.workspace_mib < 1:
        raise ValueError(f"--workspace-mib must be >= 1, got {args.workspace_mib}")
    if not onnx_path.is_file():
        raise FileNotFoundError(f"{onnx_path} not found: produce the {precision} ONNX first")
    stale = provenance.mismatch(onnx_path)
    if stale:
        raise ValueError(stale)

    model = onnx.load(str(onnx_path), load_external_data=False)
    summary = precision_summary(model)
    check_precision(summary, precision, str(onnx_path))
    profile = profile_shapes(spec, onnx_input_dims(model))
    del model
    gpu = gpu_info()
    compatibility = {"version_compatible": args.version_compatible, "hardware_compatibility": args.hardware_compatibility}
    key = {**cache_key(tensorrt_version, gpu), **compatibility}
    cache_data, cache_status = read_timing_cache(cache_path, key)
    (LOG.info if cache_data is not None or not cache_path.exists() else LOG.warning)(
        "timing cache %s: %s", cache_path, cache_status)

    import tensorrt as trt  # type: ignore[import-not-found]

    logger = trt.Logger(trt.Logger.VERBOSE if args.verbose else trt.Logger.WARNING)
    LOG.info("parsing %s (%s, strongly typed) with TensorRT %s on %s", onnx_path, precision,
             tensorrt_version, gpu.get("name"))
    builder, network, _parser = network_from_onnx_path(trt, logger, onnx_path)
    io = network_io(network)
    LOG.info("building %s: profile %s min %s opt %s max %s, workspace %d MiB", plan_path, MODEL_INPUT,
             profile["min"], profile["opt"], profile["max"], args.workspace_mib)
    start = time.monotonic()
    plan, new_cache = engine_bytes_from_network(
        trt, builder, network, profile=profile, workspace_bytes=args.workspace_mib << 20,
        timing_cache=cache_data, progress=None if args.no_progress else BuildProgress(),
        optimization_level=args.optimization_level, compatibility=compatibility,
        detailed_profile=args.detailed_profile)
    seconds = time.monotonic() - start
    built = engine_profile(trt, logger, plan, args.version_compatible)
    if built != profile:
        raise RuntimeError(f"the built plan's profile {built} differs from the requested {profile}")

    plan_path.parent.mkdir(parents=True, exist_ok=True)
    write_whole(plan_path, plan)
    if new_cache:
        write_timing_cache(cache_path, new_cache, key)
    metadata = plan_metadata(
        tensorrt_version=tensorrt_version, gpu=gpu, onnx_path=onnx_path, onnx_sha256=model_sha256(onnx_path),
        precision=precision, summary=summary, profile=profile, workspace_bytes=args.workspace_mib << 20,
        timing_cache=cache_path, timing_cache_status=cache_status, build_seconds=seconds, plan=plan_path,
        plan_sha256=hashlib.sha256(plan).hexdigest(), network_io=io,
        options={k: v for k, v in vars(args).items()}, compatibility=compatibility)
    metadata_path(plan_path).write_text(json.dumps(metadata, indent=2) + "\n")
    LOG.info("wrote %s (%.1f MiB) in %.1f s; metadata %s", plan_path, len(plan) / 2**20, seconds,
             metadata_path(plan_path))
    return metadata


if __name__ == "__main__":
    import sys

    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    try:
        main(get_args_parser().parse_args())
    except TensorRTUnavailable as exc:
        print(exc, file=sys.stderr)
        sys.exit(EXIT_UNAVAILABLE)
    except (OSError, ValueError, RuntimeError) as exc:
        sys.exit(f"build.precision.plans: {exc}")
