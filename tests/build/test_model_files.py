"""The classifier file a repository serves (build.repository.writer.model_shape, weight_files, copy_model):
checked against the artifacts it claims to belong to, and copied with the weights it keeps beside it."""
import shutil

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from build.repository.spec import DeploymentSpec
from build.repository.writer import ArtifactsError, copy_model, model_shape, weight_files, write_repository
from common.onnxsession import cpu_session


def _with_external_weights(source, target, location="weights.bin"):
    """`source`'s model.onnx in `target` with every initializer in the file `location` (relative to it)."""
    shutil.copytree(source, target)
    model = onnx.load(target / "model.onnx")
    for tensor in model.graph.initializer:  # raw data: onnx moves only that out of the file
        tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor), tensor.name))
    (target / location).parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, target / "model.onnx", save_as_external_data=True, location=location, size_threshold=0)
    return target


def _edited(source, target, edit):
    shutil.copytree(source, target)
    model = onnx.load(target / "model.onnx")
    edit(model.graph)
    onnx.save(model, target / "model.onnx")
    return target / "model.onnx"


def _run(path, crop=32):
    return cpu_session(path).run(None, {"images": np.ones((2, 3, crop, crop), np.float32)})[1]


def test_a_model_with_weights_beside_it_is_copied_whole(tiny_artifacts, tmp_path):
    artifacts = _with_external_weights(tiny_artifacts, tmp_path / "external")
    assert weight_files(artifacts / "model.onnx") == ["weights.bin"]
    assert weight_files(tiny_artifacts / "model.onnx") == []
    (tmp_path / "version").mkdir()
    copy_model(artifacts / "model.onnx", tmp_path / "version" / "served.onnx")
    assert sorted(p.name for p in (tmp_path / "version").iterdir()) == ["served.onnx", "weights.bin"]
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

    cases = [(rename_input, r"has inputs \['input'\]"), (half_output, "probabilities is FLOAT16"),
             (bigger_crop, r"takes \[3, 64, 64\] per image, preprocess.json makes \[3, 32, 32\]"),
             (four_classes, "has 4 classes but labels.txt has 3 lines")]
    for edit, message in cases:
        path = _edited(tiny_artifacts, tmp_path / edit.__name__, edit)
        with pytest.raises(ArtifactsError, match=message):
            model_shape(tiny_artifacts, path)
        with pytest.raises(ArtifactsError, match=message):  # make engines MODEL_FILE=... refuses it too
            write_repository(DeploymentSpec(artifacts=str(tiny_artifacts)), "python-onnxruntime",
                             tmp_path / f"{edit.__name__}_repository", "tests", model_file=path)
