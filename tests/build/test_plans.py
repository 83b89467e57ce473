"""build.precision.plans: everything that runs without TensorRT runs here for real; plan building and TensorRT
inference run only where TensorRT and an NVIDIA GPU are present (skipped, with the reason, elsewhere)."""
import io
import json
import logging
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from build.precision import plans
from build.repository import capabilities
from build.repository.spec import DeploymentSpec, StageSpec

TRT_VERSION, TRT_REASON = capabilities.detect_tensorrt()
GPUS, GPU_REASON = capabilities.detect_gpus()
HAVE_TRT_AND_GPU = TRT_VERSION is not None and GPUS > 0
NEEDS_TRT = pytest.mark.skipif(
    not HAVE_TRT_AND_GPU,
    reason=f"needs TensorRT and an NVIDIA GPU: TensorRT {TRT_VERSION or 'absent (' + TRT_REASON + ')'}, "
           f"{GPUS} GPU(s) ({GPU_REASON})")


def tiny_variant(source: Path, precision: str) -> onnx.ModelProto:
    """The tiny classifier with its precision in the graph: as it is (fp32), Q/DQ on the input (int8),
    or the pooling in FP16 between casts with FP32 IO kept (fp16). IR version 9, which ONNX Runtime
    and TensorRT's parser read (onnx 1.23 writes 14 by default)."""
    model = onnx.load(str(source))
    model.ir_version = 9
    graph = model.graph
    if precision == "int8":
        graph.initializer.extend([helper.make_tensor("x_scale", TensorProto.FLOAT, [], [0.02]),
                                  helper.make_tensor("x_zero", TensorProto.INT8, [], [0])])
        graph.node[0].input[0] = "images_dq"
        graph.node.insert(0, helper.make_node("DequantizeLinear", ["images_q", "x_scale", "x_zero"], ["images_dq"]))
        graph.node.insert(0, helper.make_node("QuantizeLinear", ["images", "x_scale", "x_zero"], ["images_q"]))
    elif precision == "fp16":
        graph.node[0].input[0] = "images_h"
        graph.node[1].output[0] = "flat_h"
        graph.node.insert(2, helper.make_node("Cast", ["flat_h"], ["flat"], to=TensorProto.FLOAT))
        graph.node.insert(0, helper.make_node("Cast", ["images"], ["images_h"], to=TensorProto.FLOAT16))
    onnx.checker.check_model(model)
    return model


@pytest.fixture
def spec():
    return DeploymentSpec(max_batch_size=16, classifier=StageSpec(preferred_batch_sizes=[4, 8]))


# ---------------------------------------------------------------- profile and ONNX input

def test_profile_comes_from_the_spec_and_the_onnx_input(spec, tiny_artifacts):
    dims = plans.onnx_input_dims(onnx.load(str(tiny_artifacts / "model.onnx")))
    assert dims == (3, 32, 32)
    assert plans.profile_shapes(spec, dims) == {"min": (1, 3, 32, 32), "opt": (8, 3, 32, 32), "max": (16, 3, 32, 32)}
    unbatched = spec.replace(classifier=StageSpec(preferred_batch_sizes=[]))
    assert plans.profile_shapes(unbatched, dims)["opt"] == (16, 3, 32, 32)  # no preference: optimise for max


def test_onnx_input_must_have_a_dynamic_batch_and_static_image_dims(tiny_artifacts):
    model = onnx.load(str(tiny_artifacts / "model.onnx"))
    dims = model.graph.input[0].type.tensor_type.shape.dim
    dims[0].dim_value = 1
    with pytest.raises(ValueError, match="fixed batch of 1"):
        plans.onnx_input_dims(model)
    dims[0].dim_param = "batch"
    dims[2].dim_param = "height"
    with pytest.raises(ValueError, match="static per-image dims"):
        plans.onnx_input_dims(model)
    with pytest.raises(ValueError, match="no input 'pixels'"):
        plans.onnx_input_dims(model, "pixels")


