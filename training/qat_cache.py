"""QAT's ranges <-> the exported ONNX's tensor names, and the TensorRT-format calibration cache that carries them.

    input_tensors(onnx_model, modules)   the fake-quantized Conv2d / Linear modules (call order, weight shapes)
                                         -> the ONNX input tensor of the Conv / Gemm / MatMul each became
    spread(onnx_model, scales)           the same scales on the tensors that only a range-keeping op (Pad,
                                         Flatten, Reshape) separates from those inputs
    start_ranges / learned_scales        a calibration cache -> QAT's initial ranges; QAT's scales -> tensor names
    write_qat_cache(...)                 <artifacts>/calibration/qat.cache + qat.json, in build.precision.calibrate's
                                         format: QAT's learned scale where a tensor maps, the observed max elsewhere

How modules map to ONNX nodes: the exporter (training.onnx_export) writes nodes in execution order, so the
n-th weighted module called is the n-th Conv / Gemm / MatMul with a constant weight in the graph. Every
pair is checked (same count, same weight shape, Gemm's transB and MatMul's layout taken into account);
any difference is a ValueError, never a silent guess.
"""
from __future__ import annotations

import datetime
import json
from pathlib import Path

import onnx

from build.precision import calibrate
from build.precision.imagesets import ImageSet
from common.onnxfiles import model_sha256
from common.preprocessing import PreprocessConfig
from training.qat_model import QatNetwork

WEIGHTED_OPS = ("Conv", "Gemm", "MatMul")
RANGE_KEEPING_OPS = ("Pad", "Flatten", "Reshape")  # zero padding keeps a symmetric range; the others move values
METHOD = "qat"


def _weight_shape(node: onnx.NodeProto, dims: tuple[int, ...]) -> tuple[int, ...]:
    """The ONNX weight's shape in torch's layout ([out, in, ...] for convolutions and Linear)."""
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    if node.op_type == "MatMul" or (node.op_type == "Gemm" and not attrs.get("transB", 0)):
        return tuple(reversed(dims))
    return dims


def weighted_nodes(model: onnx.ModelProto) -> list[tuple[onnx.NodeProto, tuple[int, ...]]]:
    """(node, weight shape in torch's layout) of every Conv / Gemm / MatMul with a constant weight, in graph order."""
    initializers = {i.name: tuple(i.dims) for i in model.graph.initializer}
    return [(node, _weight_shape(node, initializers[node.input[1]])) for node in model.graph.node
            if node.op_type in WEIGHTED_OPS and len(node.input) > 1 and node.input[1] in initializers]


def input_tensors(model: onnx.ModelProto, modules: list[tuple[str, tuple[int, ...]]]) -> dict[str, str]:
    """Module name -> the ONNX tensor its Conv / Gemm / MatMul reads (its data input)."""
    nodes = weighted_nodes(model)
    if len(nodes) != len(modules):
        raise ValueError(f"the ONNX graph has {len(nodes)} Conv/Gemm/MatMul nodes with constant weights, the network "
                         f"{len(modules)} fake-quantized Conv2d/Linear modules: they cannot be paired")
    mapping = {}
    for (name, shape), (node, onnx_shape) in zip(modules, nodes):
        if tuple(shape) != onnx_shape:
            raise ValueError(f"module {name} (weight {tuple(shape)}) does not match ONNX node {node.name or node.op_type} "
                             f"(weight {onnx_shape}) at the same position: the graph is not in execution order")
        mapping[name] = node.input[0]
    return mapping


def spread(model: onnx.ModelProto, scales: dict[str, float]) -> dict[str, float]:
    """`scales`, plus each tensor that reaches one of them through range-keeping ops only and feeds nothing else
    (e.g. the input of the Pad in front of a strided convolution, the pooled features before Flatten)."""
    producer = {out: node for node in model.graph.node for out in node.output}
    readers: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    result = dict(scales)
    for name, scale in scales.items():
        node = producer.get(name)
        while node is not None and node.op_type in RANGE_KEEPING_OPS:
            source = node.input[0]
            if readers.get(source, 0) != 1 or source in result:
                break
            result[source] = scale
            node = producer.get(source)
    return result


def learned_scales(net: QatNetwork, model: onnx.ModelProto) -> dict[str, float]:
    """ONNX tensor name -> the scale QAT trained with there (the larger where two quantizers meet one tensor)."""
    tensors = input_tensors(model, net.weighted_modules())
    scales: dict[str, float] = {}
    for q in net.inputs:
        for name in q.modules:
            scales[tensors[name]] = max(scales.get(tensors[name], 0.0), q.scale)
    return spread(model, scales)


def start_ranges(net: QatNetwork, model: onnx.ModelProto, calibration: calibrate.Calibration) -> None:
    """Each input quantizer's moving average starts at its tensor's range in `calibration` (a cache of `model`)."""
    bounds = calibration.ranges()
    tensors = input_tensors(model, net.weighted_modules())
    for q in net.inputs:
        q.set_range(*bounds[tensors[q.modules[0]]])


def write_qat_cache(model_path: Path, out_dir: Path, learned: dict[str, float], images: ImageSet,
                    config: PreprocessConfig, source: dict, batch_size: int = 16) -> calibrate.Calibration:
    """Write `<out_dir>/qat.cache` and `qat.json` for `model_path`: every activation tensor build.precision.calibrate
    would list, with the scale in `learned` (tensor name -> scale) where there is one and the observed max on
    `images` / 127 elsewhere (tensors QAT did not fake-quantize: convolution outputs, Add outputs...)."""
    stats = calibrate.collect_statistics(model_path, images, config, batch_size)
    unknown = sorted(set(learned) - set(stats))
    if unknown:
        raise ValueError(f"{model_path} has no activation tensors named {unknown[:3]}")
    scales = {name: s.absmax / 127.0 for name, s in stats.items()}
    scales.update(learned)
    out_dir.mkdir(parents=True, exist_ok=True)
    cache = out_dir / f"{METHOD}.cache"
    code = calibrate.trt_version_code()
    calibrate.write_cache(cache, scales, calibrate.CALIBRATOR_NAMES[METHOD], code)
    meta = {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "onnx": str(model_path), "onnx_sha256": model_sha256(model_path), "method": METHOD,
        "algorithm_version": calibrate.ALGORITHM_VERSION, "percentile": None,
        "preprocess": json.loads(json.dumps(config.to_dict())), "images": len(images),
        "images_description": images.description, "images_sha256": images.fingerprint(), "image_files": images.files,
        "tensors": len(scales),
        "trt_version_code": code, "trt_version_note": "0: written without TensorRT" if code == 0 else "",
        "observed_min": {n: s.minimum for n, s in stats.items()},
        "observed_max": {n: s.maximum for n, s in stats.items()},
        "channel_means": calibrate.channel_means(model_path, stats),
        "qat": {**source, "learned_tensors": sorted(learned),
                "note": "learned_tensors hold QAT's scales; every other tensor the observed max / 127 on the images"},
    }
    cache.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")
    return calibrate.load_calibration(cache)
