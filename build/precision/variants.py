"""The precision chain behind `make engines PRECISION=fp16|int8`: build the variants, gate them,
and hand back the one file the classifier should serve.

    int8: calibrate (cache reused when current) -> quantize (TensorRT Q/DQ + CPU U8S8 in the layout the
          target CPU computes exactly: `cpu_layout`, auto = this CPU's for the python backend, which checks
          it when it loads, and the portable avx2 layout for Triton's onnxruntime backend, which cannot)
    fp16: convert (FP32 IO)
    then: for the tensorrt backend only, a TensorRT plan (where TensorRT and a GPU exist; else it fails)
    then: build.precision.validate on held-out images; a variant that fails is not deployed
    int8 CPU file failing the gate: the fewest float layers that make it pass (build.precision.mixed)
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

from build.precision import calibrate, fp16, mixed, quantize, validate
from build.precision.imagesets import (ImageSet, OverlappingImages, bundled_photos_warning, calibration_files,
                                      calibration_set, held_out_files, held_out_set, overlap_refusal)
from build.repository.spec import DeploymentSpec
from build.repository.writer import model_shape
from common import cpu
from common.contract import LABELS_TXT, MODEL_ONNX, PREPROCESS_JSON
from common.preprocessing import PreprocessConfig

FEW_GATE_IMAGES = 50  # a pass judged on fewer images is printed with a caution: one flip moves it 2 points


class GateFailed(ValueError):
    """The variant to deploy failed the accuracy gate."""


@dataclasses.dataclass
class VariantOptions:
    calibration_method: str = "max"
    calibration_images: str | None = None
    held_out: str | None = None
    thresholds: dict[str, float] = dataclasses.field(default_factory=lambda: dict(validate.THRESHOLDS))
    allow_fallback: bool = False  # deploy FP32 when the requested precision fails the gate
    cpu_layout: str = "auto"  # INT8 CPU file: auto | vnni | avx2 (build.precision.quantize)
    max_float_layers: int = 8  # INT8 CPU file failing the gate: keep up to this many layers in float (mixed.py)


@dataclasses.dataclass
class Deployable:
    model_file: Path
    variant: str
    precision: str
    reports: list[validate.VariantReport] = dataclasses.field(default_factory=list)


def tensorrt_unavailable() -> str | None:
    """None where TensorRT plans can be built here; otherwise the one-line reason."""
    from build.precision import plans

    try:
        plans.require_tensorrt()
    except plans.TensorRTUnavailable as exc:
        return str(exc)
    return None


def build_plan(artifacts: Path, precision: str, spec_path: str, backend: str,
               compatibility: list[str] | None = None) -> tuple[Path | None, str]:
    """A TensorRT plan for the tensorrt backend, or None and the one-line reason none was built. Only the
    tensorrt backend serves a plan: for any other backend none is built (and a TensorRT failure cannot
    stop a CPU deployment)."""
    from build.precision import plans

    if backend != "tensorrt":
        return None, f"TensorRT plan not built: the {backend} backend serves an ONNX file, not a plan"
    why_not = tensorrt_unavailable()
    if why_not:
        return None, why_not
    args = plans.get_args_parser().parse_args(["--spec", spec_path, "--artifacts", str(artifacts),
                                               "--precision", precision, *(compatibility or [])])
    metadata = plans.main(args)
    return Path(metadata["plan"]["path"]), "built"


def plan_flags(target_server: dict) -> list[str]:
    """build.precision.plans flags for the portability the spec's target_server accepts (build.precision.binding)."""
    flags = ["--version-compatible"] if target_server.get("version_compatible") else []
    level = target_server.get("hardware_compatibility", "none")
    return flags + (["--hardware-compatibility", level] if level != "none" else [])


@dataclasses.dataclass
class Int8Build:
    calibration: calibrate.Calibration
    images: ImageSet  # the calibration images
    layout: str


def build_variants(artifacts: Path, precision: str, options: VariantOptions, config: PreprocessConfig,
                   log: Callable[[str], None], backend: str | None = None) -> Int8Build | None:
    """Write the ONNX variants of `precision` (the INT8 CPU file in the layout for `backend`'s server)."""
    if precision == "int8":
        layout = quantize.default_layout(backend) if options.cpu_layout == "auto" else options.cpu_layout
        if backend == "onnxruntime" and layout != "avx2":
            raise ValueError(f"--int8-cpu-layout {layout} cannot be served by Triton's onnxruntime backend: it does "
                             "not check the CPU's flags at load, so on a CPU without them the file answers wrongly; "
                             "use --int8-cpu-layout avx2 (or auto), or --backend python-onnxruntime")
        images = calibration_set(config, options.calibration_images)
        log(f"calibration images: {images.description}")
        result = calibrate.calibrate(artifacts / MODEL_ONNX, artifacts / "calibration",
                                     options.calibration_method, images, config)
        log(result.message)
        for target in quantize.TARGETS:
            out = quantize.quantize(artifacts / MODEL_ONNX, result, target,
                                    artifacts / quantize.output_name(target), cpu_layout=layout)
            log(f"wrote {out}" + (f" (layout {layout}; this CPU: {cpu.describe()})" if target == "cpu" else ""))
        return Int8Build(result, images, layout)
    if precision == "fp16":
        log(f"wrote {fp16.convert(artifacts / MODEL_ONNX, artifacts / fp16.OUTPUT_NAME)}")
    return None


