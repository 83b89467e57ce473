"""The INT8 files' logits: float in both files, whatever the head (Gemm, or MatMul + Add)."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper

from build.precision import calibrate, quantize
from build.precision.imagesets import augmented_photos
from common.preprocessing import PreprocessConfig
from tests.tiny_model import write_tiny_classifier


def _matmul_add_head(artifacts):
    """The tiny classifier with its Gemm split into MatMul + Add (the bias), the head of many exports."""
    model = onnx.load(str(artifacts / "model.onnx"))
    graph = model.graph
    gemm = next(n for n in graph.node if n.op_type == "Gemm")
    nodes = [helper.make_node("MatMul", ["flat", "W"], ["scores"], name="head_matmul"),
             helper.make_node("Add", ["scores", "B"], ["logits"], name="head_add")]
    ordered = [m for n in graph.node for m in (nodes if n is gemm else [n])]
    del graph.node[:]
    graph.node.extend(ordered)
    onnx.checker.check_model(model)
    onnx.save(model, str(artifacts / "model.onnx"))


@pytest.fixture(params=["gemm", "matmul_add"])
def quantized(request, tmp_path):
    artifacts = write_tiny_classifier(tmp_path / "tiny")
    if request.param == "matmul_add":
        _matmul_add_head(artifacts)
    config = PreprocessConfig.load(artifacts / "preprocess.json")
    images = augmented_photos(("chelsea", "coffee"), 4, 0, config)
    result = calibrate.calibrate(artifacts / "model.onnx", artifacts / "calibration", "max", images, config)
    files = {target: quantize.quantize(artifacts / "model.onnx", result, target, artifacts / quantize.output_name(target),
                                       cpu_layout="avx2") for target in quantize.TARGETS}
    return artifacts, files, next(images.batches(config, 8)), request.param


def _logits(path, batch):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["logits"], {"images": batch})[0]


def test_int8_logits_are_float_and_agree_with_fp32(quantized):
    artifacts, files, batch, head = quantized
    reference = _logits(artifacts / "model.onnx", batch)
    for target, path in files.items():
        model = onnx.load(str(path))
        producers = {o: n for n in model.graph.node for o in n.output}
        last = producers["logits"]
        assert last.op_type != "DequantizeLinear", target  # not 8-bit logits dequantized
        if head == "matmul_add":  # the bias Add stays float, its inputs not int8 either
            assert last.op_type == "Add", target
            inputs = [producers.get(i) for i in last.input]
            assert all(p is None or p.op_type not in ("DequantizeLinear", "QLinearAdd") for p in inputs), target
        if target == "cpu":  # the head itself still computes in integers
            layer = last if head == "gemm" else producers[last.input[0]]
            assert layer.op_type == ("QGemm" if head == "gemm" else "MatMulIntegerToFloat")
            assert [t.data_type for t in model.graph.initializer if t.name == layer.input[3 if head == "gemm" else 1]] \
                == [onnx.TensorProto.INT8]
        np.testing.assert_allclose(_logits(path, batch), reference, atol=0.02, err_msg=target)
