"""Structured (channel) pruning of a trained classifier, then fine-tuning: a smaller, faster dense model.

    python -m training.prune --checkpoint runs/digits --target-flops-reduction 0.5 --fine-tune-epochs 2
    python -m training.export --checkpoint runs/digits-pruned

`--ratio R` removes the fraction R of the output channels of every prunable layer in one step;
`--target-flops-reduction F` (the default, 0.5) removes `--ratio-step` more of every layer per step,
re-ranking the channels between steps, until the MACs (multiply-accumulates, torch-pruning's counter;
FLOPs = 2 x MACs, so the reduction is the same) are at most (1 - F) of the original. The classifier
head keeps its outputs. Fine-tuning and evaluation use the source run's data, split and recipe
(optimizer, weight decay, label smoothing, augmentation), with a cosine learning rate from --lr.
How channels are chosen and removed: training.pruning.

Writes to --output-dir (default: <run directory>-pruned): checkpoint.pt (a training.train checkpoint
with a "pruning" field, from which training.checkpoint rebuilds the pruned network), labels.txt,
preprocess.json, args.json (the fine-tuning recipe), prune_report.json (parameters, MACs and conv
channels before and after; validation top-1 before pruning, after pruning, after fine-tuning).
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
from importlib.metadata import version
from pathlib import Path

import torch
from tqdm import tqdm

from training import distributed, engine, presets, recipe, train
from training.checkpoint import FORMAT, LAST, load_checkpoint, model_from_checkpoint, save_checkpoint
from serving.health import number
from training.loop import write_run_files
from training.pruning import CRITERIA, MAX_RATIO, loss_gradients, model_size, prune_channels
from training.state import RunData, load_data

REPORT = "prune_report.json"


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, add_help=add_help,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="training.train checkpoint, or run directory (its best.pt)")
    p.add_argument("--output-dir", type=Path, default=None, help="new run directory (default: <run directory>-pruned)")
    amount = p.add_mutually_exclusive_group()
    amount.add_argument("--ratio", type=number(float, 0, MAX_RATIO, above_low=True), default=None,
                        help=f"fraction of the output channels removed from every prunable layer, in (0, {MAX_RATIO}]")
    amount.add_argument("--target-flops-reduction", type=number(float, 0, 0.99, above_low=True), default=None,
                        help="fraction of the MACs (= FLOPs) to remove, in (0, 0.99]; channels go step by step "
                             "until it is reached (default: 0.5 when --ratio is not given)")
    p.add_argument("--ratio-step", type=number(float, 0, MAX_RATIO, above_low=True), default=0.02,
                   help=f"with --target-flops-reduction: channel fraction removed per step, in (0, {MAX_RATIO}] "
                        "(default: %(default)s)")
    p.add_argument("--criterion", default="l1", choices=CRITERIA,
                   help="channel importance: L1 / L2 norm of the weights, first-order Taylor (|weight x gradient| "
                        "on --importance-batches training batches), random (a baseline) (default: %(default)s)")
    p.add_argument("--importance-batches", type=number(int, 1), default=4,
                   help="taylor: batches per step (default: %(default)s)")
    p.add_argument("--round-to", type=number(int, 1), default=8,
                   help="keep channel counts multiples of this: ONNX Runtime's CPU convolutions ran a pruned Lite0 "
                        "slower than the original with other counts (docs/results/2026-12-02-pruning.md); "
                        "1 = the exact ratio (default: %(default)s)")
    f = p.add_argument_group("fine-tuning and evaluation (default: the source run's own data and recipe)")
    f.add_argument("--fine-tune-epochs", type=number(int, 0), default=2, help="0 = none (default: %(default)s)")
    f.add_argument("--lr", type=number(float, 0, above_low=True), default=None,
                   help="peak learning rate, above 0 (default: the source run's --lr)")
    f.add_argument("--data-dir", default=None, help="training ImageFolder (default: the source run's)")
    f.add_argument("--val-dir", default=None, help="validation ImageFolder (default: the source run's validation images)")
    f.add_argument("--batch-size", type=number(int, 1), default=None, help="(default: the source run's)")
    f.add_argument("--steps-per-epoch", type=number(int, 0), default=None,
                   help="cap on steps per epoch, 0 = whole data (default: the source run's)")
    f.add_argument("--workers", type=number(int, 0), default=2,
                   help="DataLoader worker processes (default: %(default)s)")
    f.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="(default: %(default)s)")
    f.add_argument("--threads", type=number(int, 0), default=0,
                   help="torch intra-op threads, 0 = torch's choice (default: %(default)s)")
    f.add_argument("--no-progress", dest="progress", action="store_false", help="no tqdm bars")
    return p


def check_args(args: argparse.Namespace) -> None:
    """No --ratio means --target-flops-reduction 0.5 (the parser checked each option's range)."""
    if args.ratio is None and args.target_flops_reduction is None:
        args.target_flops_reduction = 0.5


def recipe_args(checkpoint: dict, args: argparse.Namespace) -> argparse.Namespace:
    """The source run's training arguments (training.train's defaults for any it predates), with this
    command's data and fine-tuning options in their place."""
    merged = {**vars(train.get_args_parser().parse_args(["--data-dir", ""])), **checkpoint["args"]}
    overrides = {"data_dir": args.data_dir, "val_dir": args.val_dir, "batch_size": args.batch_size,
                 "steps_per_epoch": args.steps_per_epoch, "lr": args.lr, "workers": args.workers,
                 "epochs": args.fine_tune_epochs, "device": args.device, "progress": args.progress}
    merged.update({k: v for k, v in overrides.items() if v is not None})
    return argparse.Namespace(**merged)


def output_dir(args: argparse.Namespace, source: Path) -> Path:
    """--output-dir or <run>-pruned; never the source run, nor a folder of files this command did not write."""
    out = args.output_dir or source.parent.with_name(source.parent.name + "-pruned")
    if out.resolve() == source.parent.resolve():
        raise ValueError(f"--output-dir {out} is the source run: choose a new directory")
    if out.is_dir() and any(out.iterdir()) and not (out / REPORT).is_file():
        raise ValueError(f"{out} holds files that training.prune did not write: choose another --output-dir")
    return out


def source_loss(rargs: argparse.Namespace, run_data: RunData) -> recipe.ClassificationLoss:
    """The source run's loss: its label smoothing, and its class weights with --class-balance loss."""
    weights = torch.tensor(run_data.weights, dtype=torch.float32) if rargs.class_balance == "loss" else None
    return recipe.ClassificationLoss(rargs.label_smoothing, weights)


def top1(model: torch.nn.Module, run_data: RunData, ctx: distributed.Context, progress: bool) -> float:
    return engine.evaluate(model, run_data.val_loader, ctx, len(run_data.classes), progress=progress)["val_top1"]


def fine_tune(model: torch.nn.Module, run_data: RunData, ctx: distributed.Context, rargs: argparse.Namespace,
              loss: recipe.ClassificationLoss) -> list[dict]:
    """rargs.epochs of the source recipe on the pruned network, cosine LR from rargs.lr; -> metrics per epoch."""
    optimizer = recipe.make_optimizer(model, rargs.optimizer, rargs.lr, rargs.lr, rargs.weight_decay, rargs.momentum)
    scheduler = recipe.make_scheduler(optimizer, recipe.Schedule("cosine", rargs.epochs * run_data.steps, 0))
    mixer = presets.batch_mixer(len(run_data.classes), run_data.augment)
    step = engine.StepConfig(progress=rargs.progress, input_shape=run_data.preprocess.input_shape)
    history = []
    for epoch in range(rargs.epochs):
        run_data.train_sampler.set_epoch(epoch)
        loader = run_data.train_loader
        if run_data.steps < len(loader):
            loader = itertools.islice(loader, run_data.steps)
        metrics = engine.train_one_epoch(model, loader, loss, optimizer, scheduler, ctx, step, epoch, mixer)
        metrics["val_top1"] = top1(model, run_data, ctx, rargs.progress)
        tqdm.write(f"fine-tune epoch {epoch}: train loss {metrics['train_loss']:.4f}, val top-1 {metrics['val_top1']:.2%}")
        history.append(metrics)
    return history


def main(args: argparse.Namespace) -> dict:
    check_args(args)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    checkpoint = load_checkpoint(args.checkpoint)
    source = Path(checkpoint["path"])
    out, rargs = output_dir(args, source), recipe_args(checkpoint, args)
    torch.manual_seed(rargs.seed)
    ctx = distributed.Context(device=distributed.resolve_device(args.device))
    run_data = load_data(rargs, ctx, tqdm.write)
    if run_data.classes != checkpoint["classes"] or run_data.preprocess.to_dict() != checkpoint["preprocess"]:
        raise ValueError(f"the data differs from {source}'s: classes {run_data.classes[:10]} vs "
                         f"{checkpoint['classes'][:10]}, preprocess {run_data.preprocess.to_dict()} vs {checkpoint['preprocess']}")
    model = model_from_checkpoint(checkpoint).to(ctx.device)
    example = torch.zeros((1, *run_data.preprocess.input_shape), device=ctx.device)
    loss = source_loss(rargs, run_data).to(ctx.device)
    before, top1_before = model_size(model, example), top1(model, run_data, ctx, args.progress)
    gradients = loss_gradients(model, run_data.train_loader, loss, args.importance_batches, ctx.device)
    ratio, history = prune_channels(model, example, args.criterion, args.ratio, args.target_flops_reduction,
                                    args.ratio_step, args.round_to, gradients if args.criterion == "taylor" else None,
                                    args.progress)
    after, top1_pruned = model_size(model, example), top1(model, run_data, ctx, args.progress)
    epochs = fine_tune(model, run_data, ctx, rargs, loss) if args.fine_tune_epochs else []
    report = {
        "source": str(source), "checkpoint": str(out / LAST), "criterion": args.criterion, "channel_ratio": ratio,
        "round_to": args.round_to, "target_flops_reduction": args.target_flops_reduction,
        "flops_reduction": 1.0 - after["macs"] / before["macs"],
        "before": before, "after": after, "val_images": len(run_data.val_split.samples),
        "val_top1": {"before": top1_before, "pruned": top1_pruned,
                     "fine_tuned": epochs[-1]["val_top1"] if epochs else None},
        "fine_tune_epochs": args.fine_tune_epochs, "lr": rargs.lr if epochs else None,
    }
    pruning = {"library": f"torch-pruning {version('torch-pruning')}", "input_shape": list(example.shape[1:]),
               "history": (checkpoint.get("pruning") or {}).get("history", []) + history,
               "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "report": report}
    write_run_files(out, rargs, run_data)
    save_checkpoint(pruned_checkpoint(checkpoint, model, rargs, run_data, pruning, epochs), out / LAST)
    (out / REPORT).write_text(json.dumps(report, indent=2) + "\n")
    return report


def pruned_checkpoint(source: dict, model: torch.nn.Module, rargs: argparse.Namespace, run_data: RunData,
                      pruning: dict, epochs: list[dict]) -> dict:
    """A training.train checkpoint of the pruned weights (deployed: "model"; "epoch": the source's) whose
    "pruning" field (history over every pruning since training) rebuilds the network."""
    metrics = dict(epochs[-1]) if epochs else {"val_top1": pruning["report"]["val_top1"]["pruned"]}
    return {
        "format": FORMAT, "model": model.state_dict(), "model_ema": None, "deploy": "model",
        "epoch": source["epoch"], "args": vars(rargs), "architecture": source["architecture"],
        "classes": run_data.classes, "preprocess": run_data.preprocess.to_dict(), "metrics": metrics,
        "pruning": pruning,
        "data": {"train_dir": str(rargs.data_dir), "val_dir": rargs.val_dir,
                 "val_files": [p for p, _ in run_data.val_split.samples],
                 "val_labels": [label for _, label in run_data.val_split.samples]},
    }


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.2%}"


def format_report(report: dict) -> str:
    b, a, top1s = report["before"], report["after"], report["val_top1"]
    rounded = f", counts rounded to multiples of {report['round_to']}" if report["round_to"] > 1 else ""
    rows = [("before pruning", b, top1s["before"]), ("pruned", a, top1s["pruned"]),
            (f"fine-tuned ({report['fine_tune_epochs']} epochs)", a, top1s["fine_tuned"])]
    lines = [f"{'':28s} {'params':>10s} {'MACs':>12s} {'conv channels':>14s} {'val top-1':>10s}"]
    lines += [f"{name:28s} {s['params']:>10,d} {s['macs']:>12,d} {s['conv_channels']:>14,d} {_percent(t):>10s}"
              for name, s, t in rows]
    lines.append(f"MACs (= FLOPs) -{report['flops_reduction']:.1%}, parameters -{1 - a['params'] / b['params']:.1%}; "
                 f"{report['channel_ratio']:.0%} of each prunable layer's channels removed ({report['criterion']}{rounded}); "
                 f"top-1 on {report['val_images']} validation images")
    return "\n".join(lines)


if __name__ == "__main__":
    try:
        result = main(get_args_parser().parse_args())
    except (ValueError, FileNotFoundError) as exc:
        sys.exit(f"training.prune: {exc}")
    run = Path(result["checkpoint"]).parent
    print(format_report(result))
    print(f"wrote {run}/: {LAST}, {REPORT}, labels.txt, preprocess.json, args.json")
    print(f"next: make export-run RUN={run}, then make engines ARTIFACTS=artifacts/{run.name} "
          f"(python -m training.export --checkpoint {run})")
