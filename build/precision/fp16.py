"""`python -m build.precision.fp16`: FP32 ONNX -> mixed-precision FP16 ONNX with FP32 inputs and outputs.

    model.onnx -> model.fp16.onnx

The precision lives in the graph (TensorRT 10/11 strongly typed networks take it from there; no
builder flag). Converter: ONNX Runtime's `float16.convert_float_to_float16` with `keep_io_types`
(FP32 IO, casts inserted at the boundaries); Softmax, average pooling and the summing reductions
always stay FP32 (KEEP_FP32; `--keep-fp32` adds op types to them), and an FP32 result on its way to an
FP32 output is not rounded through FP16 (the converter's Cast FP16 -> Cast FP32 pairs are dropped).
MaxPool goes FP16: it picks one of its inputs, exact in any precision. The result is checked by `build.precision.validate` before it is deployed.
A model.onnx with its weights beside it gives a model.fp16.onnx with model.fp16.onnx.data (common.onnxfiles).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import onnx
from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

from build.precision import provenance
from common.contract import MODEL_ONNX
from common.onnxfiles import data_file, save_model, weight_files

# Softmax, and the ops that sum many values: a sum can pass FP16's 65504 (and loses low bits on the way).
KEEP_FP32 = ["Softmax", "GlobalAveragePool", "AveragePool", "ReduceMean", "ReduceSum", "ReduceSumSquare",
             "ReduceL1", "ReduceL2", "ReduceLogSumExp"]
OUTPUT_NAME = "model.fp16.onnx"


def topological_sort(graph: onnx.GraphProto) -> None:
    """Reorder graph.node in place so every node comes after the producers of its inputs."""
    available = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        ready = [n for n in pending if all(i in available for i in n.input)]
        if not ready:
            raise ValueError(f"graph has a cycle or a missing input near node {pending[0].name!r}")
        for node in ready:
            available.update(node.output)
        ordered += ready
        done = {id(n) for n in ready}
        pending = [n for n in pending if id(n) not in done]
    del graph.node[:]
    graph.node.extend(ordered)


def drop_round_trip_casts(graph: onnx.GraphProto) -> int:
    """Replace every Cast(to FP16) -> Cast(to FP32) pair by an Identity of the FP32 tensor, so a tensor
    that is FP32 already (Softmax's probabilities, kept FP32) is not rounded through FP16 on its way
    out (the converter inserts such pairs before FP32 graph outputs). Returns how many pairs went."""
    producers = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            consumers[name] = consumers.get(name, 0) + 1
    outputs = {o.name for o in graph.output}

    def casts_to(node: onnx.NodeProto | None, dtype: int) -> bool:
        return node is not None and node.op_type == "Cast" and onnx.helper.get_node_attr_value(node, "to") == dtype

    dropped = 0
    for node in list(graph.node):
        first = producers.get(node.input[0]) if node.op_type == "Cast" else None
        if not (casts_to(node, onnx.TensorProto.FLOAT) and casts_to(first, onnx.TensorProto.FLOAT16)):
            continue
        node.CopyFrom(onnx.helper.make_node("Identity", [first.input[0]], list(node.output), name=node.name))
        consumers[first.output[0]] -= 1
        if consumers[first.output[0]] == 0 and first.output[0] not in outputs:
            graph.node.remove(first)
        dropped += 1
    return dropped


def drop_duplicate_casts(graph: onnx.GraphProto) -> int:
    """Keep one of the identical Cast nodes the converter writes when one FP16 tensor feeds several ops
    kept FP32 (each gets a Cast with the same output name, which ONNX refuses). Returns how many went."""
    seen, dropped = set(), 0
    for node in list(graph.node):
        if node.op_type != "Cast":
            continue
        key = (node.input[0], node.output[0], onnx.helper.get_node_attr_value(node, "to"))
        if key in seen:
            graph.node.remove(node)
            dropped += 1
        seen.add(key)
    names = set()
    for info in list(graph.value_info):
        if info.name in names:
            graph.value_info.remove(info)
        names.add(info.name)
    return dropped


def block_list(keep_fp32: list[str] | None = None) -> list[str]:
    """Op types kept FP32: the converter's defaults, KEEP_FP32, and `keep_fp32` on top (never instead)."""
    return sorted(set(DEFAULT_OP_BLOCK_LIST) | set(KEEP_FP32) | set(keep_fp32 or []))


def convert(model_path: Path, out: Path, keep_fp32: list[str] | None = None) -> Path:
    """`keep_fp32`: op types kept FP32 in addition to KEEP_FP32 (Softmax, average pooling and summing reductions always stay FP32). The
    file records `model_path`'s sha256 (build/precision/provenance.py)."""
    external = bool(weight_files(model_path))
    # a path: the converter infers shapes from the file (onnx.shape_inference.infer_shapes_path), as a model over
    # 2 GB needs; a self-contained file is converted in memory, as before
    model = str(model_path) if external else onnx.load(str(model_path))
    block = block_list(keep_fp32)
    converted = convert_float_to_float16(model, keep_io_types=True, op_block_list=block)
    drop_duplicate_casts(converted.graph)
    drop_round_trip_casts(converted.graph)
    topological_sort(converted.graph)  # the converter appends its Cast nodes out of order
    provenance.stamp(converted, model_path)
    save_model(converted, out, external)
    try:
        onnx.checker.check_model(str(out))  # the file: the check that takes a model over 2 GB
    except onnx.checker.ValidationError:
        for written in (out, data_file(out)):
            written.unlink(missing_ok=True)
        raise
    return out


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, add_help=add_help,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifacts", default="artifacts/efficientnet_lite0", help="(default: %(default)s)")
    p.add_argument("--keep-fp32", nargs="*", default=[], metavar="OP_TYPE",
                   help=f"more op types kept in FP32, added to {', '.join(KEEP_FP32)} (always kept)")
    return p


def main(args: argparse.Namespace) -> Path:
    artifacts = Path(args.artifacts)
    out = convert(artifacts / MODEL_ONNX, artifacts / OUTPUT_NAME, args.keep_fp32)
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    import sys

    try:
        main(get_args_parser().parse_args())
    except (OSError, RuntimeError, ValueError) as exc:
        sys.exit(f"build.precision.fp16: {exc}")
