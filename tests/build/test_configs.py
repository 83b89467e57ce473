"""Every generated config.pbtxt parses as Triton's ModelConfig and says what the spec says."""
import dataclasses
import json
import shutil
import subprocess
import sys

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from build.repository import configs
from build.repository.writer import ArtifactsError, model_shape, write_repository
from build.repository.spec import PREPROCESS_NICE, STUB_NICE, DeploymentSpec, StageSpec

SHAPE = configs.ModelShape(input_dims=(3, 224, 224), num_classes=1000)
DT = model_config_pb2.DataType


def parse(text: str) -> model_config_pb2.ModelConfig:
    return text_format.Parse(text, model_config_pb2.ModelConfig())


@pytest.fixture
def spec():
    return DeploymentSpec(max_batch_size=16,
                          preprocess=StageSpec(instances=3, preferred_batch_sizes=[2, 4], max_queue_delay_us=500),
                          classifier=StageSpec(instances=2, preferred_batch_sizes=[8, 16], threads=4))


def test_preprocess_config(spec):
    cfg = parse(configs.preprocess_config(spec, SHAPE, "test"))
    assert (cfg.name, cfg.backend, cfg.max_batch_size) == ("preprocess", "python", 16)
    assert cfg.input[0].name == "IMAGE" and cfg.input[0].data_type == DT.TYPE_STRING and list(cfg.input[0].dims) == [1]
    assert cfg.output[0].name == "PIXELS" and list(cfg.output[0].dims) == [3, 224, 224]
    assert list(cfg.dynamic_batching.preferred_batch_size) == [2, 4]
    assert cfg.dynamic_batching.max_queue_delay_microseconds == 500
    assert cfg.instance_group[0].count == 3 and cfg.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_CPU
    assert cfg.parameters["max_image_pixels"].string_value == str(spec.limits.max_image_pixels)


@pytest.mark.parametrize("backend, kind", [
    ("python-onnxruntime", "KIND_CPU"), ("onnxruntime", "KIND_CPU"), ("tensorrt", "KIND_GPU")])
def test_classifier_config_for_every_backend(spec, backend, kind):
    text = configs.classifier_config(spec, SHAPE, backend, "test")
    assert text.startswith("# GENERATED")
    cfg = parse(text)
    selector = {"python-onnxruntime": ("backend", "python"), "onnxruntime": ("platform", "onnxruntime_onnx"),
                "tensorrt": ("platform", "tensorrt_plan")}[backend]
    assert getattr(cfg, selector[0]) == selector[1]
    assert cfg.max_batch_size == 16
    assert [i.name for i in cfg.input] == ["images"] and list(cfg.input[0].dims) == [3, 224, 224]
    assert [o.name for o in cfg.output] == ["logits", "probabilities"]
    assert all(list(o.dims) == [1000] for o in cfg.output)
    assert cfg.instance_group[0].kind == getattr(model_config_pb2.ModelInstanceGroup, kind)
    assert cfg.instance_group[0].count == 2
    assert list(cfg.dynamic_batching.preferred_batch_size) == [8, 16]
    if backend == "tensorrt":
        assert cfg.default_model_filename == "model.plan"
    if backend == "python-onnxruntime":
        assert cfg.parameters["intra_op_threads"].string_value == "4"
        assert cfg.parameters["onnx_file"].string_value == "model.onnx"


def test_ensemble_wires_members_by_name(spec):
    ens = parse(configs.ensemble_config(spec, SHAPE, "test"))
    pre = parse(configs.preprocess_config(spec, SHAPE, "test"))
    cls = parse(configs.classifier_config(spec, SHAPE, "python-onnxruntime", "test"))
    assert ens.platform == "ensemble" and ens.name == "image_classifier"
    assert ens.output[0].label_filename == "labels.txt"
    members = {"preprocess": pre, "classifier": cls}
    available = {i.name for i in ens.input}
    for step in ens.ensemble_scheduling.step:
        member = members[step.model_name]
        assert set(step.input_map) == {i.name for i in member.input}
        assert set(step.input_map.values()) <= available  # fed by an ensemble input or an earlier step
        assert set(step.output_map) <= {o.name for o in member.output}
        available |= set(step.output_map.values())
    assert {o.name for o in ens.output} <= available


