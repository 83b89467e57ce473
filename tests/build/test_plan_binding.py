"""Plans bound to their server (build.precision.binding, the writer's refusal), plans only for the tensorrt
backend (build.precision.variants) and calibration-cache headers TensorRT knows (build.precision.calibrate).

TensorRT is absent here: where the project's logic around it is under test, a stand-in `tensorrt` module
(tests/build/test_plans.py) plays it; nothing here claims TensorRT accepted anything."""
import json
import shutil
import sys

import onnx
import pytest

from build.precision import binding, calibrate, plans, provenance, variants
from build.precision.imagesets import augmented_photos
from build.repository import capabilities
from build.repository.spec import DeploymentSpec, StageSpec
from build.repository.writer import write_repository
from common.preprocessing import PreprocessConfig
from tests.build.test_plans import stand_in_tensorrt, tiny_variant


def fake_plan(folder, tensorrt="10.13.2.6", cc="9.0", gpu="NVIDIA H100", **compatibility):
    """A plan file with the `<plan>.json` build.precision.plans writes beside it (its bytes are not a plan)."""
    plan = folder / "model.int8.plan"
    plan.write_bytes(b"not a real plan")
    meta = {"tensorrt": tensorrt, "gpu": {"name": gpu, "compute_capability": cc},
            "compatibility": {"version_compatible": False, "hardware_compatibility": "none", **compatibility}}
    plans.metadata_path(plan).write_text(json.dumps(meta))
    return plan


def target(tensorrt="10.13.2.6", cc="9.0", image="nvcr.io/nvidia/tritonserver:25.08-py3"):
    return binding.resolve_target({"tensorrt": tensorrt, "compute_capability": cc, "image": image}, None, None)


def test_same_tensorrt_and_gpu_bind(tmp_path):
    record = binding.check_plan(fake_plan(tmp_path), target())
    assert record["built_with"] == {"tensorrt": "10.13.2.6", "gpu": "NVIDIA H100", "compute_capability": "9.0"}
    assert record["checks"][0] == "TensorRT 10.13.2.6 = server's 10.13.2.6" and record["server_flags"] == []
    assert binding.check_plan(fake_plan(tmp_path), target(tensorrt="10.13.2"))  # the build number not stated


@pytest.mark.parametrize("server", ["10.13.3.9", "10.13.2.5", "10.8.0.43", "11.0.0"])
def test_another_tensorrt_even_a_patch_release_is_refused_saying_how_to_rebuild(tmp_path, server):
    with pytest.raises(binding.PlanBindingError) as info:
        binding.check_plan(fake_plan(tmp_path), target(tensorrt=server))
    message = str(info.value)
    assert f"built by TensorRT 10.13.2.6 but nvcr.io/nvidia/tritonserver:25.08-py3 has TensorRT {server}" in message
    assert "rebuild it inside nvcr.io/nvidia/tritonserver:25.08-py3" in message and "--version-compatible" in message


def test_a_version_compatible_plan_loads_on_later_tensorrt_only(tmp_path):
    plan = fake_plan(tmp_path, tensorrt="10.8.0.43", version_compatible=True)
    record = binding.check_plan(plan, target(tensorrt="10.13.2.6"))
    assert record["server_flags"] == ["--backend-config=tensorrt,version-compatible=true"]
    assert binding.check_plan(plan, target(tensorrt="11.0.0"))
    with pytest.raises(binding.PlanBindingError, match="version-compatible from TensorRT 10.8.0.43 on.*10.7.0.23"):
        binding.check_plan(plan, target(tensorrt="10.7.0.23"))


def test_another_gpu_architecture_is_refused_unless_the_plan_is_portable(tmp_path):
    plan = fake_plan(tmp_path, cc="8.6", gpu="NVIDIA A10")
    with pytest.raises(binding.PlanBindingError) as info:
        binding.check_plan(plan, target(cc="9.0"))
    assert "built for GPU NVIDIA A10 (compute capability 8.6)" in str(info.value)
    assert "compute capability 9.0" in str(info.value) and "--hardware-compatibility ampere_plus" in str(info.value)
    portable = fake_plan(tmp_path, cc="8.6", gpu="NVIDIA A10", hardware_compatibility="ampere_plus")
    assert "ampere_plus" in binding.check_plan(portable, target(cc="9.0"))["checks"][1]
    with pytest.raises(binding.PlanBindingError, match="Ampere and later.*7.5"):
        binding.check_plan(portable, target(cc="7.5"))
    same_cc = fake_plan(tmp_path, cc="8.6", hardware_compatibility="same_compute_capability")
    assert binding.check_plan(same_cc, target(cc="8.6"))
    with pytest.raises(binding.PlanBindingError, match="compute capability 8.6"):
        binding.check_plan(same_cc, target(cc="8.9"))


