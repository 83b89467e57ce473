"""`python -m build.precision.validate`: the accuracy gate. Every variant against the FP32 reference, on held-out
images; a variant that fails is not deployed. Held-out images that are calibration images (the same bytes,
whatever the name) are refused: by `make engines` before it builds, and here against the file hashes each
calibration cache's <method>.json records (a cache that records none is warned about, not checked).

    python -m build.precision.validate --artifacts artifacts/efficientnet_lite0
    python -m build.precision.validate --held-out my_photos/ --min-agreement-int8 0.99

Polygraphy's Comparator runs each variant (ONNX Runtime runners on CPU; TensorRT runners where
TensorRT and a GPU exist) on the same batches. Reported per variant: top-1 agreement with FP32 on
all images, top-5 overlap, max and mean absolute error of the probabilities, and top-1 agreement on
the images where FP32 itself is decided (top-1 minus top-2 probability > 0.1). **The gate holds the
last one to its threshold** and says how many near-ties it left out: quantisation flips near-ties
first, and on a near-tie neither answer is more right. With labels (an ImageFolder), true top-1
accuracy is reported too, and may fall at most `--max-accuracy-drop` below FP32's.

Each file runs as it will be served: the INT8 CPU file through the serving path's own ONNX Runtime
session (common/onnxsession.py) on this CPU, whose integer path the report names. An INT8 CPU file
whose layout this CPU cannot compute exactly (common/cpu.py) is not run and fails the gate: what it
measured here would not be what it answers where it can run. TensorRT's Q/DQ file runs in ONNX
Runtime with graph optimisations off, each Q/DQ pair executed as written around float maths, which is
TensorRT's arithmetic up to rounding on every CPU (the fused int8 kernels would add the CPU's own).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np
from polygraphy.backend.onnxrt import OnnxrtRunner
from polygraphy.comparator import Comparator

from build.precision import provenance
from build.precision.calibrate import read_meta
from build.precision.imagesets import ImageSet, OverlappingImages, bundled_photos_warning, held_out_set, overlap_refusal
from build.precision.mixed import float_nodes
from build.precision.quantize import read_layout
from common import cpu
from common.contract import LABELS_TXT, MODEL_ONNX, ONNX_INPUT, ONNX_PROBABILITIES, PREPROCESS_JSON
from common.labels import read_labels
from common.onnxfiles import model_sha256
from common.onnxsession import cpu_session
from common.preprocessing import PreprocessConfig
from serving.health import number

PROBABILITIES = ONNX_PROBABILITIES
THRESHOLDS = {"fp16": 0.995, "int8": 0.99}
ACCURACY_DROP = 0.01  # with labels: how far below FP32's true top-1 a variant may fall
CONFIDENT_MARGIN = 0.1
# variant name -> (file in the artifacts folder, precision, how it runs here)
VARIANTS = {
    "fp32": (MODEL_ONNX, "fp32", "ONNX Runtime CPU"),
    "fp16": ("model.fp16.onnx", "fp16", "ONNX Runtime CPU"),
    "int8-cpu": ("model.int8.cpu.onnx", "int8", "ONNX Runtime CPU, U8S8, as served"),
    "int8-cpu-avx2": ("model.int8.cpu.avx2.onnx", "int8", "ONNX Runtime CPU, U8S8, as served"),
    "int8-cpu-mixed": ("model.int8.cpu.mixed.onnx", "int8", "ONNX Runtime CPU, U8S8, as served"),
    "int8-trt": ("model.int8.trt.onnx", "int8", "ONNX Runtime CPU, Q/DQ in float (TensorRT)"),
    "fp32-plan": ("model.fp32.plan", "fp32", "TensorRT"),
    "fp16-plan": ("model.fp16.plan", "fp16", "TensorRT"),
    "int8-plan": ("model.int8.plan", "int8", "TensorRT"),
}
# Written by `make bench-precision` beside the INT8 CPU file, to measure side by side: the portable
# layout (on a VNNI CPU) and the mixed-precision file (when the plain one fails the gate); never
# deployed, so never gated by `make engines`.
BENCH_ONLY = ("int8-cpu-avx2", "int8-cpu-mixed")


@dataclasses.dataclass
class VariantReport:
    name: str
    file: str
    precision: str
    runs_on: str
    images: int
    top1_agreement: float
    top5_overlap: float
    max_abs_error: float
    mean_abs_error: float
    confident_images: int
    confident_agreement: float
    accuracy: float | None = None  # with labels
    threshold: float | None = None
    passed: bool = True
    reason: str = ""
    layout: str = ""  # an INT8 CPU file's integer layout (common/cpu.py)
    float_layers: list[str] = dataclasses.field(default_factory=list)  # layers an INT8 file keeps in float
    gated_on: str = ""  # the CPU it ran on, and its integer path
    criterion: str = ""  # what the gate held it to


def onnxruntime_runner(path: Path, name: str, threads: int = 2) -> OnnxrtRunner:
    """The serving path's session (same options as the served classifier's)."""
    return OnnxrtRunner(lambda: cpu_session(path, threads), name=name)


def float_qdq_runner(path: Path, name: str) -> OnnxrtRunner:
    """A Q/DQ model with every Q/DQ pair executed as written and float maths between them."""
    return OnnxrtRunner(lambda: cpu_session(path, 2, optimize=False), name=name)


def runner_for(artifacts: Path, variant: str):
    filename = VARIANTS[variant][0]
    if filename.endswith(".plan"):
        from build.precision.plans import trt_runner

        return trt_runner(artifacts / filename, name=variant)
    if variant == "int8-trt":
        return float_qdq_runner(artifacts / filename, variant)
    return onnxruntime_runner(artifacts / filename, variant)


def cannot_gate_here(path: Path) -> str | None:
    """Why a file cannot be gated here (an ONNX file whose INT8 layout needs flags this CPU lacks; a plan
    where TensorRT or a GPU is missing), or None."""
    if path.suffix == ".plan":
        from build.precision.plans import TensorRTUnavailable, require_tensorrt

        try:
            require_tensorrt()
        except TensorRTUnavailable as exc:
            return str(exc)
        return None
    return cpu.refusal(read_layout(path)) if path.suffix == ".onnx" else None


def stale(path: Path, current: str | None) -> str | None:
    """Why an ONNX variant or a plan was not built from the model.onnx beside it (sha256 `current`), or None."""
    if path.suffix == ".plan":
        return provenance.plan_mismatch(path, current)
    return provenance.mismatch(path, current) if path.suffix == ".onnx" else None


def _quiet_polygraphy() -> None:
    from polygraphy.logger import G_LOGGER

    G_LOGGER.module_severity = G_LOGGER.WARNING


def run_all(runners: list, images: ImageSet, config: PreprocessConfig, batch_size: int) -> dict[str, np.ndarray]:
    """Comparator.run over the same batches -> {runner name: probabilities (N, classes)}."""
    _quiet_polygraphy()
    feeds = [{ONNX_INPUT: batch} for batch in images.batches(config, batch_size)]
    results = Comparator.run(runners, data_loader=feeds)
    return {name: np.concatenate([iteration[PROBABILITIES] for iteration in iterations])
            for name, iterations in results.items()}


def compare(reference: np.ndarray, candidate: np.ndarray, labels: np.ndarray | None = None) -> dict:
    ref_top1, cand_top1 = reference.argmax(1), candidate.argmax(1)
    ref_top5 = np.argsort(-reference, axis=1)[:, :5]
    cand_top5 = np.argsort(-candidate, axis=1)[:, :5]
    overlap = np.mean([len(set(a) & set(b)) / 5.0 for a, b in zip(ref_top5, cand_top5)])
    ordered = np.sort(reference, axis=1)
    confident = (ordered[:, -1] - ordered[:, -2]) > CONFIDENT_MARGIN
    agree = ref_top1 == cand_top1
    error = np.abs(reference - candidate)
    return {
        "images": int(len(reference)),
        "top1_agreement": float(agree.mean()),
        "top5_overlap": float(overlap),
        "max_abs_error": float(error.max()),
        "mean_abs_error": float(error.mean()),
        "confident_images": int(confident.sum()),
        "confident_agreement": float(agree[confident].mean()) if confident.any() else float("nan"),
        "accuracy": None if labels is None else float((cand_top1 == labels).mean()),
    }


def threshold_for(name: str, thresholds: dict[str, float]) -> float | None:
    """The minimum top-1 agreement `name` must reach; None only for the FP32 ONNX reference itself.
    The FP32 TensorRT plan must agree with FP32 ONNX at least as well as FP16 does: thresholds["fp32"]
    where given, else the FP16 threshold."""
    if name == "fp32":
        return None
    precision = VARIANTS[name][1]
    if precision == "fp32":
        return thresholds.get("fp32", thresholds.get("fp16", THRESHOLDS["fp16"]))
    return thresholds.get(precision)


def validate(artifacts: Path, variants: list[str], images: ImageSet, config: PreprocessConfig,
             thresholds: dict[str, float], labels: np.ndarray | None = None,
             batch_size: int = 16) -> list[VariantReport]:
    present = [v for v in variants if v != "fp32" and (artifacts / VARIANTS[v][0]).exists()]
    current = model_sha256(artifacts / MODEL_ONNX) if present and (artifacts / MODEL_ONNX).is_file() else None
    refused = {v: why for v in present if (why := cannot_gate_here(artifacts / VARIANTS[v][0])
                                           or stale(artifacts / VARIANTS[v][0], current))}
    runnable = [v for v in present if v not in refused]
    runners = [runner_for(artifacts, v) for v in ["fp32", *runnable]]
    outputs = run_all(runners, images, config, batch_size)
    here = cpu.describe()
    reports = []
    for name in ["fp32", *present]:
        filename, precision, runs_on = VARIANTS[name]
        layout = read_layout(artifacts / filename).get(cpu.LAYOUT_KEY, "") if filename.endswith(".onnx") else ""
        kept = float_nodes(artifacts / filename) if filename.endswith(".onnx") else []
        if name in refused:
            report = VariantReport(name, filename, precision, runs_on, **not_run(len(images)), layout=layout,
                                   float_layers=kept, gated_on=here, threshold=threshold_for(name, thresholds), passed=False,
                                   reason=f"not gated: {refused[name]}")
        else:
            reference = compare(outputs["fp32"], outputs["fp32"], labels)["accuracy"]
            report = gate(VariantReport(name, filename, precision, runs_on, layout=layout, float_layers=kept,
                                        gated_on=here,
                                        **compare(outputs["fp32"], outputs[name], labels)), thresholds, reference)
        reports.append(report)
    return reports


def not_run(images: int) -> dict:
    nan = float("nan")
    return {"images": images, "top1_agreement": nan, "top5_overlap": nan, "max_abs_error": nan,
            "mean_abs_error": nan, "confident_images": 0, "confident_agreement": nan, "accuracy": None}


def gate_metric(report: VariantReport) -> float:
    """What the gate holds to its threshold: top-1 agreement on the held-out images where FP32 is decided
    (its top-1 beats its top-2 by more than CONFIDENT_MARGIN); near-ties, where any rounding may flip the
    answer and no answer is more right than the other, are left out and counted. Without a decided
    image, agreement on all of them."""
    return report.confident_agreement if report.confident_images else report.top1_agreement


def gate_summary(report: VariantReport) -> str:
    """A few words on the gate's figure: '98.54% of 137 decided' (+ true top-1 with labels)."""
    where = f"of {report.confident_images} decided" if report.confident_images else f"of all {report.images}"
    return f"{gate_metric(report):.2%} {where}" + (f", true top-1 {report.accuracy:.2%}" if report.accuracy is not None else "")