def test_spec_rejects_bad_values(tmp_path):
    with pytest.raises(ValueError, match="backend"):
        DeploymentSpec(backend="tflite")
    with pytest.raises(ValueError, match="preferred_batch_sizes"):
        DeploymentSpec(max_batch_size=8, classifier=StageSpec(preferred_batch_sizes=[16]))
    path = tmp_path / "spec.json"
    path.write_text(json.dumps({"max_batch_sise": 8}))
    with pytest.raises(ValueError, match="unknown deployment-spec keys"):
        DeploymentSpec.load(path)


def test_python_models_are_told_to_run_below_the_server(spec):
    """Every python-backend model gets its stub's nice increment (common/priority.py applies it in the stub):
    derived, preprocess below the classifier (and the fused model); a classifier that runs inside tritonserver
    (onnxruntime backend) gets none: lowering it would lower the server."""
    def nice(text: str) -> int:
        return int(parse(text).parameters["nice"].string_value)

    derived = {"preprocess": configs.preprocess_config(spec, SHAPE, "t"), "fused": configs.fused_config(spec, SHAPE, "t"),
               "classifier": configs.classifier_config(spec, SHAPE, "python-onnxruntime", "t")}
    assert {stage: nice(text) for stage, text in derived.items()} == {
        "preprocess": PREPROCESS_NICE, "classifier": STUB_NICE, "fused": STUB_NICE}
    assert 0 < STUB_NICE < PREPROCESS_NICE <= 19
    chosen = spec.replace(preprocess=dataclasses.replace(spec.preprocess, nice=0),
                          classifier=dataclasses.replace(spec.classifier, nice=7),
                          fused=dataclasses.replace(spec.fused, nice=3))
    assert nice(configs.preprocess_config(chosen, SHAPE, "t")) == 0
    assert nice(configs.classifier_config(chosen, SHAPE, "python-onnxruntime", "t")) == 7
    assert nice(configs.fused_config(chosen, SHAPE, "t")) == 3
    assert "nice" not in parse(configs.classifier_config(chosen, SHAPE, "onnxruntime", "t")).parameters
    for bad in (-1, 20):
        with pytest.raises(ValueError, match="classifier.nice must be within 0..19"):
            spec.replace(classifier=dataclasses.replace(spec.classifier, nice=bad))


def test_the_onnxruntime_classifier_runs_on_a_gpu_when_the_spec_says_so(spec):
    """classifier_kind: Triton's onnxruntime backend on either kind; the python classifier (CPU sessions) and a
    TensorRT plan (GPU only) on their own, and INT8 (CPU integer kernels) not on a GPU: refused in one line."""
    gpu = spec.replace(classifier_kind="KIND_GPU")
    cfg = parse(configs.classifier_config(gpu, SHAPE, "onnxruntime", "test"))
    assert cfg.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU
    with pytest.raises(ValueError, match="the python-onnxruntime classifier runs as KIND_CPU only"):
        configs.classifier_config(gpu, SHAPE, "python-onnxruntime", "test")
    with pytest.raises(ValueError, match="the tensorrt classifier runs as KIND_GPU only"):
        configs.classifier_config(spec.replace(classifier_kind="KIND_CPU"), SHAPE, "tensorrt", "test")
    with pytest.raises(ValueError, match="INT8 on a GPU is the tensorrt backend's"):
        configs.classifier_config(gpu.replace(precision="int8"), SHAPE, "onnxruntime", "test")
    with pytest.raises(ValueError, match="classifier_kind 'GPU' is not one of"):
        spec.replace(classifier_kind="GPU")


def test_spec_round_trip(tmp_path, spec):
    spec.save(tmp_path / "spec.json")
    assert DeploymentSpec.load(tmp_path / "spec.json") == spec


