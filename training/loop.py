"""The body of `python -m training.train`, as the steps a run goes through:

    run
      check_run             what can be refused before anything is written (--amp, --output-dir)
      state.load_data       splits, samplers, loaders, the class table
      state.build_state     model, optimizer, LR schedule, loss, EMA, early stopping, teacher
      state.resume          a checkpoint's state back (--resume)
      write_run_files       labels.txt, preprocess.json, args.json
      carry_records         resumed into another folder: the run's best.pt and metrics come along
      train_epochs          per epoch: freeze/unfreeze, train_and_evaluate, log, save_epoch, stop?
      finish                summary.json, the check that every rank holds the same weights

Top to bottom, like torchvision's main.
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch
from tqdm import tqdm

from common.labels import write_labels
from training import data, distributed, engine, networks
from training.checkpoint import BEST, LAST, load_checkpoint, resolve_checkpoint_path, save_checkpoint
from training.logs import RunLog
from training.state import (Log, RunData, TrainState, build_state, check_resumable, epoch_checkpoint, load_data,
                            resume)


def run(args: argparse.Namespace) -> dict:
    ctx = distributed.init(args.device)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed + ctx.rank)  # MixUp/CutMix and dropout differ per rank; weights come from rank 0
    # (DDP); image augmentation has its own seed per sample and epoch (data.ShardedSampler item_seeds)
    out = Path(args.output_dir)
    check_run(args, ctx, out)
    log = (lambda text: tqdm.write(text)) if ctx.is_main else (lambda text: None)

    run_data = load_data(args, ctx, log)
    state = build_state(args, ctx, run_data)
    teacher_top1 = None
    if state.distiller is not None:
        teacher_top1 = engine.evaluate(state.distiller.teacher_on_classes(), run_data.val_loader, ctx,
                                       len(run_data.classes))["val_top1"]
        log(f"teacher {args.teacher}: val top-1 {teacher_top1:.2%}")
    start_epoch, best_metrics = resume(args, ctx, state, run_data, log) if args.resume else (0, None)
    if ctx.is_main:
        write_run_files(out, args, run_data)
        if args.resume:
            carry_records(resolve_checkpoint_path(args.resume, prefer=LAST), start_epoch - 1, best_metrics, out, log)
    runlog = RunLog(out, ctx.is_main, args.tensorboard, resume=bool(args.resume), first_epoch=start_epoch)
    skipped = SkippedImages(ctx)
    last_epoch, best_metrics = train_epochs(args, ctx, run_data, state, runlog, skipped, start_epoch, best_metrics,
                                            out, log)
    runlog.close()
    return finish(args, ctx, run_data, state, skipped, out, start_epoch, last_epoch, best_metrics, teacher_top1, log)


# The files that make a folder a run's: a new run there would overwrite its checkpoints and wipe its history.
RUN_RECORDS = (LAST, BEST, "metrics.csv", "metrics.jsonl", "summary.json")


def check_run(args: argparse.Namespace, ctx: distributed.Context, out: Path) -> None:
    """Refuse, before anything is written, --amp fp16 without a GPU, a new run (no --resume) in a folder
    that already holds one, and a run resumed into a folder that holds another."""
    if args.amp == "fp16" and ctx.device.type != "cuda":
        raise ValueError("--amp fp16 needs a GPU; on CPU use --amp bf16 or none")
    held = [name for name in RUN_RECORDS if (out / name).exists()]
    if not held:
        return
    if not args.resume:
        raise ValueError(f"{out} already holds a run ({', '.join(held)}): --resume {out} to continue it, or "
                         f"choose another --output-dir")
    resumed = load_checkpoint(args.resume, prefer=LAST)
    check_resumable(resumed)  # the plainer refusal first
    if Path(resumed["path"]).parent.resolve() != out.resolve() and not _holds_run_of(out, resumed.get("run_id")):
        raise ValueError(f"{out} holds another run's files ({', '.join(held)}), not those of the run in "
                         f"{Path(resumed['path']).parent}: choose another --output-dir, or --resume {out} to continue "
                         "the run there")


def _holds_run_of(out: Path, run_id: str | None) -> bool:
    """Whether every checkpoint in `out` is of the run `run_id` (a checkpoint's)."""
    theirs = {load_checkpoint(out / name).get("run_id") for name in (LAST, BEST) if (out / name).is_file()}
    return run_id is not None and theirs == {run_id}


def carry_records(resumed: Path, epoch: int, best: dict | None, out: Path, log: Log) -> None:
    """A run resumed (from checkpoint `resumed` of `epoch`) into another folder brings its best.pt (the checkpoint
    of its best epoch so far) and per-epoch metrics along, so that export and evaluation there read the best
    epoch, not the last."""
    source = resumed.parent
    if source.resolve() == out.resolve():
        return
    for name in ("metrics.csv", "metrics.jsonl"):
        if (source / name).is_file() and not (out / name).exists():
            shutil.copy2(source / name, out / name)
    if best is None or (out / BEST).exists():
        return
    origin = resumed if best["epoch"] == epoch else source / BEST
    if origin != resumed and not (origin.is_file() and load_checkpoint(origin)["epoch"] == best["epoch"]):
        log(f"no {BEST} of epoch {best['epoch']} (the best so far) beside {resumed}: {out / BEST} will be the best "
            f"of the epochs trained from here")
        return
    shutil.copy2(origin, out / BEST)
    log(f"carried {origin} over as {out / BEST} (epoch {best['epoch']}, the best so far)")


def write_run_files(out: Path, args: argparse.Namespace, run_data: RunData) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_labels(out / "labels.txt", run_data.classes)
    run_data.preprocess.save(out / "preprocess.json")
    (out / "args.json").write_text(json.dumps(vars(args), indent=2, default=str) + "\n")


# --- epochs --------------------------------------------------------------------------------------


def train_epochs(args: argparse.Namespace, ctx: distributed.Context, run_data: RunData, state: TrainState,
                 runlog: RunLog, skipped: SkippedImages, start_epoch: int, best_metrics: dict | None, out: Path,
                 log: Log) -> tuple[int, dict | None]:
    """Train from `start_epoch` until --epochs, early stopping or the end of the session;
    -> (last epoch trained, start_epoch - 1 if none; best metrics)."""
    end_epoch = start_epoch if state.stopper.should_stop else args.epochs
    step_config = engine.StepConfig(args.amp, args.clip_grad_norm, args.progress, run_data.preprocess.input_shape)
    wrapped, opened, epoch = None, None, start_epoch - 1
    for epoch in range(start_epoch, end_epoch):
        started = time.perf_counter()
        stages_open = networks.trainable_stages(epoch, args.freeze_epochs, args.unfreeze_stages)
        if stages_open != opened or wrapped is None:  # DDP must see the trainable set it reduces
            trainable = networks.apply_freezing(state.model, stages_open, args.unfreeze_stages)
            wrapped, opened = _wrap(state.model, ctx), stages_open
            log(f"epoch {epoch}: {trainable} trainable tensors (backbone stages open: "
                f"{'all' if stages_open < 0 else stages_open})")
        metrics = train_and_evaluate(args, ctx, run_data, state, wrapped, epoch, step_config, skipped)
        metrics["epoch_seconds"] = time.perf_counter() - started
        improved = state.stopper.update(metrics)
        if improved:
            best_metrics = {"epoch": epoch, **_without_confusion(metrics)}
        log(runlog.epoch(epoch, _without_confusion(metrics)))
        if ctx.is_main:
            save_epoch(out, epoch_checkpoint(args, ctx, run_data, state, epoch, metrics, best_metrics), improved)
        if args.session_epochs and epoch + 1 - start_epoch >= args.session_epochs and epoch + 1 < args.epochs:
            log(f"stopping after {args.session_epochs} epoch(s) of this session: --resume {out} to continue")
            break
        if state.stopper.should_stop:
            log(f"early stopping: {args.monitor} did not improve for {state.stopper.bad_epochs} epochs")
            break
    return epoch, best_metrics


def train_and_evaluate(args: argparse.Namespace, ctx: distributed.Context, run_data: RunData, state: TrainState,
                       wrapped: torch.nn.Module, epoch: int, step_config: engine.StepConfig,
                       skipped: SkippedImages) -> dict:
    """One epoch of training, then validation of the weights to deploy (the EMA's, with --model-ema)."""
    model, ema, num_classes = state.model, state.ema, len(run_data.classes)
    run_data.train_sampler.set_epoch(epoch)
    train_set, val_set = run_data.train_loader.dataset, run_data.val_loader.dataset
    metrics = engine.train_one_epoch(
        wrapped, _limit(run_data.train_loader, run_data.steps), state.criterion, state.optimizer, state.scheduler,
        ctx, step_config, epoch, state.mixer, ema, state.scaler, state.distiller,
        lambda indices: skipped.report(train_set, indices))
    if metrics["train_images"] == 0:  # every step was a zero-loss dummy step: nothing was learnt
        raise ValueError(f"epoch {epoch}: not one training image could be read ({skipped.example(train_set)}); "
                         f"fix or remove the unreadable files in {args.data_dir}")
    distributed.average_buffers(model, ctx)
    val = engine.evaluate(model, run_data.val_loader, ctx, num_classes, progress=args.progress)
    if ema is not None:
        distributed.average_buffers(ema.module, ctx)
        ema_val = engine.evaluate(ema.module, run_data.val_loader, ctx, num_classes)
        metrics["model_val_top1"] = val["val_top1"]  # the raw weights, for comparison
        metrics["ema_val_top1"] = ema_val["val_top1"]
        val = ema_val  # the deployed weights are the ones monitored
    skipped.report(val_set, val.pop("val_unreadable"))
    if val["val_images"] == 0:
        raise ValueError(f"not one of the {len(run_data.val_split.samples)} validation images could be read "
                         f"({skipped.example(val_set)}); fix or remove them, or pass another --val-dir")
    metrics.update(val, **_lrs(state.optimizer), trainable_tensors=sum(p.requires_grad for p in model.parameters()))
    return metrics


def save_epoch(out: Path, checkpoint: dict, improved: bool) -> None:
    save_checkpoint(checkpoint, out / LAST)
    if improved:
        save_checkpoint(checkpoint, out / BEST)


# --- the end of the run --------------------------------------------------------------------------


def finish(args: argparse.Namespace, ctx: distributed.Context, run_data: RunData, state: TrainState,
           skipped: SkippedImages, out: Path, start_epoch: int, last_epoch: int, best_metrics: dict | None,
           teacher_top1: float | None, log: Log) -> dict:
    """Gather every rank's weight digests (model, EMA) and skipped files, write summary.json; RuntimeError if
    the ranks ended with different weights."""
    digests = distributed.gather_strings(distributed.state_digest(state.model), ctx)
    ema = None if state.ema is None else distributed.state_digest(state.ema.module)
    ema_digests = None if ema is None else distributed.gather_strings(ema, ctx)
    skipped_all = skipped.of_all_ranks()
    summary = {"rank": ctx.rank, "world_size": ctx.world_size, "output_dir": str(out), "classes": run_data.classes,
               "epochs_run": last_epoch + 1 - start_epoch, "last_epoch": last_epoch, "best": best_metrics,
               "finished": state.stopper.should_stop or last_epoch + 1 >= args.epochs,
               "teacher_val_top1": teacher_top1, "skipped_images": skipped_all, "rank_weight_digests": digests,
               "rank_ema_weight_digests": ema_digests}
    if ctx.is_main:
        if best_metrics is not None:
            log(run_data.class_table(best_metrics["val_per_class_recall"]))
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if len(set(digests)) > 1:
        raise RuntimeError(f"ranks ended with different weights: {digests}")
    if ema_digests is not None and len(set(ema_digests)) > 1:
        raise RuntimeError(f"ranks ended with different EMA weights: {ema_digests}")
    distributed.shutdown(ctx)
    return summary


class SkippedImages:
    """Unreadable images, reported once each with the decoder's reason; every rank reports the files
    of its own shard."""

    def __init__(self, ctx: distributed.Context):
        self.ctx, self.reasons = ctx, {}  # path -> reason, in the order met

    def report(self, dataset: data.ImageFolderDataset, indices: list[int]) -> None:
        for i in indices:
            path = dataset.split.samples[i][0]
            if path not in self.reasons:
                self.reasons[path] = dataset.why_unreadable(i)
                rank = f" (rank {self.ctx.rank})" if self.ctx.distributed else ""
                tqdm.write(f"skipping unreadable image {path}{rank}: {self.reasons[path]}")

    def example(self, dataset: data.ImageFolderDataset) -> str:
        """The first skipped file of `dataset` and why, for an error message."""
        paths = {path for path, _ in dataset.split.samples}
        return next((f"first: {path}: {reason}" for path, reason in self.reasons.items() if path in paths),
                    "no file was reported")

    def of_all_ranks(self) -> list[str]:
        gathered = distributed.gather_strings(json.dumps(sorted(self.reasons)), self.ctx)
        return sorted(set().union(*map(json.loads, gathered)))


def _without_confusion(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k != "confusion"}


def _wrap(model, ctx: distributed.Context):
    if not ctx.distributed:
        return model
    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)


def _lrs(optimizer) -> dict:
    lrs = {g["role"]: g["lr"] for g in optimizer.param_groups}
    return {"lr_head": lrs.get("head", 0.0), "lr_backbone": lrs.get("backbone", 0.0)}


def _limit(loader, steps: int):
    """The first `steps` batches of `loader` (a cap for quick runs), keeping len() for the progress bar."""
    class Limited:
        def __len__(self):
            return min(steps, len(loader))

        def __iter__(self):
            for index, batch in enumerate(loader):
                if index >= steps:
                    break
                yield batch
    return Limited()