def gate(report: VariantReport, thresholds: dict[str, float], reference_accuracy: float | None = None,
         threshold: float | None = None) -> VariantReport:
    """Set the report's threshold and verdict (a failing variant is not deployed). Without labels the
    gate holds agreement with FP32 (gate_metric) to the threshold. With labels, true accuracy is what
    counts: the variant's top-1 may fall at most thresholds["accuracy_drop"] below FP32's, and agreement
    is reported, not held (a file that is right where FP32 is wrong, as QAT's can be, disagrees).
    `threshold` overrides the variant's own (serving.rollout gates a candidate model this way)."""
    report.threshold = threshold if threshold is not None else threshold_for(report.name, thresholds)
    if report.threshold is None:
        return report
    reasons = []
    metric = gate_metric(report)
    labelled = reference_accuracy is not None and report.accuracy is not None
    drop = thresholds.get("accuracy_drop", ACCURACY_DROP)
    report.criterion = (f"true top-1 >= FP32's - {drop:.1%}" if labelled else f"agreement >= {report.threshold:.1%}")
    if metric < report.threshold and not labelled:
        where = (f"on the {report.confident_images} held-out images where FP32 is decided "
                 f"({report.images - report.confident_images} near-ties left out)" if report.confident_images
                 else f"on all {report.images} held-out images (none where FP32 is decided)")
        reasons.append(f"top-1 agreement {metric:.2%} < {report.threshold:.1%} {where}")
    if labelled and report.accuracy < reference_accuracy - drop:
        reasons.append(f"true top-1 {report.accuracy:.2%} is more than {drop:.1%} below FP32's {reference_accuracy:.2%}")
    if reasons:
        report.passed = False
        report.reason = "; ".join(reasons) + ": not deployed"
    return report


