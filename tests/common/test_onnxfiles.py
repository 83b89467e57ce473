"""common.onnxfiles: when a model is written with its weights beside it, and the hash that covers them."""
import os
import stat

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from common.hashing import file_sha256
from common.onnxfiles import EXTERNAL_DATA_THRESHOLD, model_sha256, save_like, save_model, weight_files
from common.onnxsession import cpu_session
from tests.tiny_model import save_with_external_weights


def _run(path):
    return cpu_session(path).run(None, {"images": np.ones((2, 3, 32, 32), np.float32)})


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _weights_as_raw_data(tiny_artifacts, tmp_path) -> onnx.ModelProto:
    """The tiny model with its weights as raw data, as exporters write them (onnx moves only those out)."""
    return onnx.load(str(save_with_external_weights(tiny_artifacts, tmp_path / "source")))


def test_a_model_under_the_threshold_is_one_file_as_onnx_writes_it(tiny_artifacts, tmp_path):
    model = onnx.load(str(tiny_artifacts / "model.onnx"))
    assert model.ByteSize() < EXTERNAL_DATA_THRESHOLD
    save_model(model, tmp_path / "model.onnx")
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]
    assert (tmp_path / "model.onnx").read_bytes() == (tiny_artifacts / "model.onnx").read_bytes()
    assert model_sha256(tmp_path / "model.onnx") == file_sha256(tiny_artifacts / "model.onnx")


def test_past_the_threshold_or_asked_the_weights_go_beside_it(tiny_artifacts, tmp_path):
    for folder, options in (("past", {"threshold": 10}), ("asked", {"external": True})):
        path = tmp_path / folder / "model.onnx"
        path.parent.mkdir()
        save_model(_weights_as_raw_data(tiny_artifacts, tmp_path / folder), path, **options)
        assert weight_files(path) == ["model.onnx.data"]
        # as readable as the model file: onnx alone makes it its owner's only (0600)
        assert _mode(path.parent / "model.onnx.data") == _mode(path) == 0o666 & ~_umask()
        for got, want in zip(_run(path), _run(tiny_artifacts / "model.onnx")):
            np.testing.assert_array_equal(got, want)


def test_a_rewrite_replaces_its_data_file_and_the_hash_follows_it(tiny_artifacts, tmp_path):
    path = tmp_path / "model.onnx"
    save_model(_weights_as_raw_data(tiny_artifacts, tmp_path), path, external=True)
    size, digest = (tmp_path / "model.onnx.data").stat().st_size, model_sha256(path)
    assert digest == file_sha256(path, tmp_path / "model.onnx.data") != file_sha256(path)
    save_like(onnx.load(str(path)), path, path)  # onnx alone would add the weights to the old file's end
    assert (tmp_path / "model.onnx.data").stat().st_size == size and model_sha256(path) == digest
    before = file_sha256(path)
    model = onnx.load(str(path))
    weight = model.graph.initializer[0]
    weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) * np.float32(2), weight.name))
    save_like(model, path, path)
    assert file_sha256(path) == before  # model.onnx is the same file: only its weights changed...
    assert model_sha256(path) != digest  # ...which its hash sees


def test_shapes_stay_in_the_model_file_where_onnx_runtime_reads_them_as_it_loads(tmp_path):
    """A Pad whose pads are an initializer (as torch's exporter folds them: EfficientNet's stem) written with
    every tensor in the weights file was refused by ONNX Runtime as it loaded it ("Cannot parse data from
    external tensors"): its shape inference reads those values. Small integer tensors stay in the model file;
    the weights go beside it."""
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.normal(size=(3, 300)).astype(np.float32), "W")
    pads = numpy_helper.from_array(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64), "pads")
    shape = numpy_helper.from_array(np.array([0, -1], np.int64), "flat")
    graph = helper.make_graph(
        [helper.make_node("Pad", ["images", "pads"], ["padded"]),
         helper.make_node("GlobalAveragePool", ["padded"], ["pooled"]),
         helper.make_node("Reshape", ["pooled", "flat"], ["features"]),
         helper.make_node("MatMul", ["features", "W"], ["logits"])],
        "padded", [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["N", 3, 32, 32])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 300])], [weight, pads, shape])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    save_model(model, tmp_path / "one.onnx")
    save_model(onnx.load(str(tmp_path / "one.onnx")), tmp_path / "model.onnx", external=True)
    for got, want in zip(_run(tmp_path / "model.onnx"), _run(tmp_path / "one.onnx")):
        np.testing.assert_array_equal(got, want)
    assert weight_files(tmp_path / "model.onnx") == ["model.onnx.data"]
    written = onnx.load(str(tmp_path / "model.onnx"), load_external_data=False).graph.initializer
    assert {t.name: t.data_location for t in written} == {
        "W": TensorProto.EXTERNAL, "pads": TensorProto.DEFAULT, "flat": TensorProto.DEFAULT}
