"""Quantization-aware training: fine-tune a trained run with fake quantization where TensorRT quantizes, and hand
build/ the scales it learned, in the calibration cache that carries activation scales there.

    python -m training.qat --checkpoint runs/digits --held-out data/digits/val --epochs 2 --lr 1e-4
    make qat RUN=runs/digits QAT_ARGS="--held-out data/digits/val"

  1. the run as it is: exported to --baseline-artifacts (reused when it holds this checkpoint's export), calibrated
     (--calibration-method, on --calibration-images; a current cache is reused), quantized: the PTQ files to beat;
  2. QAT (training.qat_model): BatchNorms folded into their convolutions, torch.ao fake quantization on every
     Conv2d/Linear input (int8 per tensor) and weight (int8 per channel), input ranges starting from step 1's
     cache; the run's own data and recipe, --epochs at --lr; the ranges stop moving after --observer-epochs;
  3. --output-dir: a run whose checkpoint holds the fine-tuned *float* weights in the run's architecture, so
     `python -m training.export --checkpoint <output-dir>` exports it like any run;
  4. that export (--artifacts) with calibration/qat.cache + qat.json (training.qat_cache): QAT's learned scale on
     each tensor a Conv/Gemm reads, the observed max on the calibration images everywhere else, by ONNX name;
  5. both INT8 files from that cache (build.precision.quantize), and build.precision.validate on the labelled
     --held-out folder before and after: top-1 of FP32, INT8 PTQ, fine-tuned float and INT8 QAT, printed and
     written to <output-dir>/qat.json.
"""
from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import onnx
import torch
from tqdm import tqdm

from build.precision import calibrate, quantize, validate
from build.precision.imagesets import calibration_set, held_out_set
from common.contract import EXPORT_JSON, MODEL_ONNX
from common.hashing import file_sha256
from training import distributed, engine, presets, qat_cache, qat_model, recipe
from training.checkpoint import (FORMAT, LAST, load_checkpoint, model_from_checkpoint, preprocess_from_checkpoint,
                                 save_checkpoint)
from serving.health import SEEDS, number
from training.loop import write_run_files
from training.onnx_export import export_checkpoint
from training.state import load_data

VARIANTS = ("fp32", "int8-cpu", "int8-trt")


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, add_help=add_help,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="the trained run: a run directory or checkpoint file")
    p.add_argument("--output-dir", default=None, help="the QAT run (default: <run directory>-qat)")
    p.add_argument("--artifacts", default=None, help="its export, cache and INT8 files (default: artifacts/<output-dir name>)")
    p.add_argument("--baseline-artifacts", default=None,
                   help="the run's own export, made here if missing (default: artifacts/<run directory name>)")
    d = p.add_argument_group("data (default: the run's)")
    d.add_argument("--data-dir", default=None, help="training ImageFolder")
    d.add_argument("--val-dir", default=None, help="validation ImageFolder, checked after each epoch")
    d.add_argument("--calibration-images", default=None, help="folder: initial ranges, and the ranges of tensors "
                   "QAT does not quantize (default: --data-dir)")
    d.add_argument("--held-out", default=None, help="labelled ImageFolder for the gate's true accuracy (default: --val-dir)")
    d.add_argument("--batch-size", type=number(int, 1), default=None, help="(default: the run's)")
    d.add_argument("--workers", type=number(int, 0), default=2, help="DataLoader worker processes (default: %(default)s)")
    r = p.add_argument_group("recipe")
    r.add_argument("--epochs", type=number(int, 1), default=2, help="(default: %(default)s)")
    r.add_argument("--lr", type=number(float, 0, above_low=True), default=1e-4,
                   help="cosine from here to 0, no warmup (default: %(default)s)")
    r.add_argument("--steps-per-epoch", type=number(int, 0), default=0,
                   help="cap on steps per epoch, 0 = whole data (default: %(default)s)")
    r.add_argument("--observer-epochs", type=number(int, 0), default=1,
                   help="epochs in which the input ranges follow the batches; later ones train with them fixed "
                        "(0: fixed from the start, at the calibrated ranges) (default: %(default)s)")
    r.add_argument("--calibration-method", default="max", choices=calibrate.METHODS,
                   help="the run's cache: initial ranges and the PTQ comparison (default: %(default)s)")
    o = p.add_argument_group("run")
    o.add_argument("--cpu-layout", default="auto", choices=["auto", *quantize.CPU_LAYOUTS],
                   help="INT8 CPU files' layout (build.precision.quantize); auto: this CPU's (default: %(default)s)")
    o.add_argument("--seed", type=number(int, *SEEDS), default=0, help="a 64-bit signed integer (default: %(default)s)")
    o.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="(default: %(default)s)")
    o.add_argument("--threads", type=number(int, 0), default=0,
                   help="torch intra-op threads, 0 = torch's choice (default: %(default)s)")
    o.add_argument("--no-progress", dest="progress", action="store_false", help="no tqdm bars")
    return p


