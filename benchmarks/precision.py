"""`make bench-precision`: every precision variant side by side, in process, in one run.

    python -m benchmarks.precision [--quick]

For the default model (EfficientNet-Lite0, ImageNet weights), ResNet-50 (random weights: its
speed is real, its agreement numbers are not meaningful) and, after `make train-demo`, the model
trained on the digits (calibrated on its training digits, true accuracy on its held-out digits): build the variants (calibration cache
reused when current), then measure ONNX Runtime throughput at batch 1 and 8 with the serving
thread count, rounds interleaved across variants so machine noise hits all of them alike, and
top-1 agreement / top-5 overlap with FP32 on the held-out photos. Writes
benchmarks/results/precision.csv and precision.png; prints the CPU and its integer path, the table
(with each INT8 CPU file's layout) and the INT8 goal check (>= 1.8x FP32 throughput at >= 99% top-1
agreement). Then the compression table for Lite0 and the digits model (benchmarks.compression:
pruned, distilled student, INT8 PTQ and QAT, pruned + INT8 beside FP32; --no-compression skips it).

The INT8 CPU file is built in this CPU's layout (common/cpu.py); on a CPU with VNNI the portable avx2
layout (right on every x86 CPU) is measured beside it as `int8-cpu-avx2`. A CPU without VNNI cannot
run the vnni layout as gated, so there it is not measured, and the output says so.
"""
from __future__ import annotations

import argparse
import csv
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from build.precision import mixed, quantize, validate
from build.precision.calibrate import load_calibration
from build.precision.imagesets import held_out_set
from build.precision.variants import VariantOptions, build_variants
from common import cpu
from common.contract import LABELS_TXT, MODEL_ONNX, ONNX_INPUT, PREPROCESS_JSON
from common.onnxsession import cpu_session
from common.preprocessing import PreprocessConfig, normalize
from serving.health import number

CPU_VARIANTS = ["fp32", "fp16", "int8-cpu", "int8-cpu-mixed", "int8-cpu-avx2", "int8-trt"]
SPEED_NOTES = {"int8-trt": "TensorRT's Q/DQ form, run by ONNX Runtime: its CPU speed says nothing about TensorRT",
               "fp16": "FP16 is a GPU precision; ONNX Runtime's CPU kernels are not tuned for it"}


def ensure_resnet50(out: Path) -> Path:
    """ResNet-50 with random weights (no hub), exported with the project's IO names."""
    if (out / MODEL_ONNX).exists():
        return out
    import torch
    import torchvision

    from training.export import export_torch_to_onnx

    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = torchvision.models.resnet50(weights=None).eval()
    tmp = out / "model.tmp.onnx"
    export_torch_to_onnx(model, tmp, (3, 224, 224), 17)
    PreprocessConfig().save(out / PREPROCESS_JSON)
    (out / LABELS_TXT).write_text("".join(f"class {i}\n" for i in range(1000)))
    tmp.rename(out / MODEL_ONNX)
    return out


def session(path: Path, threads: int) -> ort.InferenceSession:
    return cpu_session(path, threads)


def throughput(sessions: dict[str, ort.InferenceSession], batch: np.ndarray | dict[str, np.ndarray], rounds: int,
               seconds: float) -> dict:
    """Median images/s per session, rounds interleaved (`batch`: one for all, or one per session)."""
    feeds = {name: {ONNX_INPUT: batch[name] if isinstance(batch, dict) else batch} for name in sessions}
    for name, s in sessions.items():
        s.run(None, feeds[name])  # warm up
    samples = {name: [] for name in sessions}
    for _ in range(rounds):
        for name, s in sessions.items():
            count, start = 0, time.perf_counter()
            while time.perf_counter() - start < seconds:
                s.run(None, feeds[name])
                count += 1
            samples[name].append(count * len(feeds[name][ONNX_INPUT]) / (time.perf_counter() - start))
    return {name: statistics.median(v) for name, v in samples.items()}