def mixed_precision(artifacts: Path, built: Int8Build, options: VariantOptions, config: PreprocessConfig,
                    held_out: ImageSet, labels, log: Callable[[str], None]) -> list[validate.VariantReport] | None:
    """The INT8 CPU file failed the gate: rebuild it with the fewest float layers that pass; the gate's
    reports for the file that passed, or None."""
    passed: list[list[validate.VariantReport]] = []

    def gate(_: Path) -> tuple[bool, str]:
        reports = validate.validate(artifacts, ["int8-cpu"], held_out, config, options.thresholds, labels)
        if reports[1].passed:
            passed.append(reports)
        return reports[1].passed, validate.gate_summary(reports[1])

    log(f"int8-cpu failed the gate: searching for the fewest layers to keep in float (at most "
        f"{options.max_float_layers}; --int8-max-float-layers)")
    kept = mixed.search(artifacts / MODEL_ONNX, built.calibration, built.layout,
                        artifacts / quantize.output_name("cpu"), built.images, config, gate,
                        options.max_float_layers, log)
    return passed[-1] if kept is not None else None


def require_disjoint(options: VariantOptions) -> None:
    """Refuse calibration and held-out images that share a file's bytes, before anything is built."""
    where = (f"--calibration-images {options.calibration_images}" if options.calibration_images
             else "the bundled calibration photos")
    refusal = overlap_refusal(calibration_files(options.calibration_images), held_out_files(options.held_out), where)
    if refusal:
        raise OverlappingImages(refusal)


def prepare(spec: DeploymentSpec, backend: str, spec_path: str, options: VariantOptions,
            log: Callable[[str], None] = print) -> Deployable:
    artifacts = Path(spec.artifacts)
    precision = spec.precision
    if precision == "fp32" and backend != "tensorrt":
        return Deployable(artifacts / MODEL_ONNX, "fp32", "fp32")
    cpu_variant = {"fp32": "fp32", "fp16": "fp16", "int8": "int8-cpu"}[precision]
    wanted = f"{precision}-plan" if backend == "tensorrt" else cpu_variant
    if backend == "tensorrt" and options.allow_fallback and precision != "fp32":
        raise GateFailed(f"--allow-fallback deploys the FP32 ONNX model, which a tensorrt classifier cannot serve: "
                         f"build without it, and if {wanted} fails the gate, build PRECISION=fp32 (an FP32 plan) "
                         "or use --backend onnxruntime")
    if backend == "tensorrt":  # a tensorrt classifier serves nothing but a plan: fail before building anything
        why_not = tensorrt_unavailable()
        if why_not:
            raise GateFailed(f"{why_not}; the tensorrt backend needs the {wanted} variant, so nothing is built or "
                             f"deployed (--backend onnxruntime or python-onnxruntime serves the {cpu_variant} "
                             "variant on CPU)")
    model_shape(artifacts)  # a model the repository cannot serve fails here, before any variant is written
    config = PreprocessConfig.load(artifacts / PREPROCESS_JSON)
    warning = bundled_photos_warning(artifacts / LABELS_TXT, {"--calibration-images": options.calibration_images,
                                                              "--held-out": options.held_out})
    if warning:
        log(warning)
    if precision == "int8":  # only INT8 calibrates: FP16 and FP32 never see the calibration images
        require_disjoint(options)
    built = build_variants(artifacts, precision, options, config, log, backend)
    plan, why = build_plan(artifacts, precision, spec_path, backend, plan_flags(spec.target_server))
    log(f"TensorRT plan: {plan}" if plan else why)

    checked = [v for v in validate.VARIANTS
               if v != "fp32" and validate.VARIANTS[v][1] == precision and v not in validate.BENCH_ONLY
               and (backend == "tensorrt" or not v.endswith("-plan"))]  # a leftover plan is no CPU backend's
    images = held_out_set(config, options.held_out)
    labels = validate.held_out_labels(images, options.held_out, artifacts)
    log(f"held-out images: {images.description}" + (" (labelled: true accuracy reported)" if labels is not None else ""))
    reports = validate.validate(artifacts, checked, images, config, options.thresholds, labels)
    table = validate.format_table(reports)
    log(table)
    by_name = {r.name: r for r in reports}
    if wanted not in by_name:
        raise GateFailed(f"the {wanted} variant was not built (missing file {validate.VARIANTS[wanted][0]})")
    chosen = by_name[wanted]
    if not chosen.passed and wanted == "int8-cpu" and built is not None and options.max_float_layers > 0:
        mixed_reports = mixed_precision(artifacts, built, options, config, images, labels, log)
        if mixed_reports is not None:
            reports = [mixed_reports[1] if r.name == "int8-cpu" else r for r in reports]
            chosen = mixed_reports[1]
            log(validate.format_table(reports))
    if chosen.passed:
        judged = chosen.confident_images if labels is None and chosen.confident_images else chosen.images
        if judged < FEW_GATE_IMAGES:
            log(f"caution: {wanted} passed the gate on {judged} {'decided ' if labels is None else ''}images, too few "
                f"for the figure to say much (a flip is {1 / max(judged, 1):.0%}): give a larger --held-out set "
                f"({FEW_GATE_IMAGES} or more)")
        return Deployable(artifacts / chosen.file, wanted, precision, reports)
    if not chosen.passed and wanted == "int8-cpu" and built is not None and options.max_float_layers > 0:
        chosen.reason += f" (and with up to {options.max_float_layers} layers in float)"
    if not options.allow_fallback:
        raise GateFailed(f"{wanted} failed the accuracy gate and is not deployed: {chosen.reason} "
                         "(use a representative --held-out set, another --calibration-method, or "
                         "--allow-fallback to deploy FP32 instead)")
    log(f"{wanted} failed the accuracy gate ({chosen.reason}); deploying FP32 instead (--allow-fallback)")
    return Deployable(artifacts / MODEL_ONNX, "fp32", "fp32", reports)
