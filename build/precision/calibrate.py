"""`make calibrate`: activation ranges of an ONNX model -> a TensorRT-format calibration cache.

    python -m build.precision.calibrate --artifacts artifacts/efficientnet_lite0 --method max

Writes `<artifacts>/calibration/<method>.cache` in TensorRT's text format (a header line, then one
`tensor: <hex of the float32 scale>` line per tensor, scale = amax / 127) and `<method>.json`
beside it (ONNX sha256, preprocessing, image set and its fingerprint, method, observed min/max per
tensor). The same cache drives Q/DQ insertion for TensorRT and ONNX Runtime's CPU INT8 model.
Re-running with the same ONNX, preprocessing and images reuses the cache and says so; a changed ONNX,
preprocessing (preprocess.json: mean, std, resize, crop, layout...), image set, method or calibration
code recalibrates, and says why.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import struct
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from tqdm import tqdm

from build.precision.bias_correction import layer_inputs
from build.precision.imagesets import ImageSet, bundled_photos_warning, calibration_set
from common.contract import LABELS_TXT, MODEL_ONNX, PREPROCESS_JSON
from common.onnxfiles import model_sha256
from common.onnxsession import cpu_session
from common.preprocessing import PreprocessConfig
from serving.health import number

METHODS = ("max", "percentile", "entropy")  # what this stage computes from images
LEARNED_METHODS = ("qat",)  # caches that training writes (python -m training.qat); read here, never recomputed
CACHE_METHODS = METHODS + LEARNED_METHODS
# The names TensorRT's own calibrators write in a cache header (IInt8EntropyCalibrator, IInt8EntropyCalibrator2,
# IInt8MinMaxCalibrator, IInt8LegacyCalibrator). TensorRT has no percentile calibrator: its legacy calibrator is
# the quantile-based one, so a percentile cache says LegacyCalibration.
TENSORRT_CALIBRATORS = ("EntropyCalibration", "EntropyCalibration2", "MinMaxCalibration", "LegacyCalibration")
CALIBRATOR_NAMES = {"max": "MinMaxCalibration", "percentile": "LegacyCalibration",
                    "entropy": "EntropyCalibration2", "qat": "MinMaxCalibration"}  # qat: moving-average min/max
ALGORITHM_VERSION = 2  # bump when the statistics or threshold code changes: old caches are then redone
FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)


# ---- the cache format ----------------------------------------------------------------------

def scale_to_hex(scale: float) -> str:
    return struct.pack(">f", scale).hex()


def hex_to_scale(text: str) -> float:
    return struct.unpack(">f", bytes.fromhex(text.strip()))[0]


def write_cache(path: Path, scales: dict[str, float], calibrator: str, trt_version_code: int) -> None:
    if calibrator not in TENSORRT_CALIBRATORS:
        raise ValueError(f"calibrator {calibrator!r} is not one TensorRT has; one of {TENSORRT_CALIBRATORS}")
    lines = [f"TRT-{trt_version_code}-{calibrator}"]
    lines += [f"{name}: {scale_to_hex(scale)}" for name, scale in scales.items()]
    path.write_text("\n".join(lines) + "\n")


def read_cache(path: Path) -> tuple[str, dict[str, float]]:
    header, *lines = Path(path).read_text().splitlines() or [""]
    if not header.startswith("TRT-"):
        raise ValueError(f"{path}: not a TensorRT calibration cache (header {header!r})")
    scales = {}
    for number, line in enumerate(lines, start=2):
        name, _, value = line.rpartition(":")
        try:
            if not name:
                raise ValueError("no 'tensor: scale'")
            scales[name] = hex_to_scale(value)
        except (ValueError, struct.error) as exc:
            raise ValueError(f"{path}: malformed line {number} {line!r} ({exc})") from None
    return header, scales


def trt_version_code() -> int:
    """TensorRT's cache header carries its version (8601 = 8.6.1); 0 where TensorRT is absent."""
    try:
        import tensorrt  # type: ignore[import-not-found]
    except ImportError:
        return 0
    major, minor, patch = (int(p) for p in tensorrt.__version__.split(".")[:3])
    return major * 1000 + minor * 100 + patch if major < 10 else major * 10000 + minor * 100 + patch


# ---- statistics ----------------------------------------------------------------------------