def format_table(reports: list[VariantReport]) -> str:
    has_accuracy = any(r.accuracy is not None for r in reports)
    head = (f"{'variant':13s} {'runs on':58s} {'images':>6s} {'top-1 agr':>9s} {'top-5 ovl':>9s} "
            f"{'max|dp|':>8s} {'mean|dp|':>9s} {'decided agr':>14s}" + (f" {'accuracy':>8s}" if has_accuracy else "")
            + "  gate")
    lines = [head, "-" * len(head)]
    for r in reports:
        if r.threshold is None:
            verdict = "reference" if r.name == "fp32" else "not gated"
        else:
            verdict = ("PASS" if r.passed else "FAIL") + f" ({r.criterion or f'>= {r.threshold:.1%}'})"
        confident = f"{r.confident_agreement:7.2%} ({r.confident_images})" if r.confident_images else "- (0)"
        runs_on = f"{r.runs_on}, {r.layout} layout" if r.layout else r.runs_on
        runs_on += f", {len(r.float_layers)} float" if r.float_layers else ""
        if np.isnan(r.top1_agreement):  # not run here
            line = f"{r.name:13s} {runs_on:58s} {r.images:6d} {'-':>9s} {'-':>9s} {'-':>8s} {'-':>9s} {confident:>14s}"
        else:
            line = (f"{r.name:13s} {runs_on:58s} {r.images:6d} {r.top1_agreement:9.2%} {r.top5_overlap:9.2%} "
                    f"{r.max_abs_error:8.4f} {r.mean_abs_error:9.2e} {confident:>14s}")
        if has_accuracy:
            line += f" {r.accuracy:8.2%}" if r.accuracy is not None else " " * 9
        lines.append(line + "  " + verdict)
    lines += [f"  {r.name}: {r.reason}" for r in reports if not r.passed]
    if reports and reports[0].gated_on:
        lines.append(f"gated on: {reports[0].gated_on}; each variant's top-1 against fp32 ({reports[0].file}) "
                     f"on the same {reports[0].images} held-out images")
    return "\n".join(lines)


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, add_help=add_help,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifacts", default="artifacts/efficientnet_lite0", help="(default: %(default)s)")
    p.add_argument("--variants", nargs="+", default=[v for v in VARIANTS if v != "fp32"],
                   choices=[v for v in VARIANTS if v != "fp32"], help="those present are checked (default: all)")
    p.add_argument("--held-out", default=None,
                   help="folder of held-out images; an ImageFolder (class sub-folders named as in labels.txt) "
                        "adds true accuracy (default: the bundled held-out photos, augmented)")
    p.add_argument("--views", type=number(int, 1), default=40,
                   help="augmented views per bundled photo (default: %(default)s)")
    p.add_argument("--min-agreement-fp16", type=number(float, 0, 1), default=THRESHOLDS["fp16"],
                   help="a share in [0, 1]; also the FP32 TensorRT plan's (default: %(default)s)")
    p.add_argument("--min-agreement-int8", type=number(float, 0, 1), default=THRESHOLDS["int8"],
                   help="a share in [0, 1] (default: %(default)s)")
    p.add_argument("--max-accuracy-drop", type=number(float, 0, 1), default=ACCURACY_DROP,
                   help="with labels: how far below FP32's true top-1 a variant may fall (default: %(default)s)")
    p.add_argument("--batch-size", type=number(int, 1), default=16, help="(default: %(default)s)")
    p.add_argument("--report", default=None, help="JSON report path (default: <artifacts>/validation.json)")
    return p


