"""The classifier file a repository serves (build.repository.writer.model_shape, weight_files, copy_model):
checked against the artifacts it claims to belong to, and copied with the weights it keeps beside it."""
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from build.repository.spec import DeploymentSpec
from build.repository.writer import (ArtifactsError, copy_model, deployed_model_file, model_shape, weight_files,
                                     write_repository)
from common.hashing import file_sha256
from common.onnxsession import CannotLoad, cpu_session
from tests.tiny_model import save_with_external_weights

ROOT = Path(__file__).resolve().parents[2]


def _with_external_weights(source, target, location="weights.bin"):
    save_with_external_weights(source, target, location)
    return target


def _edited(source, target, edit):
    shutil.copytree(source, target)
    model = onnx.load(target / "model.onnx")
    edit(model.graph)
    onnx.save(model, target / "model.onnx")
    return target / "model.onnx"


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _run(path, crop=32):
    return cpu_session(path).run(None, {"images": np.ones((2, 3, crop, crop), np.float32)})[1]


def test_a_model_with_weights_beside_it_is_copied_whole(tiny_artifacts, tmp_path):
    artifacts = _with_external_weights(tiny_artifacts, tmp_path / "external")
    assert weight_files(artifacts / "model.onnx") == ["weights.bin"]
    assert weight_files(tiny_artifacts / "model.onnx") == []
    (tmp_path / "version").mkdir()
    copy_model(artifacts / "model.onnx", tmp_path / "version" / "served.onnx")
    assert sorted(p.name for p in (tmp_path / "version").iterdir()) == ["served.onnx", "weights.bin"]
    # onnx.save wrote weights.bin 0600: the served copy is as readable as the served model (a container's server
    # runs as another uid than the one that built the repository)
    assert _mode(artifacts / "weights.bin") == 0o600
    assert _mode(tmp_path / "version" / "weights.bin") == _mode(tmp_path / "version" / "served.onnx") == \
        _mode(artifacts / "model.onnx")
    np.testing.assert_array_equal(_run(tmp_path / "version" / "served.onnx"), _run(tiny_artifacts / "model.onnx"))


def test_repository_serves_a_model_with_weights_beside_it(tiny_artifacts, tmp_path):
    artifacts = _with_external_weights(tiny_artifacts, tmp_path / "external")
    out = tmp_path / "model_repository"
    write_repository(DeploymentSpec(artifacts=str(artifacts)), "python-onnxruntime", out, "tests")
    version = out / "classifier" / "1"
    assert (version / "weights.bin").read_bytes() == (artifacts / "weights.bin").read_bytes()
    np.testing.assert_array_equal(_run(version / "model.onnx"), _run(tiny_artifacts / "model.onnx"))


def test_weights_that_cannot_travel_with_the_model_are_refused(tiny_artifacts, tmp_path):
    nested = _with_external_weights(tiny_artifacts, tmp_path / "nested", "data/weights.bin")
    with pytest.raises(ArtifactsError, match="keeps weights in 'data/weights.bin': only a file beside it"):
        weight_files(nested / "model.onnx")
    missing = _with_external_weights(tiny_artifacts, tmp_path / "missing")
    (missing / "weights.bin").unlink()
    with pytest.raises(ArtifactsError, match="keeps weights in weights.bin, which is not beside it"):
        weight_files(missing / "model.onnx")
    clash = _with_external_weights(tiny_artifacts, tmp_path / "clash", "model.py")
    (tmp_path / "version").mkdir()
    with pytest.raises(ArtifactsError, match="keeps weights in model.py, a name the served version folder uses"):
        copy_model(clash / "model.onnx", tmp_path / "version" / "model.onnx", keep={"model.py"})
    assert list((tmp_path / "version").iterdir()) == []
    with pytest.raises(ArtifactsError, match="keeps weights in model.py"):  # the writer's own model.py
        write_repository(DeploymentSpec(artifacts=str(clash)), "python-onnxruntime", tmp_path / "repo", "tests")


def test_a_model_file_is_checked_against_its_artifacts(tiny_artifacts, tmp_path):
    assert model_shape(tiny_artifacts, tiny_artifacts / "model.onnx").num_classes == 3

    def rename_input(graph):
        graph.input[0].name = "input"
        graph.node[0].input[0] = "input"

    def half_output(graph):
        graph.output[1].type.tensor_type.elem_type = onnx.TensorProto.FLOAT16

    def bigger_crop(graph):
        for dim in graph.input[0].type.tensor_type.shape.dim[2:]:
            dim.dim_value = 64

    def four_classes(graph):
        graph.output[1].type.tensor_type.shape.dim[1].dim_value = 4

    def batch_of_one(graph):  # Triton batches along it: the onnxruntime backend refuses such a model
        graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1

    cases = [(rename_input, r"has inputs \['input'\]"), (half_output, "probabilities is FLOAT16"),
             (bigger_crop, r"takes \[3, 64, 64\] per image, preprocess.json makes \[3, 32, 32\]"),
             (four_classes, "has 4 classes but labels.txt has 3 lines"),
             (batch_of_one, "takes batches of exactly 1: export it with a dynamic batch axis")]
    for edit, message in cases:
        path = _edited(tiny_artifacts, tmp_path / edit.__name__, edit)
        with pytest.raises(ArtifactsError, match=message):
            model_shape(tiny_artifacts, path)
        with pytest.raises(ArtifactsError, match=message):  # make engines MODEL_FILE=... refuses it too
            write_repository(DeploymentSpec(artifacts=str(tiny_artifacts)), "python-onnxruntime",
                             tmp_path / f"{edit.__name__}_repository", "tests", model_file=path)


def test_a_model_without_declared_output_shapes_is_taken(tiny_artifacts, tmp_path):
    def no_shape(graph):
        graph.output[1].type.tensor_type.ClearField("shape")

    path = _edited(tiny_artifacts, tmp_path / "no_shape", no_shape)
    assert model_shape(tiny_artifacts, path).num_classes == 3  # was an IndexError


def test_benchmarks_rebuild_only_the_file_that_was_deployed(tiny_artifacts, tmp_path):
    model = Path(shutil.copy2(tiny_artifacts / "model.onnx", tmp_path / "model.int8.cpu.onnx"))
    build = {"classifier_model": {"source": str(model), "sha256": file_sha256(model)}}
    assert deployed_model_file(build) == model and deployed_model_file({}) is None
    model.write_bytes(model.read_bytes() + b"\0")  # a later make engines rewrote it (and failed its gate)
    with pytest.raises(ValueError, match="has changed since: run `make engines` again"):
        deployed_model_file(build)
    model.unlink()
    with pytest.raises(ValueError, match="is gone since"):
        deployed_model_file(build)


def test_a_spec_that_is_not_there_is_an_error_not_the_default(tiny_artifacts, tmp_path):
    done = subprocess.run([sys.executable, "-m", "build.engines", "--spec", str(tmp_path / "mistyped.json"),
                           "--artifacts", str(tiny_artifacts), "--out", str(tmp_path / "repo")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip() == f"build.engines: spec {tmp_path / 'mistyped.json'} not found (the committed specs " \
                                  "are in configs/)"
    assert not (tmp_path / "repo").exists()


def test_a_model_onnx_runtime_cannot_load_is_named_in_one_error(tiny_artifacts, tmp_path):
    model = onnx.load(tiny_artifacts / "model.onnx")
    model.ir_version = 99
    onnx.save(model, tmp_path / "future.onnx")
    with pytest.raises(CannotLoad, match=r"future.onnx: ONNX Runtime [0-9.]+ cannot load it: .*IR version"):
        cpu_session(tmp_path / "future.onnx")
