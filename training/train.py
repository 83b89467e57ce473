"""Fine-tune a classifier on any ImageFolder (`root/<class>/<image>`); checkpoints ready for export.

    python -m training.train --data-dir data/digits/train --val-dir data/digits/val \\
        --crop-size 64 --resize-size 64 --epochs 3 --output-dir runs/digits
    torchrun --nproc-per-node 2 -m training.train ...          # data parallel (gloo on CPU, nccl on GPU)
    python -m training.export --checkpoint runs/digits --output-dir artifacts/digits

Writes to --output-dir: checkpoint.pt (last; --resume it), best.pt (best --monitor), labels.txt,
preprocess.json (the eval = serving preprocess), args.json, metrics.csv / metrics.jsonl per epoch
(with --model-ema the val_* columns are the EMA weights', model_val_top1 the raw weights' top-1),
tensorboard/, summary.json (best metrics, per-class recall, skipped files, each rank's weight digest).
Pretrained start: the bundled ImageNet EfficientNet-Lite0 (default). Other timm/torchvision models
start from random weights or from a local --weights file; nothing is downloaded.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from common.preprocessing import IMAGENET_MEAN, IMAGENET_STD, INTERPOLATIONS
from training import models
from serving.health import SEEDS, number
from training.loop import run
from training.presets import AUTO_AUGMENTS
from training.recipe import MONITORS, OPTIMIZERS, SCHEDULERS

CLASS_BALANCE = ("none", "loss", "sampler")
AMP = ("none", "bf16", "fp16")


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, add_help=add_help,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    d = p.add_argument_group("data")
    d.add_argument("--data-dir", required=True, help="training ImageFolder: <dir>/<class>/<image>")
    d.add_argument("--val-dir", default=None, help="validation ImageFolder with the same classes "
                   "(default: a stratified --val-fraction split of --data-dir)")
    d.add_argument("--val-fraction", type=number(float, 0, 1, above_low=True, below_high=True), default=0.2,
                   help="validation share without --val-dir (default: %(default)s)")
    d.add_argument("--split-seed", type=number(int, 0), default=0, help="seed of that split (default: %(default)s)")
    d.add_argument("--crop-size", type=number(int, 1), default=224, help="model input side (default: %(default)s)")
    d.add_argument("--resize-size", type=number(int, 1), default=None, help="eval: shorter side before the centre crop (default: crop / 0.875)")
    d.add_argument("--interpolation", default="bilinear", choices=sorted(INTERPOLATIONS), help="(default: %(default)s)")
    d.add_argument("--mean", type=number(float, 0, 1), nargs=3, default=IMAGENET_MEAN,
                   help="per-channel mean of pixels scaled to [0, 1] (default: %(default)s)")
    d.add_argument("--std", type=number(float, 0, above_low=True), nargs=3, default=IMAGENET_STD, help="(default: %(default)s)")
    d.add_argument("--batch-size", type=number(int, 1), default=64, help="per process (default: %(default)s)")
    d.add_argument("--workers", type=number(int, 0), default=2, help="DataLoader worker processes (default: %(default)s)")
    d.add_argument("--class-balance", default="none", choices=CLASS_BALANCE,
                   help="imbalanced classes: inverse-frequency loss weights or a weighted sampler (default: %(default)s)")
    a = p.add_argument_group("augmentation")
    a.add_argument("--scale-min", type=number(float, 0, 1), default=0.35, help="RandomResizedCrop minimum area (default: %(default)s)")
    a.add_argument("--hflip-prob", type=number(float, 0, 1), default=0.5, help="(default: %(default)s)")
    a.add_argument("--auto-augment", default="trivialaugment", choices=AUTO_AUGMENTS, help="(default: %(default)s)")
    a.add_argument("--ra-magnitude", type=number(int, 0), default=9, help="RandAugment magnitude (default: %(default)s)")
    a.add_argument("--color-jitter", type=number(float, 0), default=0.2, help="brightness/contrast/saturation (default: %(default)s)")
    a.add_argument("--random-erase", type=number(float, 0, 1), default=0.1, help="RandomErasing probability (default: %(default)s)")
    a.add_argument("--mixup-alpha", type=number(float, 0), default=0.0, help="batch MixUp, 0 = off (default: %(default)s)")
    a.add_argument("--cutmix-alpha", type=number(float, 0), default=0.0, help="batch CutMix, 0 = off (default: %(default)s)")
    m = p.add_argument_group("model")
    m.add_argument("--model", default=models.BUNDLED_EFFICIENTNET_LITE0,
                   help="bundled-efficientnet-lite0 (ImageNet weights), timm/<name> or torchvision/<name> "
                        "(random init: no hub downloads) (default: %(default)s)")
    m.add_argument("--weights", default=None, help="start from this local state dict or checkpoint (default: none)")
    m.add_argument("--freeze-epochs", type=number(int, 0), default=0, help="train only the head for this many epochs (default: %(default)s)")
    m.add_argument("--unfreeze-stages", type=number(int, 0), default=0,
                   help="then unfreeze the backbone in this many stages, one per epoch, top first; 0 = all at once (default: %(default)s)")
    m.add_argument("--teacher", default=None, help="distil from a checkpoint or bundled-efficientnet-lite0 (default: none)")
    m.add_argument("--distill-alpha", type=number(float, 0, 1), default=0.5,
                   help="weight of the teacher term; the label term gets 1 - it (default: %(default)s)")
    m.add_argument("--distill-temperature", type=number(float, 0, above_low=True), default=4.0,
                   help="softens both sides' logits (default: %(default)s)")
    r = p.add_argument_group("recipe")
    r.add_argument("--epochs", type=number(int, 1), default=10, help="(default: %(default)s)")
    r.add_argument("--steps-per-epoch", type=number(int, 0), default=0, help="cap on steps per epoch, 0 = whole data (default: %(default)s)")
    r.add_argument("--optimizer", default="adamw", choices=OPTIMIZERS, help="(default: %(default)s)")
    r.add_argument("--lr", type=number(float, 0), default=1e-3, help="head learning rate (default: %(default)s)")
    r.add_argument("--backbone-lr", type=number(float, 0), default=None, help="backbone learning rate (default: --lr)")
    r.add_argument("--momentum", type=number(float, 0, 1, below_high=True), default=0.9, help="SGD momentum (default: %(default)s)")
    r.add_argument("--weight-decay", type=number(float, 0), default=0.05, help="(default: %(default)s)")
    r.add_argument("--lr-scheduler", default="cosine", choices=SCHEDULERS, help="(default: %(default)s)")
    r.add_argument("--lr-warmup-epochs", type=number(float, 0), default=1.0, help="linear warmup (default: %(default)s)")
    r.add_argument("--lr-warmup-start", type=number(float, 0, 1), default=0.01, help="warmup starts at this x lr (default: %(default)s)")
    r.add_argument("--lr-min-factor", type=number(float, 0, 1), default=0.0, help="cosine floor as a fraction of lr (default: %(default)s)")
    r.add_argument("--restart-epochs", type=number(float, 0), default=0, help="cosine-restarts: first cycle (default: %(default)s)")
    r.add_argument("--restart-mult", type=number(int, 1), default=1, help="cosine-restarts: cycle growth (default: %(default)s)")
    r.add_argument("--label-smoothing", type=number(float, 0, 1, below_high=True), default=0.1, help="(default: %(default)s)")
    r.add_argument("--amp", default="none", choices=AMP, help="autocast: bf16 (CPU or GPU), fp16 (GPU) (default: %(default)s)")
    r.add_argument("--clip-grad-norm", type=number(float, 0), default=0.0, help="0 = off (default: %(default)s)")
    r.add_argument("--model-ema", action="store_true", help="keep an EMA of the weights and deploy it")
    r.add_argument("--model-ema-decay", type=number(float, 0, 1, above_low=True, below_high=True), default=0.999,
                   help="per step (default: %(default)s)")
    r.add_argument("--monitor", default="val_top1", choices=sorted(MONITORS), help="best.pt / early stopping (default: %(default)s)")
    r.add_argument("--early-stop-patience", type=number(int, 0), default=0, help="epochs without improvement, 0 = off (default: %(default)s)")
    r.add_argument("--early-stop-min-delta", type=number(float, 0), default=0.0, help="(default: %(default)s)")
    o = p.add_argument_group("run")
    o.add_argument("--output-dir", default="runs/train", help="run directory; one holding a run only with "
                   "--resume (default: %(default)s)")
    o.add_argument("--resume", default=None, help="continue from a checkpoint.pt or run directory, with that run's "
                   "arguments (only --session-epochs, --early-stop-patience/-min-delta, output, workers, device, threads "
                   "and logging may change, and the data folders' paths when they hold the run's images; an "
                   "early-stopped run stays stopped) (default: none)")
    o.add_argument("--session-epochs", type=number(int, 0), default=0,
                   help="stop after this many epochs in this invocation, to --resume later (time-sliced or "
                        "preemptible machines); 0 = run to --epochs (default: %(default)s)")
    o.add_argument("--seed", type=number(int, *SEEDS), default=0, help="a 64-bit signed integer (default: %(default)s)")
    o.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="(default: %(default)s)")
    o.add_argument("--threads", type=number(int, 0), default=0, help="torch intra-op threads per process, 0 = torch's choice (default: %(default)s)")
    o.add_argument("--no-progress", dest="progress", action="store_false", help="no tqdm bars")
    o.add_argument("--no-tensorboard", dest="tensorboard", action="store_false", help="no TensorBoard event files")
    return p


def main(args: argparse.Namespace) -> dict:
    return run(args)


def next_step(summary: dict) -> str:
    """The command to run after this one: --resume while epochs are left, else export and build."""
    run_dir = Path(summary["output_dir"])
    if not summary["finished"]:
        return f"next: the same command with --resume {run_dir} added, to train the epochs that are left"
    return (f"next: make export-run RUN={run_dir}, then make engines ARTIFACTS=artifacts/{run_dir.name} "
            f"(python -m training.export --checkpoint {run_dir}; make evaluate RUN={run_dir} for a per-class report)")


if __name__ == "__main__":
    try:
        summary = main(get_args_parser().parse_args())
    except (ValueError, FileNotFoundError) as exc:
        sys.exit(f"error: {exc}")
    if summary["rank"] == 0:
        print(json.dumps({k: summary[k] for k in ("output_dir", "best")}, indent=2))
        print(next_step(summary))