def folder_labels(images: ImageSet, folder: Path, labels_file: Path) -> np.ndarray | None:
    """Class indices from `<folder>/<class>/<image>` paths when every class folder names a label."""
    names = read_labels(labels_file)
    classes = [Path(p).relative_to(folder).parts[0] if len(Path(p).relative_to(folder).parts) > 1 else None
               for p in images.names]
    if any(c not in names for c in classes):
        return None
    return np.array([names.index(c) for c in classes])


def held_out_labels(images: ImageSet, held_out: str | None, artifacts: Path) -> np.ndarray | None:
    """True class indices when `held_out` is an ImageFolder whose class folders are named as in the
    artifacts' labels.txt; else None. Used here and by `make engines` (build.precision.variants)."""
    labels_file = artifacts / LABELS_TXT
    if not held_out or not labels_file.exists():
        return None
    return folder_labels(images, Path(held_out), labels_file)


def calibration_overlap(artifacts: Path, variants: list[str], held_out: ImageSet) -> list[str]:
    """Refuse held-out images that a calibration cache of this model.onnx records as its own (by sha256);
    the warnings for caches that record no files. Only when an INT8 variant of `variants` is present."""
    if not any(VARIANTS[v][1] == "int8" and (artifacts / VARIANTS[v][0]).exists() for v in variants):
        return []
    model = artifacts / MODEL_ONNX
    current = model_sha256(model) if model.is_file() else None
    warnings = []
    for meta_path in sorted((artifacts / "calibration").glob("*.json")):
        try:
            meta = read_meta(meta_path)
        except ValueError as exc:
            warnings.append(f"warning: {exc}: cannot check the held-out images against its calibration images")
            continue
        if meta.get("onnx_sha256") != current:
            continue  # calibrated another model.onnx: no variant here was built from it
        files = meta.get("image_files")
        if not isinstance(files, dict) or not files:
            warnings.append(f"warning: {meta_path} records no calibration image files, so whether the held-out "
                            "images overlap them cannot be told; recalibrate (python -m build.precision.calibrate "
                            "--force) to record them")
            continue
        refusal = overlap_refusal(files, held_out.files, f"{meta_path}")
        if refusal:
            raise OverlappingImages(refusal)
    return warnings


