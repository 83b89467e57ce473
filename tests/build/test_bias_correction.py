"""build.precision.bias_correction: the weight grids it assumes are the ones ONNX Runtime's quantizer writes,
the correction cancels a rounded layer's mean shift exactly on its mean input, the cache records the means
it needs, and a quantized file says how many layers were corrected."""
from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from build.precision import bias_correction, calibrate, quantize
from build.precision.imagesets import augmented_photos
from common.preprocessing import PreprocessConfig


def conv_net(out, crop: int = 32, classes: int = 3):
    """images -> Conv 3x3 (3->8) -> Relu -> depthwise 3x3 -> Relu -> Conv 1x1 (8->16) -> Relu -> pool -> Gemm -> Softmax,
    with the project's IO names, labels and preprocess.json (a real, small CNN)."""
    rng = np.random.default_rng(1)

    def tensor(name, *shape, scale=0.5):
        return numpy_helper.from_array((rng.normal(size=shape) * scale).astype(np.float32), name)

    inits = [tensor("w1", 8, 3, 3, 3), tensor("b1", 8, scale=0.1), tensor("w2", 8, 1, 3, 3), tensor("b2", 8, scale=0.1),
             tensor("w3", 16, 8, 1, 1), tensor("b3", 16, scale=0.1), tensor("w4", classes, 16), tensor("b4", classes)]
    nodes = [
        helper.make_node("Conv", ["images", "w1", "b1"], ["c1"], name="stem", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="depthwise", group=8, pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("Conv", ["r2", "w3", "b3"], ["c3"], name="pointwise"),
        helper.make_node("Relu", ["c3"], ["r3"]),
        helper.make_node("GlobalAveragePool", ["r3"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"]),
        helper.make_node("Gemm", ["flat", "w4", "b4"], ["logits"], name="head", transB=1),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=-1),
    ]
    graph = helper.make_graph(
        nodes, "convnet", [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, crop, crop])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes]),
         helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", classes])], inits)
    # IR 9: the installed onnx writes IR 14 by default, which ONNX Runtime 1.31 refuses.
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    onnx.checker.check_model(model)
    out.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(out / "model.onnx"))
    (out / "labels.txt").write_text("".join(f"class {i}\n" for i in range(classes)))
    config = PreprocessConfig(resize=crop + 4, crop=crop)
    config.save(out / "preprocess.json")
    return out, config


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    artifacts, config = conv_net(tmp_path_factory.mktemp("biascorr") / "net")
    images = augmented_photos(("astronaut", "rocket"), 8, 0, config)
    result = calibrate.calibrate(artifacts / "model.onnx", artifacts / "calibration", "max", images, config)
    return artifacts, result


def test_calibration_records_the_channel_means_of_every_weighted_layers_input(calibrated):
    artifacts, result = calibrated
    meta = json.loads(result.cache.with_suffix(".json").read_text())
    assert sorted(meta["channel_means"]) == ["flat", "images", "r1", "r2"]
    assert [len(meta["channel_means"][n]) for n in ("images", "r1", "r2", "flat")] == [3, 8, 8, 16]
    assert min(meta["channel_means"]["r1"]) >= 0  # after a Relu
    # a cache without them is stale for calibrated methods (redone), still usable for a learned (QAT) one
    del meta["channel_means"]
    result.cache.with_suffix(".json").write_text(json.dumps(meta))
    try:
        config = PreprocessConfig.load(artifacts / "preprocess.json")
        onnx_hash = meta["onnx_sha256"]
        assert "per-channel input means" in calibrate.staleness(result.cache, onnx_hash, config, "max")
    finally:
        meta["channel_means"] = result.meta["channel_means"]
        result.cache.with_suffix(".json").write_text(json.dumps(meta))


def _layers(path):
    model = onnx.load(str(path))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    return {n.name: (n, inits) for n in model.graph.node if n.op_type == "QLinearConv"}, model


