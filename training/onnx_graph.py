"""The canonical ONNX classifier and the graph work that makes one: IO names, checks, ONNX Runtime.

A canonical classifier has one input `images` float32 [batch, 3, H, W] (or NHWC) and the outputs
`logits` [batch, C] and `probabilities` [batch, C]; `batch` is a dynamic axis.
`canonicalize_classifier` renames a foreign model's IO to these names, adds the output it lacks
(Softmax, or the log of probabilities) and declares the input's shape; `check_onnx_file` verifies all
of it with onnx.checker and ONNX Runtime;
`fold_constants` cleans up what the TorchScript exporter leaves behind; `own_biases` gives each layer of
an imported model a bias of its own; `with_luma_input` gives a grayscale (1-channel) classifier the RGB input
the serving pipeline feeds every model.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from common import contract
from common.onnxsession import cpu_session

INPUT_NAME = contract.ONNX_INPUT
LOGITS = contract.ONNX_LOGITS
PROBABILITIES = contract.ONNX_PROBABILITIES
BATCH_AXIS = contract.BATCH_AXIS
CHECK_BATCH_SIZES = (1, 5)
CHANNEL_AXIS = {"NCHW": 1, "NHWC": 3}
# ITU-R 601-2 luma, the grayscale of Pillow's convert("L") and torchvision's Grayscale; the weights sum to 1.
LUMA_WEIGHTS = (0.299, 0.587, 0.114)


def _data_inputs(graph: onnx.GraphProto) -> list[onnx.ValueInfoProto]:
    """The graph's inputs fed at run time: not its initializers (IR < 4 lists weights as inputs too)."""
    initializers = {i.name for i in graph.initializer}
    return [v for v in graph.input if v.name not in initializers]


def _dims(value_info: onnx.ValueInfoProto) -> list:
    return [d.dim_param or (d.dim_value if d.HasField("dim_value") else "?") for d in value_info.type.tensor_type.shape.dim]


def io_summary(model: onnx.ModelProto) -> dict:
    """{'inputs': [...], 'outputs': [...]} with name, dtype and shape (dim names for dynamic axes)."""
    def describe(v):
        dtype = onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name
        return {"name": v.name, "dtype": dtype, "shape": _dims(v)}

    return {
        "inputs": [describe(v) for v in _data_inputs(model.graph)],
        "outputs": [describe(v) for v in model.graph.output],
    }


def default_opset(model: onnx.ModelProto) -> int:
    versions = [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")]
    if not versions:
        raise ValueError("the model imports no default-domain (ai.onnx) opset")
    return versions[0]


def onnxruntime_session(path: str | Path, threads: int = 0) -> ort.InferenceSession:
    """The project's one CPU session (common/onnxsession.py), with ONNX Runtime's default thread count."""
    return cpu_session(path, threads)


def check_onnx_file(path: str | Path, input_shape: tuple[int, int, int], num_classes: int) -> dict:
    """onnx.checker (full) + ONNX Runtime at each of CHECK_BATCH_SIZES. Returns the IO summary.

    Raises ValueError if the IO names, the batch axis or an output shape are not canonical.
    """
    onnx.checker.check_model(str(path), full_check=True)
    summary = io_summary(onnx.load(str(path), load_external_data=False))
    inputs = [v["name"] for v in summary["inputs"]]
    outputs = [v["name"] for v in summary["outputs"]]
    if inputs != [INPUT_NAME] or PROBABILITIES not in outputs or not set(outputs) <= {LOGITS, PROBABILITIES}:
        raise ValueError(f"non-canonical IO: inputs {inputs}, outputs {outputs}")
    for v in summary["inputs"] + summary["outputs"]:
        if v["shape"][0] != BATCH_AXIS:
            raise ValueError(f"{v['name']}: first axis is {v['shape'][0]!r}, expected dynamic {BATCH_AXIS!r}")
    session = onnxruntime_session(path)
    rng = np.random.default_rng(0)
    for batch in CHECK_BATCH_SIZES:
        images = rng.standard_normal((batch, *input_shape), dtype=np.float32)
        try:
            results = session.run(None, {INPUT_NAME: images})
        except Exception as exc:  # ORT raises its own exception types
            raise ValueError(f"ONNX Runtime failed at batch size {batch}: {exc}") from exc
        for name, value in zip(outputs, results):
            if value.shape != (batch, num_classes):
                raise ValueError(f"{name} has shape {value.shape} at batch {batch}, expected {(batch, num_classes)}")
    return summary


def run_onnxruntime(path: str | Path, images: np.ndarray) -> dict[str, np.ndarray]:
    session = onnxruntime_session(path)
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, {INPUT_NAME: images})))