def bench_model(name: str, artifacts: Path, threads: int, rounds: int, seconds: float, views: int,
                data: Path | None = None, max_float: int = 8) -> list[dict]:
    """`data`: an ImageFolder root with train/ (calibration) and val/ (held out, labelled)."""
    config = PreprocessConfig.load(artifacts / PREPROCESS_JSON)
    options = VariantOptions(calibration_images=str(data / "train") if data else None)
    built = build_variants(artifacts, "int8", options, config, print)
    build_variants(artifacts, "fp16", options, config, print)
    portable_beside_native(artifacts, options.calibration_method)
    images = held_out_set(config, str(data / "val") if data else None, views=views)
    labels = validate.folder_labels(images, data / "val", artifacts / LABELS_TXT) if data else None
    mixed_beside_plain(artifacts, built, config, images, labels, max_float)
    present = [v for v in CPU_VARIANTS if (artifacts / validate.VARIANTS[v][0]).exists()]
    reports = {r.name: r for r in validate.validate(artifacts, [v for v in present if v != "fp32"], images,
                                                       config, validate.THRESHOLDS, labels)}
    sessions = {v: session(artifacts / validate.VARIANTS[v][0], threads) for v in present}
    pixels = normalize(images.crops[:8], config)
    speed = {b: throughput(sessions, pixels[:b], rounds, seconds) for b in (1, 8)}
    rows = []
    for v in present:
        r = reports[v]
        rows.append({"model": name, "variant": v, "img_s_b1": speed[1][v], "img_s_b8": speed[8][v],
                     "x_fp32_b1": speed[1][v] / speed[1]["fp32"], "x_fp32_b8": speed[8][v] / speed[8]["fp32"],
                     "top1_agreement": r.top1_agreement, "confident_agreement": r.confident_agreement,
                     "top5_overlap": r.top5_overlap, "images": r.images, "accuracy": r.accuracy,
                     "layout": r.layout, "float_layers": len(r.float_layers),
                     "size_mb": (artifacts / validate.VARIANTS[v][0]).stat().st_size / 2**20,
                     "cpu": r.gated_on, "note": SPEED_NOTES.get(v, "")})
    return rows


def mixed_beside_plain(artifacts: Path, built, config: PreprocessConfig, images, labels, max_float: int) -> None:
    """When the plain INT8 CPU file fails the gate, write the mixed-precision one beside it (as
    `make engines` would deploy it); else remove a stale one."""
    out = artifacts / validate.VARIANTS["int8-cpu-mixed"][0]
    out.unlink(missing_ok=True)
    plain = validate.validate(artifacts, ["int8-cpu"], images, config, validate.THRESHOLDS, labels)[1]
    if plain.passed or max_float < 1:
        return

    def passes(_: Path) -> tuple[bool, str]:
        report = validate.validate(artifacts, ["int8-cpu-mixed"], images, config, validate.THRESHOLDS, labels)[1]
        return report.passed, validate.gate_summary(report)

    kept = mixed.search(artifacts / MODEL_ONNX, built.calibration, built.layout, out, built.images, config, passes,
                        max_float)
    print(f"int8-cpu-mixed: {len(kept)} float layer(s) pass the gate" if kept is not None else
          f"int8-cpu-mixed: {max_float} float layers do not pass the gate (measured anyway)")


def portable_beside_native(artifacts: Path, method: str) -> None:
    """On a VNNI CPU, write the avx2 layout beside the (vnni) INT8 CPU file; elsewhere remove a stale one."""
    portable = artifacts / validate.VARIANTS["int8-cpu-avx2"][0]
    native = quantize.read_layout(artifacts / quantize.output_name("cpu")).get(cpu.LAYOUT_KEY)
    if native == "vnni":
        calibration = load_calibration(artifacts / "calibration" / f"{method}.cache")
        quantize.quantize(artifacts / MODEL_ONNX, calibration, "cpu", portable, cpu_layout="avx2")
        print(f"wrote {portable} (layout avx2, measured beside the vnni layout)")
    else:
        portable.unlink(missing_ok=True)
        print(f"{cpu.describe()}: the vnni layout is not measured here (this CPU would not answer as it was gated)")