@pytest.mark.parametrize("layout", quantize.CPU_LAYOUTS)
def test_the_grids_are_the_quantizers_and_the_int8_biases_carry_the_correction(calibrated, tmp_path, layout):
    """For every QLinearConv ONNX Runtime wrote: its dequantized weights are bias_correction.quantized() of the
    float ones on the layout's grid, and its int32 bias is the float bias minus (Q(W) - W) . E[x]."""
    artifacts, result = calibrated
    path = quantize.quantize(artifacts / "model.onnx", result, "cpu", tmp_path / f"{layout}.onnx", cpu_layout=layout)
    float_model = onnx.load(str(artifacts / "model.onnx"))
    floats = {i.name: numpy_helper.to_array(i) for i in float_model.graph.initializer}
    float_nodes = {n.name: n for n in float_model.graph.node}
    pairing = quantize.pairing_weights(float_model)
    convs, model = _layers(path)
    assert len(convs) == 3
    for name, (node, inits) in convs.items():
        original = float_nodes[name.removesuffix("_quant")]
        weight, bias = floats[original.input[1]], floats[original.input[2]]
        qmax = bias_correction.INT7_MAX if layout == "avx2" and original.input[1] in pairing else 127
        w_int, w_scale = inits[node.input[3]], inits[node.input[4]]
        dequantized = w_int.astype(np.float64) * w_scale.reshape(-1, 1, 1, 1)
        np.testing.assert_allclose(dequantized, bias_correction.quantized(weight, 0, qmax), rtol=1e-6, atol=1e-7)
        assert np.abs(w_int).max() == qmax, name
        shift = bias_correction.mean_shift(original, dequantized - weight, 0,
                                           np.asarray(result.meta["channel_means"][original.input[0]]))
        step = float(inits[node.input[1]]) * w_scale  # the int32 bias's scale: x_scale * w_scale
        np.testing.assert_allclose(inits[node.input[8]] * step, bias - shift, atol=float(step.max()))
        assert np.abs(shift).max() > step.max(), name  # the correction is not lost in the bias's rounding
    metadata = {p.key: p.value for p in model.metadata_props}
    assert metadata[quantize.BIAS_CORRECTION_KEY] == "4 layers"


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


@pytest.mark.parametrize("qmax", [bias_correction.INT8_MAX, bias_correction.INT7_MAX])
def test_a_rounded_layer_with_its_corrected_bias_is_exact_on_its_mean_input(qmax):
    """A grouped 3x3 convolution (no padding) and a Gemm: on an input equal to the means everywhere, the layer
    with rounded weights and the corrected bias gives the float layer's output; without the correction it
    does not."""
    rng = np.random.default_rng(2)
    means = rng.uniform(0.5, 3.0, size=8)
    cases = {
        "conv": (helper.make_node("Conv", ["x", "w", "b"], ["y"], name="layer", group=2),
                 rng.normal(size=(6, 4, 3, 3)), np.broadcast_to(means[None, :, None, None], (1, 8, 5, 5))),
        "gemm": (helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="layer", transB=1),
                 rng.normal(size=(5, 8)), means[None, :]),
    }
    for case, (node, weight, x) in cases.items():
        bias = rng.normal(size=weight.shape[0])

        def model(w, b):
            graph = helper.make_graph([node], case, [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
                                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                                      [numpy_helper.from_array(w.astype(np.float32), "w"),
                                       numpy_helper.from_array(b.astype(np.float32), "b")])
            return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)

        original = model(weight, bias)
        corrected, done = bias_correction.correct(original, {"x": list(means)}, {"w": qmax})
        assert done == ["layer"], case
        new_bias = numpy_helper.to_array(next(i for i in corrected.graph.initializer if i.name == "b"))
        rounded = bias_correction.quantized(weight, 0, qmax)
        x = np.ascontiguousarray(x, dtype=np.float32)
        exact = _run(original, x)
        np.testing.assert_allclose(_run(model(rounded, new_bias), x), exact, rtol=1e-4, atol=1e-4)
        assert np.abs(_run(model(rounded, bias), x) - exact).max() > 1e-3, case


def test_layers_left_in_float_are_not_corrected(calibrated):
    artifacts, result = calibrated
    model = onnx.load(str(artifacts / "model.onnx"))
    _, done = bias_correction.correct(model, result.meta["channel_means"], {}, skip=["stem"])
    assert sorted(done) == ["depthwise", "head", "pointwise"]