def test_repository_is_complete_and_self_contained(tmp_path, tiny_artifacts):
    spec = DeploymentSpec(artifacts=str(tiny_artifacts))
    out = tmp_path / "repo"
    manifest = write_repository(spec, "python-onnxruntime", out, "test")
    assert manifest["num_classes"] == 3 and manifest["input_dims"] == [3, 32, 32]
    for rel in ["preprocess/1/model.py", "preprocess/1/preprocessing.py", "preprocess/1/preprocess.json",
                "preprocess/1/priority.py", "classifier/1/priority.py",
                "classifier/1/model.py", "classifier/1/onnxsession.py", "classifier/1/cpu.py", "classifier/1/model.onnx",
                "image_classifier/labels.txt", "image_classifier/1/README", "BUILD.json"]:
        assert (out / rel).is_file(), rel
    for model in ("preprocess", "classifier", "image_classifier"):
        parse((out / model / "config.pbtxt").read_text())
    # The classifier's session code runs without the project: on another server, cpu.py beside it is used.
    alone = subprocess.run([sys.executable, "-c", "import sys; sys.modules['common'] = None; import onnxsession; "
                            "print(onnxsession.refusal.__module__)"], cwd=out / "classifier/1",
                           capture_output=True, text=True, timeout=60)
    assert alone.returncode == 0 and alone.stdout.strip() == "cpu", alone.stderr
    write_repository(spec, "onnxruntime", out, "test")  # rebuilt in place
    assert not (out / "classifier/1/model.py").exists()


def test_repository_refuses_foreign_folder_and_bad_artifacts(tmp_path, tiny_artifacts):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        write_repository(DeploymentSpec(artifacts=str(tiny_artifacts)), "onnxruntime", foreign)
    assert (foreign / "notes.txt").exists()
    # nor a folder of the staging name it writes beside the repository, unless a write left it behind
    out = tmp_path / "model_repository"
    staging = tmp_path / "model_repository.tmp"
    staging.mkdir()
    (staging / "notes.txt").write_text("keep me too")
    with pytest.raises(FileExistsError, match="model_repository.tmp"):
        write_repository(DeploymentSpec(artifacts=str(tiny_artifacts)), "onnxruntime", out)
    assert (staging / "notes.txt").exists()
    (staging / "notes.txt").unlink()
    (staging / ".staging").write_text("")  # what an interrupted write leaves
    (staging / "half").mkdir()
    write_repository(DeploymentSpec(artifacts=str(tiny_artifacts)), "onnxruntime", out)
    assert not staging.exists() and (out / "BUILD.json").is_file() and not (out / ".staging").exists()
    # nor the folder the old repository is moved to while the new one takes its place
    old = tmp_path / "model_repository.old"
    old.mkdir()
    (old / "notes.txt").write_text("keep me as well")
    with pytest.raises(FileExistsError, match="model_repository.old exists and was not written by build.engines"):
        write_repository(DeploymentSpec(artifacts=str(tiny_artifacts)), "onnxruntime", out)
    assert (old / "notes.txt").exists() and (out / "BUILD.json").is_file()
    with pytest.raises(ArtifactsError, match="make export"):
        model_shape(tmp_path / "nothing")


def test_a_repository_with_rollout_versions_is_not_rebuilt_unless_asked(tmp_path, tiny_artifacts):
    """What serving.rollout added (a version 2, a retired version, an A/B candidate, ROLLOUT.json) would be lost by
    a rebuild, and version 1 served again: refused, the repository left as it was, unless discard_additions."""
    spec = DeploymentSpec(artifacts=str(tiny_artifacts))
    out = tmp_path / "model_repository"
    write_repository(spec, "onnxruntime", out, "test")
    (out / ".model-control.lock").touch()  # the watchdog's and rollout's lock: not an addition
    write_repository(spec, "onnxruntime", out, "test")
    added = [out / "classifier" / "2", out / "classifier" / "_retired" / "3", out / "classifier_candidate" / "4"]
    for folder in added:
        folder.mkdir(parents=True)
    (out / "ROLLOUT.json").write_text("{}")
    before = (out / "BUILD.json").read_text()
    with pytest.raises(FileExistsError, match=r"\(ROLLOUT.json, classifier/2, classifier/_retired, classifier_candidate\)"
                                              r".*--discard-rollouts"):
        write_repository(spec, "onnxruntime", out, "test")
    assert all(f.is_dir() for f in added) and (out / "BUILD.json").read_text() == before
    write_repository(spec, "onnxruntime", out, "test", discard_additions=True)
    assert not any(f.exists() for f in added) and not (out / "ROLLOUT.json").exists()
    assert not out.with_name("model_repository.old").exists()


