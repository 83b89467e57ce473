"""The compression table (part of `make bench-precision`): one model and what compression made of it,
side by side, in one run.

    python -m benchmarks.compression --artifacts artifacts/digits --held-out data/digits/val \\
        [--calibration-images data/digits/train]

Rows, each from a folder beside the model's (`<artifacts>-pruned`, `-student`, `-qat`, as
`make export-run`, `training.distill` + export and `make qat` write them; a missing one is listed
with the command that makes it):

    fp32           <artifacts>/model.onnx
    pruned         <artifacts>-pruned/model.onnx             (training.prune, exported)
    student        <artifacts>-student/model.onnx            (training.distill's distilled student, exported)
    int8 ptq       <artifacts>: the INT8 CPU file `make engines PRECISION=int8` deploys (mixed precision
                   when the plain file fails its gate)
    int8 qat       <artifacts>-qat: the same from its learned `qat` cache (METHOD=qat)
    pruned + int8  <artifacts>-pruned: INT8 PTQ of the pruned model

Accuracy is true top-1 where `--held-out` is a labelled ImageFolder, else top-1 agreement with the
fp32 row on the held-out views where that FP32 is decided (the gate's metric). Each INT8 row says
whether it passed its gate. Speed: ONNX Runtime in process with the serving session options, batch 1
and 8, rounds interleaved across the rows so machine noise hits them alike; ratios to the fp32 row.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import json
from pathlib import Path

import numpy as np

from build.precision import quantize, validate
from build.precision.imagesets import held_out_set
from build.precision.variants import GateFailed, VariantOptions, prepare
from build.repository.spec import DeploymentSpec
from common import cpu
from common.contract import MODEL_ONNX, PREPROCESS_JSON
from common.onnxsession import cpu_session
from common.preprocessing import PreprocessConfig, normalize
from serving.health import number

# row -> (folder suffix, precision, calibration method or None)
ROWS = {
    "fp32": ("", "fp32", None),
    "pruned": ("-pruned", "fp32", None),
    "student": ("-student", "fp32", None),
    "int8 ptq": ("", "int8", "ptq"),
    "int8 qat": ("-qat", "int8", "qat"),
    "pruned + int8": ("-pruned", "int8", "ptq"),
}
HOW = {
    "-pruned": "make prune RUN=runs/<run> && make export-run RUN=runs/<run>-pruned ARTIFACTS={folder}",
    "-student": "python -m training.distill --teacher runs/<run>/best.pt --model <student> ... --output-dir runs/<d> && "
                "python -m training.export --checkpoint runs/<d>/student_distilled --output-dir {folder}",
    "-qat": "make qat RUN=runs/<run> QAT_ARGS=\"--artifacts {folder}\"",
}


@dataclasses.dataclass
class Member:
    row: str
    folder: Path
    file: Path | None = None
    gate: str = ""  # INT8: PASS / FAIL and why, float layers
    missing: str = ""  # why the row is empty and how to fill it


def int8_file(folder: Path, method: str, options: VariantOptions, log) -> tuple[Path, str]:
    """The INT8 CPU file `make engines PRECISION=int8` would deploy from `folder` (built, gated, mixed
    precision when the plain file fails), and the gate's verdict in a few words."""
    opts = dataclasses.replace(options, calibration_method="qat" if method == "qat" else options.calibration_method)
    spec = DeploymentSpec(artifacts=str(folder), precision="int8")
    try:
        deployable = prepare(spec, "python-onnxruntime", "unused.json", opts, log)
        report = next(r for r in deployable.reports if r.name == "int8-cpu")
        verdict = f"PASS ({validate.gate_summary(report)})"
    except GateFailed as exc:
        verdict = f"FAIL ({exc})"
    path = folder / quantize.output_name("cpu")
    floats = validate.float_nodes(path)
    return path, verdict + (f", {len(floats)} float layer(s)" if floats else "")


def members(artifacts: Path, options: VariantOptions, log) -> list[Member]:
    found = []
    for row, (suffix, precision, method) in ROWS.items():
        folder = artifacts.with_name(artifacts.name + suffix)
        member = Member(row, folder)
        if not (folder / MODEL_ONNX).exists():
            member.missing = f"no {folder / MODEL_ONNX}: " + HOW.get(suffix, "make export").format(folder=folder)
        elif precision == "fp32":
            member.file = folder / MODEL_ONNX
        elif method == "qat" and not (folder / "calibration" / "qat.cache").exists():
            member.missing = f"no {folder}/calibration/qat.cache: " + HOW["-qat"].format(folder=folder)
        else:
            member.file, member.gate = int8_file(folder, method, options, log)
        found.append(member)
    return found


def outputs(member: Member, held_out: str | None, views: int) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities on the held-out images, a batch of 8 of them), in the member's own preprocessing."""
    config = PreprocessConfig.load(member.folder / PREPROCESS_JSON)
    images = held_out_set(config, held_out, views=views)
    probs = validate.run_all([validate.onnxruntime_runner(member.file, member.row)], images, config, 16)
    return probs[member.row], normalize(images.crops[:8], config)


