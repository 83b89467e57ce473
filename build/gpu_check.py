"""`make gpu-check`: the first thing to run where a GPU and TensorRT exist (an NGC container), in minutes.

    python -m build.gpu_check                                  # artifacts from configs/deployment.json
    python -m build.gpu_check --artifacts artifacts/efficientnet_lite0 --out benchmarks/results/gpu-check

1. FP32, FP16 and INT8 ONNX from the real exported model (build.precision.fp16, calibrate + quantize: the
   TensorRT Q/DQ file), then a plan of each (build.precision.plans, layer details kept);
2. each plan against ONNX Runtime FP32 through polygraphy's Comparator on held-out images (top-1
   agreement, max |diff| of the probabilities);
3. the layer precisions TensorRT chose (engine inspector): an INT8 plan must run INT8 layers;
4. plan throughput at batch 1, 8 and 32;
5. where a Triton server with the tensorrt backend is here: the INT8 repository served, the bundled
   photos classified;
6. one report: <out>/gpu_check.md and gpu_check.json. Exit status 0 all passed, 1 a step failed,
   3 TensorRT or a GPU is missing (one line saying which, before anything else runs).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

import numpy as np

from build.precision import calibrate, fp16, plans, quantize
from build.precision.imagesets import calibration_set, held_out_set
from build.repository.spec import DEFAULT_SPEC_PATH, DeploymentSpec
from common.contract import MODEL_ONNX, PREPROCESS_JSON
from common.preprocessing import PreprocessConfig

PRECISIONS = ("fp32", "fp16", "int8")
BATCHES = (1, 8, 32)
MIN_AGREEMENT = {"fp32": 0.995, "fp16": 0.99, "int8": 0.9}  # top-1 vs ONNX Runtime FP32 on held-out views
DATATYPES = (("int8", "Int8"), ("fp8", "FP8"), ("half", "Half"), ("fp16", "Half"), ("bf16", "BF16"),
             ("int32", "Int32"), ("fp32", "Float"), ("float", "Float"), ("bool", "Bool"))  # first match wins
HOW_TO_RUN = ("run it inside an NGC container with a GPU, e.g. docker run --gpus all -v $PWD:/work -w /work "
              "nvcr.io/nvidia/tritonserver:<yy.mm>-py3 make gpu-check (docs/gpu.md)")


def preflight() -> str:
    """TensorRT's version, or TensorRTUnavailable saying what is missing and how to run this check."""
    try:
        return plans.require_tensorrt()
    except plans.TensorRTUnavailable as exc:
        raise plans.TensorRTUnavailable(f"make gpu-check: {exc}; {HOW_TO_RUN}") from None


def layer_precisions(info: dict) -> dict:
    """Counts of the engine inspector's layers (JSON, ProfilingVerbosity.DETAILED) by the datatype of their
    outputs, e.g. {"Int8": 40, "Half": 3, "Float": 2}. Layers without details count as "unknown"."""
    counts: dict[str, int] = {}
    for layer in info.get("Layers", []):
        if not isinstance(layer, dict):
            counts["unknown"] = counts.get("unknown", 0) + 1
            continue
        kinds = set()
        for tensor in layer.get("Outputs", []):
            text = str(tensor.get("Format/Datatype", "")).lower()
            kinds.add(next((name for key, name in DATATYPES if key in text), "unknown"))
        for kind in kinds or {"unknown"}:
            counts[kind] = counts.get(kind, 0) + 1
    return counts


def variants(artifacts: Path, config: PreprocessConfig, log) -> dict[str, Path]:
    """The three ONNX files the plans are built from: the exported model, its FP16 and its TensorRT Q/DQ form."""
    out = {"fp32": artifacts / MODEL_ONNX, "fp16": fp16.convert(artifacts / MODEL_ONNX, artifacts / fp16.OUTPUT_NAME)}
    images = calibration_set(config)
    result = calibrate.calibrate(artifacts / MODEL_ONNX, artifacts / "calibration", "max", images, config)
    log(result.message)
    out["int8"] = quantize.quantize(artifacts / MODEL_ONNX, result, "trt", artifacts / quantize.output_name("trt"))
    return out


def build(spec_path: Path, artifacts: Path, precision: str, onnx_path: Path, out: Path) -> dict:
    args = plans.get_args_parser().parse_args([
        "--spec", str(spec_path), "--artifacts", str(artifacts), "--precision", precision, "--onnx", str(onnx_path),
        "--out", str(out / f"model.{precision}.plan"), "--detailed-profile"])
    return plans.main(args)


def onnxrt_runner(onnx_path: Path, name: str = "onnxrt-fp32"):
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx

    return OnnxrtRunner(SessionFromOnnx(str(onnx_path), providers=["cpu"]), name=name)


