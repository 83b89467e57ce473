"""The canonical ONNX classifier and the graph work that makes one: IO names, checks, ONNX Runtime.

A canonical classifier has one input `images` float32 [batch, 3, H, W] and the outputs `logits`
[batch, C] (when the source model has logits) and `probabilities` [batch, C]; `batch` is a dynamic
axis. `canonicalize_classifier` renames a foreign model's IO to these names, adds the Softmax and
names the batch axis; `check_onnx_file` verifies all of it with onnx.checker and ONNX Runtime;
`fold_constants` cleans up what the TorchScript exporter leaves behind.
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


def _dims(value_info: onnx.ValueInfoProto) -> list:
    return [d.dim_param or (d.dim_value if d.HasField("dim_value") else "?") for d in value_info.type.tensor_type.shape.dim]


def io_summary(model: onnx.ModelProto) -> dict:
    """{'inputs': [...], 'outputs': [...]} with name, dtype and shape (dim names for dynamic axes)."""
    initializers = {i.name for i in model.graph.initializer}

    def describe(v):
        dtype = onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name
        return {"name": v.name, "dtype": dtype, "shape": _dims(v)}

    return {
        "inputs": [describe(v) for v in model.graph.input if v.name not in initializers],
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


def _set_batch_axis(value: onnx.ValueInfoProto) -> None:
    dims = value.type.tensor_type.shape.dim
    if not dims:
        raise ValueError(f"{value.name!r} has no shape: cannot name its batch axis")
    dims[0].Clear()
    dims[0].dim_param = BATCH_AXIS


def canonicalize_classifier(model: onnx.ModelProto, outputs: str, input_size: int) -> onnx.ModelProto:
    """Rename the single input to `images` and the single output to `logits` (adding a Softmax
    `probabilities`) or, for `outputs="probabilities"`, to `probabilities` (no logits exist then).
    The batch axis of the input and outputs becomes the dynamic `batch`; stale intermediate shapes
    are dropped. Whether the graph really runs at other batch sizes is checked later (ONNX Runtime).
    """
    if outputs not in (LOGITS, PROBABILITIES):
        raise ValueError(f"outputs {outputs!r} is not one of {(LOGITS, PROBABILITIES)}")
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    initializers = {i.name for i in graph.initializer}
    inputs = [v for v in graph.input if v.name not in initializers]
    if len(inputs) != 1 or len(graph.output) != 1:
        raise ValueError(
            f"expected one input and one output, got inputs {[v.name for v in inputs]} "
            f"and outputs {[v.name for v in graph.output]}"
        )
    image, output = inputs[0], graph.output[0]
    shape = _dims(image)
    if image.type.tensor_type.elem_type != onnx.TensorProto.FLOAT or len(shape) != 4:
        raise ValueError(f"input {image.name!r} must be float32 [N, 3, H, W], got shape {shape}")
    if isinstance(shape[1], int) and shape[1] != 3:
        raise ValueError(f"input {image.name!r} must be NCHW with 3 channels, got shape {shape}")
    for axis in (2, 3):
        if isinstance(shape[axis], int) and shape[axis] != input_size:
            raise ValueError(f"input {image.name!r} has shape {shape}; --input-size is {input_size}")
    out_shape = _dims(output)
    if out_shape and len(out_shape) != 2:
        raise ValueError(f"output {output.name!r} must be [N, num_classes], got shape {out_shape}")
    new_output = outputs
    taken = _tensor_names(graph) - {image.name, output.name}
    for new in (INPUT_NAME, LOGITS, PROBABILITIES):
        if new in taken:
            raise ValueError(f"the model already uses the tensor name {new!r} internally")
    _rename_tensor(graph, image.name, INPUT_NAME)
    _rename_tensor(graph, output.name, new_output)
    del graph.value_info[:]
    _set_batch_axis(graph.input[[v.name for v in graph.input].index(INPUT_NAME)])
    if out_shape:
        _set_batch_axis(graph.output[0])
    if outputs == LOGITS:
        graph.node.append(onnx.helper.make_node("Softmax", [LOGITS], [PROBABILITIES], axis=1, name="probabilities_softmax"))
        probabilities = graph.output.add()
        probabilities.CopyFrom(graph.output[0])
        probabilities.name = PROBABILITIES
    return model