@pytest.mark.parametrize("graph", ["fp32", "fp16", "int8"])
def test_precision_must_be_the_one_the_graph_carries(tiny_artifacts, graph):
    model = tiny_variant(tiny_artifacts / "model.onnx", graph)
    summary = plans.precision_summary(model)
    assert summary["io_dtypes"]["images"] == "FLOAT" and summary["io_dtypes"]["probabilities"] == "FLOAT"
    assert (summary["quantize_linear"], summary["dequantize_linear"]) == ((1, 1) if graph == "int8" else (0, 0))
    assert summary["fp16_casts"] == (1 if graph == "fp16" else 0)
    plans.check_precision(summary, graph)
    for other in {"fp32", "fp16", "int8"} - {graph}:
        with pytest.raises(ValueError, match="int8|FP16|FP32"):
            plans.check_precision(summary, other)


# ---------------------------------------------------------------- TensorRT absent: one clear line

def test_unavailable_reason_names_exactly_what_is_missing():
    both = plans.unavailable_reason(None, "cannot import tensorrt: No module named 'tensorrt'",
                                    0, "no NVIDIA driver (libcuda.so.1 not found)")
    assert both == ("TensorRT plans not built: cannot import tensorrt (No module named 'tensorrt'); "
                    "GPU: none (no NVIDIA driver (libcuda.so.1 not found))")
    gpu_only = plans.unavailable_reason("10.13.0", "ok", 0, "cuInit failed")
    assert gpu_only == "TensorRT plans not built: GPU: none (cuInit failed) (present: TensorRT 10.13.0)"
    old = plans.unavailable_reason("8.6.1", "ok", 1, "ok")
    assert "8.6.1 is too old" in old and "present: 1 GPU(s)" in old
    multi_line = plans.unavailable_reason(None, "cannot import tensorrt: libnvinfer.so.10:\n cannot open", 1, "ok")
    assert "\n" not in multi_line
    assert plans.unavailable_reason("11.0.0", "ok", 2, "ok") is None


@pytest.mark.skipif(HAVE_TRT_AND_GPU, reason="TensorRT and a GPU are present here: nothing is unavailable")
def test_unavailable_is_really_raised_here(tmp_path):
    with pytest.raises(plans.TensorRTUnavailable) as raised:
        plans.require_tensorrt()
    message = str(raised.value)
    assert "\n" not in message and message.startswith("TensorRT plans not built: ")
    if TRT_VERSION is None:
        assert "cannot import tensorrt" in message
    if GPUS == 0:
        assert "GPU: none" in message
    # main() says so before reading anything: the ONNX file need not exist.
    args = plans.get_args_parser().parse_args(["--artifacts", str(tmp_path / "none"), "--precision", "int8"])
    with pytest.raises(plans.TensorRTUnavailable, match="TensorRT plans not built"):
        plans.main(args)
    with pytest.raises(plans.TensorRTUnavailable):
        plans.trt_runner(b"not a plan")
    assert not list(tmp_path.iterdir())


