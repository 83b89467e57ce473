"""TensorRT's explicit-quantization rules, applied to the Q/DQ model ONNX Runtime's quantizer writes.

The quantizer places Q/DQ pairs; TensorRT decides from their placement what it can fuse and run in
INT8. Three rules from TensorRT's Q/DQ placement guidance (and NVIDIA ModelOpt, which implements them
on top of the same quantizer) that the quantizer does not follow by itself:

- **Float biases.** TensorRT's DequantizeLinear takes int8/fp8/int4/fp4 only: an int32 bias behind a
  DequantizeLinear makes the ONNX parser reject the model. `build.precision.quantize` turns the quantizer's
  `QuantizeBias` off; `int32_dequantize_nodes` lists any that slipped through.
- **Residual Adds.** TensorRT fuses `Conv -> Add(skip)` into the convolution when the skip input is
  quantized and the branch the convolution computes is not: Q/DQ stays on the residual (skip) input
  only. `residual_branches` finds, for each such Add, the input that is the convolution's branch
  (the longer way back to where the two inputs meet); `drop_branch_qdq` takes its Q/DQ away.
- **The cache's scales, bit for bit** (`set_cache_scales`): the quantizer recomputes each scale from
  the range it is fed and lands one ulp off for a few tensors.
"""
from __future__ import annotations

from collections import deque
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from common.onnxfiles import save_like

FUSING_OPS = ("Conv",)  # the layers TensorRT fuses a following residual Add into


def _producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    return {o: n for n in graph.node for o in n.output}


def _ancestors(node: onnx.NodeProto, producers: dict[str, onnx.NodeProto]) -> dict[str, int]:
    """Node name -> fewest steps back from `node` (itself at 0)."""
    depth, queue = {node.name: 0}, deque([node])
    while queue:
        current = queue.popleft()
        for name in current.input:
            parent = producers.get(name)
            if parent is not None and parent.name not in depth:
                depth[parent.name] = depth[current.name] + 1
                queue.append(parent)
    return depth


def residual_branches(model: onnx.ModelProto) -> dict[str, int]:
    """Add node name -> index of its input that is a convolution's branch (the one TensorRT fuses the
    Add into), for every Add of two computed tensors where at least one comes straight from a Conv.
    Where both do, the branch is the input with the longer way back to the nearest node both descend
    from (the skip connection is the short way)."""
    graph = model.graph
    producers = _producers(graph)
    branches = {}
    for add in graph.node:
        if add.op_type != "Add" or len(add.input) != 2:
            continue
        parents = [producers.get(name) for name in add.input]
        if any(p is None for p in parents):  # a weight, a constant or a graph input: not a residual
            continue
        from_conv = [i for i, p in enumerate(parents) if p.op_type in FUSING_OPS]
        if len(from_conv) == 1:
            branches[add.name] = from_conv[0]
        elif len(from_conv) == 2:
            first, second = (_ancestors(p, producers) for p in parents)
            common = set(first) & set(second)
            if not common:
                continue
            meet = min(common, key=lambda n: (first[n] + second[n], n))
            if first[meet] != second[meet]:
                branches[add.name] = 0 if first[meet] > second[meet] else 1
    return branches


def drop_branch_qdq(model: onnx.ModelProto, branches: dict[str, int]) -> int:
    """Feed each residual Add's branch input straight from the float tensor its Q/DQ pair wraps,
    and remove pairs nothing else reads. Returns how many inputs were changed."""
    graph = model.graph
    producers = _producers(graph)
    changed = 0
    for add in graph.node:
        if add.name not in branches:
            continue
        index = branches[add.name]
        dq = producers.get(add.input[index])
        q = producers.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
        if q is None or q.op_type != "QuantizeLinear":
            continue
        add.input[index] = q.input[0]
        changed += 1
    read = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    for node in [n for n in graph.node if n.op_type in ("DequantizeLinear", "QuantizeLinear")]:
        if node.op_type == "DequantizeLinear" and node.output[0] not in read:
            graph.node.remove(node)
    read = {name for node in graph.node for name in node.input}
    for node in [n for n in graph.node if n.op_type == "QuantizeLinear" and n.output[0] not in read]:
        graph.node.remove(node)
    read = {name for node in graph.node for name in node.input}
    for init in [i for i in graph.initializer if i.name not in read]:
        graph.initializer.remove(init)
    return changed


def int32_dequantize_nodes(model: onnx.ModelProto) -> list[str]:
    """DequantizeLinear nodes whose input is an int32 initializer (a quantized bias): TensorRT rejects them."""
    int32 = {i.name for i in model.graph.initializer if i.data_type == onnx.TensorProto.INT32}
    return [n.name for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in int32]


def set_cache_scales(path: Path, scales: dict[str, float]) -> int:
    """Overwrite the scale of every quantized activation in the Q/DQ model at `path` with the cache's
    float32, bit for bit. The quantizer recomputes each scale from the range it is fed ((hi - lo) / 254
    in float64, then rounded to float32), which lands one ulp off the cache's value for some tensors.
    Returns how many scales were set."""
    model = onnx.load(str(path))
    graph = model.graph
    wanted: dict[str, np.float32] = {}  # scale initializer -> the cache's scale

    def want(initializer: str, value: np.float32) -> None:
        if initializer in wanted and wanted[initializer].tobytes() != value.tobytes():
            raise RuntimeError(f"{path}: scale {initializer!r} is shared by tensors with different cache scales")
        wanted[initializer] = value

    quantized: dict[str, np.float32] = {}  # QuantizeLinear output -> the cache's scale of its input
    for node in graph.node:
        # A tensor calibration saw only as zeros has scale 0 in the cache, which no Q/DQ can use: the
        # quantizer's placeholder (1.0) stays for it.
        if node.op_type == "QuantizeLinear" and scales.get(node.input[0], 0.0) > 0:
            quantized[node.output[0]] = np.float32(scales[node.input[0]])
            want(node.input[1], quantized[node.output[0]])
    for node in graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in quantized:
            want(node.input[1], quantized[node.input[0]])
    done = 0
    for init in graph.initializer:
        if init.name in wanted:
            current = numpy_helper.to_array(init)
            if current.shape != () or current.dtype != np.float32:
                raise RuntimeError(f"{path}: activation scale {init.name!r} is {current.dtype}{list(current.shape)}, "
                                   "expected a float32 scalar")
            init.CopyFrom(numpy_helper.from_array(np.array(wanted[init.name], dtype=np.float32), init.name))
            done += 1
    missing = set(wanted) - {i.name for i in graph.initializer}
    if missing:
        raise RuntimeError(f"{path}: activation scales {sorted(missing)} are not initializers")
    save_like(model, path, path)
    return done
