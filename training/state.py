"""What a run trains and on which images, built from the arguments or resumed from a checkpoint.

    load_data          RunData: splits, samplers, loaders, class statistics
    build_state        TrainState: model, optimizer, LR schedule, loss, EMA, early stopping, teacher
    resume             a checkpoint's state back into a TrainState (--resume)
    epoch_checkpoint   the checkpoint of an epoch: what `resume`, evaluation and export read back
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import uuid
import zlib
from typing import Callable

import numpy as np
import torch

from common.preprocessing import PreprocessConfig
from training import data, distributed, networks, presets, recipe
from training.checkpoint import FORMAT, LAST, load_checkpoint, preprocess_from_checkpoint
from training.distillation import Distiller, load_teacher
from training.logs import class_table

Log = Callable[[str], None]


def preprocess_from_args(args: argparse.Namespace) -> PreprocessConfig:
    resize = args.resize_size or int(round(args.crop_size / 0.875))
    return PreprocessConfig(resize=resize, crop=args.crop_size, mean=tuple(args.mean), std=tuple(args.std),
                            interpolation=args.interpolation)


def augment_from_args(args: argparse.Namespace) -> presets.TrainAugment:
    return presets.TrainAugment(
        scale_min=args.scale_min, hflip_prob=args.hflip_prob, auto_augment=args.auto_augment,
        randaugment_magnitude=args.ra_magnitude, color_jitter=args.color_jitter, random_erase=args.random_erase,
        mixup_alpha=args.mixup_alpha, cutmix_alpha=args.cutmix_alpha)


@dataclasses.dataclass
class RunData:
    """The run's images: splits, loaders, and the class statistics the logs and the loss use."""

    preprocess: PreprocessConfig
    augment: presets.TrainAugment
    train_split: data.Split
    val_split: data.Split
    counts: np.ndarray  # training images per class
    weights: np.ndarray | None  # inverse-frequency class weights (--class-balance loss / sampler)
    train_sampler: data.ShardedSampler
    train_loader: torch.utils.data.DataLoader
    val_loader: torch.utils.data.DataLoader
    steps: int  # optimizer steps per epoch

    @property
    def classes(self) -> list[str]:
        return self.train_split.classes

    def class_table(self, recall=None) -> str:
        return class_table(self.classes, self.counts, self.val_split.class_counts(), self.weights, recall)