@pytest.mark.skipif(HAVE_TRT_AND_GPU, reason="TensorRT and a GPU are present here: nothing is unavailable")
def test_cli_exits_3_with_one_line(tmp_path):
    done = subprocess.run([sys.executable, "-m", "build.precision.plans", "--check"], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == plans.EXIT_UNAVAILABLE
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "tensorrt" in lines[0].lower() and "GPU" in lines[0], done.stderr


# ---------------------------------------------------------------- TensorRT API differences (10.x vs 11.x)

def test_network_flags_are_strongly_typed_on_10_and_11_without_explicit_batch():
    trt10 = SimpleNamespace(__version__="10.13.0",
                            NetworkDefinitionCreationFlag=SimpleNamespace(EXPLICIT_BATCH=0, STRONGLY_TYPED=1))
    trt11 = SimpleNamespace(__version__="11.0.0", NetworkDefinitionCreationFlag=SimpleNamespace(STRONGLY_TYPED=0))
    trt8 = SimpleNamespace(__version__="8.6.1", NetworkDefinitionCreationFlag=SimpleNamespace(EXPLICIT_BATCH=0))
    assert plans.network_creation_flags(trt10) == 1 << 1  # EXPLICIT_BATCH (bit 0) is not set
    assert plans.network_creation_flags(trt11) == 1 << 0
    with pytest.raises(plans.TensorRTUnavailable, match="STRONGLY_TYPED"):
        plans.network_creation_flags(trt8)


def test_parser_errors_name_their_node():
    class Error10:  # TensorRT 10.x ParserError
        def code(self): return "UNSUPPORTED_NODE"
        def desc(self): return "no importer for op Foo"
        def node(self): return 7
        def node_name(self): return "foo_1"
        def node_operator(self): return "Foo"
        def file(self): return "ModelImporter.cpp"
        def line(self): return 42
        def func(self): return "parseNode"

    class Error8:  # older bindings: no node_name / node_operator
        def code(self): return "INVALID_GRAPH"
        def desc(self): return "bad graph"
        def node(self): return -1
        def file(self): return ""

    assert plans.describe_parser_error(Error10()) == (
        "node 7 (Foo 'foo_1'): UNSUPPORTED_NODE: no importer for op Foo [ModelImporter.cpp:42 parseNode]")
    assert plans.describe_parser_error(Error8()) == "graph: INVALID_GRAPH: bad graph"


def test_progress_logs_phases_or_draws_bars(caplog):
    progress = plans.BuildProgress(use_tqdm=False)
    with caplog.at_level(logging.INFO, logger="build.precision.plans"):
        progress.phase_start("Building engine", None, 3)
        progress.phase_start("Tactic selection", "Building engine", 10)
        progress.phase_start("Layer timing", "Tactic selection", 5)  # depth 2: not logged
        assert progress.step_complete("Layer timing", 0)
        progress.phase_finish("Layer timing")
        progress.phase_finish("Tactic selection")
        progress.cancel = True
        assert progress.step_complete("Building engine", 1) is False  # asks TensorRT to stop
        progress.close()
    text = caplog.text
    assert "Building engine (3 steps)" in text and "  Tactic selection (10 steps)" in text
    assert "Layer timing" not in text and "Building engine done in" in text

    out = io.StringIO()
    bars = plans.BuildProgress(use_tqdm=True, file=out)
    bars.phase_start("Building engine", None, 2)
    bars.step_complete("Building engine", 1)
    bars.phase_finish("Building engine")
    assert "Building engine" in out.getvalue() and "2/2" in out.getvalue()


# ---------------------------------------------------------------- timing cache, metadata, CLI

def test_timing_cache_path_defaults_beside_the_plan(tmp_path):
    plan = tmp_path / "a" / "model.int8.plan"
    assert plans.timing_cache_path(plan) == tmp_path / "a" / "timing.cache"
    assert plans.timing_cache_path(plan, "/x/y.cache") == Path("/x/y.cache")
    assert plans.metadata_path(plan) == tmp_path / "a" / "model.int8.plan.json"


def test_timing_cache_is_reused_only_when_valid(tmp_path, caplog):
    path = tmp_path / "timing.cache"
    key = plans.cache_key("10.13.0", {"name": "NVIDIA H100", "compute_capability": "9.0"})
    data, status = plans.read_timing_cache(path, key)
    assert data is None and status.startswith("absent")
    plans.write_timing_cache(path, b"\x01cache-bytes", key)
    assert plans.read_timing_cache(path, key) == (b"\x01cache-bytes", "loaded (12 bytes)")
    other_gpu = plans.cache_key("10.13.0", {"name": "NVIDIA L4", "compute_capability": "8.9"})
    data, status = plans.read_timing_cache(path, other_gpu)
    assert data is None and "made for" in status and "rebuilding" in status
    path.write_bytes(b"\x01cache-bytez")  # corrupt
    data, status = plans.read_timing_cache(path, key)
    assert data is None and "corrupt" in status
    (tmp_path / "timing.cache.json").unlink()
    data, status = plans.read_timing_cache(path, key)
    assert data is None and "no readable key file" in status


def test_metadata_records_what_was_built_from_what(tmp_path, tiny_artifacts):
    onnx_path = tiny_artifacts / "model.onnx"
    args = plans.get_args_parser().parse_args(["--precision", "fp32", "--workspace-mib", "512"])
    meta = plans.plan_metadata(
        tensorrt_version="10.13.0", gpu={"name": "NVIDIA H100", "compute_capability": "9.0"},
        onnx_path=onnx_path, onnx_sha256=plans.model_sha256(onnx_path), precision="fp32",
        summary=plans.precision_summary(onnx.load(str(onnx_path))),
        profile={"min": (1, 3, 32, 32), "opt": (8, 3, 32, 32), "max": (16, 3, 32, 32)},
        workspace_bytes=512 << 20, timing_cache=tmp_path / "timing.cache", timing_cache_status="loaded (9 bytes)",
        build_seconds=12.34567, plan=tmp_path / "model.fp32.plan", plan_sha256="ab" * 32,
        network_io=[{"kind": "input", "name": "images", "shape": [-1, 3, 32, 32], "dtype": "FLOAT"}],
        options=vars(args))
    back = json.loads(json.dumps(meta))  # JSON-serialisable as it is
    assert back["tensorrt"] == "10.13.0" and back["gpu"]["compute_capability"] == "9.0"
    assert back["profile"] == {"input": "images", "min": [1, 3, 32, 32], "opt": [8, 3, 32, 32], "max": [16, 3, 32, 32]}
    assert back["onnx"]["sha256"] == plans.model_sha256(onnx_path) and len(back["onnx"]["sha256"]) == 64
    assert back["workspace_bytes"] == 512 << 20 and back["build_seconds"] == 12.346
    assert back["strongly_typed"] is True and back["options"]["workspace_mib"] == 512


def test_cli_arguments_resolve_paths_from_the_spec(tmp_path):
    spec_file = tmp_path / "deployment.json"
    DeploymentSpec(artifacts=str(tmp_path / "art"), precision="fp16").save(spec_file)
    parse = plans.get_args_parser().parse_args
    spec, precision, onnx_path, plan, cache = plans.resolve(parse(["--spec", str(spec_file)]))
    assert precision == "fp16" and onnx_path == tmp_path / "art" / "model.fp16.onnx"
    assert plan == tmp_path / "art" / "model.fp16.plan" and cache == tmp_path / "art" / "timing.cache"
    _, precision, onnx_path, plan, cache = plans.resolve(parse(
        ["--spec", str(spec_file), "--onnx", "q.onnx", "--precision", "int8", "--out", "out/m.plan",
         "--timing-cache", "tc.bin"]))
    assert (precision, onnx_path, plan, cache) == ("int8", Path("q.onnx"), Path("out/m.plan"), Path("tc.bin"))
    with pytest.raises(FileNotFoundError, match="absent.json not found"):  # not the built-in default, silently
        plans.resolve(parse(["--spec", str(tmp_path / "absent.json"), "--precision", "int8"]))
    args = parse(["--workspace-mib", "256", "--optimization-level", "5", "--no-progress", "--verbose"])
    assert (args.workspace_mib, args.optimization_level, args.no_progress, args.verbose) == (256, 5, True, True)
    for bad in (["--precision", "int4"], ["--optimization-level", "9"], ["--workspace-mib", "lots"]):
        with pytest.raises(SystemExit):
            parse(bad)


# ---------------------------------------------------------------- the stage's own logic, on a stand-in

def stand_in_tensorrt(version: str, calls: list):
    """NOT TensorRT: a recording stand-in with the Python API names build.precision.plans uses (10.x / 11.x
    spellings), so the stage's order of calls, profile, cache and metadata logic runs here. Whether
    TensorRT accepts them is checked only by the tests marked gpu."""
    flags = {"STRONGLY_TYPED": 1, "EXPLICIT_BATCH": 0} if version.startswith("10.") else {"STRONGLY_TYPED": 0}

    class Dims(tuple):
        pass

    class Tensor:
        def __init__(self, name, shape):
            self.name, self.shape, self.dtype = name, Dims(shape), "DataType.FLOAT"

    class Network:
        def __init__(self):
            self.inputs, self.outputs = [], []
        num_inputs = property(lambda self: len(self.inputs))
        num_outputs = property(lambda self: len(self.outputs))
        def get_input(self, i): return self.inputs[i]
        def get_output(self, i): return self.outputs[i]

    class Parser:
        num_errors = 0
        def __init__(self, network, logger): self.network = network
        def parse_from_file(self, path):
            graph = onnx.load(path).graph
            dims = lambda v: [d.dim_value or -1 for d in v.type.tensor_type.shape.dim]  # noqa: E731
            self.network.inputs = [Tensor(v.name, dims(v)) for v in graph.input]
            self.network.outputs = [Tensor(v.name, dims(v)) for v in graph.output]
            calls.append(("parse", Path(path).name))
            return True

    class Profile(dict):
        def set_shape(self, name, lo, opt, hi): self[name] = (tuple(lo), tuple(opt), tuple(hi))

    class Cache:
        def __init__(self, data): self.data = bytes(data)
        def serialize(self): return self.data + b"+timed"

    class Config:
        def set_memory_pool_limit(self, pool, size): calls.append(("workspace", pool, size))
        def set_flag(self, flag): calls.append(("flag", flag))
        def __setattr__(self, name, value):
            if name in ("hardware_compatibility_level", "profiling_verbosity"):
                calls.append((name, value))
            object.__setattr__(self, name, value)
        def add_optimization_profile(self, profile): self.profile = profile; return 0
        def create_timing_cache(self, data): return Cache(data)
        def set_timing_cache(self, cache, ignore_mismatch): self.cache = cache; return True
        def get_timing_cache(self): return self.cache

    class Builder:
        def __init__(self, logger): pass
        def create_network(self, network_flags):
            calls.append(("flags", network_flags))
            return Network()
        def create_builder_config(self): return Config()
        def create_optimization_profile(self): return Profile()
        def build_serialized_network(self, network, config):
            monitor = getattr(config, "progress_monitor", None)  # none with --no-progress
            if monitor is not None:
                monitor.phase_start("Building engine", None, 2)
                assert monitor.step_complete("Building engine", 0) is True
                monitor.phase_finish("Building engine")
            plans_built.append(config.profile)
            return memoryview(b"PLAN %d" % len(plans_built))

    class Engine:
        def __init__(self, plan): self.profile = plans_built[int(plan.split()[1]) - 1]
        def get_tensor_profile_shape(self, name, index): return [Dims(s) for s in self.profile[name]]

    class Runtime:
        def __init__(self, logger): pass
        def __setattr__(self, name, value):
            calls.append(("runtime", name, value))
            object.__setattr__(self, name, value)
        def deserialize_cuda_engine(self, plan): return Engine(bytes(plan))

    class IProgressMonitor:
        def __init__(self): pass

    class Logger:
        VERBOSE, WARNING = 0, 2
        def __init__(self, severity): self.severity = severity

    plans_built = []
    return SimpleNamespace(
        __version__=version, Builder=Builder, OnnxParser=Parser, Runtime=Runtime, IProgressMonitor=IProgressMonitor,
        Logger=Logger, NetworkDefinitionCreationFlag=SimpleNamespace(**flags),
        MemoryPoolType=SimpleNamespace(WORKSPACE="WORKSPACE"),
        BuilderFlag=SimpleNamespace(VERSION_COMPATIBLE="VERSION_COMPATIBLE"),
        HardwareCompatibilityLevel=SimpleNamespace(NONE=0, AMPERE_PLUS=1, SAME_COMPUTE_CAPABILITY=2),
        ProfilingVerbosity=SimpleNamespace(DETAILED="DETAILED"))


@pytest.mark.parametrize("version", ["10.13.0", "11.0.0"])
def test_stage_logic_on_a_stand_in_for_tensorrt(tmp_path, tiny_artifacts, monkeypatch, version, caplog):
    calls = []
    monkeypatch.setitem(sys.modules, "tensorrt", stand_in_tensorrt(version, calls))
    monkeypatch.setattr(capabilities, "detect_tensorrt", lambda: (version, "ok"))
    monkeypatch.setattr(capabilities, "detect_gpus", lambda: (1, "ok"))
    monkeypatch.setattr(plans, "gpu_info", lambda index=0: {"index": 0, "name": "Stand-in GPU", "compute_capability": "9.0"})
    art = tmp_path / "art"
    art.mkdir()
    onnx.save(tiny_variant(tiny_artifacts / "model.onnx", "int8"), art / "model.int8.trt.onnx")
    spec_file = tmp_path / "deployment.json"
    DeploymentSpec(artifacts=str(art), max_batch_size=8, classifier=StageSpec(preferred_batch_sizes=[2, 4])).save(spec_file)
    argv = ["--spec", str(spec_file), "--precision", "int8", "--workspace-mib", "64"]

    with caplog.at_level(logging.INFO, logger="build.precision.plans"):
        meta = plans.main(plans.get_args_parser().parse_args(argv))
    strongly_typed_bit = 1 << (1 if version.startswith("10.") else 0)
    assert calls[:3] == [("flags", strongly_typed_bit), ("parse", "model.int8.trt.onnx"),
                         ("workspace", "WORKSPACE", 64 << 20)]
    assert "network input 'images' shape [-1, 3, 32, 32]" in caplog.text
    assert "network output 'probabilities'" in caplog.text and "Building engine (2 steps)" not in caplog.text
    plan = art / "model.int8.plan"
    assert plan.read_bytes() == b"PLAN 1" and json.loads(plans.metadata_path(plan).read_text()) == meta
    assert meta["profile"] == {"input": "images", "min": [1, 3, 32, 32], "opt": [4, 3, 32, 32], "max": [8, 3, 32, 32]}
    assert meta["onnx"]["precision"]["quantize_linear"] == 1 and meta["gpu"]["name"] == "Stand-in GPU"
    assert (art / "timing.cache").read_bytes() == b"+timed"
    again = plans.main(plans.get_args_parser().parse_args(argv))  # the saved cache is loaded and grows
    assert again["timing_cache"]["status"] == "loaded (6 bytes)"
    assert (art / "timing.cache").read_bytes() == b"+timed+timed"
    (art / "timing.cache").write_bytes(b"garbage")
    with caplog.at_level(logging.WARNING, logger="build.precision.plans"):
        third = plans.main(plans.get_args_parser().parse_args(argv))
    assert "corrupt" in third["timing_cache"]["status"] and "rebuilding" in caplog.text
    assert (art / "timing.cache").read_bytes() == b"+timed"


def test_a_variant_of_another_model_onnx_is_refused_before_anything_is_built(tmp_path, tiny_artifacts, monkeypatch):
    """After a re-export into the same folder, the FP16 file of the old model is not built into a plan."""
    from build.precision import fp16
    from common.hashing import file_sha256

    calls = []
    monkeypatch.setitem(sys.modules, "tensorrt", stand_in_tensorrt("10.13.0", calls))
    monkeypatch.setattr(capabilities, "detect_tensorrt", lambda: ("10.13.0", "ok"))
    monkeypatch.setattr(capabilities, "detect_gpus", lambda: (1, "ok"))
    monkeypatch.setattr(plans, "gpu_info", lambda index=0: {"index": 0, "name": "Stand-in GPU", "compute_capability": "9.0"})
    art = tmp_path / "art"
    art.mkdir()
    (art / "model.onnx").write_bytes((tiny_artifacts / "model.onnx").read_bytes())
    fp16.convert(art / "model.onnx", art / fp16.OUTPUT_NAME)
    spec_file = tmp_path / "deployment.json"
    DeploymentSpec(artifacts=str(art), max_batch_size=8, classifier=StageSpec(preferred_batch_sizes=[2, 4])).save(spec_file)
    argv = plans.get_args_parser().parse_args(["--spec", str(spec_file), "--precision", "fp16", "--no-progress"])
    assert plans.main(argv)["onnx"]["path"] == str(art / fp16.OUTPUT_NAME)  # unchanged: built
    plan = art / "model.fp16.plan"
    plan.unlink()

    old = file_sha256(art / "model.onnx")
    model = onnx.load(str(art / "model.onnx"))
    model.graph.initializer[0].float_data[0] += 1.0  # a re-export with other weights
    onnx.save(model, str(art / "model.onnx"))
    new = file_sha256(art / "model.onnx")
    with pytest.raises(ValueError) as info:
        plans.main(argv)
    assert str(info.value) == (f"{art / fp16.OUTPUT_NAME} was built from another model.onnx (sha256 {old[:12]}, now "
                               f"{new[:12]}): rebuild it with `make fp16 ARTIFACTS={art}`")
    assert not plan.exists() and [c for c in calls if c[0] == "parse"] == [("parse", fp16.OUTPUT_NAME)]


# ---------------------------------------------------------------- with TensorRT and a GPU

@NEEDS_TRT
@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_plan_builds_with_the_spec_profile_and_matches_onnxruntime(tmp_path, tiny_artifacts, precision):
    import onnxruntime as ort

    art = tmp_path / "art"
    art.mkdir()
    onnx_path = art / plans.ONNX_FILES[precision]
    onnx.save(tiny_variant(tiny_artifacts / "model.onnx", precision), onnx_path)
    spec_file = tmp_path / "deployment.json"
    DeploymentSpec(artifacts=str(art), max_batch_size=8, classifier=StageSpec(preferred_batch_sizes=[2, 4])).save(spec_file)
    argv = ["--spec", str(spec_file), "--precision", precision, "--workspace-mib", "256", "--no-progress"]

    meta = plans.main(plans.get_args_parser().parse_args(argv))
    plan = art / f"model.{precision}.plan"
    assert plan.is_file() and json.loads(plans.metadata_path(plan).read_text()) == json.loads(json.dumps(meta))
    assert meta["profile"] == {"input": "images", "min": [1, 3, 32, 32], "opt": [4, 3, 32, 32], "max": [8, 3, 32, 32]}
    assert meta["timing_cache"]["status"].startswith("absent") and (art / "timing.cache").is_file()
    again = plans.main(plans.get_args_parser().parse_args(argv))  # the second build reuses the cache
    assert again["timing_cache"]["status"].startswith("loaded")

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    with plans.trt_runner(plan) as runner:
        for batch in (1, 3, 8):
            x = rng.uniform(-2, 2, size=(batch, 3, 32, 32)).astype(np.float32)
            got = runner.infer({"images": x})
            want = dict(zip(["logits", "probabilities"], session.run(["logits", "probabilities"], {"images": x})))
            for name in ("logits", "probabilities"):
                np.testing.assert_allclose(got[name], want[name], rtol=1e-3, atol=1e-3, err_msg=name)


@NEEDS_TRT
@pytest.mark.gpu
def test_parser_errors_are_reported(tmp_path):
    bad = helper.make_model(helper.make_graph(
        [helper.make_node("NoSuchOp", ["images"], ["logits"], domain="nowhere")], "bad",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3])]),
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("nowhere", 1)], ir_version=9)
    onnx.save(bad, tmp_path / "bad.onnx")
    import tensorrt as trt

    with pytest.raises(RuntimeError, match="parser error"):
        plans.network_from_onnx_path(trt, trt.Logger(trt.Logger.ERROR), tmp_path / "bad.onnx")