def format_rows(rows: list[dict]) -> str:
    head = (f"{'model':18s} {'variant':14s} {'layout':6s} {'float':>5s} {'MB':>6s} {'b1 img/s':>9s} {'b8 img/s':>9s} "
            f"{'x fp32 b1':>9s} {'x fp32 b8':>9s} {'top-1 agr':>9s} {'decided':>9s} {'top-5 ovl':>9s} {'accuracy':>9s}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['model']:18s} {r['variant']:14s} {r['layout'] or '-':6s} {r['float_layers']:5d} "
                     f"{r['size_mb']:6.1f} {r['img_s_b1']:9.1f} {r['img_s_b8']:9.1f} "
                     f"{r['x_fp32_b1']:9.2f} {r['x_fp32_b8']:9.2f} {r['top1_agreement']:9.2%} "
                     f"{r['confident_agreement']:9.2%} {r['top5_overlap']:9.2%} "
                     + (f"{r['accuracy']:9.2%}" if r["accuracy"] is not None else f"{'-':>9s}"))
    return "\n".join(lines)


def goal_check(rows: list[dict], model: str, variant: str = "int8-cpu") -> str:
    """The INT8 goal: >= 1.8x FP32 throughput at batch 8 with >= 99 % top-1 agreement on the held-out
    images where FP32 is decided (the gate's metric)."""
    int8 = next((r for r in rows if r["model"] == model and r["variant"] == variant), None)
    if int8 is None:
        return f"{model}: no {variant} variant"
    ok_speed, ok_agree = int8["x_fp32_b8"] >= 1.8, int8["confident_agreement"] >= 0.99
    verdict = "MET" if ok_speed and ok_agree else "NOT MET"
    limits = []
    if not ok_speed:
        limits.append(f"speed at batch 8 {int8['x_fp32_b8']:.2f}x < 1.8x")
    if not ok_agree:
        limits.append(f"top-1 agreement {int8['confident_agreement']:.2%} < 99% on the held-out images where FP32 is "
                      f"decided (top-1 - top-2 > {validate.CONFIDENT_MARGIN}); on all {int8['images']}: "
                      f"{int8['top1_agreement']:.2%}")
    return (f"INT8 goal ({model}, {variant}, {int8['layout']} layout, {int8['float_layers']} float layers, "
            f">= 1.8x at batch 8 with >= 99% decided agreement): {verdict}" + ("; " + "; ".join(limits) if limits else ""))


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    widths = [max(4, sum(r["model"] == m for r in rows)) for m in models]  # each variant its own room
    fig, axes = plt.subplots(1, len(models), figsize=(1.5 * sum(widths), 4.4), squeeze=False,
                             gridspec_kw={"width_ratios": widths})
    for ax, model in zip(axes[0], models):
        mine = [r for r in rows if r["model"] == model]
        x = np.arange(len(mine))
        ax.bar(x - 0.2, [r["img_s_b1"] for r in mine], 0.4, label="batch 1")
        ax.bar(x + 0.2, [r["img_s_b8"] for r in mine], 0.4, label="batch 8")
        ax.set_xticks(x, [f"{r['variant']}\n{r['top1_agreement']:.1%} agr" for r in mine], fontsize=8)
        ax.set_ylabel("images/s (ONNX Runtime, in process)")
        ax.set_title(model)
        ax.legend()
    fig.suptitle(f"CPU: {rows[0]['cpu']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifacts", default="artifacts/efficientnet_lite0", help="(default: %(default)s)")
    p.add_argument("--resnet50", default="artifacts/resnet50_random", help="(default: %(default)s)")
    p.add_argument("--no-resnet50", action="store_true")
    p.add_argument("--digits", default="artifacts/digits",
                   help="a model trained on the digits (make train-demo); included with true accuracy when it "
                        "and --digits-data exist (default: %(default)s)")
    p.add_argument("--digits-data", default="data/digits", help="(default: %(default)s)")
    p.add_argument("--threads", type=number(int, 0), default=2,
                   help="ONNX Runtime intra-op threads, 0: its default (default: %(default)s)")
    p.add_argument("--rounds", type=number(int, 1), default=5, help="(default: %(default)s)")
    p.add_argument("--seconds", type=number(float, 0, above_low=True), default=2.0,
                   help="per round and variant (default: %(default)s)")
    p.add_argument("--views", type=number(int, 1), default=40, help="held-out views per photo (default: %(default)s)")
    p.add_argument("--quick", action="store_true", help="2 rounds of 1 s, 10 views")
    p.add_argument("--max-float-layers", type=number(int, 0), default=8,
                   help="mixed precision: an INT8 CPU file that fails the gate is measured again with up to this "
                        "many layers in float, as few as pass, as `make engines` deploys it; 0: no such "
                        "file (default: %(default)s)")
    p.add_argument("--no-compression", dest="compression", action="store_false",
                   help="skip the compression table (benchmarks.compression: pruned, student, INT8 PTQ/QAT beside FP32)")
    p.add_argument("--out", default="benchmarks/results", help="(default: %(default)s)")
    return p