def measure(artifacts: Path, held_out: str | None, options: VariantOptions, threads: int, rounds: int,
            seconds: float, views: int, log=print) -> list[dict]:
    from benchmarks.precision import throughput

    found = members(artifacts, options, log)
    present = [m for m in found if m.file is not None]
    images = held_out_set(PreprocessConfig.load(artifacts / PREPROCESS_JSON), held_out, views=views)
    labels = validate.held_out_labels(images, held_out, artifacts)
    sessions, batches, scores = {}, {}, {}
    reference = None
    for m in present:  # the fp32 row first: the reference
        probs, batches[m.row] = outputs(m, held_out, views)
        reference = probs if reference is None else reference
        scores[m.row] = validate.compare(reference, probs, labels)
        sessions[m.row] = cpu_session(m.file, threads)
    speed = {b: throughput(sessions, {k: v[:b] for k, v in batches.items()}, rounds, seconds) for b in (1, 8)}
    integer_path = cpu.describe()
    rows = []
    for m in found:
        if m.file is None:
            rows.append({"model": artifacts.name, "row": m.row, "note": m.missing})
            continue
        s = scores[m.row]
        accuracy = s["accuracy"] if labels is not None else (
            s["confident_agreement"] if s["confident_images"] else s["top1_agreement"])
        rows.append({"model": artifacts.name, "row": m.row, "file": str(m.file),
                     "metric": "true top-1" if labels is not None else "decided agreement with fp32",
                     "accuracy": accuracy, "agreement": s["top1_agreement"],
                     "size_mb": m.file.stat().st_size / 2**20,
                     "img_s_b1": speed[1][m.row], "img_s_b8": speed[8][m.row],
                     "x_fp32_b1": speed[1][m.row] / speed[1]["fp32"], "x_fp32_b8": speed[8][m.row] / speed[8]["fp32"],
                     "layout": validate.read_layout(m.file).get(cpu.LAYOUT_KEY, ""), "gate": m.gate,
                     "cpu": integer_path, "note": ""})
    return rows


def format_rows(rows: list[dict]) -> str:
    head = (f"{'model':18s} {'row':14s} {'accuracy':>9s} {'metric':11s} {'MB':>6s} {'b1 img/s':>9s} {'b8 img/s':>9s} "
            f"{'x fp32 b1':>9s} {'x fp32 b8':>9s}  gate")
    lines = [head, "-" * len(head)]
    for r in rows:
        if "accuracy" not in r:
            lines.append(f"{r['model']:18s} {r['row']:14s} {'-':>9s}  {r['note']}")
            continue
        metric = "true top-1" if r["metric"] == "true top-1" else "agreement"
        lines.append(f"{r['model']:18s} {r['row']:14s} {r['accuracy']:9.2%} {metric:11s} {r['size_mb']:6.1f} "
                     f"{r['img_s_b1']:9.1f} {r['img_s_b8']:9.1f} {r['x_fp32_b1']:9.2f} {r['x_fp32_b8']:9.2f}  "
                     f"{r['gate'] or '-'}")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows if "accuracy" in r))
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.5), squeeze=False)
    for ax, model in zip(axes[0], models):
        mine = [r for r in rows if r["model"] == model and "accuracy" in r]
        for r in mine:
            ax.scatter(r["x_fp32_b8"], 100 * r["accuracy"], s=30 + 20 * r["size_mb"])
            ax.annotate(f"{r['row']} ({r['size_mb']:.1f} MB)", (r["x_fp32_b8"], 100 * r["accuracy"]),
                        textcoords="offset points", xytext=(5, 5), fontsize=8)
        ax.set_xlabel("throughput at batch 8, x FP32 (ONNX Runtime CPU)")
        ax.set_ylabel(f"{mine[0]['metric']} (%)")
        ax.set_ylim(top=min(ax.get_ylim()[1], 100.5))  # a percentage
        ax.set_title(model)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write(rows: list[dict], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with open(out / "compression.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    (out / "compression.json").write_text(json.dumps(rows, indent=2))
    if any("accuracy" in r for r in rows):
        plot(rows, out / "compression.png")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifacts", action="append", required=True,
                   help="a model's artifacts folder; its compressed forms beside it (repeat for more models)")
    p.add_argument("--held-out", action="append", default=None,
                   help="per --artifacts, in order: a labelled ImageFolder (true top-1), or 'photos' for the "
                        "bundled held-out views (agreement with FP32) (default: photos)")
    p.add_argument("--calibration-images", action="append", default=None,
                   help="per --artifacts, in order: a folder, or 'photos' (default: photos)")
    p.add_argument("--threads", type=number(int, 0), default=2,
                   help="ONNX Runtime intra-op threads, 0: its default (default: %(default)s)")
    p.add_argument("--rounds", type=number(int, 1), default=5, help="(default: %(default)s)")
    p.add_argument("--seconds", type=number(float, 0, above_low=True), default=2.0,
                   help="per round and row (default: %(default)s)")
    p.add_argument("--views", type=number(int, 1), default=40,
                   help="held-out views per bundled photo (default: %(default)s)")
    p.add_argument("--out", default="benchmarks/results", help="(default: %(default)s)")
    return p


def _per_model(values: list[str] | None, count: int) -> list[str | None]:
    values = list(values or [])
    if len(values) > count:
        raise SystemExit(f"benchmarks.compression: {len(values)} values for {count} --artifacts")
    return [None if v in (None, "photos") else v for v in values + [None] * (count - len(values))]


def main(args: argparse.Namespace) -> list[dict]:
    count = len(args.artifacts)
    rows = []
    for artifacts, held_out, calibration in zip(args.artifacts, _per_model(args.held_out, count),
                                                _per_model(args.calibration_images, count)):
        if not (Path(artifacts) / MODEL_ONNX).exists():
            raise SystemExit(f"benchmarks.compression: no {artifacts}/{MODEL_ONNX}")
        options = VariantOptions(calibration_images=calibration, held_out=held_out)
        rows += measure(Path(artifacts), held_out, options, args.threads, args.rounds, args.seconds, args.views)
    write(rows, Path(args.out))
    print(f"\nCompression table. CPU: {cpu.describe()}; ONNX Runtime, {args.threads} intra-op threads")
    print(format_rows(rows))
    print(f"wrote {Path(args.out) / 'compression.csv'}, .json and .png")
    return rows


if __name__ == "__main__":
    main(get_args_parser().parse_args())