def fold_constants(model: onnx.ModelProto) -> onnx.ModelProto:
    """Replace every node computed from constants only by an initializer (evaluated with onnx.reference).

    The TorchScript exporter leaves Constant and Identity nodes and the arithmetic that turns
    torch's pad order into ONNX's; TensorRT would fold them at build time, but a clean graph is
    easier to read, compare and quantise. Nodes with subgraphs or without inputs (other than
    Constant) are left alone.
    """
    from onnx.reference import ReferenceEvaluator

    graph = model.graph
    initializers = {i.name: i for i in graph.initializer}
    constant, folded = set(initializers), []
    for index, node in enumerate(graph.node):  # nodes are topologically sorted
        has_subgraph = any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute)
        if has_subgraph or node.domain not in ("", "ai.onnx") or (not node.input and node.op_type != "Constant"):
            continue
        if all(name == "" or name in constant for name in node.input):
            folded.append(index)
            constant.update(node.output)
    if not folded:
        return model
    kept = [node for index, node in enumerate(graph.node) if index not in set(folded)]
    needed = {name for node in kept for name in node.input} | {v.name for v in graph.output}
    nodes = [graph.node[index] for index in folded]
    produced = [name for node in nodes for name in node.output if name in needed]
    used = {name for node in nodes for name in node.input if name in initializers}
    subgraph = onnx.helper.make_graph(
        nodes, "constants", [], [onnx.helper.make_empty_tensor_value_info(name) for name in produced],
        initializer=[initializers[name] for name in used],
    )
    values = ReferenceEvaluator(onnx.helper.make_model(subgraph, opset_imports=model.opset_import)).run(None, {})
    new_initializers = [onnx.numpy_helper.from_array(np.asarray(v), name) for name, v in zip(produced, values)]
    still_used = needed | {v.name for v in graph.input}
    old_initializers = [i for i in graph.initializer if i.name in still_used]
    del graph.node[:]
    graph.node.extend(kept)
    del graph.initializer[:]
    graph.initializer.extend(old_initializers + new_initializers)
    return model


def _rename_tensor(graph: onnx.GraphProto, old: str, new: str) -> None:
    """Rename a tensor everywhere in `graph`, including references from subgraphs."""
    for node in graph.node:
        node.input[:] = [new if name == old else name for name in node.input]
        node.output[:] = [new if name == old else name for name in node.output]
        for attribute in node.attribute:
            for subgraph in [attribute.g] if attribute.HasField("g") else list(attribute.graphs):
                _rename_tensor(subgraph, old, new)
    for value in [*graph.input, *graph.output, *graph.value_info]:
        if value.name == old:
            value.name = new


def _tensor_names(graph: onnx.GraphProto) -> set[str]:
    names = {v.name for v in [*graph.input, *graph.output, *graph.value_info]}
    names |= {i.name for i in graph.initializer}
    for node in graph.node:
        names |= set(node.input) | set(node.output)
    return names


def _set_dims(value: onnx.ValueInfoProto, dims: list) -> None:
    """Declare `value`'s shape: ints are fixed sizes, strings named (dynamic) axes."""
    shape = value.type.tensor_type.shape
    shape.Clear()
    for size in dims:
        dim = shape.dim.add()
        if isinstance(size, str):
            dim.dim_param = size
        else:
            dim.dim_value = size