def compare(onnx_path: Path, plan: Path, batches: list[np.ndarray], precision: str) -> dict:
    """Polygraphy: ONNX Runtime FP32 and the plan on the same held-out batches."""
    return compare_runners(onnxrt_runner(onnx_path), plans.trt_runner(plan, name=f"trt-{precision}"), batches,
                           precision)


def compare_runners(reference, candidate, batches: list[np.ndarray], precision: str) -> dict:
    """Top-1 agreement and max |diff| of the probabilities of two polygraphy runners, and polygraphy's own
    element-wise verdict at a tolerance by precision."""
    from polygraphy.comparator import Comparator, SimpleCompareFunc

    results = Comparator.run([reference, candidate], data_loader=[{"images": b} for b in batches])
    tolerance = {"fp32": 1e-3, "fp16": 1e-2, "int8": 1e-1}[precision]
    close = bool(Comparator.compare_accuracy(results, compare_func=SimpleCompareFunc(atol=tolerance)))
    (_, reference), (_, candidate) = list(results)
    agree = total = 0
    worst = 0.0
    for ref, got in zip(reference, candidate):
        a, b = ref["probabilities"], got["probabilities"]
        agree += int((a.argmax(1) == b.argmax(1)).sum())
        total += len(a)
        worst = max(worst, float(np.abs(a - b).max()))
    agreement = agree / total
    return {"images": total, "top1_agreement": agreement, "max_abs_diff_probabilities": worst,
            f"polygraphy_allclose_atol_{tolerance:g}": close, "passed": agreement >= MIN_AGREEMENT[precision]}


def inspect(plan: Path) -> dict:
    import tensorrt as trt  # type: ignore[import-not-found]

    logger = trt.Logger(trt.Logger.WARNING)
    engine = plans.runtime_for(trt, logger).deserialize_cuda_engine(plan.read_bytes())
    inspector = engine.create_engine_inspector()
    info = json.loads(inspector.get_engine_information(trt.LayerInformationFormat.JSON))
    (plan.parent / f"{plan.stem}.layers.json").write_text(json.dumps(info, indent=1))
    return layer_precisions(info)


def throughput(plan: Path, shape: tuple[int, ...], iterations: int = 50) -> dict[int, float]:
    """Images per second of the plan alone (polygraphy TrtRunner, host<->device copies included)."""
    rates = {}
    with plans.trt_runner(plan) as runner:
        for batch in BATCHES:
            x = np.random.default_rng(0).standard_normal((batch, *shape)).astype(np.float32)
            times = []
            for i in range(iterations + 5):
                runner.infer({"images": x})
                if i >= 5:
                    times.append(runner.last_inference_time())
            rates[batch] = batch / statistics.median(times)
    return rates


def serve(spec_path: Path, artifacts: Path, out: Path) -> dict:
    """Write the INT8 tensorrt repository and classify the bundled photos through Triton, if a server with the
    tensorrt backend is here; otherwise say why not."""
    from build import engines
    from build.repository import capabilities
    from clients.client import ImageClassifierClient
    from common.samples import sample_photos
    from serving.server import TritonServer

    caps = capabilities.detect()
    if "tensorrt" not in caps.server_backends:
        return {"skipped": f"no Triton server with the tensorrt backend here ({caps.line()})"}
    repo = out / "model_repository"
    engines.main(engines.get_args_parser().parse_args([
        "--spec", str(spec_path), "--artifacts", str(artifacts), "--backend", "tensorrt", "--precision", "int8",
        "--out", str(repo)]))
    photos = sample_photos()
    answers = {}
    with TritonServer(repo, log_file=out / "tritonserver.log") as server:
        with ImageClassifierClient(server.http_url, "http") as client:
            for name, path in photos.items():
                answers[name] = [(p.index, round(p.score, 4)) for p in client.classify([path.read_bytes()], 3)[0]]
    return {"repository": str(repo), "answers": answers, "photos": len(answers)}