def main(args: argparse.Namespace) -> list[VariantReport]:
    artifacts = Path(args.artifacts)
    config = PreprocessConfig.load(artifacts / PREPROCESS_JSON)
    images = held_out_set(config, args.held_out, args.views)
    labels = held_out_labels(images, args.held_out, artifacts)
    print(f"held-out images: {images.description}" + (" (labelled)" if labels is not None else ""))
    warnings = calibration_overlap(artifacts, args.variants, images)
    warning = bundled_photos_warning(artifacts / LABELS_TXT, {"--held-out": args.held_out})
    for line in [*warnings, *([warning] if warning else [])]:
        print(line)
    thresholds = {"fp16": args.min_agreement_fp16, "int8": args.min_agreement_int8,
                  "accuracy_drop": args.max_accuracy_drop}
    reports = validate(artifacts, args.variants, images, config, thresholds, labels, args.batch_size)
    print(format_table(reports))
    report_path = Path(args.report) if args.report else artifacts / "validation.json"
    report_path.write_text(json.dumps({"held_out": images.description, "thresholds": thresholds,
                                       "variants": [dataclasses.asdict(r) for r in reports]}, indent=2) + "\n")
    print(f"report: {report_path}")
    return reports


if __name__ == "__main__":
    import sys

    try:
        passed = all(r.passed for r in main(get_args_parser().parse_args()))
    except (OSError, RuntimeError, ValueError) as exc:
        sys.exit(f"build.precision.validate: {exc}")
    sys.exit(0 if passed else 2)  # 2, not 1: a failed gate is not an error