def test_a_hand_edited_labels_file_reaches_triton_with_plain_line_ends(tmp_path, tiny_artifacts):
    """Triton splits an ensemble's label file on '\\n' alone: a CRLF file with a byte-order mark would serve
    'cat\\r' and a first label behind the mark."""
    artifacts = tmp_path / "artifacts"
    shutil.copytree(tiny_artifacts, artifacts)
    names = (artifacts / "labels.txt").read_text(encoding="utf-8").splitlines()
    (artifacts / "labels.txt").write_bytes(b"\xef\xbb\xbf" + "\r\n".join(names).encode() + b"\r\n")
    out = tmp_path / "repo"
    write_repository(DeploymentSpec(artifacts=str(artifacts)), "onnxruntime", out, "test")
    assert (out / "image_classifier" / "labels.txt").read_bytes() == "".join(f"{n}\n" for n in names).encode()


def test_fused_pipeline_is_one_step_with_preprocessing_inside(tmp_path, tiny_artifacts):
    spec = DeploymentSpec(artifacts=str(tiny_artifacts), pipeline="fused")
    ens = parse(configs.ensemble_config(spec, SHAPE, "test"))
    fused = parse(configs.fused_config(spec, SHAPE, "test"))
    (step,) = ens.ensemble_scheduling.step
    assert step.model_name == "classifier" and dict(step.input_map) == {"IMAGE": "IMAGE"}
    assert [i.name for i in fused.input] == ["IMAGE"] and fused.input[0].data_type == DT.TYPE_STRING
    assert {"probabilities", "logits"} == {o.name for o in fused.output}
    assert fused.parameters["min_image_side"].string_value == str(spec.limits.min_image_side)
    assert fused.instance_group[0].count == spec.fused.instances == 2
    assert fused.parameters["intra_op_threads"].string_value == str(spec.fused.threads)
    out = tmp_path / "repo"
    manifest = write_repository(spec, "python-onnxruntime", out, "test")
    assert manifest["models"] == ["classifier", "image_classifier"] and not (out / "preprocess").exists()
    for rel in ("preprocessing.py", "onnxsession.py", "cpu.py", "model.onnx"):
        assert (out / "classifier/1" / rel).is_file(), rel
    with pytest.raises(ValueError, match="fused pipeline needs the python-onnxruntime backend"):
        write_repository(spec, "onnxruntime", tmp_path / "other", "test")
    with pytest.raises(ValueError, match="pipeline"):
        DeploymentSpec(pipeline="parallel")


def test_the_committed_model_repository_readme_is_what_the_writer_writes(tmp_path, tiny_artifacts):
    """model_repository/ is visible in a fresh clone (its README.md is committed); `make engines` writes
    into it, keeps that README as it is, and still refuses a folder with anything else in it."""
    from pathlib import Path

    committed = Path(__file__).resolve().parents[2] / "model_repository" / "README.md"
    out = tmp_path / "model_repository"
    out.mkdir()
    shutil.copy(committed, out / "README.md")  # what a fresh clone has
    write_repository(DeploymentSpec(artifacts=str(tiny_artifacts)), "python-onnxruntime", out, "test")
    assert (out / "README.md").read_bytes() == committed.read_bytes() and (out / "BUILD.json").is_file()
    edited = tmp_path / "edited"
    edited.mkdir()
    (edited / "README.md").write_text("my notes\n")
    with pytest.raises(FileExistsError, match="was not written by build.engines"):
        write_repository(DeploymentSpec(artifacts=str(tiny_artifacts)), "python-onnxruntime", edited, "test")
