"""A small but real ONNX classifier with the project's tensor names, for fast tests."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from common.preprocessing import PreprocessConfig


def save_with_external_weights(source: Path, target: Path, location: str = "weights.bin", scale: float = 1.0) -> Path:
    """`source` (artifacts) copied to `target` with model.onnx's initializers, times `scale`, in the file
    `location` (relative to it), as ONNX saves models over 2 GB. -> target/model.onnx"""
    shutil.copytree(source, target)
    model = onnx.load(target / "model.onnx")
    for tensor in model.graph.initializer:  # raw data: onnx moves only that out of the file
        tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor) * np.float32(scale), tensor.name))
    (target / location).parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, target / "model.onnx", save_as_external_data=True, location=location, size_threshold=0)
    return target / "model.onnx"


def write_tiny_classifier(out: Path, num_classes: int = 3, crop: int = 32) -> Path:
    """A small but real ONNX classifier with the project's IO names, plus labels and preprocess.json:
    images -> global average pool -> linear -> logits -> softmax -> probabilities."""
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    weight = helper.make_tensor("W", TensorProto.FLOAT, [3, num_classes], rng.normal(size=(3, num_classes)).ravel())
    bias = helper.make_tensor("B", TensorProto.FLOAT, [num_classes], np.zeros(num_classes))
    nodes = [
        helper.make_node("GlobalAveragePool", ["images"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"]),
        helper.make_node("Gemm", ["flat", "W", "B"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=-1),
    ]
    graph = helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, crop, crop])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", num_classes]),
         helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", num_classes])],
        initializer=[weight, bias],
    )
    # IR 9: the installed onnx writes IR 14 by default, which ONNX Runtime 1.31 refuses.
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    onnx.checker.check_model(model)
    onnx.save(model, out / "model.onnx")
    (out / "labels.txt").write_text("".join(f"class {i}\n" for i in range(num_classes)))
    PreprocessConfig(resize=crop + 8, crop=crop).save(out / "preprocess.json")
    return out


def write_near_tie_classifier(out: Path) -> Path:
    """The tiny classifier whose classes 0 and 1 always score 2048 and 2048.5 (identical weights, those biases):
    FP32 picks class 1 with a probability margin of 0.24 on every image, while FP16 (its step at 2048 is 2) rounds
    both to one value and picks class 0: an FP16 file that genuinely fails the accuracy gate. (The INT8 files
    keep it: their logits are float and the int32 biases hold the 0.5.)"""
    write_tiny_classifier(out)
    model = onnx.load(out / "model.onnx")
    for tensor in model.graph.initializer:
        values = numpy_helper.to_array(tensor)
        if tensor.name == "W":
            values = np.repeat(values[:, :1], values.shape[1], axis=1) * np.float32(0.01)
        else:
            values = np.array([2048.0, 2048.5, 0.0], dtype=np.float32)
        tensor.CopyFrom(numpy_helper.from_array(values.astype(np.float32), tensor.name))
    onnx.save(model, out / "model.onnx")
    return out


def write_pooled_convnet(out: Path, head: str = "conv") -> Path:
    """A small convolutional classifier with the project's IO names, whose first convolution has no activation
    and a negative bias, so that the max pooling after it sees a range of values other than its input's (its
    smallest values rise). After the pooling, `head` 'conv': convolution, ReLU, global average pooling, flatten,
    linear; 'flatten': flatten, linear. Plus labels and preprocess.json."""
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)

    def weight(name, *shape, scale=0.3, mean=0.0):
        return numpy_helper.from_array((rng.normal(size=shape) * scale + mean).astype(np.float32), name)

    nodes = [helper.make_node("Conv", ["images", "wa", "ba"], ["a"], name="conv_a", pads=[1, 1, 1, 1]),
             helper.make_node("MaxPool", ["a"], ["pooled"], name="pool", kernel_shape=[2, 2], strides=[2, 2])]
    initializers = [weight("wa", 8, 3, 3, 3), weight("ba", 8, scale=0.1, mean=-1.0)]
    if head == "conv":
        nodes += [helper.make_node("Conv", ["pooled", "wb", "bb"], ["b"], name="conv_b", pads=[1, 1, 1, 1]),
                  helper.make_node("Relu", ["b"], ["relu"], name="relu_b"),
                  helper.make_node("GlobalAveragePool", ["relu"], ["features"], name="gap"),
                  helper.make_node("Flatten", ["features"], ["flat"], name="flatten")]
        initializers += [weight("wb", 8, 8, 3, 3), weight("bb", 8, scale=0.1), weight("wg", 3, 8, scale=0.5)]
    elif head == "flatten":
        nodes += [helper.make_node("Flatten", ["pooled"], ["flat"], name="flatten")]
        initializers += [weight("wg", 3, 8 * 16 * 16, scale=0.02)]
    else:
        raise ValueError(f"head {head!r} is not 'conv' or 'flatten'")
    initializers.append(weight("bg", 3, scale=0.0))
    return _save_three_class_model(out, nodes, initializers, "pooled", "flat")


def _save_three_class_model(out: Path, nodes: list, initializers: list, name: str, features: str) -> Path:
    """`nodes` + a linear head over `features` (its weight "wg" and bias "bg" among `initializers`) and a
    softmax, as a 3-class model for 32x32 images in `out`, with labels and preprocess.json."""
    nodes += [helper.make_node("Gemm", [features, "wg", "bg"], ["logits"], name="head", transB=1),
              helper.make_node("Softmax", ["logits"], ["probabilities"], name="softmax", axis=-1)]
    graph = helper.make_graph(
        nodes, name,
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, 32, 32])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3]),
         helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 3])],
        initializer=initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    onnx.checker.check_model(model)
    onnx.save(model, out / "model.onnx")
    (out / "labels.txt").write_text("".join(f"class {i}\n" for i in range(3)))
    PreprocessConfig(resize=40, crop=32).save(out / "preprocess.json")
    return out


def write_attention_net(out: Path) -> Path:
    """A small transformer-like classifier with the project's IO names: 8x8 patches (a convolution) become 16
    tokens, one attention head (query, key and value projections; softmax(query x key^T) x value: two MatMuls
    of computed tensors), a mean over the tokens and a linear head. Plus labels and preprocess.json."""
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)

    def weight(name, *shape, scale=0.3):
        return numpy_helper.from_array((rng.normal(size=shape) * scale).astype(np.float32), name)

    nodes = [helper.make_node("Conv", ["images", "wp", "bp"], ["patches"], name="patchify", strides=[8, 8]),
             helper.make_node("Reshape", ["patches", "token_shape"], ["channels"], name="flatten_patches"),
             helper.make_node("Transpose", ["channels"], ["tokens"], name="to_tokens", perm=[0, 2, 1]),
             helper.make_node("MatMul", ["tokens", "wq"], ["query"], name="query"),
             helper.make_node("MatMul", ["tokens", "wk"], ["key"], name="key"),
             helper.make_node("MatMul", ["tokens", "wv"], ["value"], name="value"),
             helper.make_node("Transpose", ["key"], ["key_t"], name="key_t", perm=[0, 2, 1]),
             helper.make_node("MatMul", ["query", "key_t"], ["scores"], name="scores"),
             helper.make_node("Softmax", ["scores"], ["attention"], name="attention", axis=-1),
             helper.make_node("MatMul", ["attention", "value"], ["mixed"], name="mix"),
             helper.make_node("ReduceMean", ["mixed"], ["features"], name="mean_tokens", axes=[1], keepdims=0)]
    initializers = [weight("wp", 16, 3, 8, 8, scale=0.05), weight("bp", 16, scale=0.1),
                    numpy_helper.from_array(np.array([0, 16, -1], np.int64), "token_shape"),
                    weight("wq", 16, 16), weight("wk", 16, 16), weight("wv", 16, 16),
                    weight("wg", 3, 16, scale=1.0), weight("bg", 3, scale=0.0)]
    return _save_three_class_model(out, nodes, initializers, "attention", "features")