def activation_tensors(model: onnx.ModelProto) -> list[str]:
    """The graph input and every floating-point tensor a node produces, in graph order."""
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type for v in
             [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]}
    names = [i.name for i in model.graph.input]
    names += [o for node in model.graph.node for o in node.output if o and types.get(o) in FLOAT_TYPES]
    return names


def _session_with_all_outputs(model: onnx.ModelProto, names: list[str], threads: int,
                              weights_folder: str) -> ort.InferenceSession:
    model = onnx.ModelProto.FromString(model.SerializeToString())
    existing = {o.name for o in model.graph.output}
    for name in names:
        if name not in existing and name not in {i.name for i in model.graph.input}:
            model.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    return cpu_session(model.SerializeToString(), threads, optimize=False,  # every tensor kept
                       weights_folder=weights_folder)


@dataclasses.dataclass
class TensorStats:
    minimum: float = np.inf
    maximum: float = -np.inf
    histogram: np.ndarray | None = None  # of |x| over [0, absmax], `bins` bins
    channel_sum: np.ndarray | None = None  # per channel (axis 1), over the batch and spatial positions
    count: int = 0  # values per channel in channel_sum

    def add_channels(self, value: np.ndarray) -> None:
        if value.ndim < 2:
            return
        axes = (0, *range(2, value.ndim))
        total = value.sum(axis=axes, dtype=np.float64)
        self.channel_sum = total if self.channel_sum is None else self.channel_sum + total
        self.count += value.size // value.shape[1]

    @property
    def channel_mean(self) -> np.ndarray | None:
        return None if self.channel_sum is None else self.channel_sum / max(self.count, 1)

    @property
    def absmax(self) -> float:
        return float(max(abs(self.minimum), abs(self.maximum)))


