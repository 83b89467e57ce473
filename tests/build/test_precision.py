"""Calibration cache, Q/DQ variants, FP16, and the accuracy gate: on the real exported model."""
import collections
import dataclasses
import json
import random
import shutil
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from build.precision import calibrate, fp16, quantize, validate
from build.precision.imagesets import augmented_photos, held_out_set
from common.preprocessing import PreprocessConfig
from tests.tiny_model import write_attention_net, write_pooled_convnet, write_tiny_classifier


def test_cache_format_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    scales = {f"/blocks.{i}/Conv_output_0": float(np.float32(s)) for i, s in enumerate(rng.uniform(1e-4, 2, 50))}
    scales["images"] = float(np.float32(2.64 / 127))
    path = tmp_path / "max.cache"
    calibrate.write_cache(path, scales, "EntropyCalibration2", 100300)
    text = path.read_text().splitlines()
    assert text[0] == "TRT-100300-EntropyCalibration2"
    assert all(len(line.rsplit(": ", 1)[1]) == 8 for line in text[1:])  # 8 hex digits: float32 bits
    header, parsed = calibrate.read_cache(path)
    assert header == text[0] and parsed == scales  # bit-identical floats, same order
    assert calibrate.hex_to_scale(calibrate.scale_to_hex(1.0)) == 1.0 and calibrate.scale_to_hex(1.0) == "3f800000"
    (tmp_path / "bad.cache").write_text("not a cache\n")
    with pytest.raises(ValueError, match="not a TensorRT calibration cache"):
        calibrate.read_cache(tmp_path / "bad.cache")


@pytest.fixture
def tiny(tmp_path):
    artifacts = write_tiny_classifier(tmp_path / "tiny")
    config = PreprocessConfig.load(artifacts / "preprocess.json")
    return artifacts, config, augmented_photos(("chelsea", "coffee"), 4, 0, config)


def test_cache_is_reused_and_invalidated(tiny, capsys):
    artifacts, config, images = tiny
    out = artifacts / "calibration"
    first = calibrate.calibrate(artifacts / "model.onnx", out, "max", images, config)
    assert not first.reused and first.cache.exists() and first.cache.with_suffix(".json").exists()
    assert first.meta["images"] == 8 and first.meta["onnx_sha256"] == calibrate.model_sha256(artifacts / "model.onnx")
    again = calibrate.calibrate(artifacts / "model.onnx", out, "max", images, config)
    assert again.reused and "reusing calibration cache" in again.message and again.scales == first.scales
    other_images = augmented_photos(("chelsea", "coffee"), 4, 1, config)
    assert "images changed" in calibrate.calibrate(artifacts / "model.onnx", out, "max", other_images, config).message
    write_tiny_classifier(artifacts, num_classes=4)  # a changed model under the same path
    changed = calibrate.calibrate(artifacts / "model.onnx", out, "max", other_images, config)
    assert not changed.reused and "the ONNX model changed" in changed.message