def main(args: argparse.Namespace) -> list[dict]:
    if args.quick:
        args.rounds, args.seconds, args.views = 2, 1.0, 10
    lead = Path(args.artifacts).name  # the model measured (artifacts/efficientnet_lite0 by default)
    models = [(lead, Path(args.artifacts), None)]
    if not args.no_resnet50:
        models.append(("resnet50 (random)", ensure_resnet50(Path(args.resnet50)), None))
    if (Path(args.digits) / MODEL_ONNX).exists() and (Path(args.digits_data) / "val").is_dir():
        models.append(("digits (trained)", Path(args.digits), Path(args.digits_data)))
    else:
        print(f"no {args.digits}/model.onnx or {args.digits_data}/val: `make train-demo` adds the digits model "
              "(true accuracy on real labels)")
    rows = [row for name, path, data in models
            for row in bench_model(name, path, args.threads, args.rounds, args.seconds, args.views, data,
                                   args.max_float_layers)]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "precision.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, out / "precision.png")
    print(f"\nCPU: {cpu.describe()}; ONNX Runtime {ort.__version__}, {args.threads} intra-op threads")
    print(format_rows(rows))
    for variant, note in SPEED_NOTES.items():
        print(f"  {variant}: {note}")
    for variant in ("int8-cpu", "int8-cpu-mixed", "int8-cpu-avx2"):
        if any(r["variant"] == variant for r in rows):
            print(goal_check(rows, lead, variant))
    print(f"wrote {out / 'precision.csv'} and {out / 'precision.png'}")
    if args.compression:
        compression_table(args, [(path, data) for name, path, data in models if not name.startswith("resnet50")])
    return rows


def compression_table(args: argparse.Namespace, models: list[tuple[Path, Path | None]]) -> list[dict]:
    """The compression table for Lite0 and the digits model (benchmarks.compression)."""
    from benchmarks import compression

    argv = []
    for path, data in models:
        argv += ["--artifacts", str(path), "--held-out", str(data / "val") if data else "photos",
                 "--calibration-images", str(data / "train") if data else "photos"]
    argv += ["--threads", str(args.threads), "--rounds", str(args.rounds), "--seconds", str(args.seconds),
             "--views", str(args.views), "--out", args.out]
    return compression.main(compression.get_args_parser().parse_args(argv))


if __name__ == "__main__":
    try:
        main(get_args_parser().parse_args())
    except (RuntimeError, OSError, ValueError) as exc:  # a missing repository or artifacts, a server that fails
        sys.exit(f"benchmarks.precision: {exc}")