def own_biases(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` with every convolution and GEMM reading its bias from an initializer of its own.

    The TorchScript exporter writes equal constants once: layers with equal biases (zeros, or batch norms
    still at their initial statistics folded into the convolutions) read one initializer, the others
    through Identity nodes. ONNX Runtime's quantizer finds no bias behind an Identity (it failed with
    "'NoneType' object has no attribute 'data_type'") and quantizes a bias that layers share once, at the
    first layer's scales, for all of them; bias correction would give one layer's correction to the others.
    An Identity of an initializer is replaced by the initializer; then each layer whose bias other nodes
    read too gets a copy under a name of its own (its last reader keeps the original). Shared weights stay
    shared (the quantizer rounds a weight alike for every layer that reads it)."""
    graph = model.graph
    initializers = {i.name: i for i in graph.initializer}
    outputs = {v.name for v in graph.output}
    for node in [n for n in graph.node if n.op_type == "Identity" and n.input and n.input[0] in initializers
                 and n.output[0] not in outputs]:
        graph.node.remove(node)
        _rename_tensor(graph, node.output[0], node.input[0])
    readers = {}
    for node in graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    names = _tensor_names(graph)
    for node in graph.node:
        bias = node.input[2] if node.op_type in ("Conv", "Gemm") and len(node.input) > 2 else ""
        if bias not in initializers or readers[bias] < 2:
            continue
        name, suffix = f"{node.name or node.output[0]}.bias", 1
        while name in names:
            name, suffix = f"{node.name or node.output[0]}.bias.{suffix}", suffix + 1
        copy = graph.initializer.add()
        copy.CopyFrom(initializers[bias])
        copy.name = node.input[2] = name
        names.add(name)
        readers[bias] -= 1
    return model


# Nodes that pass a tensor's values through unchanged: a Softmax behind them still makes probabilities.
PASS_THROUGH = {"Identity", "Flatten", "Reshape", "Squeeze", "Unsqueeze", "Cast"}
CLASSES_AXIS = "classes"  # the class axis of an output whose width the source model does not declare
TINY_PROBABILITY = 1e-30  # floor of probabilities before their log (logits of a probabilities-only model)


def _producer_op(graph: onnx.GraphProto, name: str) -> str | None:
    """The op type that computes `name`, looking through PASS_THROUGH nodes; None for an input or initializer."""
    producers = {output: node for node in graph.node for output in node.output}
    while name in producers:
        node = producers[name]
        if node.op_type not in PASS_THROUGH or not node.input:
            return node.op_type
        name = node.input[0]
    return None


def canonicalize_classifier(model: onnx.ModelProto, outputs: str, input_shape: tuple[int, int, int],
                            layout: str = "NCHW") -> onnx.ModelProto:
    """Rename the single input to `images` and the single output to `logits` (adding a Softmax
    `probabilities`) or, for `outputs="probabilities"`, to `probabilities` (adding `logits` as their log,
    so that every canonical model has both: softmax(log p) = p). The input's per-image axes become
    `input_shape` (C, H, W or H, W, C per `layout`), the batch axis of the input and outputs the dynamic
    `batch`; an output without a declared shape gets [batch, classes]; a one-column output (a sigmoid
    binary classifier) becomes two classes (x -> [0, x] for logits, p -> [1 - p, p] for probabilities);
    initializers listed as graph inputs (IR < 4) become plain initializers; stale intermediate shapes are
    dropped. Whether the graph really runs at other batch sizes is checked later (ONNX Runtime).
    """
    if outputs not in (LOGITS, PROBABILITIES):
        raise ValueError(f"outputs {outputs!r} is not one of {(LOGITS, PROBABILITIES)}")
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    initializers = {i.name for i in graph.initializer}
    inputs = _data_inputs(graph)
    if len(inputs) != 1 or len(graph.output) != 1:
        raise ValueError(
            f"expected one input and one output, got inputs {[v.name for v in inputs]} "
            f"and outputs {[v.name for v in graph.output]}"
        )
    image, output = inputs[0], graph.output[0]
    image_name, output_name, shape = image.name, output.name, _dims(image)
    dtype = onnx.helper.tensor_dtype_to_np_dtype(image.type.tensor_type.elem_type).name
    wanted = f"float32 [N, {', '.join(map(str, input_shape))}] ({layout}, normalised pixels)"
    if dtype != "float32" or len(shape) != 4:
        raise ValueError(f"input {image.name!r} is {dtype} {shape}; the model must take {wanted}")
    if any(isinstance(got, int) and got != want for got, want in zip(shape[1:], input_shape)):
        hint = "--input-size" if shape[1 if layout == "NCHW" else 3] == 3 else "--layout"
        raise ValueError(f"input {image.name!r} has shape {shape}; with --input-size and --layout the model must "
                         f"take {wanted}: check {hint}")
    out_shape, out_type = _dims(output), output.type.tensor_type.elem_type
    if out_type not in (onnx.TensorProto.UNDEFINED, onnx.TensorProto.FLOAT):
        kind = onnx.helper.tensor_dtype_to_np_dtype(out_type).name
        raise ValueError(f"output {output.name!r} is {kind}; the model must give float32 scores [N, num_classes]")
    output.type.tensor_type.elem_type = onnx.TensorProto.FLOAT  # declared, where the source left it out
    if out_shape and len(out_shape) != 2:
        raise ValueError(f"output {output.name!r} must be [N, num_classes], got shape {out_shape}")
    if outputs == LOGITS and _producer_op(graph, output.name) == "Softmax":
        raise ValueError(f"output {output.name!r} comes from a Softmax: the model gives probabilities; "
                         "import it with --outputs probabilities")
    width = out_shape[-1] if out_shape and out_shape[-1] != "?" else CLASSES_AXIS
    one_column = width == 1
    added_names = [INPUT_NAME, LOGITS, PROBABILITIES]
    if outputs == PROBABILITIES:
        added_names += ["probabilities_floor", "probabilities_floored"]
    if one_column:
        added_names += [f"{outputs}_source", f"{outputs}_one", f"{outputs}_other"]
    taken = _tensor_names(graph) - {image_name, output_name}
    for new in added_names:
        if new in taken:
            raise ValueError(f"the model already uses the tensor name {new!r} internally")
    for listed in [v for v in graph.input if v.name in initializers]:  # IR < 4 lists them: constants from IR 4 on
        graph.input.remove(listed)
    model.ir_version = max(model.ir_version, 4)
    source = f"{outputs}_source" if one_column else outputs
    _rename_tensor(graph, image_name, INPUT_NAME)
    _rename_tensor(graph, output_name, source)
    del graph.value_info[:]
    _set_dims(graph.input[0], [BATCH_AXIS, *input_shape])
    _set_dims(graph.output[0], [BATCH_AXIS, 2 if one_column else width])
    graph.output[0].name = outputs
    if one_column:
        _two_classes(graph, source, outputs)
    if outputs == LOGITS:
        graph.node.append(onnx.helper.make_node("Softmax", [LOGITS], [PROBABILITIES], axis=1, name="probabilities_softmax"))
        added = PROBABILITIES
    else:
        floor = onnx.numpy_helper.from_array(np.array(TINY_PROBABILITY, np.float32), "probabilities_floor")
        graph.initializer.append(floor)
        graph.node.extend([
            onnx.helper.make_node("Max", [PROBABILITIES, floor.name], ["probabilities_floored"], name="logits_floor"),
            onnx.helper.make_node("Log", ["probabilities_floored"], [LOGITS], name="logits_log"),
        ])
        added = LOGITS
    second = graph.output.add()
    second.CopyFrom(graph.output[0])
    second.name = added
    if outputs == PROBABILITIES:  # the project's order: logits first
        graph.output[0].name, second.name = LOGITS, PROBABILITIES
    return model


def _two_classes(graph: onnx.GraphProto, source: str, outputs: str) -> None:
    """One column x (a sigmoid classifier's logit or probability of class 1) -> two classes [0, x] / [1 - p, p]."""
    one = onnx.numpy_helper.from_array(np.array(1, np.float32), f"{outputs}_one")
    graph.initializer.append(one)
    if outputs == LOGITS:
        other = onnx.helper.make_node("Sub", [source, source], [f"{outputs}_other"], name=f"{outputs}_zero")
    else:
        other = onnx.helper.make_node("Sub", [one.name, source], [f"{outputs}_other"], name=f"{outputs}_complement")
    graph.node.extend([other, onnx.helper.make_node("Concat", [other.output[0], source], [outputs], axis=1,
                                                    name=f"{outputs}_two_classes")])


def input_channels(model: onnx.ModelProto, layout: str) -> int | str | None:
    """The channel count the single image input declares on `layout`'s channel axis (a name or "?" when it is
    dynamic); None when the input is not 4-d or there is not exactly one (canonicalize_classifier says so)."""
    inputs = _data_inputs(model.graph)
    shape = _dims(inputs[0]) if len(inputs) == 1 else []
    return shape[CHANNEL_AXIS[layout]] if len(shape) == 4 else None


def with_luma_input(model: onnx.ModelProto, layout: str) -> onnx.ModelProto:
    """A 1-channel classifier -> the same, taking 3 channels (R, G, B) under the same input name: a 1x1
    convolution (a MatMul for NHWC) with LUMA_WEIGHTS makes the channel it took. With one mean and one std for
    all three channels, the luma of the normalised R, G, B is the normalised luma, the input the model knew."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    (image,) = _data_inputs(graph)
    taken = _tensor_names(graph)
    gray, weights = f"{image.name}_luma", f"{image.name}_luma_weights"
    for added in (gray, weights):
        if added in taken:
            raise ValueError(f"the model already uses the tensor name {added!r} internally")
    name = image.name
    _rename_tensor(graph, name, gray)  # the model's nodes read the luma now...
    image.name = name  # ...and the input, renamed with them, keeps its name
    luma = np.asarray(LUMA_WEIGHTS, np.float32)
    if layout == "NCHW":
        graph.initializer.append(onnx.numpy_helper.from_array(luma.reshape(1, 3, 1, 1), weights))
        node = onnx.helper.make_node("Conv", [image.name, weights], [gray], name=f"{image.name}_luma")
    else:
        graph.initializer.append(onnx.numpy_helper.from_array(luma.reshape(3, 1), weights))
        node = onnx.helper.make_node("MatMul", [image.name, weights], [gray], name=f"{image.name}_luma")
    graph.node.insert(0, node)
    dims = _dims(image)
    dims[CHANNEL_AXIS[layout]] = 3
    _set_dims(image, [d if d != "?" else f"axis{i}" for i, d in enumerate(dims)])
    return model