def test_changed_preprocessing_recalibrates_and_says_why(tiny):
    """Mean, std and layout act after the uint8 crops the image fingerprint hashes: the same photos
    under another normalisation are other activations, so the cache must be redone."""
    artifacts, config, images = tiny
    out = artifacts / "calibration"
    first = calibrate.calibrate(artifacts / "model.onnx", out, "max", images, config)
    other = dataclasses.replace(config, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    assert augmented_photos(("chelsea", "coffee"), 4, 0, other).fingerprint() == images.fingerprint()
    changed = calibrate.calibrate(artifacts / "model.onnx", out, "max", images, other)
    assert not changed.reused, changed.message
    assert ("the preprocessing changed (mean [0.485, 0.456, 0.406] -> [0.5, 0.5, 0.5]; "
            "std [0.229, 0.224, 0.225] -> [0.25, 0.25, 0.25])") in changed.message
    assert changed.scales["images"] != first.scales["images"] and changed.meta["preprocess"]["std"] == [0.25] * 3
    assert calibrate.calibrate(artifacts / "model.onnx", out, "max", images, other).reused
    assert calibrate.staleness(first.cache, calibrate.model_sha256(artifacts / "model.onnx"), config, "max") == \
        "the preprocessing changed (mean [0.5, 0.5, 0.5] -> [0.485, 0.456, 0.406]; std [0.25, 0.25, 0.25] -> " \
        "[0.229, 0.224, 0.225])"


def _module(name, *argv):
    return subprocess.run([sys.executable, "-m", f"build.precision.{name}", *map(str, argv)],
                          capture_output=True, text=True, timeout=300)


def test_quantize_cli_refuses_a_stale_cache(tiny_artifacts, tmp_path):
    artifacts = tmp_path / "tiny"
    shutil.copytree(tiny_artifacts, artifacts, ignore=shutil.ignore_patterns("calibration", "model.*.onnx"))
    missing = _module("quantize", "--artifacts", artifacts)
    assert missing.returncode == 1 and missing.stderr.strip() == (
        f"build.precision.quantize: no calibration cache {artifacts}/calibration/max.cache: run `make calibrate` "
        f"(python -m build.precision.calibrate --artifacts {artifacts} --method max) first")
    assert _module("calibrate", "--artifacts", artifacts, "--views", 2).returncode == 0
    current = _module("quantize", "--artifacts", artifacts)
    assert current.returncode == 0, current.stderr
    assert (artifacts / "model.int8.trt.onnx").exists() and (artifacts / "model.int8.cpu.onnx").exists()

    config = json.loads((artifacts / "preprocess.json").read_text())
    (artifacts / "preprocess.json").write_text(json.dumps({**config, "std": [0.5, 0.5, 0.5]}))
    stale = _module("quantize", "--artifacts", artifacts)
    assert stale.returncode == 1 and "Traceback" not in stale.stderr, stale.stderr
    assert stale.stderr.startswith(f"build.precision.quantize: calibration cache {artifacts}/calibration/max.cache is stale: "
                                   "the preprocessing changed (std [0.229, 0.224, 0.225] -> [0.5, 0.5, 0.5]); "
                                   "run `make calibrate`"), stale.stderr
    write_tiny_classifier(artifacts, num_classes=4)  # another model (and the original preprocess.json)
    stale = _module("quantize", "--artifacts", artifacts, "--target", "trt")
    assert stale.returncode == 1 and "is stale: the ONNX model changed" in stale.stderr, stale.stderr


@pytest.mark.parametrize("module", ["calibrate", "quantize", "fp16", "validate"])
def test_module_clis_report_errors_in_one_line(module, tmp_path):
    cli = _module(module, "--artifacts", tmp_path)  # an empty folder: no model, no preprocess.json, no cache
    assert cli.returncode == 1 and "Traceback" not in cli.stderr, cli.stderr
    assert cli.stderr.startswith(f"build.precision.{module}: ") and len(cli.stderr.strip().splitlines()) == 1, cli.stderr
    assert str(tmp_path) in cli.stderr


def test_fp16_keep_fp32_adds_to_softmax_and_pooling(tiny_artifacts, tmp_path):
    assert set(fp16.KEEP_FP32) <= set(fp16.block_list(["Gemm"])) and "Gemm" in fp16.block_list(["Gemm"])
    out = fp16.convert(tiny_artifacts / "model.onnx", tmp_path / "model.fp16.onnx", keep_fp32=["Gemm"])
    model = onnx.shape_inference.infer_shapes(onnx.load(str(out)))
    types = {v.name: v.type.tensor_type.elem_type for v in [*model.graph.value_info, *model.graph.input]}
    for node in model.graph.node:
        if node.op_type in ("Softmax", "GlobalAveragePool", "Gemm"):  # Gemm added; the defaults still kept
            assert types[node.input[0]] == onnx.TensorProto.FLOAT, node.op_type
    assert _initializers(model)["W"].dtype == np.float32
    args = fp16.get_args_parser().parse_args(["--keep-fp32", "Gemm"])
    assert args.keep_fp32 == ["Gemm"] and fp16.get_args_parser().parse_args([]).keep_fp32 == []


def test_fp16_keeps_average_pooling_and_summing_reductions_fp32(tmp_path):
    """Average pooling and the reductions that sum run in FP32 in the converted file; MaxPool (exact) in FP16."""
    from onnx import TensorProto, helper
    rng = np.random.default_rng(0)
    axes = numpy_helper.from_array(np.array([2, 3], np.int64), "axes")
    summing = ["ReduceSum", "ReduceSumSquare", "ReduceL1", "ReduceL2", "ReduceLogSumExp"]
    nodes = [helper.make_node("Conv", ["images", "CW"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("MaxPool", ["c"], ["mp"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("AveragePool", ["mp"], ["ap"], kernel_shape=[2, 2], strides=[2, 2])]
    nodes += [helper.make_node(op, ["ap", "axes"], [op], keepdims=0) for op in summing]
    nodes += [helper.make_node("Sum", summing, ["s"]), helper.make_node("MatMul", ["s", "W"], ["logits"]),
              helper.make_node("Softmax", ["logits"], ["probabilities"], axis=-1)]
    graph = helper.make_graph(
        nodes, "reductions", [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["b", 3, 32, 32])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", 3]),
         helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["b", 3])],
        initializer=[numpy_helper.from_array(rng.normal(size=(8, 3, 3, 3)).astype(np.float32), "CW"),
                     numpy_helper.from_array(rng.normal(size=(8, 3)).astype(np.float32) * 1e-3, "W"), axes])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9), tmp_path / "model.onnx")
    out = fp16.convert(tmp_path / "model.onnx", tmp_path / "model.fp16.onnx")
    model = onnx.shape_inference.infer_shapes(onnx.load(str(out)))
    types = {v.name: v.type.tensor_type.elem_type for v in [*model.graph.value_info, *model.graph.input]}
    ran = {n.op_type: (types[n.input[0]], types.get(n.output[0])) for n in model.graph.node if n.op_type != "Cast"}
    for op in ["AveragePool", *summing]:
        assert ran[op] == (TensorProto.FLOAT, TensorProto.FLOAT), op
    assert ran["MaxPool"][0] == ran["Conv"][0] == TensorProto.FLOAT16
    batch = rng.normal(size=(2, 3, 32, 32)).astype(np.float32) * 100  # sums past FP16's 65504
    runs = [ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(["logits"], {"images": batch})[0]
            for p in (tmp_path / "model.onnx", out)]
    assert np.isfinite(runs[1]).all()
    np.testing.assert_allclose(runs[1], runs[0], rtol=0.02, atol=0.02)


def test_methods_clip_no_more_than_max(tiny):
    artifacts, config, images = tiny
    stats = calibrate.collect_statistics(artifacts / "model.onnx", images, config, batch_size=4)
    assert set(stats) == set(calibrate.activation_tensors(onnx.load(str(artifacts / "model.onnx"))))
    amax = {m: calibrate.amax_per_tensor(stats, m, 99.9) for m in calibrate.METHODS}
    for name, s in stats.items():
        assert amax["max"][name] == pytest.approx(s.absmax)
        assert 0 < amax["percentile"][name] <= s.absmax and 0 < amax["entropy"][name] <= s.absmax


def _recomputed_by_the_quantizer(scale: np.float32) -> np.float32:
    """ONNX Runtime's symmetric int8 scale for the range [-127 s, 127 s] that quantize feeds it."""
    high = np.float32(127.0 * float(scale))
    return np.float32((np.float64(high) - np.float64(-high)) / 254.0)


def test_trt_qdq_scales_are_the_cache_bit_for_bit_even_where_the_quantizer_rounds_off(tiny):
    artifacts, config, images = tiny
    result = calibrate.calibrate(artifacts / "model.onnx", artifacts / "calibration", "max", images, config)
    scale = np.float32(result.scales["flat"])  # the one activation the tiny model's Gemm quantizes
    while _recomputed_by_the_quantizer(scale) == scale:  # a scale the quantizer lands one ulp off
        scale = np.nextafter(scale, np.float32(1))
    assert abs(int(_recomputed_by_the_quantizer(scale).view(np.int32)) - int(scale.view(np.int32))) == 1
    crafted = dataclasses.replace(result, scales={**result.scales, "flat": float(scale)})
    out = quantize.quantize(artifacts / "model.onnx", crafted, "trt", artifacts / "model.int8.trt.onnx")
    model = onnx.load(str(out))
    inits = _initializers(model)
    qdq = [n for n in model.graph.node  # on activations, not on the stored int8 weights or int32 bias
           if n.op_type in ("QuantizeLinear", "DequantizeLinear") and n.input[0] not in inits]
    assert {n.op_type for n in qdq} == {"QuantizeLinear", "DequantizeLinear"}
    for node in qdq:
        assert inits[node.input[1]].tobytes() == scale.tobytes(), node.name
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    batch = next(images.batches(config, 8))
    (probabilities,) = session.run(["probabilities"], {"images": batch})
    reference = ort.InferenceSession(str(artifacts / "model.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(probabilities, reference.run(["probabilities"], {"images": batch})[0], atol=0.05)


@pytest.fixture(scope="module")
def lite0_int8(lite0_artifacts, tmp_path_factory):
    """Lite0 copied, calibrated (max) on the bundled calibration photos and quantized both ways; the CPU
    file in the portable avx2 layout, which answers the same on every x86 CPU, so the figures the tests
    check do not depend on the CI machine's CPU."""
    artifacts = tmp_path_factory.mktemp("int8") / "lite0"
    shutil.copytree(lite0_artifacts, artifacts)
    config = PreprocessConfig.load(artifacts / "preprocess.json")
    images = augmented_photos(("astronaut", "rocket", "horse", "china"), 8, 0, config)
    result = calibrate.calibrate(artifacts / "model.onnx", artifacts / "calibration", "max", images, config)
    for target in quantize.TARGETS:
        quantize.quantize(artifacts / "model.onnx", result, target, artifacts / quantize.output_name(target),
                          cpu_layout="avx2")
    return artifacts, result, config


def _initializers(model):
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


@pytest.mark.slow
def test_trt_qdq_graph_uses_the_cache_scales(lite0_int8):
    artifacts, result, _ = lite0_int8
    model = onnx.load(str(artifacts / "model.int8.trt.onnx"))
    inits = _initializers(model)
    producers = {o: n for n in model.graph.node for o in n.output}
    consumers = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    quantizers = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert len(quantizers) > 40
    for q in quantizers:  # every quantized activation: int8, zero point 0, scale = the cache's, bit for bit
        tensor, scale, zero = q.input
        assert inits[zero].dtype == np.int8 and not inits[zero].any()
        assert result.scales[tensor] > 0, tensor
        cache_bits = np.float32(result.scales[tensor]).tobytes()
        assert inits[scale].dtype == np.float32 and inits[scale].tobytes() == cache_bits, tensor
        # TensorRT's placement: Q/DQ only on inputs of Conv/Gemm/MatMul/Add, never feeding Clip & co.
        (dq,) = consumers[q.output[0]]
        assert dq.op_type == "DequantizeLinear" and inits[dq.input[1]].tobytes() == cache_bits, tensor
        assert {c.op_type for c in consumers[dq.output[0]]} <= set(quantize.TRT_OP_TYPES), tensor
    for conv in (n for n in model.graph.node if n.op_type == "Conv"):
        data, weight = (producers[i] for i in conv.input[:2])
        assert data.op_type == weight.op_type == "DequantizeLinear", conv.name
        assert inits[weight.input[0]].dtype == np.int8
        assert inits[weight.input[1]].shape == (inits[weight.input[0]].shape[0],)  # per output channel


@pytest.mark.slow
def test_cpu_int8_graph_is_u8s8_from_the_cache(lite0_int8, lite0_artifacts):
    artifacts, result, _ = lite0_int8
    model = onnx.load(str(artifacts / "model.int8.cpu.onnx"))
    inits = _initializers(model)
    ranges = result.ranges()
    convs = [n for n in model.graph.node if n.op_type == "QLinearConv"]
    fp32 = onnx.load(str(lite0_artifacts / "model.onnx")).graph
    assert len(convs) == sum(n.op_type == "Conv" for n in fp32.node)  # every convolution runs in int8
    clip_after = {n.input[0]: n.output[0] for n in fp32.node if n.op_type == "Clip"}
    checked = 0
    for conv in convs:  # x, x_scale, x_zp, w, w_scale, w_zp, y_scale, y_zp, bias
        x_zero, weight, w_scale, y_scale, y_zero = (inits[conv.input[i]] for i in (2, 3, 4, 6, 7))
        assert x_zero.dtype == y_zero.dtype == np.uint8 and weight.dtype == np.int8
        assert w_scale.shape == (weight.shape[0],)  # per output channel
        tensor = conv.input[6].removesuffix("_scale")
        if tensor in clip_after:  # ReLU6 folded in: [0, amax of the Clip output] in uint8, from the cache
            low, high = ranges[clip_after[tensor]]
            assert low == 0.0 and int(y_zero) == 0 and float(y_scale) == pytest.approx(high / 255, rel=1e-6)
            checked += 1
    assert checked > len(convs) // 2


@pytest.mark.slow
def test_gate_passes_int8_that_agrees_and_rejects_broken_scales(lite0_int8, tmp_path):
    artifacts, result, config = lite0_int8
    # 20 views a photo (120, some 60 decided): on 6 (19 decided) three flipped near-ties move the figure 15 points
    held_out = held_out_set(config, views=20)
    good = validate.validate(artifacts, ["int8-cpu", "int8-trt"], held_out, config, {"int8": 0.75})
    assert [r.name for r in good] == ["fp32", "int8-cpu", "int8-trt"]
    assert all(r.passed for r in good), validate.format_table(good)
    assert good[0].top1_agreement == 1.0 and good[0].max_abs_error == 0.0
    assert all(r.confident_agreement >= 0.8 for r in good[1:]), validate.format_table(good)

    broken = dataclasses.replace(result, scales={n: s * 100 for n, s in result.scales.items()})
    shutil.copy(artifacts / "model.onnx", tmp_path / "model.onnx")
    shutil.copy(artifacts / "preprocess.json", tmp_path / "preprocess.json")
    quantize.quantize(tmp_path / "model.onnx", broken, "cpu", tmp_path / "model.int8.cpu.onnx")
    reports = validate.validate(tmp_path, ["int8-cpu"], held_out, config, {"int8": 0.75})
    assert not reports[1].passed and "not deployed" in reports[1].reason
    assert reports[1].top1_agreement < good[1].top1_agreement
    assert "FAIL" in validate.format_table(reports)


@pytest.mark.slow
def test_fp16_keeps_fp32_io_and_agrees(lite0_artifacts, tmp_path):
    out = fp16.convert(lite0_artifacts / "model.onnx", tmp_path / "model.fp16.onnx")
    model = onnx.load(str(out))
    assert {i.type.tensor_type.elem_type for i in [*model.graph.input, *model.graph.output]} == {onnx.TensorProto.FLOAT}
    assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in model.graph.initializer)
    shutil.copy(lite0_artifacts / "model.onnx", tmp_path / "model.onnx")
    config = PreprocessConfig.load(lite0_artifacts / "preprocess.json")
    reports = validate.validate(tmp_path, ["fp16"], held_out_set(config, views=4), config, validate.THRESHOLDS)
    assert reports[1].top1_agreement >= 0.95 and reports[1].max_abs_error < 0.05


def test_fp16_probabilities_are_not_rounded_through_fp16(tiny_artifacts, tmp_path):
    out = fp16.convert(tiny_artifacts / "model.onnx", tmp_path / "model.fp16.onnx")
    graph = onnx.load(str(out)).graph
    producers = {o: n for n in graph.node for o in n.output}
    node = producers["probabilities"]
    while node.op_type == "Identity":
        node = producers[node.input[0]]
    assert node.op_type == "Softmax"  # FP32 Softmax straight to the FP32 output

    def to(n):
        return onnx.helper.get_node_attr_value(n, "to") if n is not None and n.op_type == "Cast" else None

    assert not [n.name for n in graph.node if to(n) == onnx.TensorProto.FLOAT
                and to(producers.get(n.input[0])) == onnx.TensorProto.FLOAT16]


def _residual_branch(float_graph, add):
    """Independently of build.precision.trt_qdq: the Add input computed by a Conv that descends from the other input."""
    producers = {o: n for n in float_graph.node for o in n.output}

    def descends(node, ancestor_output):
        seen, stack = set(), [node]
        while stack:
            current = stack.pop()
            if ancestor_output in current.input:
                return True
            for name in current.input:
                if name in producers and producers[name].name not in seen:
                    seen.add(producers[name].name)
                    stack.append(producers[name])
        return False

    for index, name in enumerate(add.input):
        other = add.input[1 - index]
        if name in producers and producers[name].op_type == "Conv" and descends(producers[name], other):
            return index
    return None


@pytest.mark.slow
def test_trt_qdq_follows_tensorrt_rules(lite0_int8, lite0_artifacts):
    """Float biases (TensorRT's DequantizeLinear takes no int32) and Q/DQ on the skip input of each
    residual Add only (the Conv branch is fused into the Add)."""
    artifacts, _, _ = lite0_int8
    model = onnx.load(str(artifacts / "model.int8.trt.onnx"))
    inits = _initializers(model)
    assert not [n.name for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits
                and inits[n.input[0]].dtype == np.int32]
    for conv in (n for n in model.graph.node if n.op_type == "Conv" and len(n.input) > 2):
        assert inits[conv.input[2]].dtype == np.float32, conv.name  # the bias, as trained
    float_graph = onnx.load(str(lite0_artifacts / "model.onnx")).graph
    producers = {o: n for n in model.graph.node for o in n.output}
    residual = 0
    for add in (n for n in float_graph.node if n.op_type == "Add"):
        branch = _residual_branch(float_graph, add)
        if branch is None:
            continue
        quantized_add = next(n for n in model.graph.node if n.name == add.name)
        assert producers[quantized_add.input[branch]].op_type == "Conv", add.name
        assert producers[quantized_add.input[1 - branch]].op_type == "DequantizeLinear", add.name
        residual += 1
    assert residual == 9  # EfficientNet-Lite0's residual blocks


def _max_abs_weights(path):
    """QLinearConv/QGemm name -> (depthwise?, max |int8 weight|)."""
    model = onnx.load(str(path))
    inits = _initializers(model)
    out = {}
    for node in model.graph.node:
        if node.op_type in ("QLinearConv", "QGemm"):
            weight = inits[node.input[3]]
            group = next((a.i for a in node.attribute if a.name == "group"), 1)
            out[node.name] = (group > 1 and group == weight.shape[0], int(np.abs(weight.astype(int)).max()))
    return out


@pytest.mark.slow
def test_cpu_layouts_keep_paired_products_within_16_bits(lite0_int8, tmp_path):
    """avx2 layout: 7-bit weights wherever a kernel adds products in pairs (2 x 255 x 64 < 32767),
    8-bit in the depthwise convolutions; vnni layout: 8-bit everywhere. Each file says so in its metadata."""
    artifacts, result, _ = lite0_int8
    written = {layout: quantize.quantize(artifacts / "model.onnx", result, "cpu", tmp_path / f"{layout}.onnx",
                                         cpu_layout=layout) for layout in quantize.CPU_LAYOUTS}
    avx2, vnni = _max_abs_weights(written["avx2"]), _max_abs_weights(written["vnni"])
    assert set(avx2) == set(vnni) and any(d for d, _ in avx2.values()) and any(not d for d, _ in avx2.values())
    for name, (depthwise, largest) in avx2.items():
        assert largest == (127 if depthwise else 64), name
        assert vnni[name] == (depthwise, 127), name
    assert quantize.read_layout(written["avx2"]) == {"int8_cpu_layout": "avx2", "int8_requires_cpu": ""}
    assert quantize.read_layout(written["vnni"]) == {"int8_cpu_layout": "vnni",
                                                    "int8_requires_cpu": "avx512_vnni|avx_vnni|amx_int8"}


@pytest.mark.slow
def test_layers_left_in_float_stay_float_when_onnx_runtime_loads_them(lite0_int8, tmp_path):
    """The mixed-precision search leaves layers in float; ONNX Runtime's optimiser used to quantize such a
    layer back (8-bit per-tensor weights, fused into QLinearConv) when it sat between int8 neighbours, so it
    ran in int8 with weights that saturate on a CPU without VNNI. Counted in the graph ONNX Runtime runs."""
    artifacts, result, _ = lite0_int8
    fp32 = onnx.load(str(artifacts / "model.onnx"), load_external_data=False)
    convs = [n for n in fp32.graph.node if n.op_type == "Conv"]
    grouped = [any(a.name == "group" and a.i > 1 for a in n.attribute) for n in convs]
    at = grouped.index(True, 10)  # a depthwise layer, and a pointwise one two layers on: int8 on both sides of each
    depthwise, pointwise = convs[at].name, next(n.name for n, g in zip(convs[at + 2:], grouped[at + 2:]) if not g)
    path = quantize.quantize(artifacts / "model.onnx", result, "cpu", tmp_path / "mixed.onnx",
                             exclude_nodes=[depthwise, pointwise], cpu_layout="avx2")
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "as_run.onnx")
    options.log_severity_level = 3
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    as_run = onnx.load(str(tmp_path / "as_run.onnx"))
    kinds = {}
    for node in as_run.graph.node:
        if node.op_type in ("Conv", "QLinearConv"):
            kinds[node.op_type] = kinds.get(node.op_type, 0) + 1
    assert kinds == {"QLinearConv": len(convs) - 2, "Conv": 2}
    float_inputs = [n for n in onnx.load(str(path)).graph.node if n.name.endswith("_float_input_DequantizeLinear")]
    assert len(float_inputs) == 2


@pytest.mark.slow
def test_layer_ranking_quantizes_once_and_swaps_each_layer_back_to_float(lite0_int8, tmp_path, monkeypatch):
    """The mixed-precision ranking measures each weighted layer alone in float. It quantizes the model once and
    swaps one layer's integer node at a time for its float original, not one whole-model quantization per layer;
    a swapped file answers as the quantizer's own exclusion of that layer for the convolution that reads the
    image, a depthwise and a pointwise one between int8 neighbours, and the head (a Gemm whose logits are
    float), and its float layer runs in float when ONNX Runtime loads it."""
    from build.precision import mixed
    from build.precision.calibrate import load_calibration
    from common.onnxfiles import save_model

    artifacts, _, config = lite0_int8
    shutil.copytree(artifacts / "calibration", tmp_path / "calibration")
    calibration = load_calibration(tmp_path / "calibration" / "max.cache")
    images = augmented_photos(("chelsea", "coffee"), 2, 0, config)
    layers = mixed.weighted_nodes(artifacts / "model.onnx")
    convs = [n for n in onnx.load(str(artifacts / "model.onnx"), load_external_data=False).graph.node
             if n.op_type == "Conv"]
    grouped = [any(a.name == "group" and a.i > 1 for a in n.attribute) for n in convs]
    at = grouped.index(True, 10)
    chosen = [convs[0].name, convs[at].name, next(n.name for n, g in zip(convs[at + 2:], grouped[at + 2:]) if not g),
              next(n for n in layers if n.endswith("Gemm"))]
    quantizations = []
    quantize_file = quantize.quantize

    def counted(*args, **kwargs):
        quantizations.append(kwargs.get("exclude_nodes"))
        return quantize_file(*args, **kwargs)

    monkeypatch.setattr(quantize, "quantize", counted)
    ranking = mixed.rank_layers(artifacts / "model.onnx", calibration, "avx2", images, config)
    assert quantizations == [None], f"{len(quantizations)} quantizations for {len(layers)} layers"
    assert sorted(ranking.nodes) == sorted(layers) and not ranking.requantized
    monkeypatch.undo()

    all_int8 = quantize.quantize(artifacts / "model.onnx", calibration, "cpu", tmp_path / "all.onnx", cpu_layout="avx2")
    base, fp32 = onnx.load(str(all_int8)), onnx.load(str(artifacts / "model.onnx"))
    reference = mixed.probabilities(artifacts / "model.onnx", images, config)
    for layer in chosen:
        excluded = quantize.quantize(artifacts / "model.onnx", calibration, "cpu", tmp_path / "excluded.onnx",
                                     exclude_nodes=[layer], cpu_layout="avx2")
        swapped = save_model(mixed.swap_in_float(base, fp32, layer), tmp_path / "swapped.onnx")
        expected, got = (mixed.probabilities(p, images, config) for p in (excluded, swapped))
        np.testing.assert_allclose(got, expected, atol=1e-6, err_msg=layer)
        assert ranking.error[layer] == pytest.approx(float(np.abs(got - reference).mean()), rel=1e-4), layer
        options = ort.SessionOptions()
        options.optimized_model_filepath = str(tmp_path / "as_run.onnx")
        options.log_severity_level = 3
        ort.InferenceSession(str(swapped), options, providers=["CPUExecutionProvider"])
        as_run = [n.op_type for n in onnx.load(str(tmp_path / "as_run.onnx")).graph.node]
        assert as_run.count("Conv") + as_run.count("Gemm") + as_run.count("FusedConv") + as_run.count("FusedGemm") == 1, (
            layer, sorted(set(as_run)))
    assert mixed.swap_in_float(base, fp32, "no such layer") is None


@pytest.mark.slow
def test_layers_swapped_to_float_in_any_order_answer_as_the_quantizers_exclusion(lite0_int8, tmp_path):
    """The quantizer leaves a padding, pooling or flatten in float after a layer it excludes (it quantizes those
    only where their input is quantized). The swap into float left them in INT8: the pooling after `conv_head`
    (so that layer alone differed from its exclusion) and the padding between an expansion and a depthwise
    layer both in float; and a float layer without activation rounded its output to 8 bits for a float layer
    after it, swapped later. Each chain of swaps, in the order given, now has the exclusion's nodes and answers."""
    from build.precision import mixed
    from common.onnxfiles import save_model

    artifacts, calibration, config = lite0_int8
    images = augmented_photos(("chelsea", "coffee"), 2, 0, config)
    layers = mixed.weighted_nodes(artifacts / "model.onnx")
    base, fp32 = onnx.load(str(artifacts / "model.int8.cpu.onnx")), onnx.load(str(artifacts / "model.onnx"))
    head = [n for n in layers if "conv_head" in n] + [n for n in layers if n.endswith("Gemm")]
    padded = [n for n in layers if "blocks.1.0/conv_pw/" in n or "blocks.1.0/conv_dw/" in n]  # a Pad between them
    projected = [n for n in layers if "blocks.0.0/conv_pw/" in n or "blocks.1.0/conv_pw/" in n]  # no activation
    chains = {"conv_head": head[:1], "conv_head, Gemm": head, "Gemm, conv_head": head[::-1],
              "expansion, depthwise": padded, "depthwise, expansion": padded[::-1],
              "projection, next expansion": projected,
              "25 at random": random.Random(1).sample(layers, 25), "all, at random": random.Random(0).sample(layers, 50)}
    assert len(head) == len(padded) == len(projected) == 2
    quantization = quantize.cpu_quantization(artifacts / "model.onnx", calibration, "avx2")
    for name, kept in chains.items():
        swapped = base
        for layer in kept:
            swapped = mixed.swap_in_float(swapped, fp32, layer, quantization)
        excluded = quantize.quantize(artifacts / "model.onnx", calibration, "cpu", tmp_path / "excluded.onnx",
                                     exclude_nodes=kept, cpu_layout="avx2")
        ops = [collections.Counter(n.op_type for n in m.graph.node) for m in (swapped, onnx.load(str(excluded)))]
        assert ops[0] == ops[1], (name, ops[0] - ops[1], ops[1] - ops[0])
        got, expected = (mixed.probabilities(p, images, config)
                         for p in (save_model(swapped, tmp_path / "swapped.onnx"), excluded))
        np.testing.assert_allclose(got, expected, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("head", ["conv", "flatten"])
def test_a_pooling_put_back_in_float_is_quantized_by_its_own_range_as_the_quantizer_does(tmp_path, head):
    """A max pooling after a layer without activation sees other values than its input (its smallest ones
    rise). In INT8 it shares its input's scale; after a layer the quantizer excludes it stays float and its
    output is quantized by its own calibrated range. The swap into float quantized it with its input's scale,
    so its file answered unlike the exclusion (2e-3 apart in probability on a model like this). It now takes
    the quantizer's own scale (`quantize.cpu_quantization`, checked here against the quantizer's file), and the
    layer that reads it its bias rounded at that scale, also where a flatten after the pooling goes float too
    and a linear layer reads it."""
    from build.precision import mixed
    from common.onnxfiles import save_model

    artifacts = write_pooled_convnet(tmp_path / "pooled", head)
    model_path, config = artifacts / "model.onnx", PreprocessConfig.load(artifacts / "preprocess.json")
    calibration = calibrate.calibrate(model_path, artifacts / "calibration", "max",
                                      augmented_photos(("chelsea", "coffee"), 4, 0, config), config)
    ranges = calibration.ranges()
    assert ranges["pooled"] != ranges["a"], "the model no longer has the case this test is about"
    quantization = quantize.cpu_quantization(model_path, calibration, "avx2")
    base = quantize.quantize(model_path, calibration, "cpu", tmp_path / "all.onnx", cpu_layout="avx2")
    written, scales = _initializers(onnx.load(str(base))), quantization.activations
    quantized = [t for t in scales if f"{t}_scale" in written]
    assert "a" in quantized and not [t for t in quantized if not (
        np.array_equal(written[f"{t}_scale"], scales[t][0]) and np.array_equal(written[f"{t}_zero_point"], scales[t][1])
        and written[f"{t}_zero_point"].dtype == scales[t][1].dtype)]
    assert sorted(quantization.biases) == (["conv_a", "conv_b", "head"] if head == "conv" else ["conv_a", "head"])
    excluded = quantize.quantize(model_path, calibration, "cpu", tmp_path / "excluded.onnx",
                                 exclude_nodes=["conv_a"], cpu_layout="avx2")
    swapped = mixed.swap_in_float(onnx.load(str(base)), onnx.load(str(model_path)), "conv_a", quantization)
    ops = [collections.Counter(n.op_type for n in m.graph.node) for m in (swapped, onnx.load(str(excluded)))]
    assert ops[0] == ops[1] and ops[0]["MaxPool"] == 1 and ops[0]["QuantizeLinear"] == 1, ops
    images = augmented_photos(("chelsea", "coffee"), 4, 1, config)
    got, expected = (mixed.probabilities(p, images, config)
                     for p in (save_model(swapped, tmp_path / "swapped.onnx"), excluded))
    np.testing.assert_allclose(got, expected, atol=1e-6)


def test_attention_matmuls_are_ranked_and_put_back_in_float_as_the_quantizer_excludes_them(tmp_path):
    """A transformer's attention multiplies two computed tensors (query x key, softmax weights x value). The
    INT8 CPU file runs them as QLinearMatMul on 8-bit inputs, softmax weights included; on a random-weight ViT
    (timm vit_tiny) leaving those 24 MatMuls in float lifted its agreement with FP32 from 18 % to 67 %, where any
    weighted layer in float changed nothing. The accuracy search ranked weighted layers only and could not give
    them back. Now they are candidates, and each swaps into float (both inputs read as the quantizer's exclusion
    reads them: the float tensor a QuantizeLinear made the input from, else dequantized) answering as the
    quantizer's own exclusion of that node."""
    from build.precision import mixed
    from common.onnxfiles import save_model

    artifacts = write_attention_net(tmp_path / "attention")
    model_path, config = artifacts / "model.onnx", PreprocessConfig.load(artifacts / "preprocess.json")
    calibration = calibrate.calibrate(model_path, artifacts / "calibration", "max",
                                      augmented_photos(("chelsea", "coffee"), 4, 0, config), config)
    assert mixed.float_candidates(model_path) == ["patchify", "query", "key", "value", "scores", "mix", "head"]
    quantization = quantize.cpu_quantization(model_path, calibration, "avx2")
    base = quantize.quantize(model_path, calibration, "cpu", tmp_path / "all.onnx", cpu_layout="avx2")
    kinds = {n.name: n.op_type for n in onnx.load(str(base)).graph.node}
    assert kinds["scores_quant"] == kinds["mix_quant"] == "QLinearMatMul", "attention is no longer quantized"
    images = augmented_photos(("chelsea", "coffee"), 4, 1, config)
    original, swapped = onnx.load(str(model_path)), onnx.load(str(base))
    for step, layer in enumerate(["scores", "mix"], 1):  # one, then both, as the search swaps them
        swapped = mixed.swap_in_float(swapped, original, layer, quantization)
        assert swapped is not None, f"{layer} has no float swap"
        excluded = quantize.quantize(model_path, calibration, "cpu", tmp_path / f"excluded{step}.onnx",
                                     exclude_nodes=["scores", "mix"][:step], cpu_layout="avx2")
        ops = [collections.Counter(n.op_type for n in m.graph.node) for m in (swapped, onnx.load(str(excluded)))]
        assert ops[0] == ops[1] and ops[0]["MatMul"] == step, ops
        got, expected = (mixed.probabilities(p, images, config)
                         for p in (save_model(swapped, tmp_path / f"swapped{step}.onnx"), excluded))
        np.testing.assert_allclose(got, expected, atol=1e-6)
    ranking = mixed.rank_layers(model_path, calibration, "avx2", images, config, quantized=base,
                                quantization=quantization)
    assert sorted(ranking.nodes) == sorted(mixed.float_candidates(model_path)) and not ranking.requantized


def _as_run_float_layers(path, tmp_path):
    """The Conv and Gemm nodes (fused or not) left in float in the graph ONNX Runtime runs for `path`."""
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "as_run.onnx")
    options.log_severity_level = 3
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    kinds = [n.op_type for n in onnx.load(str(tmp_path / "as_run.onnx")).graph.node]
    return sum(kinds.count(kind) for kind in ("Conv", "Gemm", "FusedConv", "FusedGemm"))


def _clip_bounds_as_constant_nodes(model):
    """`model` with each Clip's bounds given by a Constant node, as torch's TorchScript exporter leaves them
    when it folds no constants (models over 2 GB)."""
    initializers = {i.name: i for i in model.graph.initializer}
    nodes = []
    for node in model.graph.node:
        if node.op_type == "Clip":
            for name in [n for n in node.input[1:] if n in initializers]:
                nodes.append(onnx.helper.make_node("Constant", [], [name], value=initializers[name]))
                model.graph.initializer.remove(initializers.pop(name))
        nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return model


@pytest.mark.slow
@pytest.mark.parametrize("form", ["one-file", "external-data", "constant-clip-bounds"])
def test_mixed_precision_search_quantizes_once_and_deploys_the_file_its_gate_judged(lite0_int8, tmp_path, monkeypatch,
                                                                                    form):
    """The search after the ranking gave one more layer back to float per step by quantizing the whole model
    again (on a 2.1 GiB model ~100 s a step). It now quantizes once and swaps each step's layer into the file of
    the step before; the gate judges each file as written, the one left is the one that passed, and it answers
    as the quantizer's own exclusion of the same layers, says so in its metadata (float layers, layers whose
    biases stay corrected) and runs those layers in float. Also for a model whose weights are external data,
    where writing a file empties the tensors it writes out, and for one whose ReLU6 bounds are Constant nodes.
    With no ranking cached, that one quantization is also the ranking's base (it was a quantization of its own)."""
    from build.precision import mixed
    from build.precision.calibrate import load_calibration
    from common.onnxfiles import data_file, model_sha256, save_model

    artifacts, _, config = lite0_int8
    external = form == "external-data"
    source = onnx.load(str(artifacts / "model.onnx"))
    if form == "constant-clip-bounds":
        source = _clip_bounds_as_constant_nodes(source)
    model = save_model(source, tmp_path / "model.onnx", external=external)
    shutil.copytree(artifacts / "calibration", tmp_path / "calibration")
    calibration = load_calibration(tmp_path / "calibration" / "max.cache")
    images = augmented_photos(("chelsea", "coffee"), 2, 0, config)

    quantizations = []
    quantize_file = quantize.quantize

    def counted(*args, **kwargs):
        quantizations.append(kwargs.get("exclude_nodes"))
        return quantize_file(*args, **kwargs)

    judged = []

    def gate(path):  # passes the third file it is given; records what it judged
        judged.append((mixed.float_nodes(path), model_sha256(path), mixed.probabilities(path, images, config)))
        return len(judged) == 3, f"file {len(judged)}"

    monkeypatch.setattr(quantize, "quantize", counted)
    out = tmp_path / "model.int8.cpu.onnx"
    kept = mixed.search(model, calibration, "avx2", out, images, config, gate, 8, log=lambda _: None)
    monkeypatch.undo()
    ranking = mixed.rank_layers(model, calibration, "avx2", images, config)
    assert ranking.reused, "the search ranked the layers (no ranking was cached) and cached what it found"
    assert kept == ranking.nodes[:3]
    assert quantizations == [None], f"{len(quantizations)} quantizations for a ranking and {len(judged)} steps"
    assert [nodes for nodes, *_ in judged] == [ranking.nodes[:k] for k in (1, 2, 3)]
    assert model_sha256(out) == judged[-1][1]
    assert data_file(out).exists() == external

    excluded = quantize.quantize(model, calibration, "cpu", tmp_path / "excluded.onnx", exclude_nodes=kept,
                                 cpu_layout="avx2")
    np.testing.assert_allclose(judged[-1][2], mixed.probabilities(excluded, images, config), atol=1e-6)
    metadata, expected = ({p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
                          for path in (out, excluded))
    for key in (quantize.BIAS_CORRECTION_KEY, "int8_cpu_layout", "int8_requires_cpu"):
        assert metadata[key] == expected[key], key
    assert metadata[mixed.FLOAT_NODES_KEY] == ",".join(kept)
    assert _as_run_float_layers(out, tmp_path) == 3


EMULATED_RUN = """
import sys
import numpy as np
import onnxruntime as ort
session = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
np.save(sys.argv[3], session.run(["probabilities"], {"images": np.load(sys.argv[2])})[0])
"""


@pytest.mark.slow
def test_avx2_layout_answers_the_same_on_a_cpu_without_vnni(lite0_int8, tmp_path):
    """The avx2-layout Lite0 gives the same probabilities here and under valgrind's AVX2 CPU without
    VNNI; where this CPU has VNNI, the vnni layout does not (which is why the classifier refuses it there)."""
    if shutil.which("valgrind") is None:
        pytest.skip("needs valgrind (Debian package valgrind; `make test` installs it as root) to emulate a CPU without VNNI")
    from common import cpu

    artifacts, result, config = lite0_int8
    batch = next(held_out_set(config, views=1).batches(config, 3))
    np.save(tmp_path / "batch.npy", batch)
    answers = {}
    for layout in quantize.CPU_LAYOUTS:
        path = quantize.quantize(artifacts / "model.onnx", result, "cpu", tmp_path / f"{layout}.onnx", cpu_layout=layout)
        here = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(["probabilities"], {"images": batch})[0]
        run = subprocess.run(["valgrind", "-q", "--tool=none", sys.executable, "-c", EMULATED_RUN, str(path),
                              str(tmp_path / "batch.npy"), str(tmp_path / f"{layout}.npy")],
                             capture_output=True, text=True, timeout=900)
        assert run.returncode == 0, run.stderr[-2000:]
        answers[layout] = (here, np.load(tmp_path / f"{layout}.npy"))
    here, emulated = answers["avx2"]
    np.testing.assert_allclose(emulated, here, atol=1e-6)
    if cpu.integer_path() == "vnni":
        here, emulated = answers["vnni"]
        assert np.abs(emulated - here).max() > 1e-3


@pytest.mark.slow
def test_bias_correction_brings_the_int8_files_closer_to_fp32(lite0_int8, tmp_path):
    """The same cache without its per-channel means (no correction) against with them (the fixture's files):
    on held-out views the corrected avx2 CPU file and TensorRT Q/DQ file (run in float) are nearer FP32."""
    artifacts, result, config = lite0_int8
    without = dataclasses.replace(result, meta={k: v for k, v in result.meta.items() if k != "channel_means"})
    plain = {target: quantize.quantize(artifacts / "model.onnx", without, target, tmp_path / f"{target}.onnx",
                                       cpu_layout="avx2") for target in quantize.TARGETS}
    for target, path in plain.items():
        metadata = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
        corrected = {p.key: p.value for p in onnx.load(str(artifacts / quantize.output_name(target))).metadata_props}
        assert metadata[quantize.BIAS_CORRECTION_KEY] == "none"
        assert corrected[quantize.BIAS_CORRECTION_KEY].endswith(" layers"), target
    runners = [validate.onnxruntime_runner(artifacts / "model.onnx", "fp32"),
               validate.onnxruntime_runner(artifacts / "model.int8.cpu.onnx", "cpu corrected"),
               validate.onnxruntime_runner(plain["cpu"], "cpu plain"),
               validate.float_qdq_runner(artifacts / "model.int8.trt.onnx", "trt corrected"),
               validate.float_qdq_runner(plain["trt"], "trt plain")]
    probabilities = validate.run_all(runners, held_out_set(config, views=4), config, 8)
    error = {name: float(np.abs(p - probabilities["fp32"]).mean()) for name, p in probabilities.items()}
    print(f"\nmean |dp| against FP32: {error}")
    assert error["cpu corrected"] < error["cpu plain"] and error["trt corrected"] < error["trt plain"]


def test_gate_refuses_a_layout_this_cpu_cannot_run(tiny, tmp_path):
    """A CPU file whose layout needs a flag this CPU lacks is not run here, and fails the gate saying why."""
    from common import cpu

    artifacts, config, images = tiny
    result = calibrate.calibrate(artifacts / "model.onnx", artifacts / "calibration", "max", images, config)
    path = quantize.quantize(artifacts / "model.onnx", result, "cpu", artifacts / "model.int8.cpu.onnx")
    assert validate.validate(artifacts, ["int8-cpu"], images, config, {"int8": 0.0})[1].passed
    model = onnx.load(str(path))
    onnx.helper.set_model_props(model, {cpu.LAYOUT_KEY: "vnni", cpu.REQUIRES_KEY: "no_cpu_has_this_flag"})
    onnx.save(model, str(path))
    reports = validate.validate(artifacts, ["int8-cpu"], images, config, {"int8": 0.0})
    assert not reports[1].passed and reports[1].reason.startswith("not gated: refusing the INT8 CPU model")
    assert "no_cpu_has_this_flag" in reports[1].reason and reports[1].layout == "vnni"
    table = validate.format_table(reports)
    assert f"\ngated on: {cpu.describe()}; each variant's top-1 against fp32 (model.onnx)" in table
    assert "nan" not in table and "FAIL" in table


def test_a_foreign_model_is_told_the_bundled_photos_are_not_its_images(tiny_artifacts, tmp_path):
    """The tiny model has 3 classes: calibrating and gating it on the bundled ImageNet photos works, but
    each command says what stood in and which flag to pass; the gate's table has no nan."""
    artifacts = tmp_path / "tiny"
    shutil.copytree(tiny_artifacts, artifacts, ignore=shutil.ignore_patterns("calibration", "model.*.onnx"))
    calibrated = _module("calibrate", "--artifacts", artifacts, "--views", 2)
    assert calibrated.returncode == 0, calibrated.stderr
    assert ("warning: this model has 3 classes, not ImageNet's 1000, but the bundled ImageNet photos stand in for "
            "its images; pass --images DIR with images of its own classes") in calibrated.stdout
    assert _module("quantize", "--artifacts", artifacts).returncode == 0
    gated = _module("validate", "--artifacts", artifacts, "--views", 2, "--variants", "int8-cpu", "int8-trt")
    assert "pass --held-out DIR" in gated.stdout and "nan" not in gated.stdout, gated.stdout
    assert "each variant's top-1 against fp32 (model.onnx) on the same 12 held-out images" in gated.stdout
    bundled = tmp_path / "imagenet"
    bundled.mkdir()
    (bundled / "labels.txt").write_text("".join(f"class {i}\n" for i in range(1000)))
    assert calibrate_warning(bundled) is None


def calibrate_warning(artifacts):
    from build.precision.imagesets import bundled_photos_warning

    return bundled_photos_warning(artifacts / "labels.txt", {"--images": None})
