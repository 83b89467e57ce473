"""Bias correction: give back, in each quantized layer's float bias, the mean shift its weights' rounding causes.

Rounding a layer's weights W to the integer grid Q(W) moves every output channel's mean by
(Q(W) - W) . E[x], where E[x] is the per-channel mean of the layer's input: a systematic error that adds
up through the network. Subtracting it from the bias before quantizing cancels it on average (Nagel et
al., "Data-Free Quantization Through Weight Equalization and Bias Correction", 2019, the empirical
variant). The means come from the calibration images (build.precision.calibrate records them in the
cache's JSON), the grids are those ONNX Runtime's quantizer will use for the file being written:
symmetric per-channel int8, |q| <= 127, or <= 64 for the `avx2` layout's pairing weights
(build.precision.quantize). Padding is ignored (the mean of a padded border is taken as the input's).

NNCF's quantizer applies the same correction ("fast bias correction") inside `nncf.quantize`, which this
project does not use (docs/precision.md: it brings OpenVINO's graph and runtime); this module is the seam
where it would plug in.
"""
from __future__ import annotations

import copy

import numpy as np
import onnx
from onnx import numpy_helper

INT8_MAX = 127
INT7_MAX = 64  # ONNX Runtime's `reduce_range` for symmetric int8 weights


def weighted_layers(model: onnx.ModelProto) -> dict[str, tuple[onnx.NodeProto, int]]:
    """Node name -> (node, output-channel axis of its weight) for every Conv and Gemm with a constant weight."""
    initializers = {i.name for i in model.graph.initializer}
    layers = {}
    for node in model.graph.node:
        if len(node.input) < 2 or node.input[1] not in initializers:
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "Conv":
            layers[node.name] = (node, 0)
        elif node.op_type == "Gemm" and not attrs.get("transA", 0):
            layers[node.name] = (node, 0 if attrs.get("transB", 0) else 1)
    return layers


def layer_inputs(model: onnx.ModelProto) -> list[str]:
    """The tensors whose per-channel means the correction needs: the inputs of the weighted layers."""
    return sorted({node.input[0] for node, _ in weighted_layers(model).values()})


def quantized(weight: np.ndarray, axis: int, qmax: int) -> np.ndarray:
    """`weight` rounded to the symmetric per-channel grid ONNX Runtime uses (scale = max|w| / qmax per
    output channel along `axis`), back in float."""
    moved = np.moveaxis(weight.astype(np.float64), axis, 0)
    flat = moved.reshape(len(moved), -1)
    scale = np.abs(flat).max(axis=1) / qmax
    scale[scale == 0] = 1.0
    rounded = np.clip(np.round(flat / scale[:, None]), -qmax, qmax) * scale[:, None]
    return np.moveaxis(rounded.reshape(moved.shape), 0, axis)


def mean_shift(node: onnx.NodeProto, delta: np.ndarray, axis: int, mean: np.ndarray) -> np.ndarray:
    """E[(Q(W) - W) x] per output channel, for a Conv (any group count) or a Gemm, from the input's channel means."""
    if node.op_type == "Gemm":
        return delta.T @ mean if axis == 1 else delta @ mean
    groups = _group(node)
    out_channels, in_per_group = delta.shape[:2]
    per_tap = delta.reshape(out_channels, in_per_group, -1).sum(axis=2)  # every kernel tap sees the same mean
    out_per_group = out_channels // groups
    shift = np.empty(out_channels)
    for g in range(groups):
        rows = slice(g * out_per_group, (g + 1) * out_per_group)
        shift[rows] = per_tap[rows] @ mean[g * in_per_group:(g + 1) * in_per_group]
    return shift


def correct(model: onnx.ModelProto, means: dict[str, list[float]], weight_max: dict[str, int],
            skip: list[str] | None = None) -> tuple[onnx.ModelProto, list[str]]:
    """A copy of `model` whose weighted layers' biases absorb their weights' rounding error; the layers corrected.

    `weight_max`: weight initializer -> its grid's largest integer (INT8_MAX if absent); `skip`: nodes that
    stay float (the mixed-precision search's), whose weights are not rounded. A layer without a bias gets one.
    """
    model = copy.deepcopy(model)  # no serialized copy: protobuf refuses one over 2 GB
    initializers = {i.name: i for i in model.graph.initializer}
    done = []
    for name, node, axis, bias_name in _correctable(model, initializers, means, skip):
        weight = numpy_helper.to_array(initializers[node.input[1]])
        delta = quantized(weight, axis, weight_max.get(node.input[1], INT8_MAX)) - weight
        shift = mean_shift(node, delta, axis, np.asarray(means[node.input[0]], dtype=np.float64))
        if bias_name is None:
            bias_name = f"{node.input[1]}_bias_correction"
            model.graph.initializer.append(numpy_helper.from_array(np.zeros(len(shift), np.float32), bias_name))
            initializers[bias_name] = model.graph.initializer[-1]
            node.input.extend([""] * (3 - len(node.input)))
            node.input[2] = bias_name
        bias = numpy_helper.to_array(initializers[bias_name]).astype(np.float64)
        initializers[bias_name].CopyFrom(numpy_helper.from_array((bias - shift).astype(np.float32), bias_name))
        done.append(name)
    return model, done


def corrected_layers(model: onnx.ModelProto, means: dict[str, list[float]], skip: list[str] | None = None) -> list[str]:
    """The layers `correct` corrects, without rounding a weight (the model's external data need not be loaded)."""
    initializers = {i.name: i for i in model.graph.initializer}
    return [name for name, *_ in _correctable(model, initializers, means, skip)]


def _correctable(model: onnx.ModelProto, initializers: dict[str, onnx.TensorProto], means: dict[str, list[float]],
                 skip: list[str] | None):
    """(name, node, weight axis, bias initializer or None) for each layer whose bias the correction changes,
    judged from the tensors' shapes alone."""
    biases = set()
    for name, (node, axis) in weighted_layers(model).items():
        if name in (skip or []) or node.input[0] not in means:
            continue
        dims = tuple(initializers[node.input[1]].dims)
        if np.shape(means[node.input[0]]) != (_input_channels(node, dims, axis),):
            continue  # the mean is not per input channel of this layer (a reshaped input): left alone
        bias_name = node.input[2] if len(node.input) > 2 and node.input[2] else None
        if bias_name in biases or (bias_name is not None and bias_name not in initializers):
            continue  # a bias shared with a layer already corrected, or computed at run time
        if bias_name is not None and tuple(initializers[bias_name].dims) != (dims[axis],):
            continue  # a broadcast Gemm bias
        if bias_name is not None:
            biases.add(bias_name)
        yield name, node, axis, bias_name


def _group(node: onnx.NodeProto) -> int:
    return next((onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == "group"), 1)


def _input_channels(node: onnx.NodeProto, dims: tuple[int, ...], axis: int) -> int:
    return dims[1] * _group(node) if node.op_type == "Conv" else dims[1 - axis]