def report_markdown(report: dict) -> str:
    lines = [f"# make gpu-check, {report['date']}", "",
             f"TensorRT {report['tensorrt']} on {report['gpu'].get('name')} "
             f"(compute capability {report['gpu'].get('compute_capability')}); artifacts `{report['artifacts']}`.", "",
             "| precision | plan built | top-1 agreement vs ORT FP32 | max diff | layers by output type | "
             + " | ".join(f"img/s batch {b}" for b in BATCHES) + " |",
             "|---|---|---|---|---|" + "---|" * len(BATCHES)]
    for p, row in report["precisions"].items():
        cmp = row.get("compare", {})
        rates = row.get("throughput", {})
        lines.append(f"| {p} | {'yes' if row.get('plan') else 'no'} | "
                     f"{cmp.get('top1_agreement', float('nan')):.2%} ({cmp.get('images', 0)} views) | "
                     f"{cmp.get('max_abs_diff_probabilities', float('nan')):.2e} | {row.get('layers', {})} | "
                     + " | ".join(f"{rates.get(b, rates.get(str(b), float('nan'))):.0f}" for b in BATCHES) + " |")
    lines += ["", f"Triton: {json.dumps(report.get('triton'))}", ""]
    lines += [f"- FAILED {f['step']}: {f['error']}" for f in report["failures"]] or ["All steps passed."]
    return "\n".join(lines) + "\n"


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, add_help=add_help,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--spec", default=str(DEFAULT_SPEC_PATH), help="deployment spec JSON (default: %(default)s)")
    p.add_argument("--artifacts", default=None, help="exported model folder (default: the spec's)")
    p.add_argument("--out", default="benchmarks/results/gpu-check", help="plans and report (default: %(default)s)")
    p.add_argument("--held-out", default=None, help="held-out image folder (default: bundled photos, augmented)")
    p.add_argument("--no-serve", action="store_true", help="skip the Triton step")
    p.add_argument("--preflight", action="store_true", help="only check that TensorRT and a GPU are here (exit 0 or 3)")
    return p


def main(args: argparse.Namespace) -> dict:
    tensorrt_version = preflight()  # first: without TensorRT and a GPU nothing else is tried
    if args.preflight:
        print(f"gpu-check: TensorRT {tensorrt_version} and a GPU are here")
        return {"tensorrt": tensorrt_version, "failures": []}
    spec_file = Path(args.spec)
    spec = DeploymentSpec.load(spec_file) if spec_file.exists() else DeploymentSpec()
    artifacts = Path(args.artifacts or spec.artifacts)
    if not (artifacts / MODEL_ONNX).is_file():
        raise FileNotFoundError(f"{artifacts / MODEL_ONNX} not found: make export first")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    spec = spec.replace(artifacts=str(artifacts), max_batch_size=max(spec.max_batch_size, max(BATCHES)))
    spec_path = out / "deployment.json"
    spec.save(spec_path)
    config = PreprocessConfig.load(artifacts / PREPROCESS_JSON)
    report = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "tensorrt": tensorrt_version,
              "gpu": plans.gpu_info(), "artifacts": str(artifacts), "precisions": {p: {} for p in PRECISIONS},
              "failures": []}

    def step(name, fn, *a):
        print(f"gpu-check: {name}", flush=True)
        try:
            return fn(*a)
        except Exception as exc:  # noqa: BLE001 - every step is reported; the next still runs
            traceback.print_exc()
            report["failures"].append({"step": name, "error": f"{exc.__class__.__name__}: {exc}"})
            return None

    onnx_files = step("ONNX variants (fp16 convert, calibrate + quantize)", variants, artifacts, config, print) or {}
    images = held_out_set(config, args.held_out)
    batches = list(images.batches(config, 8))
    for precision, onnx_path in onnx_files.items():
        row = report["precisions"][precision]
        meta = step(f"{precision} plan", build, spec_path, artifacts, precision, onnx_path, out)
        if not meta:
            continue
        plan = Path(meta["plan"]["path"])
        row["plan"] = str(plan)
        row["compare"] = step(f"{precision} vs ONNX Runtime FP32", compare, artifacts / MODEL_ONNX, plan, batches,
                              precision) or {}
        if row["compare"] and not row["compare"]["passed"]:
            report["failures"].append({"step": f"{precision} agreement", "error":
                                       f"top-1 agreement {row['compare']['top1_agreement']:.2%} < "
                                       f"{MIN_AGREEMENT[precision]:.1%}"})
        row["layers"] = step(f"{precision} layer precisions", inspect, plan) or {}
        if precision == "int8" and row["layers"] and not row["layers"].get("Int8"):
            report["failures"].append({"step": "int8 kernels", "error": f"no INT8 layer in the plan: {row['layers']}"})
        row["throughput"] = step(f"{precision} throughput", throughput, plan, config.input_shape) or {}
    report["triton"] = {"skipped": "--no-serve"} if args.no_serve else step("Triton", serve, spec_path, artifacts, out)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (out / "gpu_check.md").write_text(report_markdown(report))
    print(report_markdown(report))
    print(f"gpu-check: report in {out}/gpu_check.md and gpu_check.json")
    return report


if __name__ == "__main__":
    try:
        result = main(get_args_parser().parse_args())
    except plans.TensorRTUnavailable as exc:
        print(exc, file=sys.stderr)
        sys.exit(plans.EXIT_UNAVAILABLE)
    except (OSError, ValueError, RuntimeError) as exc:
        sys.exit(f"build.gpu_check: {exc}")
    sys.exit(1 if result["failures"] else 0)