@dataclasses.dataclass
class TrainState:
    """The model and everything that trains it; `epoch_checkpoint` saves it, `resume` restores it."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    schedule: recipe.Schedule
    scheduler: torch.optim.lr_scheduler.LambdaLR
    criterion: recipe.ClassificationLoss
    scaler: torch.amp.GradScaler | None
    ema: torch.optim.swa_utils.AveragedModel | None
    mixer: presets.BatchMixer | None
    stopper: recipe.EarlyStopping
    distiller: Distiller | None
    run_id: str = dataclasses.field(default_factory=lambda: uuid.uuid4().hex)  # kept by every --resume


def load_data(args: argparse.Namespace, ctx: distributed.Context, log: Log) -> RunData:
    preprocess = preprocess_from_args(args)
    augment = augment_from_args(args)
    train_split, val_split = data.load_splits(args.data_dir, args.val_dir, args.val_fraction, args.split_seed)
    counts = train_split.class_counts()
    weights = data.class_weights(counts) if args.class_balance != "none" else None
    sample_weights = weights[train_split.targets] if args.class_balance == "sampler" else None
    train_sampler = data.ShardedSampler(len(train_split.samples), ctx.rank, ctx.world_size, True, args.seed,
                                        sample_weights, item_seeds=True)
    val_sampler = data.ShardedSampler(len(val_split.samples), ctx.rank, ctx.world_size, False, pad=False)
    pin = ctx.device.type == "cuda"
    train_loader = data.make_loader(data.ImageFolderDataset(train_split, presets.TrainPreset(preprocess, augment)),
                                    train_sampler, args.batch_size, args.workers, pin, drop_last=True)
    val_loader = data.make_loader(
        data.ImageFolderDataset(val_split, presets.EvalPreset(preprocess), draft_size=preprocess.resize),
        val_sampler, args.batch_size, args.workers, pin)
    if len(train_loader) == 0:
        raise ValueError(f"--batch-size {args.batch_size} x {ctx.world_size} process(es) exceeds the "
                         f"{len(train_split.samples)} training images")
    steps = min(len(train_loader), args.steps_per_epoch or len(train_loader))
    run_data = RunData(preprocess, augment, train_split, val_split, counts, weights, train_sampler, train_loader,
                       val_loader, steps)
    log(f"data: {len(train_split.samples)} train / {len(val_split.samples)} val images, {len(run_data.classes)} "
        f"classes, {steps} steps/epoch x {ctx.world_size} process(es), eval preprocess {preprocess.to_dict()}")
    log(run_data.class_table())
    return run_data


def build_state(args: argparse.Namespace, ctx: distributed.Context, run_data: RunData) -> TrainState:
    num_classes, steps = len(run_data.classes), run_data.steps
    model = networks.create_model(args.model, num_classes, args.weights, args.seed).to(ctx.device)
    networks.check_input_size(model, args.model, run_data.preprocess.input_shape, ctx.device)
    backbone_lr = args.lr if args.backbone_lr is None else args.backbone_lr
    optimizer = recipe.make_optimizer(model, args.optimizer, args.lr, backbone_lr, args.weight_decay, args.momentum)
    schedule = recipe.Schedule(args.lr_scheduler, total_steps=args.epochs * steps,
                               warmup_steps=int(args.lr_warmup_epochs * steps), warmup_start=args.lr_warmup_start,
                               min_factor=args.lr_min_factor, restart_steps=int(args.restart_epochs * steps),
                               restart_mult=args.restart_mult)
    scheduler = recipe.make_scheduler(optimizer, schedule)
    loss_weights = torch.tensor(run_data.weights, dtype=torch.float32) if args.class_balance == "loss" else None
    criterion = recipe.ClassificationLoss(args.label_smoothing, loss_weights).to(ctx.device)
    scaler = torch.amp.GradScaler(ctx.device.type) if args.amp == "fp16" else None
    ema = recipe.make_ema(model, args.model_ema_decay) if args.model_ema else None
    mixer = presets.batch_mixer(num_classes, run_data.augment)
    stopper = recipe.EarlyStopping(args.monitor, args.early_stop_patience, args.early_stop_min_delta)
    distiller = None
    if args.teacher:
        teacher, columns = load_teacher(args.teacher, run_data.classes, run_data.preprocess)
        distiller = Distiller(teacher, criterion, args.distill_alpha, args.distill_temperature, columns).to(ctx.device)
    return TrainState(model, optimizer, schedule, scheduler, criterion, scaler, ema, mixer, stopper, distiller)


# What a later session of a run may change: how long this session runs, early stopping, where the run
# writes and runs, what it shows. --epochs too, but it spans the LR schedule, which must not change.
MAY_CHANGE_ON_RESUME = ("epochs", "session_epochs", "early_stop_patience", "early_stop_min_delta", "output_dir",
                        "resume", "workers", "device", "threads", "progress", "tensorboard")
# The data folders may move (another machine, another mount point) when they hold the run's very images: the
# same files, by path within the folders, in the same train / val split (_data_folders).
DATA_FOLDER_ARGS = ("data_dir", "val_dir")
PREPROCESS_ARGS = ("crop_size", "resize_size", "mean", "std", "interpolation")  # compared as the preprocess they make


def check_resumable(checkpoint: dict) -> None:
    """ValueError unless `checkpoint` (load_checkpoint's) holds what a resume needs: an optimizer and LR schedule."""
    made_by = "training.qat" if checkpoint.get("qat") else "training.prune" if checkpoint.get("pruning") else None
    if made_by:
        raise ValueError(f"{checkpoint['path']} is a {made_by} run: it holds no optimizer or LR-schedule state, so "
                         f"it cannot be resumed (run {made_by} again to fine-tune longer)")
    if not (checkpoint.get("optimizer") and checkpoint.get("lr_scheduler")):
        raise ValueError(f"{checkpoint['path']} holds no optimizer or LR-schedule state, so it cannot be resumed; "
                         f"start a new run from it with --weights")


def resume(args: argparse.Namespace, ctx: distributed.Context, state: TrainState, run_data: RunData,
           log: Log) -> tuple[int, dict | None]:
    """Load --resume's checkpoint into `state`; -> (first epoch to train, best metrics so far)."""
    checkpoint = load_checkpoint(args.resume, prefer=LAST)
    check_resumable(checkpoint)
    classes = run_data.classes
    if checkpoint["classes"] != classes or checkpoint["architecture"]["name"] != args.model:
        raise ValueError(f"{checkpoint['path']} is a {checkpoint['architecture']['name']} run on classes "
                         f"{checkpoint['classes'][:10]}; this run is {args.model} on {classes[:10]}")
    moved, refused = _data_folders(checkpoint, args, run_data)
    changed = _changed_settings(checkpoint, args, run_data.preprocess) + refused
    if changed:
        # the checkpoint's weights, optimizer and LR were made with its settings; args.json and
        # preprocess.json would describe the new ones
        raise ValueError(f"{checkpoint['path']} was trained with other settings (checkpoint -> now): "
                         f"{', '.join(changed)}; resume with the run's own arguments (its args.json), or start "
                         f"a new run from it with --weights")
    saved_schedule = (checkpoint["lr_scheduler"].get("lr_lambdas") or [None])[0]
    schedule = dataclasses.asdict(state.schedule)
    if isinstance(saved_schedule, dict) and saved_schedule != schedule:
        # LambdaLR.load_state_dict would silently bring back the old schedule (e.g. LR 0 after its end)
        changed = {k: (saved_schedule.get(k), v) for k, v in schedule.items() if saved_schedule.get(k) != v}
        raise ValueError(f"{checkpoint['path']} was trained with another LR schedule, (checkpoint, now): "
                         f"{changed}; resume with the run's own --epochs, --steps-per-epoch, --batch-size, "
                         f"process count and --lr-* arguments (its args.json), or start anew from it with --weights")
    state.model.load_state_dict(checkpoint["model"])
    state.optimizer.load_state_dict(checkpoint["optimizer"])
    state.scheduler.load_state_dict(checkpoint["lr_scheduler"])
    if state.ema is not None and checkpoint.get("model_ema_full") is not None:
        state.ema.load_state_dict(checkpoint["model_ema_full"])
    if state.scaler is not None and checkpoint.get("scaler"):
        state.scaler.load_state_dict(checkpoint["scaler"])
    state.stopper = recipe.EarlyStopping(args.monitor, args.early_stop_patience, args.early_stop_min_delta,
                                         **checkpoint["early_stopping"])
    state.run_id = checkpoint.get("run_id") or state.run_id
    start_epoch = checkpoint["epoch"] + 1
    if ctx.world_size == 1 and checkpoint.get("rng_state") is not None:
        torch.set_rng_state(checkpoint["rng_state"])  # same MixUp/CutMix and dropout as an uninterrupted run
        if ctx.device.type == "cuda" and checkpoint.get("cuda_rng_state") is not None:
            torch.cuda.set_rng_state(checkpoint["cuda_rng_state"], ctx.device)  # dropout, GPU-side MixUp
    else:
        torch.manual_seed(args.seed + ctx.rank + 1_000_003 * start_epoch)
    log(f"resumed {checkpoint['path']} at epoch {start_epoch}")
    if moved:
        log(f"data folders moved ({', '.join(moved)}): the run's {len(run_data.train_split.samples)} train / "
            f"{len(run_data.val_split.samples)} val images are all there, by path within them")
    if state.stopper.should_stop:
        log(f"{checkpoint['path']} had stopped early ({args.monitor} did not improve for {state.stopper.bad_epochs} "
            f"epochs): nothing left to train; raise --early-stop-patience to continue it")
    return start_epoch, checkpoint.get("best_metrics")


def _plain(value):
    """Tuples and lists, paths and strings compare equal, as args.json writes them."""
    return json.loads(json.dumps(value, default=str))


def _changed_settings(checkpoint: dict, args: argparse.Namespace, preprocess: PreprocessConfig) -> list[str]:
    """'setting old -> new' for each recipe argument and preprocess field that differs from the checkpoint's
    (the data folders: `_data_folders`)."""
    saved, now = checkpoint["args"], vars(args)
    changed = [f"--{key.replace('_', '-')} {_plain(saved[key])} -> {_plain(value)}" for key, value in now.items()
               if key in saved and key not in MAY_CHANGE_ON_RESUME + PREPROCESS_ARGS + DATA_FOLDER_ARGS
               and _plain(saved[key]) != _plain(value)]
    old = preprocess_from_checkpoint(checkpoint).to_dict()
    return changed + [f"preprocess {key} {_plain(old[key])} -> {_plain(value)}"
                      for key, value in preprocess.to_dict().items() if _plain(old[key]) != _plain(value)]


def relative_files(args: argparse.Namespace, run_data: RunData) -> dict[str, list[str]]:
    """The run's train and val images by path within their folder (--data-dir; --val-dir, else --data-dir), in
    the order the samplers index them: what tells, on --resume, that moved folders hold the same split."""
    val_root = args.data_dir if args.val_dir is None else args.val_dir
    return {"train": run_data.train_split.relative_paths(args.data_dir),
            "val": run_data.val_split.relative_paths(val_root)}


def pack_paths(paths: list[str]) -> bytes:
    """`paths` as a checkpoint keeps them: zlib over one per line (ImageNet's 1.28 M training paths are some 40 MB
    as a list, a few MB packed)."""
    return zlib.compress("\n".join(paths).encode(), 6)


def unpack_paths(packed: bytes) -> list[str]:
    text = zlib.decompress(packed).decode()
    return text.split("\n") if text else []


EXAMPLES = 3  # paths named per difference


def _data_folders(checkpoint: dict, args: argparse.Namespace, run_data: RunData) -> tuple[list[str], list[str]]:
    """(moved, refused): 'setting old -> new' for the data folder arguments that differ from the checkpoint's,
    moved when the checkpoint's record of its images is this run's (the same files within the folders, the same
    train / val split), else refused, saying why; folders that did not move but hold other images are refused
    too."""
    saved = checkpoint["args"]
    changed = [f"--{key.replace('_', '-')} {_plain(saved[key])} -> {_plain(getattr(args, key))}"
               for key in DATA_FOLDER_ARGS if key in saved and _plain(saved[key]) != _plain(getattr(args, key))]
    recorded = (checkpoint.get("data") or {}).get("relative_files")
    if recorded is None:  # a checkpoint from before the record: the same folders are taken on trust, as then
        return [], [f"{', '.join(changed)} (the checkpoint predates the record of its images' paths, so whether "
                    f"the new folders hold the same images cannot be told: make them reachable at the old paths, "
                    f"e.g. by a symlink)"] if changed else []
    now = relative_files(args, run_data)
    differences = [d for d in (_differences(name, unpack_paths(recorded[name]), now[name]) for name in ("train", "val"))
                   if d]
    if differences:  # moved or not: images added or removed would change the split and the schedule mid-run
        return [], [f"{', '.join(changed) or 'the data folders'} (other images than the run's: "
                    f"{'; '.join(differences)})"]
    return changed, []


def _differences(name: str, old: list[str], new: list[str]) -> str | None:
    """How the `name` images `new` differ from the run's `old` ones, with a few paths; None if they do not."""
    if old == new:
        return None
    old_set, new_set = set(old), set(new)
    missing, added = [p for p in old if p not in new_set], [p for p in new if p not in old_set]
    parts = [f"{len(paths)} {what} (e.g. {', '.join(paths[:EXAMPLES])})"
             for what, paths in (("of the run's missing", missing), ("not in the run", added)) if paths]
    return f"{name}: {', '.join(parts) or 'the same images in another order'}"


def epoch_checkpoint(args: argparse.Namespace, ctx: distributed.Context, run_data: RunData, state: TrainState,
                     epoch: int, metrics: dict, best_metrics: dict | None) -> dict:
    """What training.checkpoint saves: enough to resume, rebuild, evaluate and export the run."""
    ema = state.ema
    return {
        "format": FORMAT, "run_id": state.run_id, "model": state.model.state_dict(),
        "model_ema": None if ema is None else ema.module.state_dict(),
        "model_ema_full": None if ema is None else ema.state_dict(),
        "deploy": "model" if ema is None else "model_ema",
        "optimizer": state.optimizer.state_dict(), "lr_scheduler": state.scheduler.state_dict(),
        "scaler": None if state.scaler is None else state.scaler.state_dict(),
        "early_stopping": state.stopper.state_dict(), "epoch": epoch, "args": vars(args),
        "rng_state": torch.get_rng_state(),
        "cuda_rng_state": torch.cuda.get_rng_state(ctx.device) if ctx.device.type == "cuda" else None,
        "architecture": {"name": args.model, "num_classes": len(run_data.classes)}, "classes": run_data.classes,
        "preprocess": run_data.preprocess.to_dict(), "metrics": metrics, "best_metrics": best_metrics,
        "data": {"train_dir": str(args.data_dir), "val_dir": args.val_dir,
                 "val_files": [p for p, _ in run_data.val_split.samples],
                 "val_labels": [label for _, label in run_data.val_split.samples],
                 "relative_files": {k: pack_paths(v) for k, v in relative_files(args, run_data).items()}},
    }
