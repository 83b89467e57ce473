"""Accuracy-aware mixed precision for the INT8 CPU file: keep the layers whose quantisation costs most
in float, as few as it takes for the accuracy gate to hold.

    1. rank: for every weighted layer (Conv, Gemm, MatMul) and every MatMul of two computed tensors (attention's
       query x key and weights x value), take the model with that layer alone left
       in float and measure how far its probabilities move from FP32's on the *calibration* images
       (mean |dp|); the layers whose float version helps most come first. The model is quantized
       once; each candidate is that file with the one layer's integer node swapped for its float
       original between a DequantizeLinear and a QuantizeLinear (`swap_in_float`; a padding or pooling
       after it back in float too), which is how the quantizer leaves an excluded layer between quantized
       neighbours, so the cost of a layer is one
       run of the images, not one quantization of the whole model (docs/precision.md); a layer
       without such a node is measured on a quantization of its own, with it excluded
    2. keep the first k of that ranking in float, k = 1, 2, ... up to `max_float`, and run the gate
       (held-out images, which the ranking never saw) on each; the first file that passes is the one
       deployed, and its ONNX metadata names the layers left in float (`int8_float_nodes`). The model is
       quantized once for both: that file is the ranking's base, step k swaps the k-th layer back into
       the file of step k - 1, and the gate judges that file, as written and deployed

The tool is ONNX Runtime's own quantizer (its `nodes_to_exclude` where a layer has no integer node to
swap); the ranking is cached beside the calibration cache, keyed by everything it depends on,
so a second `make engines` reuses it. This is
the search NNCF's accuracy-control quantisation runs (rank by the metric, give back layers to float
until a validation metric holds), on the same quantizer as the rest of build/.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
from onnx import numpy_helper
from tqdm import tqdm

from build.precision import bias_correction, quantize
from build.precision.calibrate import Calibration
from build.precision.imagesets import ImageSet
from common.contract import ONNX_INPUT, ONNX_PROBABILITIES
from common.hashing import file_sha256
from common.onnxfiles import model_sha256, save_like
from common.onnxsession import cpu_session
from common.preprocessing import PreprocessConfig

FLOAT_NODES_KEY = "int8_float_nodes"  # ONNX metadata: the layers this INT8 file leaves in float, comma-separated
WEIGHTED_OPS = ("Conv", "Gemm", "MatMul")
RANKING_VERSION = 8
FOLDED_ACTIVATIONS = ("Relu", "Clip")  # what the quantizer removes after a quantized layer (QLinearActivation)
# The integer node ONNX Runtime's QOperator quantizer writes for each weighted op, named "<layer>_quant";
# MatMulIntegerToFloat is quantize.float_logits' form of a QLinearMatMul that computes the logits.
INTEGER_FORMS = {"Conv": ("QLinearConv",), "Gemm": ("QGemm",), "MatMul": ("QLinearMatMul", "MatMulIntegerToFloat")}
# The ops the quantizer quantizes only where their input is already quantized (its QPad, QMaxPool,
# QGlobalAveragePool, Direct8BitOp): after a layer left in float they stay float. Their integer form, and
# where that form's output scale and zero point are among its inputs (else they are its input's).
FOLLOWERS = {"Pad": ("Pad", None), "MaxPool": ("MaxPool", None), "Flatten": ("Flatten", None),
             "Reshape": ("Reshape", None), "Squeeze": ("Squeeze", None), "Unsqueeze": ("Unsqueeze", None),
             "GlobalAveragePool": ("QLinearGlobalAveragePool", 3)}
# Integer nodes that read a quantized tensor at input i with its scale and zero point at i + 1 and i + 2; and
# MatMulIntegerToFloat's places for them (A, B, a_scale, b_scale, a_zero_point, b_zero_point).
SCALE_READERS = ("DequantizeLinear", "QLinearConv", "QGemm", "QLinearMatMul", "QLinearAdd", "QLinearMul",
                 "QLinearGlobalAveragePool", "QLinearAveragePool", "QLinearConcat", "QLinearSigmoid",
                 "QLinearLeakyRelu", "QLinearSoftmax")
MATMUL_SCALES = {0: (2, 4), 1: (3, 5)}
# Integer nodes whose int32 bias is rounded at (input scale x weight scale [x Gemm's beta]), and its place;
# ONNX Runtime's quantizer widens a weight's scale instead where a bias would come near the int32 limit.
INT32_BIASES = {"QLinearConv": 8, "QGemm": 6}
INT32_LIMIT = float(np.iinfo(np.int32).max) / 1.0001


@dataclasses.dataclass
class Ranking:
    nodes: list[str]  # most worth keeping in float first
    error: dict[str, float]  # node -> mean |dp| vs FP32 with that node alone in float
    baseline: float  # mean |dp| with every layer quantized
    reused: bool = False
    requantized: list[str] = dataclasses.field(default_factory=list)  # layers measured by a quantization of their own


def _weighted(node: onnx.NodeProto, weights: set[str]) -> bool:
    return node.op_type in WEIGHTED_OPS and len(node.input) > 1 and node.input[1] in weights


def weighted_nodes(model_path: Path) -> list[str]:
    model = onnx.load(str(model_path), load_external_data=False)
    weights = {i.name for i in model.graph.initializer}
    return [n.name for n in model.graph.node if _weighted(n, weights)]


def float_candidates(model_path: Path) -> list[str]:
    """The nodes the search may give back to float, in graph order: the weighted layers, and the MatMuls that
    multiply two computed tensors (a transformer's attention), whose 8-bit inputs (softmax weights among them)
    can cost more than any weighted layer's."""
    model = onnx.load(str(model_path), load_external_data=False)
    weights = {i.name for i in model.graph.initializer}
    constants = weights | {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    return [n.name for n in model.graph.node if _weighted(n, weights) or (
        n.op_type == "MatMul" and len(n.input) == 2 and not set(n.input) & constants)]


def probabilities(path: Path, images: ImageSet, config: PreprocessConfig, batch_size: int = 16) -> np.ndarray:
    session = cpu_session(path, 2)
    return np.concatenate([session.run([ONNX_PROBABILITIES], {ONNX_INPUT: batch})[0]
                           for batch in images.batches(config, batch_size)])


def _key(model_path: Path, calibration: Calibration, layout: str, images: ImageSet) -> str:
    parts = [model_sha256(model_path), file_sha256(calibration.cache), layout, images.fingerprint(), str(RANKING_VERSION)]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def swap_in_float(quantized: onnx.ModelProto, original: onnx.ModelProto, layer: str,
                  quantization: quantize.CpuQuantization | None = None) -> onnx.ModelProto | None:
    """A copy of the INT8 CPU model `quantized` in which `layer` runs in float as in `original` (its FP32
    model): its integer node becomes DequantizeLinear -> the float layer with its own weights and bias ->
    QuantizeLinear to the same output scale (no QuantizeLinear where the integer node output float), the
    form ONNX Runtime's quantizer gives a layer in `nodes_to_exclude`, made to stay float when loaded
    (`quantize.keep_float`). An activation the quantizer folded into the integer node's output range (a Relu
    or Clip after the layer) comes back after the float layer, so that a layer swapped next to it reads the
    very tensor it reads in `original`. A padding, pooling or reshape after it goes back to float too
    (`_float_followers`), its output quantized as the quantizer would (`quantization`, from
    `quantize.cpu_quantization`). A MatMul of two computed tensors (attention) reads both inputs so. None where
    `quantized` has no integer node for `layer`."""
    source = next((n for n in original.graph.node if n.name == layer), None)
    if source is None or source.op_type not in INTEGER_FORMS:
        return None
    at, node = next(((i, n) for i, n in enumerate(quantized.graph.node) if n.name == f"{layer}_quant"), (None, None))
    if node is None or node.op_type not in INTEGER_FORMS[source.op_type]:
        return None
    if node.op_type == "MatMulIntegerToFloat":  # A, B, a_scale, b_scale, a_zero_point, b_zero_point
        x, output_scale = [node.input[0], node.input[2], node.input[4]], None
        w = [node.input[1], node.input[3], node.input[5]]
    else:  # x, x_scale, x_zero_point, w, w_scale, w_zero_point, [QGemm: C,] y_scale, y_zero_point[, QLinearConv: B]
        x, w = list(node.input[:3]), list(node.input[3:6])
        scale_at = 7 if node.op_type == "QGemm" else 6
        output_scale = list(node.input[scale_at:scale_at + 2]) if len(node.input) > scale_at and node.input[scale_at] else None
    initializers = {i.name: i for i in original.graph.initializer}
    computed = [i for i, name in enumerate(source.input[1:], 1) if name and name not in initializers]
    if computed and (source.op_type != "MatMul" or computed != [1]):
        return None  # a weight or bias computed at run time: not this function's case (a MatMul's B is: attention)
    prefix = f"{layer}_float_swap"
    activation = _folded_activation(original, source, quantized) if output_scale else None
    bounds = {name: _constant(original, name) for name in (activation.input[1:] if activation is not None else [])
              if name}
    if None in bounds.values():
        return None  # a Clip's bounds computed at run time: not this function's case
    model = copy.deepcopy(quantized)  # no serialized copy: protobuf refuses one over 2 GB
    producers = {o: n for n in model.graph.node for o in n.output}
    floated = onnx.NodeProto()
    floated.CopyFrom(source)
    replacement = []
    for i, (quantized_input, suffix) in enumerate([(x, "")] + ([(w, "_1")] if computed else [])):
        floated.input[i], dequantize = _float_read(producers, original, quantized_input, source.input[i],
                                                   f"{prefix}_input{suffix}", f"{prefix}_DequantizeLinear{suffix}")
        replacement += dequantize
    for i, name in enumerate(source.input[1:], 1):  # its own weights and bias, under names of their own
        if name and i not in computed:
            model.graph.initializer.add().CopyFrom(initializers[name])
            model.graph.initializer[-1].name = floated.input[i] = f"{prefix}_{i}"
    floated.output[:] = [f"{prefix}_output" if output_scale else node.output[0]]
    replacement.append(floated)
    if activation is not None:  # its output under its name in `original`: the tensor the next layer reads there
        folded = onnx.NodeProto()
        folded.CopyFrom(activation)
        folded.input[0] = f"{prefix}_output"
        for i, name in enumerate(activation.input[1:], 1):
            if name:
                model.graph.initializer.add().CopyFrom(bounds[name])
                model.graph.initializer[-1].name = folded.input[i] = f"{prefix}_activation_{i}"
        replacement.append(folded)
    if output_scale:
        quantized_from = activation.output[0] if activation is not None else f"{prefix}_output"
        replacement.append(onnx.helper.make_node("QuantizeLinear", [quantized_from, *output_scale],
                                                 [node.output[0]], name=f"{prefix}_QuantizeLinear"))
    nodes = list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(nodes[:at] + replacement + nodes[at + 1:])
    if output_scale:  # a float layer after it, swapped earlier, reads its float output as in `original`
        _read_float(model, original, node.output[0], replacement[-1].input[0],
                    activation.output[0] if activation is not None else source.output[0])
        _float_followers(model, original, quantization)
    _drop_unread(model)
    quantize.keep_float(model, [layer])
    return model


def _float_followers(model: onnx.ModelProto, original: onnx.ModelProto,
                     quantization: quantize.CpuQuantization | None) -> None:
    """Put back in float each padding, pooling or reshape (`FOLLOWERS`) that reads a float layer's output,
    as the quantizer leaves it after a layer it excludes, and so on down the chain: it reads the float
    tensor, a float layer after it reads its float output, and an integer one reads it quantized as the
    quantizer quantizes it there, by its own calibrated range (`quantization`), where the integer form shared
    its input's scale: the same scale for a padding after a ReLU or a flatten, not for a max pooling after a
    layer without activation, whose smallest values rise (`_own_scale`); else the scale it read before. One
    that reads a tensor computed at run time (not a constant), or whose float output's name the file already
    gives another node, stays as it is."""
    before = {n.name: n for n in original.graph.node if n.name}
    while True:
        producers = {o: n for n in model.graph.node for o in n.output}
        found = None
        for at, node in enumerate(model.graph.node):
            source = before.get(node.name[:-len("_quant")] if node.name.endswith("_quant") else node.name)
            if source is None or FOLLOWERS.get(source.op_type, ("",))[0] != node.op_type:
                continue
            quantizer = producers.get(node.input[0])
            if quantizer is None or quantizer.op_type != "QuantizeLinear" or _twin(quantizer, producers,
                                                                                  original) != source.input[0]:
                continue
            constants = {name: _constant(original, name) for name in source.input[1:] if name}
            if None not in constants.values() and source.output[0] not in producers:
                found = at, node, source, quantizer, constants
                break
        if found is None:
            return
        at, node, source, quantizer, constants = found
        quantized_output = node.output[0]
        scale_at = FOLLOWERS[source.op_type][1]
        scale = list(node.input[scale_at:scale_at + 2]) if scale_at else list(quantizer.input[1:3])
        prefix = f"{source.name}_float_follow"
        if not scale_at:
            scale = _own_scale(model, original, quantization, source.output[0], quantized_output, scale, prefix)
        floated = onnx.NodeProto()
        floated.CopyFrom(source)
        floated.input[0] = quantizer.input[0]
        for i, name in enumerate(source.input[1:], 1):
            if name:
                model.graph.initializer.add().CopyFrom(constants[name])
                model.graph.initializer[-1].name = floated.input[i] = f"{prefix}_{i}"
        requantized = onnx.helper.make_node("QuantizeLinear", [source.output[0], *scale], [quantized_output],
                                            name=f"{prefix}_QuantizeLinear")
        nodes = list(model.graph.node)
        del model.graph.node[:]
        model.graph.node.extend(nodes[:at] + [floated, requantized] + nodes[at + 1:])
        _read_float(model, original, quantized_output, source.output[0], source.output[0])


def _own_scale(model: onnx.ModelProto, original: onnx.ModelProto, quantization: quantize.CpuQuantization | None,
               tensor: str, quantized: str, before: list[str], prefix: str) -> list[str]:
    """The scale and zero point to quantize `tensor` (a follower's float output) with into `quantized`: the
    quantizer's, as initializers of their own that every integer reader of `quantized` reads, each reader's
    int32 bias rounded again at its new input scale, as the quantizer rounds it; `before` (the names of the
    ones read now) where those are the same figures, or where a reader has no place for a scale of its own (a
    follower that goes float next: then its own output gets the quantizer's scale), where `quantization`
    lacks the tensor or a reader's bias, or where a bias would not fit int32 (the quantizer then widens that
    layer's weight scale)."""
    if quantization is None or tensor not in quantization.activations:
        return before
    scale, zero_point = quantization.activations[tensor]
    initializers = {i.name: i for i in model.graph.initializer}
    if all(name in initializers for name in before) and all(
            np.array_equal(numpy_helper.to_array(initializers[name]), value)
            for name, value in zip(before, (scale, zero_point))):
        return before
    layers = {n.name: n for n in original.graph.node if n.name}
    places, biases = [], []
    for reader in model.graph.node:
        for i, name in enumerate(reader.input):
            if name != quantized:
                continue
            if reader.op_type in SCALE_READERS:
                places.append((reader, (i + 1, i + 2)))
            elif reader.op_type == "MatMulIntegerToFloat" and i in MATMUL_SCALES:
                places.append((reader, MATMUL_SCALES[i]))
            else:
                return before
            at = INT32_BIASES.get(reader.op_type)
            if i == 0 and at is not None and len(reader.input) > at and reader.input[at]:
                layer = layers.get(reader.name[:-len("_quant")]) if reader.name.endswith("_quant") else None
                if layer is None or layer.name not in quantization.biases or reader.input[4] not in initializers:
                    return before
                beta = next((a.f for a in layer.attribute if a.name == "beta"), 1.0)
                bias_scale = scale * numpy_helper.to_array(initializers[reader.input[4]]) * beta
                steps = np.asarray(quantization.biases[layer.name], np.float64) / np.asarray(bias_scale, np.float64)
                if np.abs(steps).max(initial=0) >= INT32_LIMIT:
                    return before
                biases.append((reader, at, steps.round().astype(np.int32)))
    names = [f"{prefix}_scale", f"{prefix}_zero_point"]
    for name, value, like in zip(names, (scale, zero_point), before):
        shape = initializers[like].dims if like in initializers else []
        model.graph.initializer.append(numpy_helper.from_array(np.asarray(value).reshape(shape), name))
    for reader, at in places:
        for place, name in zip(at, names):
            reader.input[place] = name
    for reader, at, values in biases:
        model.graph.initializer.append(numpy_helper.from_array(values.reshape(initializers[reader.input[at]].dims),
                                                               f"{reader.name}_{prefix}_bias"))
        reader.input[at] = model.graph.initializer[-1].name
    return names


def _float_read(producers: dict[str, onnx.NodeProto], original: onnx.ModelProto, quantized_input: list[str],
                original_tensor: str, name: str, node_name: str) -> tuple[str, list[onnx.NodeProto]]:
    """What a layer swapped to float reads for one of its quantized inputs (tensor, scale, zero point) that is
    `original_tensor` in `original`: that float tensor itself where a QuantizeLinear made the input from it for
    this layer (as the quantizer's exclusion leaves it), else the input dequantized (`name`, by a new node)."""
    producer = producers.get(quantized_input[0])
    if (producer is not None and producer.op_type == "QuantizeLinear" and list(producer.input[1:3]) == quantized_input[1:]
            and original_tensor in (producer.input[0], _twin(producer, producers, original))):
        return producer.input[0], []
    return name, [onnx.helper.make_node("DequantizeLinear", quantized_input, [name], name=node_name)]


def _twin(quantizer: onnx.NodeProto, producers: dict[str, onnx.NodeProto], original: onnx.ModelProto) -> str | None:
    """The tensor of `original` that `quantizer`, a QuantizeLinear a swap wrote, quantizes: the output of the
    float node (a layer, its activation, a padding or pooling) the swap copied from `original`; else None."""
    if not quantizer.name.endswith(("_float_swap_QuantizeLinear", "_float_follow_QuantizeLinear")):
        return None
    writer = producers.get(quantizer.input[0])
    if writer is None:
        return None
    twin = next((n for n in original.graph.node if n.name == writer.name), None)
    return twin.output[0] if twin is not None and twin.op_type == writer.op_type else None


def _folded_activation(original: onnx.ModelProto, source: onnx.NodeProto,
                       quantized: onnx.ModelProto) -> onnx.NodeProto | None:
    """The Relu or Clip that alone reads `source`'s output in `original` and that the quantizer folded away
    (its output is not in `quantized`: the integer node's output range clips as it did), or None."""
    readers = [n for n in original.graph.node if source.output[0] in n.input]
    if len(readers) != 1 or readers[0].op_type not in FOLDED_ACTIVATIONS or readers[0].input[0] != source.output[0]:
        return None
    if any(readers[0].output[0] in n.output for n in quantized.graph.node):
        return None
    return readers[0]


def _constant(model: onnx.ModelProto, name: str) -> onnx.TensorProto | None:
    """The value of tensor `name` where `model` holds it: an initializer, or a Constant node's output (as torch's
    TorchScript exporter leaves a Clip's bounds when it folds no constants); None where it is computed."""
    found = next((i for i in model.graph.initializer if i.name == name), None)
    if found is not None:
        return found
    node = next((n for n in model.graph.node if name in n.output), None)
    if node is None or node.op_type != "Constant":
        return None
    attribute = next((a for a in node.attribute if a.name in ("value", "value_float", "value_int")), None)
    if attribute is None:
        return None
    if attribute.name == "value":
        return attribute.t
    value = onnx.helper.get_attribute_value(attribute)
    return numpy_helper.from_array(np.array(value, np.float32 if attribute.name == "value_float" else np.int64), name)


def _read_float(model: onnx.ModelProto, original: onnx.ModelProto, quantized_tensor: str, float_tensor: str,
                original_tensor: str) -> None:
    """Make each node of `model` that reads `quantized_tensor` through a DequantizeLinear, where in `original`
    it reads `original_tensor`, read `float_tensor` (that value, unrounded) instead."""
    before = {n.name: n for n in original.graph.node}
    dequantized = {n.output[0] for n in model.graph.node
                   if n.op_type == "DequantizeLinear" and n.input[0] == quantized_tensor}
    for node in model.graph.node:
        source = before.get(node.name) if node.name else None  # an unnamed node is no node of `original`
        for i, name in enumerate(node.input):
            if name in dequantized and source is not None and source.input[i:i + 1] == [original_tensor]:
                node.input[i] = float_tensor


def _drop_unread(model: onnx.ModelProto) -> None:
    """Remove the nodes whose outputs nothing reads (a QuantizeLinear no layer needs any more), then the
    initializers nothing reads (the integer node's weights)."""
    outputs = {o.name for o in model.graph.output}
    while True:
        read = {i for n in model.graph.node for i in n.input} | outputs
        unread = [n for n in model.graph.node if not set(n.output) & read]
        if not unread:
            break
        for node in unread:
            model.graph.node.remove(node)
    read = {i for n in model.graph.node for i in n.input}
    for initializer in [i for i in model.graph.initializer if i.name not in read]:
        model.graph.initializer.remove(initializer)


def rank_layers(model_path: Path, calibration: Calibration, layout: str, images: ImageSet,
                config: PreprocessConfig, quantized: Path | None = None,
                quantization: quantize.CpuQuantization | None = None) -> Ranking:
    """The `float_candidates`, most worth keeping in float first (cached in `<cache>.<layout>.ranking.json`).
    `quantized`: the whole model already quantized with this calibration and layout, measured as the base
    instead of quantizing it again (read only); `quantization`: its `quantize.cpu_quantization`, where the
    caller has it."""
    cache = calibration.cache.with_name(f"{calibration.cache.stem}.{layout}.ranking.json")
    key = _key(model_path, calibration, layout, images)
    if cache.exists():
        stored = json.loads(cache.read_text())
        if stored.get("key") == key:
            return Ranking(stored["nodes"], stored["error"], stored["baseline"], reused=True,
                           requantized=stored.get("requantized", []))
    reference = probabilities(model_path, images, config)
    with tempfile.TemporaryDirectory(prefix="mixed.") as work:
        candidate = Path(work) / "candidate.int8.onnx"

        def error(path: Path) -> float:
            return float(np.abs(probabilities(path, images, config) - reference).mean())

        if quantized is None:
            quantized = quantize.quantize(model_path, calibration, "cpu", Path(work) / "all.int8.onnx",
                                          cpu_layout=layout)
        baseline = error(quantized)
        nodes = float_candidates(model_path)
        original = onnx.load(str(model_path))
        base = onnx.load(str(quantized))
        quantization = quantization or quantize.cpu_quantization(model_path, calibration, layout)
        errors, requantized = {}, []
        for node in tqdm(nodes, desc="mixed precision: rank layers", unit="layer"):
            swapped = swap_in_float(base, original, node, quantization)
            if swapped is None:  # no integer node of its own: the quantizer's own exclusion, the slow way
                quantize.quantize(model_path, calibration, "cpu", candidate, exclude_nodes=[node], cpu_layout=layout)
                requantized.append(node)
            else:
                save_like(swapped, candidate, model_path)
            errors[node] = error(candidate)
    ranked = sorted(nodes, key=lambda n: (errors[n], nodes.index(n)))
    cache.write_text(json.dumps({"key": key, "layout": layout, "images": images.description, "baseline": baseline,
                                 "nodes": ranked, "error": errors, "requantized": requantized}, indent=2) + "\n")
    return Ranking(ranked, errors, baseline, requantized=requantized)


def stamp_float_nodes(path: Path, nodes: list[str]) -> None:
    model = onnx.load(str(path))
    entries = {p.key: p.value for p in model.metadata_props}
    entries[FLOAT_NODES_KEY] = ",".join(nodes)
    onnx.helper.set_model_props(model, entries)
    save_like(model, path, path)


def float_nodes(path: Path) -> list[str]:
    model = onnx.load(str(path), load_external_data=False)
    value = next((p.value for p in model.metadata_props if p.key == FLOAT_NODES_KEY), "")
    return [n for n in value.split(",") if n]


def _swapped_file(model: onnx.ModelProto, original: onnx.ModelProto, calibration: Calibration, kept: list[str],
                  out: Path, model_path: Path) -> None:
    """Write `model` (the INT8 file with `kept` swapped back to float) to `out`, its metadata saying what the
    quantizer's own exclusion of `kept` would: the float layers, and the layers whose biases stay corrected."""
    entries = {p.key: p.value for p in model.metadata_props}
    means = calibration.meta.get("channel_means")
    if means:
        entries[quantize.BIAS_CORRECTION_KEY] = f"{len(bias_correction.corrected_layers(original, means, kept))} layers"
    entries[FLOAT_NODES_KEY] = ",".join(kept)
    written = copy.deepcopy(model)  # saving with external data empties the tensors it writes out
    onnx.helper.set_model_props(written, entries)
    save_like(written, out, model_path)


def search(model_path: Path, calibration: Calibration, layout: str, out: Path, images: ImageSet,
           config: PreprocessConfig, passes: Callable[[Path], tuple[bool, str]], max_float: int,
           log: Callable[[str], None] = print) -> list[str] | None:
    """Write to `out` the INT8 CPU file with the fewest float layers (ranked on `images`) that `passes`
    (the gate, on other images: verdict and a few words on its figure); the float layers, or None (and
    `out` as with `max_float` layers) when none within `max_float` passes.

    The model is quantized once, into `out`, which serves as the ranking's base where no ranking is cached;
    each step swaps one more layer of the ranking back to float in that file (`swap_in_float`) and the gate
    judges the file written to `out`, the one deployed. A layer with no integer node of its own is left out
    by the quantizer instead, and the steps after it swap on that file."""
    quantize.quantize(model_path, calibration, "cpu", out, cpu_layout=layout)
    quantization = quantize.cpu_quantization(model_path, calibration, layout)
    ranking = rank_layers(model_path, calibration, layout, images, config, quantized=out, quantization=quantization)
    log(("reusing the layer ranking" if ranking.reused else "ranked the layers") +
        f" ({len(ranking.nodes)} layers on {images.description}; all quantized: mean |dp| "
        f"{ranking.baseline:.2e}; best single float layer: {ranking.nodes[0]} {ranking.error[ranking.nodes[0]]:.2e})")
    steps = min(max_float, len(ranking.nodes))
    if steps < 1:
        return None
    original = onnx.load(str(model_path))
    current = onnx.load(str(out))
    for count in range(1, steps + 1):
        kept = ranking.nodes[:count]
        swapped = swap_in_float(current, original, kept[-1], quantization)
        if swapped is None:
            quantize.quantize(model_path, calibration, "cpu", out, exclude_nodes=kept, cpu_layout=layout)
            stamp_float_nodes(out, kept)
            current = onnx.load(str(out))
        else:
            current = swapped
            _swapped_file(current, original, calibration, kept, out, model_path)
        ok, figure = passes(out)
        log(f"mixed precision: {count} layer(s) in float: gate {'PASS' if ok else 'FAIL'} ({figure}); "
            f"added {kept[-1]}")
        if ok:
            return kept
    return None
