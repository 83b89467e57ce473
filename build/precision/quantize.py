"""`python -m build.precision.quantize`: calibration cache -> INT8 ONNX models with explicit Q/DQ, for TensorRT and
for ONNX Runtime on CPU. One cache, both worlds.

    model.onnx + calibration/<method>.cache
      -> model.int8.trt.onnx   signed int8 activations, symmetric scales = the cache's (amax / 127),
                               per-channel int8 weights, float biases, Q/DQ on the inputs of convolutions,
                               GEMMs and the skip input of residual Adds: TensorRT's explicit-quantization
                               form (TensorRT 10/11 strongly typed networks read precision from Q/DQ;
                               the rules are build/precision/trt_qdq.py's)
      -> model.int8.cpu.onnx   unsigned int8 activations (zero point 0 for tensors that calibration
                               saw non-negative), signed per-channel weights: U8S8, in ONNX Runtime's
                               QOperator form (QLinearConv & co.; `--cpu-format qdq` for the Q/DQ form),
                               in the layout the target CPU computes exactly (`--cpu-layout`):
                                 vnni  8-bit weights; right only on CPUs with VNNI (AVX-512 VNNI,
                                       AVX-VNNI, AMX)
                                 avx2  7-bit weights wherever a kernel adds products in pairs (every
                                       convolution but the depthwise ones, GEMMs): right on every x86 CPU
                               The file's ONNX metadata names its layout and the CPU flags it needs; the
                               served classifier refuses it on a CPU without them (common/cpu.py).

Tool: ONNX Runtime's quantizer (`onnxruntime.quantization.quantize_static`, maintained by Microsoft),
fed the cache's ranges through its documented `calibration_cache_path`; 7-bit weights through its
per-tensor `reduce_range` overrides. NVIDIA ModelOpt's ONNX PTQ implements the same TensorRT rules on
top of this quantizer, but it pins onnx and onnxruntime-gpu versions this environment cannot take and
its output can only be checked where TensorRT runs (docs/precision.md).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper
from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.calibrate import TensorData, TensorsData, save_tensors_data
from onnxruntime.quantization.onnx_quantizer import ONNXQuantizer
from onnxruntime.quantization.quant_utils import QuantizationMode, load_model_with_shape_infer

from build.precision import bias_correction, provenance, trt_qdq
from build.precision.calibrate import CACHE_METHODS, LEARNED_METHODS, Calibration, load_calibration, staleness
from common import cpu
from common.contract import MODEL_ONNX, ONNX_LOGITS, PREPROCESS_JSON
from common.onnxfiles import data_file, model_sha256, save_like, weight_files
from common.preprocessing import PreprocessConfig

TARGETS = ("trt", "cpu")
CPU_FORMATS = {"qoperator": QuantFormat.QOperator, "qdq": QuantFormat.QDQ}
CPU_LAYOUTS = cpu.PATHS
BIAS_CORRECTION_KEY = "int8_bias_correction"  # ONNX metadata: "<n> layers" or "none"
# TensorRT's placement: Q/DQ on the *inputs* of convolutions, GEMMs and residual Adds (and on
# weights), never on their outputs: TensorRT fuses Conv+activation and takes the output scale from
# the next layer's input Q. Quantising Conv outputs with the pre-activation range (ONNX Runtime's
# default) loses most of the top-1 agreement on EfficientNet-Lite0 (docs/precision.md).
TRT_OP_TYPES = ["Conv", "Gemm", "MatMul", "Add"]
# ONNX Runtime CPU: also keep the activations between convolutions in int8 so kernels chain in U8S8.
# ...but the classifier's logits stay float: quantised logits flip near-ties after the softmax. The
# quantizer honours this option in the Q/DQ form only; in the QOperator form `float_logits` does it.
CPU_FLOAT_OUTPUTS = ["Gemm", "MatMul"]
CPU_OP_TYPES = ["Conv", "Gemm", "MatMul", "Add", "Mul", "Clip", "Relu", "Pad", "GlobalAveragePool",
                "AveragePool", "MaxPool", "Flatten", "Reshape", "Concat"]


class StaleCalibration(ValueError):
    """The calibration cache was made for another ONNX model, preprocessing, method or calibration code."""


def output_name(target: str) -> str:
    return f"model.int8.{target}.onnx"


def _ranges(calibration: Calibration, target: str) -> TensorsData:
    if target == "trt":
        bounds = {n: (-127.0 * s, 127.0 * s) for n, s in calibration.scales.items()}
    else:
        bounds = calibration.ranges()
    data = {n: TensorData(lowest=np.float32(lo), highest=np.float32(hi)) for n, (lo, hi) in bounds.items()}
    return TensorsData(CalibrationMethod.MinMax, data)


@contextlib.contextmanager
def _quiet_root_logger():
    """quantize_static warns on the root logger to run its optional pre-processing on every call."""
    level = logging.root.level
    logging.root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logging.root.setLevel(level)


def pairing_weights(model: onnx.ModelProto) -> dict[str, int]:
    """Weight initializer -> its output-channel axis, for every layer whose U8S8 kernel adds products in
    pairs on x86 without VNNI: convolutions except depthwise ones (their kernels widen to 16 bits
    first), GEMMs and MatMuls with a constant weight."""
    initializers = {i.name: i for i in model.graph.initializer}
    axes = {}
    for node in model.graph.node:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if len(node.input) < 2 or node.input[1] not in initializers:
            continue
        weight = initializers[node.input[1]]
        if node.op_type == "Conv":
            depthwise = attrs.get("group", 1) > 1 and attrs.get("group", 1) == weight.dims[0] and weight.dims[1] == 1
            if not depthwise:
                axes[node.input[1]] = 0
        elif node.op_type == "Gemm":
            axes[node.input[1]] = 0 if attrs.get("transB", 0) else 1
        elif node.op_type == "MatMul":
            axes[node.input[1]] = len(weight.dims) - 1
    return axes


def _cpu_options(model_path: Path, layout: str) -> dict:
    if layout not in CPU_LAYOUTS:
        raise ValueError(f"INT8 CPU layout {layout!r} is not one of {CPU_LAYOUTS}")
    options = {"ActivationSymmetric": False, "WeightSymmetric": True,
               "OpTypesToExcludeOutputQuantization": CPU_FLOAT_OUTPUTS}
    if layout == "avx2":
        axes = pairing_weights(onnx.load(str(model_path), load_external_data=False))
        options["TensorQuantOverrides"] = {w: [{"reduce_range": True, "axis": axis}] for w, axis in axes.items()}
    return options


def keep_float(model: onnx.ModelProto, nodes: list[str]) -> list[str]:
    """Make the layers left in float stay float when ONNX Runtime loads the file; the ones changed.

    ONNX Runtime's graph optimisations (its `WeightBiasQuantization` rewrite) quantize the float
    weights of a Conv or Gemm that reads a per-tensor DequantizeLinear and feeds a QuantizeLinear, to
    8 bits per tensor, and then fuses it into QLinearConv: the layer the accuracy search left in float
    ran in INT8, with weights that saturate the pairing kernels of a CPU without VNNI. Each such layer
    now reads its own DequantizeLinear with the same scale repeated per channel: the same numbers, and
    a form that rewrite (per-tensor input scales only) leaves alone, in every runtime that loads the
    file (our sessions and Triton's onnxruntime backend alike)."""
    initializers = {i.name: i for i in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    changed, inserted = [], {}
    for node in model.graph.node:
        if node.name not in nodes or node.op_type not in ("Conv", "Gemm") or node.input[1] not in initializers:
            continue
        dequantize = producers.get(node.input[0])
        if dequantize is None or dequantize.op_type != "DequantizeLinear":
            continue
        scale, zero_point = (initializers.get(name) for name in (list(dequantize.input) + [""])[1:3])
        if scale is None or zero_point is None or len(scale.dims) != 0:
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        weight = initializers[node.input[1]]
        if node.op_type == "Conv":
            channels = weight.dims[1] * attrs.get("group", 1)
        else:
            channels = weight.dims[1] if attrs.get("transB", 0) else weight.dims[0]  # K of [N, K] or [K, N]
        prefix = f"{node.name}_float_input"
        model.graph.initializer.extend([
            numpy_helper.from_array(np.full(channels, numpy_helper.to_array(scale), np.float32), f"{prefix}_scale"),
            numpy_helper.from_array(np.full(channels, numpy_helper.to_array(zero_point)), f"{prefix}_zero_point")])
        inserted[node.name] = onnx.helper.make_node(
            "DequantizeLinear", [dequantize.input[0], f"{prefix}_scale", f"{prefix}_zero_point"], [prefix],
            name=f"{prefix}_DequantizeLinear", axis=1)
        node.input[0] = prefix
        changed.append(node.name)
    if changed:  # drop the DequantizeLinears nothing reads any more, then put each new one before its layer
        used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
        for node in [n for n in model.graph.node if n.op_type == "DequantizeLinear" and not set(n.output) & used]:
            model.graph.node.remove(node)
        ordered = [n for node in model.graph.node for n in ([inserted[node.name]] if node.name in inserted else []) + [node]]
        del model.graph.node[:]
        model.graph.node.extend(ordered)
        if model.ByteSize() < onnx.checker.MAXIMUM_PROTOBUF:  # larger: the gate's session loads the file
            onnx.checker.check_model(model)
    return changed


def head_adds(model: onnx.ModelProto) -> list[str]:
    """The Add that produces the logits output (a MatMul + Add head), left out of quantization in both
    files: quantized, its MatMul's output would get Q/DQ, its bias an int8 constant and the logits 8 bits."""
    return [n.name for n in model.graph.node if n.op_type == "Add" and ONNX_LOGITS in n.output]


def float_logits(model: onnx.ModelProto) -> list[str]:
    """Make the QGemm or QLinearMatMul that computes the logits output (directly, or through a float Add)
    emit float instead of 8 bits followed by a DequantizeLinear; the layers changed. QGemm (an ONNX Runtime
    contrib op) outputs float when given no output scale; a QLinearMatMul becomes a MatMulIntegerToFloat
    (contrib) on the same integer inputs. Every other layer stays as quantized."""
    producers = {o: n for n in model.graph.node for o in n.output}
    readers: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    last = producers.get(ONNX_LOGITS)
    if last is None:
        return []
    dequantizes = [last] if last.op_type == "DequantizeLinear" else (
        [producers[i] for i in last.input if i in producers] if last.op_type == "Add" else [])
    changed = []
    for dequantize in [d for d in dequantizes if d.op_type == "DequantizeLinear"]:
        layer = producers.get(dequantize.input[0])
        if layer is None or readers[dequantize.input[0]] != 1 or layer.op_type not in ("QGemm", "QLinearMatMul"):
            continue
        if layer.op_type == "QGemm":  # A, a_scale, a_zp, B, b_scale, b_zp, C[, y_scale, y_zp]
            del layer.input[7:]
            layer.output[0] = dequantize.output[0]
        else:  # a, a_scale, a_zp, b, b_scale, b_zp, y_scale, y_zp -> A, B, a_scale, b_scale, a_zp, b_zp
            a, a_scale, a_zp, b, b_scale, b_zp = layer.input[:6]
            layer.CopyFrom(onnx.helper.make_node("MatMulIntegerToFloat", [a, b, a_scale, b_scale, a_zp, b_zp],
                                                 [dequantize.output[0]], name=layer.name, domain="com.microsoft"))
        model.graph.node.remove(dequantize)
        changed.append(layer.name)
    if changed:
        if not any(o.domain == "com.microsoft" for o in model.opset_import):
            model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
        used = {i for n in model.graph.node for i in n.input}
        for initializer in [i for i in model.graph.initializer if i.name not in used]:
            model.graph.initializer.remove(initializer)
    return changed


def stamp_layout(path: Path, layout: str, corrected: int | None = None, source: Path | None = None) -> None:
    """Write the CPU layout and the flags it needs into the model's ONNX metadata, how many layers'
    biases were corrected (None: no correction) and the sha256 of the `source` model (build/precision/provenance.py)."""
    model = onnx.load(str(path))
    entries = {p.key: p.value for p in model.metadata_props}
    if layout:
        entries.update({cpu.LAYOUT_KEY: layout, cpu.REQUIRES_KEY: cpu.requirement(layout)})
    entries[BIAS_CORRECTION_KEY] = "none" if corrected is None else f"{corrected} layers"
    onnx.helper.set_model_props(model, entries)
    if source is not None:
        provenance.stamp(model, source)
    save_like(model, path, path if source is None else source)  # written as its source model is


def _bias_correction(model: onnx.ModelProto, calibration: Calibration, target: str, layout: str,
                     exclude_nodes: list[str]) -> tuple[onnx.ModelProto, list[str]] | None:
    """`model` with bias correction for `target`'s weight grids and the layers corrected, or None when the
    cache has no per-channel means (a QAT cache from before them)."""
    means = calibration.meta.get("channel_means")
    if not means:
        return None
    seven_bit = pairing_weights(model) if target == "cpu" and layout == "avx2" else {}
    weight_max = {w: bias_correction.INT7_MAX for w in seven_bit}
    return bias_correction.correct(model, means, weight_max, exclude_nodes)


def bias_corrected(model_path: Path, calibration: Calibration, target: str, layout: str,
                   exclude_nodes: list[str], out: Path) -> int | None:
    """Write `model_path` with bias correction for `target`'s weight grids to `out`; the layers corrected,
    or None (and nothing written) when the cache has no per-channel means (a QAT cache from before them)."""
    if not calibration.meta.get("channel_means"):
        return None
    corrected, layers = _bias_correction(onnx.load(str(model_path)), calibration, target, layout, exclude_nodes)
    save_like(corrected, out, model_path)
    return len(layers)


@dataclasses.dataclass
class CpuQuantization:
    """What ONNX Runtime's quantizer computes for a model's INT8 CPU file in a layout, also where the file does
    not show it, for edits of the file that must quantize a tensor as the quantizer would (build/precision/mixed.py):
    a pooling's output that the file quantized with its input's scale, a layer's bias at another input scale."""
    activations: dict[str, tuple[np.ndarray, np.ndarray]]  # tensor -> (scale, zero point) from the cache's range
    biases: dict[str, np.ndarray]  # weighted layer -> the float bias the quantizer rounds (bias-corrected)


def cpu_quantization(model_path: Path, calibration: Calibration, layout: str) -> CpuQuantization:
    """The figures computed by the quantizer's own code, with the arguments `quantize` gives it: scales from
    the cache's ranges as it adjusts them (a Relu's or Clip's input takes its output's range), biases as it
    reads them; tests/build/test_precision.py checks them against the file it writes."""
    model = load_model_with_shape_infer(model_path)
    quantizer = ONNXQuantizer(model, True, False, QuantizationMode.QLinearOps, True, QuantType.QInt8, QuantType.QUInt8,
                              _ranges(calibration, "cpu"), [], head_adds(model), CPU_OP_TYPES,
                              _cpu_options(model_path, layout))
    activations = {name: (np.asarray(p["scale"]), np.asarray(p["zero_point"]))
                   for name, p in quantizer.calculate_quantization_params().items()}
    corrected = _bias_correction(model, calibration, "cpu", layout, [])
    source = corrected[0] if corrected is not None else model
    initializers = {i.name: i for i in source.graph.initializer}
    biases = {n.name: numpy_helper.to_array(initializers[n.input[2]]) for n in source.graph.node
              if n.op_type in ("Conv", "Gemm") and len(n.input) > 2 and n.input[2] in initializers}
    return CpuQuantization(activations, biases)


def read_layout(path: Path) -> dict[str, str]:
    """The INT8 CPU layout keys of an ONNX file's metadata ({} for files without them)."""
    model = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in model.metadata_props if p.key in (cpu.LAYOUT_KEY, cpu.REQUIRES_KEY)}


def default_layout(backend: str | None = None) -> str:
    """The layout `auto` means: this CPU's own, where the served classifier checks it at load time
    (the python backend); the portable one for servers that cannot check (Triton's onnxruntime backend)."""
    return "avx2" if backend == "onnxruntime" else cpu.integer_path()


def quantize(model_path: Path, calibration: Calibration, target: str, out: Path,
             exclude_nodes: list[str] | None = None, cpu_format: str = "qoperator",
             cpu_layout: str | None = None) -> Path:
    """Write the INT8 model for `target` ('trt': Q/DQ; 'cpu': `cpu_format` in `cpu_layout`) from the cache's
    ranges only. `cpu_layout` None: this CPU's (`default_layout`)."""
    if target not in TARGETS:
        raise ValueError(f"target {target!r} is not one of {TARGETS}")
    if cpu_format not in CPU_FORMATS:
        raise ValueError(f"cpu format {cpu_format!r} is not one of {sorted(CPU_FORMATS)}")
    symmetric = target == "trt"
    cpu_layout = cpu_layout or default_layout()
    float_nodes = (exclude_nodes or []) + head_adds(onnx.load(str(model_path), load_external_data=False))
    extra = ({"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False,
              "OpTypesToExcludeOutputQuantization": TRT_OP_TYPES} if symmetric
             else _cpu_options(model_path, cpu_layout))
    with tempfile.TemporaryDirectory(prefix="ranges.") as tmp:
        ranges = Path(tmp) / "ranges.json"
        save_tensors_data(_ranges(calibration, target), ranges)
        source = Path(tmp) / "bias_corrected.onnx"
        corrected = bias_corrected(model_path, calibration, target, cpu_layout, exclude_nodes or [], source)
        data_file(out).unlink(missing_ok=True)  # an earlier build's: the quantizer would add to it
        with _quiet_root_logger():
            quantize_static(
                str(source if corrected is not None else model_path), str(out), calibration_data_reader=None,
                quant_format=QuantFormat.QDQ if symmetric else CPU_FORMATS[cpu_format],
                op_types_to_quantize=TRT_OP_TYPES if symmetric else CPU_OP_TYPES,
                per_channel=True, reduce_range=False,
                activation_type=QuantType.QInt8 if symmetric else QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                nodes_to_exclude=float_nodes,
                calibrate_method=CalibrationMethod.MinMax,
                calibration_cache_path=str(ranges),
                extra_options=extra,
                use_external_data_format=bool(weight_files(model_path)),  # out + out.data, as model.onnx is
            )
    if symmetric:
        _apply_trt_rules(model_path, out)
        trt_qdq.set_cache_scales(out, calibration.scales)
    else:
        model = onnx.load(str(out))
        if float_logits(model) + keep_float(model, exclude_nodes or []):
            save_like(model, out, model_path)
    stamp_layout(out, "" if symmetric else cpu_layout, corrected, source=model_path)
    return out


def _apply_trt_rules(model_path: Path, out: Path) -> None:
    branches = trt_qdq.residual_branches(onnx.load(str(model_path), load_external_data=False))
    model = onnx.load(str(out))
    trt_qdq.drop_branch_qdq(model, branches)
    int32 = trt_qdq.int32_dequantize_nodes(model)
    if int32:
        raise RuntimeError(f"{out}: int32 DequantizeLinear nodes that TensorRT rejects: {int32[:3]}...")
    save_like(model, out, model_path)


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, add_help=add_help,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifacts", default="artifacts/efficientnet_lite0", help="(default: %(default)s)")
    p.add_argument("--method", default="max", choices=CACHE_METHODS,
                   help="which calibration cache to use; qat: the one python -m training.qat wrote (default: %(default)s)")
    p.add_argument("--target", nargs="+", default=list(TARGETS), choices=TARGETS, help="(default: %(default)s)")
    p.add_argument("--cpu-format", default="qoperator", choices=sorted(CPU_FORMATS),
                   help="form of the CPU model (default: %(default)s, the faster one on CPU)")
    p.add_argument("--cpu-layout", default="auto", choices=["auto", *CPU_LAYOUTS],
                   help="integer layout of the CPU model: vnni (8-bit weights, CPUs with VNNI only), avx2 (7-bit "
                        "weights where kernels pair products, right on every x86 CPU); auto: this CPU's "
                        "(default: %(default)s)")
    return p


def main(args: argparse.Namespace) -> list[Path]:
    artifacts = Path(args.artifacts)
    cache = artifacts / "calibration" / f"{args.method}.cache"
    remedy = (f"python -m training.{args.method}" if args.method in LEARNED_METHODS else "`make calibrate` "
              f"(python -m build.precision.calibrate --artifacts {artifacts} --method {args.method})")
    if not cache.exists():
        raise FileNotFoundError(f"no calibration cache {cache}: run {remedy} first")
    model = artifacts / MODEL_ONNX
    config = PreprocessConfig.load(artifacts / PREPROCESS_JSON)
    # The image set and percentile are calibrate's to choose; what the cache must fit is checked here.
    why = staleness(cache, model_sha256(model), config, args.method)
    if why is not None:
        raise StaleCalibration(f"calibration cache {cache} is stale: {why}; run {remedy} first")
    calibration = load_calibration(cache)
    layout = default_layout() if args.cpu_layout == "auto" else args.cpu_layout
    written = []
    for target in args.target:
        out = quantize(model, calibration, target, artifacts / output_name(target),
                       cpu_format=args.cpu_format, cpu_layout=layout)
        print(f"wrote {out} from {cache}" + (f" (layout {layout}; this CPU: {cpu.describe()})" if target == "cpu" else ""))
        written.append(out)
    return written


if __name__ == "__main__":
    import sys

    try:
        main(get_args_parser().parse_args())
    except (OSError, RuntimeError, ValueError) as exc:
        sys.exit(f"build.precision.quantize: {exc}")
