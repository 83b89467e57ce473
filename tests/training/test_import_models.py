"""training.export --onnx on the classifiers other tools leave: a Softmax at the end, NHWC, named spatial axes,
IR 3 weights listed as inputs, an undeclared output shape, a one-column sigmoid head, weights in a file beside the
model (external data). Each import is canonical (model_shape, which `make engines` reads first, accepts it) and
answers as the source model does."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from build.repository.writer import model_shape
from common.hashing import file_sha256
from common.onnxfiles import model_sha256, weight_files
from common.preprocessing import PreprocessConfig, load_files
from common.samples import sample_photos
from tests.training.tiny_torch import FreshBatchNormNet, TinyNet, export_fixed_batch, export_with_external_data
from training import export

TINY = PreprocessConfig(resize=72, crop=64)
SEVEN = [f"class {i}" for i in range(7)]


def _photos(config: PreprocessConfig = TINY) -> np.ndarray:
    return load_files(sample_photos(["chelsea", "coffee", "rocket"]).values(), config)


def _run(result: export.ExportResult, images: np.ndarray) -> dict[str, np.ndarray]:
    return export.run_onnxruntime(result.model_path, images)


def _dims(value: onnx.ValueInfoProto) -> list:
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


def _canonical(result: export.ExportResult, classes: int, per_image=(3, 64, 64)) -> onnx.ModelProto:
    model = onnx.load(str(result.model_path))
    assert [v.name for v in model.graph.input] == ["images"] and _dims(model.graph.input[0]) == ["batch", *per_image]
    assert [v.name for v in model.graph.output] == ["logits", "probabilities"]
    assert model_shape(result.out_dir).num_classes == classes  # what make engines checks first
    return model


def test_a_model_ending_in_softmax_imports_with_its_log_as_logits(tmp_path):
    net = TinyNet(head="probabilities")
    result = export.import_onnx(export_fixed_batch(net, tmp_path / "p.onnx"), tmp_path / "out", SEVEN, TINY,
                                outputs="probabilities")
    model = _canonical(result, 7)
    assert sum(n.op_type == "Softmax" for n in model.graph.node) == 1  # the model's own, no second one
    images = _photos()
    answers = _run(result, images)
    with torch.no_grad():
        expected = net(torch.from_numpy(images)).numpy()
    np.testing.assert_allclose(answers["probabilities"], expected, atol=1e-6)
    np.testing.assert_allclose(answers["logits"], np.log(expected), atol=1e-4)
    assert set(np.load(result.out_dir / "reference.npz")) >= {"logits", "probabilities"}


@pytest.mark.parametrize("head", ["probabilities", "manual-softmax"])
def test_a_model_giving_probabilities_is_refused_as_logits(tmp_path, head):
    """Imported as logits, a model that already ends in a softmax would be softmaxed twice: every answer
    near 1/C with the same top-1. A Softmax node is seen in the graph; a hand-made one in its outputs."""
    source = export_fixed_batch(TinyNet(head=head), tmp_path / "p.onnx")
    with pytest.raises(ValueError, match="gives probabilities; import it with --outputs probabilities"):
        export.import_onnx(source, tmp_path / "out", SEVEN, TINY, outputs="logits")
    assert not (tmp_path / "out").exists()


def test_nhwc_and_named_spatial_axes_become_the_declared_shape(tmp_path):
    nhwc = PreprocessConfig(resize=72, crop=64, layout="NHWC")
    net = TinyNet(nhwc=True)
    source = export_fixed_batch(net, tmp_path / "nhwc.onnx", dynamic_size=True)
    result = export.import_onnx(source, tmp_path / "out", SEVEN, nhwc)
    _canonical(result, 7, per_image=(64, 64, 3))
    images = _photos(nhwc)
    with torch.no_grad():
        np.testing.assert_allclose(_run(result, images)["logits"], net(torch.from_numpy(images)).numpy(), atol=1e-5)

    plain = export_fixed_batch(TinyNet(), tmp_path / "nchw.onnx", dynamic_size=True)
    _canonical(export.import_onnx(plain, tmp_path / "nchw", SEVEN, TINY), 7)  # NCHW with named H, W
    with pytest.raises(ValueError, match="check --layout"):
        export.import_onnx(source, tmp_path / "wrong", SEVEN, TINY)  # an NHWC model imported as NCHW
    assert not (tmp_path / "wrong").exists()


def _gemm_model(path, ir_version: int, opset: int, output_shape: list | None, dtype=TensorProto.FLOAT, width=4):
    """images -> GlobalAveragePool -> Flatten -> Gemm: `width` outputs, written the way old exporters did."""
    rng = np.random.default_rng(1)
    weights = [numpy_helper.from_array(rng.normal(size=(3, width)).astype(np.float32), "W"),
               numpy_helper.from_array(rng.normal(size=width).astype(np.float32), "B")]
    nodes = [helper.make_node("GlobalAveragePool", ["x"], ["pooled"]), helper.make_node("Flatten", ["pooled"], ["flat"]),
             helper.make_node("Gemm", ["flat", "W", "B"], ["scores"])]
    inputs = [helper.make_tensor_value_info("x", dtype, [1, 3, 64, 64])]
    if ir_version < 4:  # IR 3: every initializer is listed as a graph input too
        inputs += [helper.make_tensor_value_info(w.name, TensorProto.FLOAT, list(w.dims)) for w in weights]
    output = (helper.make_tensor_value_info("scores", TensorProto.FLOAT, output_shape) if output_shape is not None
              else helper.make_empty_tensor_value_info("scores"))
    graph = helper.make_graph(nodes, "old", inputs, [output], initializer=weights)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir_version), path)
    return path


def test_ir3_weights_as_inputs_and_an_undeclared_output_shape_import(tmp_path):
    four = [f"c{i}" for i in range(4)]
    old = export.import_onnx(_gemm_model(tmp_path / "ir3.onnx", 3, 9, [1, 4]), tmp_path / "ir3", four, TINY)
    model = _canonical(old, 4)
    assert model.ir_version >= 4 and {i.name for i in model.graph.initializer} >= {"W", "B"}
    bare = export.import_onnx(_gemm_model(tmp_path / "bare.onnx", 8, 13, None), tmp_path / "bare", four, TINY)
    assert _dims(_canonical(bare, 4).graph.output[0]) == ["batch", "classes"]
    np.testing.assert_allclose(_run(old, _photos())["logits"], _run(bare, _photos())["logits"], atol=1e-6)


def test_the_input_type_is_named_when_it_is_not_float(tmp_path):
    source = _gemm_model(tmp_path / "u8.onnx", 8, 13, [1, 4], dtype=TensorProto.UINT8)
    with pytest.raises(ValueError, match=r"input 'x' is uint8 \[1, 3, 64, 64\]; the model must take float32"):
        export.import_onnx(source, tmp_path / "out", ["a", "b", "c", "d"], TINY)


@pytest.mark.parametrize("head,outputs", [("logits", "logits"), ("sigmoid", "probabilities")])
def test_a_one_column_sigmoid_classifier_becomes_two_classes(tmp_path, head, outputs):
    net = TinyNet(num_classes=1, head=head)
    result = export.import_onnx(export_fixed_batch(net, tmp_path / "one.onnx"), tmp_path / "out", ["no", "yes"], TINY,
                                outputs=outputs)
    _canonical(result, 2)
    images = _photos()
    with torch.no_grad():
        column = net(torch.from_numpy(images)).numpy()[:, 0]
    yes = column if head == "sigmoid" else 1 / (1 + np.exp(-column))
    np.testing.assert_allclose(_run(result, images)["probabilities"], np.stack([1 - yes, yes], 1), atol=1e-6)
    with pytest.raises(ValueError, match="names 1 class"):
        export.import_onnx(tmp_path / "one.onnx", tmp_path / "single", ["yes"], TINY, outputs=outputs)


@pytest.mark.parametrize("inner,width,outputs", [("logits", 4, "logits"),
                                                 ("probabilities_floored", 4, "probabilities"),
                                                 ("logits_other", 1, "logits")])
def test_a_tensor_name_the_import_would_add_is_refused(tmp_path, inner, width, outputs):
    """The import adds tensors (the missing output, the log's floor, the second class's column): a model that
    already uses one of those names inside is refused in one line, not rewired into a wrong graph."""
    source = _gemm_model(tmp_path / "m.onnx", 8, 13, [1, width], width=width)
    model = onnx.load(str(source))
    for node in model.graph.node:
        node.input[:] = [inner if name == "flat" else name for name in node.input]
        node.output[:] = [inner if name == "flat" else name for name in node.output]
    onnx.save(model, str(source))
    labels = [f"c{i}" for i in range(max(width, 2))]
    with pytest.raises(ValueError, match=f"already uses the tensor name '{inner}' internally"):
        export.import_onnx(source, tmp_path / "out", labels, TINY, outputs=outputs)


GRAY = PreprocessConfig(resize=72, crop=64, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


def gray_model(path, layout: str = "NCHW", channels: int = 1, width: int = 4):
    """A 1-channel (MNIST-like) conv classifier at batch 1: x -> Conv 3x3 -> Relu -> GlobalAveragePool -> Gemm."""
    rng = np.random.default_rng(2)
    weights = [numpy_helper.from_array(rng.normal(size=(8, channels, 3, 3)).astype(np.float32), "K"),
               numpy_helper.from_array(rng.normal(size=(8, width)).astype(np.float32), "W")]
    nchw = "x" if layout == "NCHW" else "x_nchw"
    nodes = [] if layout == "NCHW" else [helper.make_node("Transpose", ["x"], [nchw], perm=[0, 3, 1, 2])]
    nodes += [helper.make_node("Conv", [nchw, "K"], ["conv"], strides=[4, 4]),
              helper.make_node("Relu", ["conv"], ["relu"]), helper.make_node("GlobalAveragePool", ["relu"], ["pooled"]),
              helper.make_node("Flatten", ["pooled"], ["flat"]), helper.make_node("Gemm", ["flat", "W"], ["scores"])]
    shape = [1, channels, 64, 64] if layout == "NCHW" else [1, 64, 64, channels]
    graph = helper.make_graph(nodes, "gray", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("scores", TensorProto.FLOAT, [1, width])],
                              initializer=weights)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), path)
    return path


def luma(images: np.ndarray, layout: str) -> np.ndarray:
    """The normalised R, G, B -> their ITU-R 601-2 luma, the 1-channel input a grayscale model knows."""
    weights = np.array([0.299, 0.587, 0.114], np.float32)
    if layout == "NCHW":
        return np.einsum("nchw,c->nhw", images, weights)[:, None]
    return np.einsum("nhwc,c->nhw", images, weights)[..., None]


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_a_grayscale_model_takes_rgb_and_answers_on_its_luma(tmp_path, layout):
    """Before, a 1-channel model was refused by the shape check ('check --layout'), which was not the mistake."""
    config = PreprocessConfig(resize=72, crop=64, mean=GRAY.mean, std=GRAY.std, layout=layout)
    source = gray_model(tmp_path / "gray.onnx", layout)
    result = export.import_onnx(source, tmp_path / "out", ["a", "b", "c", "d"], config)
    _canonical(result, 4, per_image=(3, 64, 64) if layout == "NCHW" else (64, 64, 3))
    assert result.metadata["source"]["input_channels"] == 1
    images = _photos(config)
    session = export.onnxruntime_session(source)  # the source takes a batch of 1
    expected = np.concatenate([session.run(None, {"x": luma(image[None], layout)})[0] for image in images])
    np.testing.assert_allclose(_run(result, images)["logits"], expected, atol=1e-5)


def test_a_grayscale_model_needs_one_mean_and_std_for_all_channels(tmp_path):
    with pytest.raises(ValueError, match=r"takes 1 channel \(grayscale\).* --mean 0.5 0.5 0.5 --std 0.5 0.5 0.5"):
        export.import_onnx(gray_model(tmp_path / "gray.onnx"), tmp_path / "out", ["a", "b", "c", "d"], TINY)
    assert not (tmp_path / "out").exists()


def test_a_channel_count_the_pipeline_cannot_feed_is_named(tmp_path):
    rgba = gray_model(tmp_path / "rgba.onnx", channels=4)
    with pytest.raises(ValueError, match=r"takes 4 channels \(NCHW\): the serving pipeline feeds 3 \(R, G, B\), or 1"):
        export.import_onnx(rgba, tmp_path / "out", ["a", "b", "c", "d"], GRAY)
    assert not (tmp_path / "out").exists()


def _files(folder) -> set[str]:
    return {p.name for p in folder.iterdir()}


def test_a_model_with_external_data_imports_with_its_data_file(tmp_path):
    """A model saved with its weights beside it (ONNX external data, which models over 2 GB need) imports as
    model.onnx + model.onnx.data, hashed together in export.json, answering as the single-file import does.
    Before, the import loaded the weights and wrote one file."""
    source = export_with_external_data(TinyNet(), tmp_path / "big" / "model.onnx")
    assert _files(source.parent) == {"model.onnx", "weights.bin"}
    single = export.import_onnx(export_fixed_batch(TinyNet(), tmp_path / "single.onnx"), tmp_path / "one", SEVEN, TINY)
    result = export.import_onnx(source, tmp_path / "out", SEVEN, TINY)
    assert _files(result.out_dir) == _files(single.out_dir) | {"model.onnx.data"}
    assert weight_files(result.model_path) == ["model.onnx.data"]
    recorded = json.loads((result.out_dir / "export.json").read_text())["onnx"]
    data = result.out_dir / "model.onnx.data"
    assert recorded["external_data"] == [{"file": "model.onnx.data", "sha256": file_sha256(data),
                                          "bytes": data.stat().st_size}]
    assert recorded["sha256"] == model_sha256(result.model_path) == file_sha256(result.model_path, data)
    assert "external_data" not in single.metadata["onnx"]
    assert single.metadata["onnx"]["sha256"] == file_sha256(single.model_path)
    images = _photos()
    for name, value in _run(single, images).items():
        np.testing.assert_array_equal(_run(result, images)[name], value)


def test_an_import_past_the_size_threshold_writes_external_data(tmp_path):
    """The rule for a single-file source: external data once the model would pass the threshold (1 GiB by
    default, under protobuf's 2 GB; the same code path as a model over 2 GB)."""
    source = export_fixed_batch(TinyNet(), tmp_path / "single.onnx")
    small = export.import_onnx(source, tmp_path / "small", SEVEN, TINY, external_data_threshold=10 ** 6)
    assert "model.onnx.data" not in _files(small.out_dir)
    large = export.import_onnx(source, tmp_path / "large", SEVEN, TINY, external_data_threshold=1000)
    assert weight_files(large.model_path) == ["model.onnx.data"]
    images = _photos()
    np.testing.assert_array_equal(_run(large, images)["probabilities"], _run(small, images)["probabilities"])


def test_a_missing_data_file_is_named_in_one_line(tmp_path):
    source = export_with_external_data(TinyNet(), tmp_path / "big" / "model.onnx")
    (source.parent / "weights.bin").unlink()
    with pytest.raises(ValueError, match=r"^\S+model.onnx keeps weights in weights.bin, which is not beside it$"):
        export.import_onnx(source, tmp_path / "out", SEVEN, TINY)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("layout", ["subfolder", "file per tensor"])
def test_weights_below_the_model_or_in_many_files_import_as_one_data_file(tmp_path, layout):
    """Exporters also leave weights in a folder below the model, or one file per tensor (torch's exporter for
    models over 2 GB): the import reads them where they are and writes model.onnx + model.onnx.data, answering
    as the single-file import; export.json's source hash covers every file the source reads. Before, a
    subfolder was refused."""
    (tmp_path / "src" / "weights").mkdir(parents=True)
    source = export_fixed_batch(TinyNet(), tmp_path / "src" / "model.onnx")
    model = onnx.load(str(source))
    onnx.save_model(model, str(source), save_as_external_data=True, size_threshold=0,
                    **({"location": "weights/all.bin"} if layout == "subfolder" else {"all_tensors_to_one_file": False}))
    names = weight_files(source, nested=True)
    if layout == "subfolder":
        assert names == ["weights/all.bin"]
    else:
        assert len(names) > 1 and all("/" not in name for name in names)
    single = export.import_onnx(export_fixed_batch(TinyNet(), tmp_path / "single.onnx"), tmp_path / "one", SEVEN, TINY)
    result = export.import_onnx(source, tmp_path / "out", SEVEN, TINY)
    assert weight_files(result.model_path) == ["model.onnx.data"]
    assert _files(result.out_dir) == _files(single.out_dir) | {"model.onnx.data"}
    recorded = json.loads((result.out_dir / "export.json").read_text())["source"]
    assert recorded["sha256"] == file_sha256(source, *(source.parent / name for name in names))
    images = _photos()
    np.testing.assert_array_equal(_run(result, images)["probabilities"], _run(single, images)["probabilities"])


def test_weights_outside_the_models_folder_are_refused_in_one_line(tmp_path):
    source = export_with_external_data(TinyNet(), tmp_path / "src" / "model.onnx", location="all.bin")
    model = onnx.load(str(source), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            entry.value = "../all.bin" if entry.key == "location" else entry.value
    (source.parent / "all.bin").rename(tmp_path / "all.bin")
    onnx.save(model, str(source))
    with pytest.raises(ValueError, match=r"^\S+model.onnx keeps weights in '../all.bin': only a file inside its "
                                         r"folder can be imported"):
        export.import_onnx(source, tmp_path / "out", SEVEN, TINY)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("sharing", ["identity", "direct"])
def test_layers_sharing_a_bias_import_with_their_own_and_quantize_each_at_its_scales(tmp_path, sharing):
    """The TorchScript exporter writes equal biases once (here two convolutions with fresh batch norms folded in)
    and gives the second layer the first's through an Identity: ONNX Runtime's quantizer found no bias there and
    `make engines PRECISION=int8` failed with a traceback ("'NoneType' object has no attribute 'data_type'").
    A bias two layers read directly was quantized once, at the first layer's scales, for both. Imported, each
    layer has a bias of its own, and the INT8 CPU file rounds each at its own input and weight scales."""
    from build.precision import calibrate, quantize
    from build.precision.imagesets import augmented_photos

    path = export_fixed_batch(FreshBatchNormNet().eval(), tmp_path / "fresh.onnx")
    source = onnx.load(str(path))
    identities = [n for n in source.graph.node if n.op_type == "Identity"]
    assert len(identities) == 1, "the exporter no longer shares the equal biases: this test has lost its case"
    if sharing == "direct":
        source.graph.node.remove(identities[0])
        for node in source.graph.node:
            node.input[:] = [identities[0].input[0] if name == identities[0].output[0] else name for name in node.input]
        onnx.save(source, str(path))
    result = export.import_onnx(path, tmp_path / "out", SEVEN, TINY)
    model = _canonical(result, 7)
    initializers = {i.name for i in model.graph.initializer}
    biases = [n.input[2] for n in model.graph.node if n.op_type in ("Conv", "Gemm")]
    assert len(biases) == 3 and set(biases) <= initializers and len(set(biases)) == 3, biases
    assert not [n for n in model.graph.node if n.op_type == "Identity"]
    images = _photos()
    with torch.no_grad():
        expected = FreshBatchNormNet().eval()(torch.from_numpy(images)).numpy()
    np.testing.assert_allclose(_run(result, images)["logits"], expected, atol=1e-5)

    calibration = calibrate.calibrate(result.model_path, result.out_dir / "calibration", "max",
                                      augmented_photos(("chelsea", "coffee"), 4, 0, TINY), TINY)
    int8 = onnx.load(str(quantize.quantize(result.model_path, calibration, "cpu", tmp_path / "int8.onnx",
                                           cpu_layout="avx2")))
    values = {i.name: numpy_helper.to_array(i) for i in int8.graph.initializer}
    rounded = quantize.cpu_quantization(result.model_path, calibration, "avx2").biases
    convolutions = [n for n in int8.graph.node if n.op_type == "QLinearConv"]
    assert len(convolutions) == 2
    for node in convolutions:
        step = values[node.input[1]] * values[node.input[4]]  # input scale x weight scale, per channel
        bias = rounded[node.name[:-len("_quant")]]
        assert np.abs(values[node.input[8]] * step - bias).max() <= step.max() / 2 * 1.001, node.name