def data_arguments(checkpoint: dict, args: argparse.Namespace) -> argparse.Namespace:
    """The run's own arguments (data, augmentation, recipe), with this command's data and schedule."""
    run = dict(checkpoint["args"])
    overrides = {"data_dir": args.data_dir or run["data_dir"], "val_dir": args.val_dir or run.get("val_dir"),
                 "batch_size": args.batch_size or run["batch_size"], "workers": args.workers, "seed": args.seed,
                 "epochs": args.epochs, "lr": args.lr, "steps_per_epoch": args.steps_per_epoch,
                 "qat": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}
    return argparse.Namespace(**{**run, **overrides})


def held_export(out_dir: Path) -> dict:
    """The source of the export in `out_dir` (its export.json), {} if none."""
    try:
        held = json.loads((out_dir / EXPORT_JSON).read_text())["source"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    return held if isinstance(held, dict) else {}


def holds_other(out_dir: Path, checkpoint_path: Path) -> bool:
    """Whether `out_dir` holds files that are not an export of `checkpoint_path` (by path, or by hash when it
    exists)."""
    if not (out_dir.is_dir() and any(out_dir.iterdir())):
        return False
    held = held_export(out_dir)
    if held.get("kind") == "checkpoint" and Path(held.get("checkpoint", "")).resolve() == checkpoint_path.resolve():
        return False
    return not (checkpoint_path.is_file() and held.get("checkpoint_sha256") == file_sha256(checkpoint_path))


def check_folders(source: Path, out: Path, artifacts: Path, baseline: Path) -> None:
    """Before anything runs: the QAT run goes to a folder of its own (never the source run's, whose checkpoint it
    would overwrite), its export to a folder that is not the baseline's and holds nothing else."""
    if out.resolve() == source.parent.resolve():
        raise ValueError(f"--output-dir {out} is the source run: choose a new directory")
    if out.is_dir() and any(out.iterdir()) and not _is_qat_run(out):
        raise ValueError(f"{out} holds files that training.qat did not write: choose another --output-dir")
    if artifacts.resolve() == baseline.resolve():
        raise ValueError(f"--artifacts {artifacts} is the source run's export (--baseline-artifacts): choose another")
    for folder, option, checkpoint in ((baseline, "--baseline-artifacts", source),
                                       (artifacts, "--artifacts", out / LAST)):
        if holds_other(folder, checkpoint):
            raise ValueError(f"{option} {folder} holds something other than an export of {checkpoint}: "
                             f"choose another folder")


def _is_qat_run(folder: Path) -> bool:
    try:
        return bool(json.loads((folder / "args.json").read_text()).get("qat"))
    except (OSError, ValueError, AttributeError):
        return False


def export_of(checkpoint_path: Path, out_dir: Path, log) -> Path:
    """`out_dir/model.onnx` exported from `checkpoint_path` (training.onnx_export, as training.export does): reused
    when out_dir's export.json names this very file (sha256); refused when out_dir holds anything else."""
    held = held_export(out_dir)
    if held.get("checkpoint_sha256") == file_sha256(checkpoint_path) and (out_dir / MODEL_ONNX).exists():
        log(f"reusing {out_dir}: the export of {checkpoint_path}")
        return out_dir / MODEL_ONNX
    if holds_other(out_dir, checkpoint_path):
        raise ValueError(f"{out_dir} holds something other than an export of {checkpoint_path}: choose another folder")
    result = export_checkpoint(checkpoint_path, out_dir)
    log(f"exported {checkpoint_path} to {out_dir} (PyTorch vs ONNX Runtime: max |logits diff| {result.parity.max_abs_diff:.1e})")
    return result.model_path


def quantize_both(artifacts: Path, calibration: calibrate.Calibration, layout: str, log) -> None:
    for target in quantize.TARGETS:
        out = quantize.quantize(artifacts / MODEL_ONNX, calibration, target, artifacts / quantize.output_name(target),
                                cpu_layout=layout)
        log(f"wrote {out} from {calibration.cache}")


def fine_tune(net: qat_model.QatNetwork, run_data, data_args: argparse.Namespace, ctx: distributed.Context,
              log) -> list[dict]:
    model = net.model.to(ctx.device)
    optimizer = recipe.make_optimizer(model, data_args.optimizer, data_args.lr, data_args.lr, data_args.weight_decay,
                                      data_args.momentum)
    scheduler = recipe.make_scheduler(optimizer, recipe.Schedule("cosine", data_args.epochs * run_data.steps, 0))
    weights = torch.tensor(run_data.weights, dtype=torch.float32) if data_args.class_balance == "loss" else None
    criterion = recipe.ClassificationLoss(data_args.label_smoothing, weights).to(ctx.device)
    step = engine.StepConfig(progress=data_args.qat["progress"], input_shape=run_data.preprocess.input_shape)
    mixer = presets.batch_mixer(len(run_data.classes), run_data.augment)
    loader = run_data.train_loader
    history = []
    for epoch in range(data_args.epochs):
        if epoch == data_args.qat["observer_epochs"]:
            net.freeze_ranges()
            log(f"epoch {epoch}: input ranges fixed from here on")
        run_data.train_sampler.set_epoch(epoch)
        steps = loader if run_data.steps >= len(loader) else itertools.islice(loader, run_data.steps)
        metrics = engine.train_one_epoch(model, steps, criterion, optimizer, scheduler, ctx, step, epoch, mixer)
        with net.ranges_fixed():
            val = engine.evaluate(model, run_data.val_loader, ctx, len(run_data.classes), progress=step.progress)
        metrics["val_top1_fake_quant"] = val["val_top1"]
        history.append({"epoch": epoch, **metrics})
        log(f"epoch {epoch}: train loss {metrics['train_loss']:.4f}, val top-1 with fake quantization {val['val_top1']:.2%}")
    return history


def save_run(out: Path, net: qat_model.QatNetwork, checkpoint: dict, data_args: argparse.Namespace, run_data,
             history: list[dict]) -> Path:
    write_run_files(out, data_args, run_data)
    return save_checkpoint({
        "format": FORMAT, "model": net.float_model().state_dict(), "model_ema": None, "deploy": "model",
        "epoch": len(history) - 1, "args": vars(data_args), "architecture": checkpoint["architecture"],
        "classes": checkpoint["classes"], "preprocess": run_data.preprocess.to_dict(), "metrics": history[-1],
        "best_metrics": None, "pruning": checkpoint.get("pruning"),  # a pruned run stays pruned
        "data": {"train_dir": str(data_args.data_dir), "val_dir": data_args.val_dir,
                 "val_files": [p for p, _ in run_data.val_split.samples],
                 "val_labels": [label for _, label in run_data.val_split.samples]},
        "qat": {"source": checkpoint["path"], "source_sha256": file_sha256(Path(checkpoint["path"])),
                "input_scales": {",".join(q.modules): q.scale for q in net.inputs}, "folded": net.folded},
    }, out / LAST)


def gate_both(folders: dict[str, Path], held_out: str, config, log) -> dict[str, list[validate.VariantReport]]:
    images = held_out_set(config, held_out)
    reports = {}
    for name, artifacts in folders.items():
        labels = validate.held_out_labels(images, held_out, artifacts)
        if labels is None:
            raise ValueError(f"--held-out {held_out} is not an ImageFolder of the run's classes: no true accuracy")
        reports[name] = validate.validate(artifacts, list(VARIANTS[1:]), images, config, dict(validate.THRESHOLDS), labels)
        log(f"{artifacts} ({name}), {images.description}:\n{validate.format_table(reports[name])}")
    return reports


def ptq_files(source: Path, baseline: Path, method: str, images, config, layout: str, log) -> calibrate.Calibration:
    """Step 1: the run exported, calibrated and quantized as `make engines` would; its calibration."""
    onnx_path = export_of(source, baseline, log)
    ptq = calibrate.calibrate(onnx_path, baseline / "calibration", method, images, config)
    log(ptq.message)
    quantize_both(baseline, ptq, layout, log)
    return ptq


def qat_files(run: Path, artifacts: Path, net: qat_model.QatNetwork, images, config, layout: str,
              log) -> calibrate.Calibration:
    """Step 4: the QAT run exported, its qat cache written, both INT8 files quantized from it; the cache."""
    onnx_path = export_of(run / LAST, artifacts, log)
    scales = qat_cache.learned_scales(net, onnx.load(str(onnx_path)))
    cache = qat_cache.write_qat_cache(onnx_path, artifacts / "calibration", scales, images, config,
                                      {"checkpoint": str(run / LAST)})
    log(f"wrote {cache.cache}: {len(cache.scales)} tensors, {len(scales)} with QAT's learned scale")
    quantize_both(artifacts, cache, layout, log)
    return cache


def main(args: argparse.Namespace) -> dict:
    log = tqdm.write
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    checkpoint = load_checkpoint(args.checkpoint)
    source = Path(checkpoint["path"])
    out = Path(args.output_dir or f"{source.parent}-qat")
    artifacts = Path(args.artifacts or Path("artifacts") / out.name)
    baseline = Path(args.baseline_artifacts or Path("artifacts") / source.parent.name)
    check_folders(source, out, artifacts, baseline)
    config = preprocess_from_checkpoint(checkpoint)
    data_args = data_arguments(checkpoint, args)
    held_out = args.held_out or data_args.val_dir
    if not held_out:
        raise ValueError("the run split its validation images off its training folder: pass --held-out DIR")
    calibration_dir = str(args.calibration_images or data_args.data_dir)
    images = calibration_set(config, calibration_dir)
    layout = quantize.default_layout() if args.cpu_layout == "auto" else args.cpu_layout

    log(f"1/5 the run as it is, INT8 by calibration ({args.calibration_method}) on {images.description}")
    ptq = ptq_files(source, baseline, args.calibration_method, images, config, layout, log)
    log("2/5 quantization-aware fine-tuning")
    ctx = distributed.Context(device=distributed.resolve_device(args.device))
    run_data = load_data(data_args, ctx, log)
    net = qat_model.prepare(model_from_checkpoint(checkpoint), config.input_shape)
    qat_cache.start_ranges(net, onnx.load(str(baseline / MODEL_ONNX)), ptq)
    log(f"{len(net.folded)} BatchNorms folded; {len(net.calls)} Conv2d/Linear fake-quantized, reading "
        f"{len(net.inputs)} tensors; input ranges start from {ptq.cache}")
    history = fine_tune(net, run_data, data_args, ctx, log)
    float_top1 = engine.evaluate(net.float_model().to(ctx.device), run_data.val_loader, ctx, len(run_data.classes))
    log(f"fine-tuned float model, PyTorch: val top-1 {float_top1['val_top1']:.2%}")
    log(f"3/5 the float run: {save_run(out, net, checkpoint, data_args, run_data, history)}")
    log("4/5 its export and the QAT calibration cache")
    cache = qat_files(out, artifacts, net, images, config, layout, log)
    log("5/5 the gate on the held-out images, before and after")
    reports = gate_both({"ptq": baseline, "qat": artifacts}, held_out, config, log)
    report = {"checkpoint": str(source), "run": str(out), "artifacts": str(artifacts),
              "baseline_artifacts": str(baseline), "held_out": held_out, "calibration_dir": calibration_dir,
              "calibration_images": images.description, "cache": str(cache.cache),
              "learned_tensors": len(cache.meta["qat"]["learned_tensors"]), "epochs": history,
              "val_top1_float_pytorch": float_top1["val_top1"], **summarize(reports)}
    (out / "qat.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def summarize(reports: dict[str, list[validate.VariantReport]]) -> dict:
    """Top-1 per variant before (ptq) and after (qat), the gate's verdicts, and a table of the top-1s."""
    top1 = {kind: {r.name: r.accuracy for r in rs} for kind, rs in reports.items()}
    passed = {kind: {r.name: r.passed for r in rs if r.name != "fp32"} for kind, rs in reports.items()}
    rows = {"ptq": "before QAT (PTQ)", "qat": "after QAT"}
    lines = [f"  {'top-1':18s} " + " ".join(f"{v:>9s}" for v in VARIANTS)]
    lines += [f"  {rows[kind]:18s} " + " ".join(f"{top1[kind][v]:9.2%}" for v in VARIANTS) for kind in reports]
    return {"top1": top1, "gate_passed": passed, "table": "\n".join(lines),
            "validation": {kind: [vars(r) for r in rs] for kind, rs in reports.items()}}


def next_step(report: dict) -> str:
    return (f"next: make engines ARTIFACTS={report['artifacts']} PRECISION=int8 METHOD=qat "
            f"ENGINES_ARGS=\"--calibration-images {report['calibration_dir']} --held-out {report['held_out']}\" "
            "(deploys the QAT INT8 file if it passes the gate)")


if __name__ == "__main__":
    import sys

    try:
        result = main(get_args_parser().parse_args())
    except (OSError, RuntimeError, ValueError) as exc:
        sys.exit(f"training.qat: {exc}")
    print(f"top-1 on {result['held_out']} (build.precision.validate):\n{result['table']}")
    print(json.dumps({k: result[k] for k in ("run", "artifacts", "cache", "top1", "gate_passed")}, indent=2))
    print(next_step(result))