def test_an_unknown_target_or_plan_is_refused_not_guessed(tmp_path):
    plan = fake_plan(tmp_path)
    nothing_here = binding.resolve_target({}, None, None)
    assert nothing_here.source == "this machine"
    with pytest.raises(binding.PlanBindingError, match="set target_server.tensorrt"):
        binding.check_plan(plan, nothing_here)
    with pytest.raises(binding.PlanBindingError, match="set target_server.compute_capability"):
        binding.check_plan(plan, binding.resolve_target({"tensorrt": "10.13.2.6"}, None, None))
    with pytest.raises(binding.PlanBindingError, match="too vague"):
        binding.check_plan(plan, target(tensorrt="10.13"))
    plans.metadata_path(plan).unlink()
    with pytest.raises(binding.PlanBindingError, match="has no model.int8.plan.json"):
        binding.check_plan(plan, target())
    local = binding.resolve_target({"compute_capability": "9.0"}, "10.13.2.6", "8.6")
    assert (local.tensorrt, local.compute_capability) == ("10.13.2.6", "9.0") and "this machine" in local.source


def test_the_writer_refuses_a_plan_the_target_server_cannot_load(tmp_path, tiny_artifacts):
    plan = fake_plan(tmp_path, tensorrt="10.8.0.43")
    spec = DeploymentSpec(artifacts=str(tiny_artifacts), precision="int8",
                          target_server={"image": "nvcr.io/nvidia/tritonserver:25.08-py3", "tensorrt": "10.13.2.6",
                                         "compute_capability": "9.0"})
    out = tmp_path / "repo"
    with pytest.raises(binding.PlanBindingError, match="built by TensorRT 10.8.0.43 but .*25.08-py3 has TensorRT"):
        write_repository(spec, "tensorrt", out, model_file=plan)
    assert not out.exists() and not (tmp_path / "repo.tmp").exists()

    good = fake_plan(tmp_path)
    manifest = write_repository(spec, "tensorrt", out, model_file=good)
    assert manifest["plan_binding"]["target"]["tensorrt"] == "10.13.2.6"
    assert json.loads((out / "BUILD.json").read_text())["plan_binding"]["checks"][0].startswith("TensorRT 10.13.2.6")
    assert (out / spec.classifier_name / "1" / "model.plan").read_bytes() == good.read_bytes()
    with pytest.raises(ValueError, match="unknown target_server keys"):
        DeploymentSpec(target_server={"tensorrt_version": "10.13"})


# ---------------------------------------------------------------- a plan only for the tensorrt backend

@pytest.fixture
def with_stand_in_tensorrt(monkeypatch):
    """TensorRT and a GPU 'present' (a stand-in whose every build fails): what a GPU machine looks like
    to build.precision.variants when TensorRT cannot build this model."""
    calls = []
    stand_in = stand_in_tensorrt("10.13.2.6", calls)

    class BrokenBuilder(stand_in.Builder):
        def build_serialized_network(self, network, config):
            calls.append(("build",))
            return None  # what TensorRT returns when a build fails

    stand_in.Builder = BrokenBuilder
    monkeypatch.setitem(sys.modules, "tensorrt", stand_in)
    monkeypatch.setattr(capabilities, "detect_tensorrt", lambda: ("10.13.2.6", "ok"))
    monkeypatch.setattr(capabilities, "detect_gpus", lambda: (1, "ok"))
    monkeypatch.setattr(plans, "gpu_info", lambda index=0: {"name": "Stand-in GPU", "compute_capability": "9.0"})
    return calls


@pytest.mark.parametrize("backend", ["onnxruntime", "python-onnxruntime"])
def test_a_cpu_backend_deploys_without_building_a_plan_on_a_gpu_machine(tmp_path, tiny_artifacts,
                                                                        with_stand_in_tensorrt, backend):
    artifacts = tmp_path / "tiny"
    shutil.copytree(tiny_artifacts, artifacts, ignore=shutil.ignore_patterns("calibration", "model.*.onnx"))
    spec = DeploymentSpec(artifacts=str(artifacts), precision="fp16")
    logged = []
    deployable = variants.prepare(spec, backend, str(tmp_path / "none.json"),
                                  variants.VariantOptions(thresholds={"fp16": 0.0}), logged.append)
    assert deployable.variant == "fp16" and with_stand_in_tensorrt == []  # TensorRT was never asked
    assert f"TensorRT plan not built: the {backend} backend serves an ONNX file, not a plan" in logged