def collect_statistics(model_path: Path, images: ImageSet, config: PreprocessConfig, batch_size: int = 16,
                       bins: int = 2048, threads: int = 2) -> dict[str, TensorStats]:
    """Two passes over the images: min/max (and per-channel sums) of every tensor, then a histogram of |x|."""
    model = onnx.load(str(model_path), load_external_data=False)  # external data stays in its file (over 2 GB)
    names = activation_tensors(model)
    input_name = model.graph.input[0].name
    session = _session_with_all_outputs(model, names, threads, str(model_path.parent))
    outputs = [n for n in names if n != input_name]
    stats = {name: TensorStats() for name in names}
    steps = -(-len(images) // batch_size)

    def run(batch):
        return {input_name: batch, **dict(zip(outputs, session.run(outputs, {input_name: batch})))}

    for batch in tqdm(images.batches(config, batch_size), total=steps, desc="calibrate 1/2 ranges", unit="batch"):
        for name, value in run(batch).items():
            s = stats[name]
            s.minimum, s.maximum = min(s.minimum, float(value.min())), max(s.maximum, float(value.max()))
            s.add_channels(value)
    for batch in tqdm(images.batches(config, batch_size), total=steps, desc="calibrate 2/2 histograms", unit="batch"):
        for name, value in run(batch).items():
            s = stats[name]
            top = s.absmax if s.absmax > 0 else 1.0
            hist, _ = np.histogram(np.abs(value), bins=bins, range=(0.0, top))
            s.histogram = hist if s.histogram is None else s.histogram + hist
    return stats


def percentile_amax(stats: TensorStats, percentile: float) -> float:
    cdf = np.cumsum(stats.histogram) / max(stats.histogram.sum(), 1)
    index = int(np.searchsorted(cdf, percentile / 100.0))
    return (index + 1) * stats.absmax / len(stats.histogram)


def entropy_amax(stats: TensorStats, levels: int = 128, stride: int = 8) -> float:
    """TensorRT-style: the clipping threshold minimising KL(P || Q) between the clipped histogram
    P and its quantisation Q onto `levels` bins."""
    hist = stats.histogram.astype(np.float64)
    hist[0] = hist[1]  # exact zeros (ReLU/Clip outputs) would otherwise dominate the divergence
    bins, width = len(hist), stats.absmax / len(hist)
    best_kl, best_i = np.inf, bins
    for i in range(levels, bins + 1, stride):
        sliced = hist[:i]
        p = sliced.copy()
        p[-1] += hist[i:].sum()  # P: outliers clipped into the last bin
        nonzero = p > 0
        starts = (np.arange(levels) * i) // levels
        lengths = np.diff(np.append(starts, i))
        mass = np.add.reduceat(sliced, starts)  # Q: the slice alone, quantised to `levels` bins
        used = np.add.reduceat(nonzero.astype(np.float64), starts)
        q = np.where(nonzero, np.repeat(mass / np.maximum(used, 1), lengths), 0.0)
        p_sum, q_sum = p.sum(), q.sum()
        if p_sum == 0 or q_sum == 0:
            continue
        p, q = p / p_sum, q / q_sum
        kl = float(np.sum(p[nonzero] * np.log(p[nonzero] / np.maximum(q[nonzero], 1e-12))))
        if kl < best_kl:
            best_kl, best_i = kl, i
    return (best_i + 0.5) * width


def amax_per_tensor(stats: dict[str, TensorStats], method: str, percentile: float) -> dict[str, float]:
    if method not in METHODS:
        raise ValueError(f"calibration method {method!r} is not one of {METHODS}")
    amax = {}
    for name, s in stats.items():
        if s.absmax == 0:
            amax[name] = 0.0
        elif method == "max":
            amax[name] = s.absmax
        elif method == "percentile":
            amax[name] = min(s.absmax, percentile_amax(s, percentile))
        else:
            amax[name] = min(s.absmax, entropy_amax(s))
    return amax


# ---- the stage -----------------------------------------------------------------------------

def channel_means(model_path: Path, stats: dict[str, TensorStats]) -> dict[str, list[float]]:
    """Per-channel means of the weighted layers' inputs on the calibration images, for bias correction
    (build.precision.bias_correction), rounded to float32's precision."""
    wanted = layer_inputs(onnx.load(str(model_path), load_external_data=False))
    return {n: [float(f"{v:.7g}") for v in stats[n].channel_mean] for n in wanted
            if n in stats and stats[n].channel_mean is not None}


@dataclasses.dataclass
class Calibration:
    cache: Path
    meta: dict
    scales: dict[str, float]
    reused: bool
    message: str

    def ranges(self) -> dict[str, tuple[float, float]]:
        """Per-tensor (low, high) for asymmetric (uint8) use: [0, amax] where the tensor was never
        negative during calibration, else [-amax, amax]."""
        observed = self.meta["observed_min"]
        return {name: (0.0 if observed.get(name, -1.0) >= 0 else -127 * s, 127 * s)
                for name, s in self.scales.items()}


def read_meta(cache: Path) -> dict:
    meta_path = cache.with_suffix(".json")
    try:
        meta = json.loads(meta_path.read_text())
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise ValueError(f"{meta_path}: not valid JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{meta_path}: not a JSON object")
    return meta


def load_calibration(cache: Path) -> Calibration:
    try:
        return Calibration(cache, read_meta(cache), read_cache(cache)[1], True, f"loaded {cache}")
    except ValueError as exc:
        raise ValueError(f"{exc}; run `make calibrate`") from None


def _as_json(value):
    return json.loads(json.dumps(value))  # tuples -> lists, as the stored meta has them


def staleness(cache: Path, onnx_hash: str, config: PreprocessConfig, method: str,
              images: ImageSet | None = None, percentile: float | None = None) -> str | None:
    """None if the cache at `cache` fits this ONNX model, preprocessing, calibration code and method
    (and `images` and `percentile`, when given); otherwise why not, in words."""
    meta_path = cache.with_suffix(".json")
    if not cache.exists() or not meta_path.exists():
        return "no cache yet"
    try:
        meta = read_meta(cache)
        read_cache(cache)
    except ValueError as exc:
        return f"unreadable: {exc}"
    calibrator = cache.read_text().split("\n", 1)[0].rpartition("-")[2]
    if calibrator not in TENSORRT_CALIBRATORS:
        return f"its header names a calibrator TensorRT does not have ({calibrator!r})"
    if meta.get("onnx_sha256") != onnx_hash:
        return f"the ONNX model changed (sha256 {str(meta.get('onnx_sha256', '?'))[:12]} -> {onnx_hash[:12]})"
    # The image fingerprint is of the uint8 crops: mean, std and layout act after it, so compare them here.
    stored, current = meta.get("preprocess"), _as_json(config.to_dict())
    if stored != current:
        if not isinstance(stored, dict):
            return "the preprocessing changed (none recorded)"
        changed = [f"{k} {stored.get(k)} -> {current.get(k)}" for k in sorted(set(stored) | set(current))
                   if stored.get(k) != current.get(k)]
        return f"the preprocessing changed ({'; '.join(changed)})"
    if images is not None and meta.get("images_sha256") != images.fingerprint():
        return "the calibration images changed"
    if meta.get("algorithm_version") != ALGORITHM_VERSION:
        return f"the calibration code changed (version {meta.get('algorithm_version')} -> {ALGORITHM_VERSION})"
    if method not in LEARNED_METHODS and "channel_means" not in meta:
        return "it has no per-channel input means (bias correction needs them)"
    if meta.get("method") != method or (method == "percentile" and percentile is not None
                                        and meta.get("percentile") != percentile):
        return "the method changed"
    return None


def calibrate(model_path: Path, out_dir: Path, method: str, images: ImageSet, config: PreprocessConfig,
              percentile: float = 99.99, batch_size: int = 16, force: bool = False) -> Calibration:
    out_dir.mkdir(parents=True, exist_ok=True)
    cache = out_dir / f"{method}.cache"
    onnx_hash = model_sha256(model_path)
    learned = method in LEARNED_METHODS  # its scales come from training, not from `images`
    reason = "forced" if force else staleness(cache, onnx_hash, config, method, None if learned else images, percentile)
    if learned and reason is not None:
        raise ValueError(f"calibration cache {cache} cannot be used: {reason}; a {method} cache is written by "
                         f"python -m training.{method}, not calibrated here")
    if reason is None:
        calibration = load_calibration(cache)
        calibration.message = (f"reusing calibration cache {cache} (same ONNX sha256 {onnx_hash[:12]}, "
                               f"same preprocessing, same {len(images)} images, method {method})")
        return calibration
    stats = collect_statistics(model_path, images, config, batch_size)
    amax = amax_per_tensor(stats, method, percentile)
    scales = {name: a / 127.0 for name, a in amax.items()}
    code = trt_version_code()
    write_cache(cache, scales, CALIBRATOR_NAMES[method], code)
    scales = read_cache(cache)[1]  # float32 as stored: fresh and reused runs see the same numbers
    meta = {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "onnx": str(model_path), "onnx_sha256": onnx_hash, "method": method,
        "algorithm_version": ALGORITHM_VERSION,
        "percentile": percentile if method == "percentile" else None,
        "preprocess": _as_json(config.to_dict()), "images": len(images), "images_description": images.description,
        "images_sha256": images.fingerprint(), "image_files": images.files, "tensors": len(scales),
        "trt_version_code": code, "trt_version_note": "0: written without TensorRT" if code == 0 else "",
        "observed_min": {n: s.minimum for n, s in stats.items()},
        "observed_max": {n: s.maximum for n, s in stats.items()},
        "channel_means": channel_means(model_path, stats),
    }
    cache.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")
    message = f"calibrated {len(scales)} tensors on {len(images)} images ({reason}); wrote {cache}"
    return Calibration(cache, meta, scales, False, message)


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, add_help=add_help,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifacts", default="artifacts/efficientnet_lite0", help="(default: %(default)s)")
    p.add_argument("--method", default="max", choices=METHODS,
                   help="max suits ReLU6-bounded networks such as EfficientNet-Lite (docs/precision.md) "
                        "(default: %(default)s)")
    p.add_argument("--percentile", type=number(float, 0, 100, above_low=True), default=99.99,
                   help="for --method percentile, in (0, 100] (default: %(default)s)")
    p.add_argument("--images", default=None,
                   help="folder of representative images (default: the bundled calibration photos, augmented)")
    p.add_argument("--views", type=number(int, 1), default=16,
                   help="augmented views per bundled photo (default: %(default)s)")
    p.add_argument("--batch-size", type=number(int, 1), default=16, help="(default: %(default)s)")
    p.add_argument("--force", action="store_true", help="recalibrate even if the cache is current")
    return p


def main(args: argparse.Namespace) -> Calibration:
    artifacts = Path(args.artifacts)
    config = PreprocessConfig.load(artifacts / PREPROCESS_JSON)
    images = calibration_set(config, args.images, args.views)
    print(f"calibration images: {images.description}")
    warning = bundled_photos_warning(artifacts / LABELS_TXT, {"--images": args.images})
    if warning:
        print(warning)
    result = calibrate(artifacts / MODEL_ONNX, artifacts / "calibration", args.method, images, config,
                       args.percentile, args.batch_size, args.force)
    print(result.message)
    return result


if __name__ == "__main__":
    import sys

    try:
        main(get_args_parser().parse_args())
    except (OSError, RuntimeError, ValueError) as exc:
        sys.exit(f"build.precision.calibrate: {exc}")
