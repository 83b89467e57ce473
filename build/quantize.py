"""`python -m build.quantize`: calibration cache -> INT8 ONNX models with explicit Q/DQ, for TensorRT and
for ONNX Runtime on CPU. One cache, both worlds.

    model.onnx + calibration/<method>.cache
      -> model.int8.trt.onnx   signed int8 activations, symmetric scales = the cache's (amax / 127),
                               per-channel int8 weights: TensorRT's explicit-quantization form
                               (TensorRT 10/11 strongly typed networks read precision from Q/DQ)
      -> model.int8.cpu.onnx   unsigned int8 activations (zero point 0 for tensors that calibration
                               saw non-negative), signed per-channel weights: U8S8, the x86 VNNI path,
                               in ONNX Runtime's QOperator form (QLinearConv & co.): measured here
                               2.4x FP32 at batch 8 for EfficientNet-Lite0, against 1.3x for the same
                               model in Q/DQ form (`--cpu-format qdq`)

Tool: ONNX Runtime's quantizer (`onnxruntime.quantization.quantize_static`, maintained by Microsoft),
fed the cache's ranges through its documented `calibration_cache_path`. It writes the Q/DQ form
TensorRT documents for explicit quantization (symmetric, zero point 0) and runs here, so both
models are validated here. NVIDIA ModelOpt's ONNX PTQ would be the natural choice for TensorRT but
it pins onnx~=1.21 and onnxruntime-gpu~=1.24 (incompatible with this environment) and its output
can only be checked where TensorRT runs (see README, "INT8 and FP16").
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper
from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.calibrate import TensorData, TensorsData, save_tensors_data

from build.calibrate import METHODS, Calibration, load_calibration, staleness
from build.repository import sha256
from common.preprocessing import PreprocessConfig

TARGETS = ("trt", "cpu")
CPU_FORMATS = {"qoperator": QuantFormat.QOperator, "qdq": QuantFormat.QDQ}
# TensorRT's placement: Q/DQ on the *inputs* of convolutions, GEMMs and residual Adds (and on
# weights), never on their outputs: TensorRT fuses Conv+activation and takes the output scale from
# the next layer's input Q. Quantising Conv outputs with the pre-activation range (ONNX Runtime's
# default) cost 50 points of top-1 agreement on EfficientNet-Lite0.
TRT_OP_TYPES = ["Conv", "Gemm", "MatMul", "Add"]
# ONNX Runtime CPU: also keep the activations between convolutions in int8 so kernels chain in U8S8.
# ...but the classifier's logits stay float: quantised logits flip near-ties after the softmax.
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


def quantize(model_path: Path, calibration: Calibration, target: str, out: Path,
             exclude_nodes: list[str] | None = None, cpu_format: str = "qoperator") -> Path:
    """Write the INT8 model for `target` ('trt': Q/DQ; 'cpu': `cpu_format`) from the cache's ranges only."""
    if target not in TARGETS:
        raise ValueError(f"target {target!r} is not one of {TARGETS}")
    if cpu_format not in CPU_FORMATS:
        raise ValueError(f"cpu format {cpu_format!r} is not one of {sorted(CPU_FORMATS)}")
    symmetric = target == "trt"
    with tempfile.TemporaryDirectory(prefix="ranges.") as tmp:
        ranges = Path(tmp) / "ranges.json"
        save_tensors_data(_ranges(calibration, target), ranges)
        with _quiet_root_logger():
            quantize_static(
                str(model_path), str(out), calibration_data_reader=None,
                quant_format=QuantFormat.QDQ if symmetric else CPU_FORMATS[cpu_format],
                op_types_to_quantize=TRT_OP_TYPES if symmetric else CPU_OP_TYPES,
                per_channel=True, reduce_range=False,
                activation_type=QuantType.QInt8 if symmetric else QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                nodes_to_exclude=exclude_nodes or [],
                calibrate_method=CalibrationMethod.MinMax,
                calibration_cache_path=str(ranges),
                extra_options={"ActivationSymmetric": symmetric, "WeightSymmetric": True,
                               "OpTypesToExcludeOutputQuantization": TRT_OP_TYPES if symmetric else CPU_FLOAT_OUTPUTS},
            )
    if symmetric:
        set_cache_scales(out, calibration.scales)
    return out


def set_cache_scales(path: Path, scales: dict[str, float]) -> int:
    """Overwrite the scale of every quantized activation in the Q/DQ model at `path` with the cache's
    float32, bit for bit. The quantizer recomputes each scale from the range it is fed ((hi - lo) / 254
    in float64, then rounded to float32), which lands one ulp off the cache's value for about 1 %
    of tensors. Int32 biases keep the scale they were quantized with (input x weight scale as the
    quantizer computed it; its own DequantizeLinear carries it). Returns how many scales were set."""
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
    onnx.save(model, str(path))
    return done


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, add_help=add_help,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifacts", default="artifacts/efficientnet_lite0", help="(default: %(default)s)")
    p.add_argument("--method", default="max", choices=METHODS,
                   help="which calibration cache to use (default: %(default)s)")
    p.add_argument("--target", nargs="+", default=list(TARGETS), choices=TARGETS, help="(default: %(default)s)")
    p.add_argument("--cpu-format", default="qoperator", choices=sorted(CPU_FORMATS),
                   help="form of the CPU model (default: %(default)s, the faster one here)")
    return p


def main(args: argparse.Namespace) -> list[Path]:
    artifacts = Path(args.artifacts)
    cache = artifacts / "calibration" / f"{args.method}.cache"
    if not cache.exists():
        raise FileNotFoundError(f"no calibration cache {cache}: run `make calibrate` first")
    model = artifacts / "model.onnx"
    config = PreprocessConfig.load(artifacts / "preprocess.json")
    # The image set and percentile are calibrate's to choose; what the cache must fit is checked here.
    why = staleness(cache, sha256(model), config, args.method)
    if why is not None:
        raise StaleCalibration(f"calibration cache {cache} is stale: {why}; run `make calibrate` "
                               f"(python -m build.calibrate --artifacts {artifacts} --method {args.method}) first")
    calibration = load_calibration(cache)
    written = []
    for target in args.target:
        out = quantize(model, calibration, target, artifacts / output_name(target),
                       cpu_format=args.cpu_format)
        print(f"wrote {out} from {cache}")
        written.append(out)
    return written


if __name__ == "__main__":
    import sys

    try:
        main(get_args_parser().parse_args())
    except (OSError, RuntimeError, ValueError) as exc:
        sys.exit(f"build.quantize: {exc}")