def test_the_tensorrt_backend_still_fails_when_its_plan_fails(tmp_path, tiny_artifacts, with_stand_in_tensorrt):
    artifacts = tmp_path / "tiny"
    shutil.copytree(tiny_artifacts, artifacts, ignore=shutil.ignore_patterns("calibration", "model.*.onnx"))
    spec_path = tmp_path / "deployment.json"
    DeploymentSpec(artifacts=str(artifacts), precision="fp16", max_batch_size=8,
                   classifier=StageSpec(preferred_batch_sizes=[2, 4])).save(spec_path)
    variant = tiny_variant(tiny_artifacts / "model.onnx", "fp16")
    provenance.stamp(variant, artifacts / "model.onnx")  # built from the model beside it, as fp16.py records
    onnx.save(variant, artifacts / "model.fp16.onnx")
    with pytest.raises(RuntimeError, match="TensorRT failed to build the plan"):
        variants.build_plan(artifacts, "fp16", str(spec_path), "tensorrt")
    assert ("build",) in with_stand_in_tensorrt


def test_plan_flags_follow_the_target_servers_portability():
    assert variants.plan_flags({}) == []
    assert variants.plan_flags({"version_compatible": True, "hardware_compatibility": "ampere_plus"}) == [
        "--version-compatible", "--hardware-compatibility", "ampere_plus"]


def test_portable_build_options_reach_the_builder_and_the_metadata(tmp_path, tiny_artifacts, monkeypatch):
    calls = []
    monkeypatch.setitem(sys.modules, "tensorrt", stand_in_tensorrt("10.13.2.6", calls))
    monkeypatch.setattr(capabilities, "detect_tensorrt", lambda: ("10.13.2.6", "ok"))
    monkeypatch.setattr(capabilities, "detect_gpus", lambda: (1, "ok"))
    monkeypatch.setattr(plans, "gpu_info", lambda index=0: {"name": "Stand-in GPU", "compute_capability": "9.0"})
    onnx.save(tiny_variant(tiny_artifacts / "model.onnx", "fp32"), tmp_path / "model.onnx")
    spec_file = tmp_path / "deployment.json"
    DeploymentSpec(artifacts=str(tmp_path), max_batch_size=8, classifier=StageSpec(preferred_batch_sizes=[2])).save(spec_file)
    meta = plans.main(plans.get_args_parser().parse_args([
        "--spec", str(spec_file), "--precision", "fp32", "--no-progress", "--version-compatible",
        "--hardware-compatibility", "ampere_plus", "--detailed-profile"]))
    assert ("flag", "VERSION_COMPATIBLE") in calls and ("hardware_compatibility_level", 1) in calls
    assert ("profiling_verbosity", "DETAILED") in calls and ("runtime", "engine_host_code_allowed", True) in calls
    assert meta["compatibility"] == {"version_compatible": True, "hardware_compatibility": "ampere_plus"}
    record = binding.check_plan(tmp_path / "model.fp32.plan", target(tensorrt="10.14.1", cc="12.0"))
    assert record["server_flags"] == ["--backend-config=tensorrt,version-compatible=true"]


# ---------------------------------------------------------------- calibration cache headers

def test_cache_headers_name_only_calibrators_tensorrt_has(tmp_path, tiny_artifacts):
    assert set(calibrate.CALIBRATOR_NAMES.values()) <= set(calibrate.TENSORRT_CALIBRATORS)
    with pytest.raises(ValueError, match="not one TensorRT has"):
        calibrate.write_cache(tmp_path / "x.cache", {"a": 1.0}, "PercentileCalibration", 0)
    config = PreprocessConfig.load(tiny_artifacts / "preprocess.json")
    images = augmented_photos(("chelsea", "coffee"), 2, 0, config)
    out = tmp_path / "calibration"
    first = calibrate.calibrate(tiny_artifacts / "model.onnx", out, "percentile", images, config)
    assert first.cache.read_text().splitlines()[0] == "TRT-0-LegacyCalibration"
    assert calibrate.calibrate(tiny_artifacts / "model.onnx", out, "percentile", images, config).reused
    old = first.cache.read_text().replace("LegacyCalibration", "PercentileCalibration", 1)
    first.cache.write_text(old)  # a cache written before the fix
    redone = calibrate.calibrate(tiny_artifacts / "model.onnx", out, "percentile", images, config)
    assert not redone.reused and "names a calibrator TensorRT does not have ('PercentileCalibration')" in redone.message
    assert redone.cache.read_text().startswith("TRT-0-LegacyCalibration\n")
