"""The body of `python -m training.train`: build data, model and recipe from the arguments, then
train epoch by epoch (evaluate, log, checkpoint, early-stop). Top to bottom, like torchvision's main.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch
from tqdm import tqdm

from common.preprocessing import PreprocessConfig
from training import data, distributed, engine, networks, presets, recipe
from training.checkpoint import BEST, FORMAT, LAST, load_checkpoint, save_checkpoint
from training.distill import Distiller, load_teacher
from training.logs import RunLog, class_table


def preprocess_from_args(args: argparse.Namespace) -> PreprocessConfig:
    resize = args.resize_size or int(round(args.crop_size / 0.875))
    return PreprocessConfig(resize=resize, crop=args.crop_size, mean=tuple(args.mean), std=tuple(args.std),
                            interpolation=args.interpolation)


def augment_from_args(args: argparse.Namespace) -> presets.TrainAugment:
    return presets.TrainAugment(
        scale_min=args.scale_min, hflip_prob=args.hflip_prob, auto_augment=args.auto_augment,
        randaugment_magnitude=args.ra_magnitude, color_jitter=args.color_jitter, random_erase=args.random_erase,
        mixup_alpha=args.mixup_alpha, cutmix_alpha=args.cutmix_alpha)


def _wrap(model, ctx: distributed.Context):
    if not ctx.distributed:
        return model
    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)


def _lrs(optimizer) -> dict:
    lrs = {g["role"]: g["lr"] for g in optimizer.param_groups}
    return {"lr_head": lrs.get("head", 0.0), "lr_backbone": lrs.get("backbone", 0.0)}


def run(args: argparse.Namespace) -> dict:
    ctx = distributed.init(args.device)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed + ctx.rank)  # MixUp/CutMix and dropout differ per rank; weights come from rank 0
    # (DDP); image augmentation has its own seed per sample and epoch (data.ShardedSampler item_seeds)
    out = Path(args.output_dir)
    log = (lambda text: tqdm.write(text)) if ctx.is_main else (lambda text: None)

    # --- data ----------------------------------------------------------------------------------
    preprocess = preprocess_from_args(args)
    augment = augment_from_args(args)
    train_split, val_split = data.load_splits(args.data_dir, args.val_dir, args.val_fraction, args.split_seed)
    classes, num_classes = train_split.classes, len(train_split.classes)
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
    log(f"data: {len(train_split.samples)} train / {len(val_split.samples)} val images, {num_classes} classes, "
        f"{steps} steps/epoch x {ctx.world_size} process(es), eval preprocess {preprocess.to_dict()}")
    log(class_table(classes, counts, val_split.class_counts(), weights))

    # --- model and recipe ----------------------------------------------------------------------
    model = networks.create_model(args.model, num_classes, args.weights, args.seed).to(ctx.device)
    backbone_lr = args.lr if args.backbone_lr is None else args.backbone_lr
    optimizer = recipe.make_optimizer(model, args.optimizer, args.lr, backbone_lr, args.weight_decay, args.momentum)
    schedule = recipe.Schedule(args.lr_scheduler, total_steps=args.epochs * steps,
                               warmup_steps=int(args.lr_warmup_epochs * steps), warmup_start=args.lr_warmup_start,
                               min_factor=args.lr_min_factor, restart_steps=int(args.restart_epochs * steps),
                               restart_mult=args.restart_mult)
    scheduler = recipe.make_scheduler(optimizer, schedule)
    loss_weights = torch.tensor(weights, dtype=torch.float32) if args.class_balance == "loss" else None
    criterion = recipe.ClassificationLoss(args.label_smoothing, loss_weights).to(ctx.device)
    scaler = torch.amp.GradScaler(ctx.device.type) if args.amp == "fp16" else None
    ema = recipe.make_ema(model, args.model_ema_decay) if args.model_ema else None
    mixer = presets.batch_mixer(num_classes, augment)
    stopper = recipe.EarlyStopping(args.monitor, args.early_stop_patience, args.early_stop_min_delta)
    distiller, teacher_top1 = None, None
    if args.teacher:
        teacher, columns = load_teacher(args.teacher, classes)
        distiller = Distiller(teacher, criterion, args.distill_alpha, args.distill_temperature, columns).to(ctx.device)
        teacher_eval = distiller.teacher if columns is None else _Columns(distiller.teacher, distiller.columns)
        teacher_top1 = engine.evaluate(teacher_eval, val_loader, ctx, num_classes)["val_top1"]
        log(f"teacher {args.teacher}: val top-1 {teacher_top1:.2%}")

    start_epoch, best_metrics = 0, None
    if args.resume:
        checkpoint = load_checkpoint(args.resume, prefer=LAST)
        if checkpoint["classes"] != classes or checkpoint["architecture"]["name"] != args.model:
            raise ValueError(f"{checkpoint['path']} is a {checkpoint['architecture']['name']} run on classes "
                             f"{checkpoint['classes'][:10]}; this run is {args.model} on {classes[:10]}")
        saved_schedule = (checkpoint["lr_scheduler"].get("lr_lambdas") or [None])[0]
        if isinstance(saved_schedule, dict) and saved_schedule != dataclasses.asdict(schedule):
            # LambdaLR.load_state_dict would silently bring back the old schedule (e.g. LR 0 after its end)
            changed = {k: (saved_schedule.get(k), v) for k, v in dataclasses.asdict(schedule).items()
                       if saved_schedule.get(k) != v}
            raise ValueError(f"{checkpoint['path']} was trained with another LR schedule, (checkpoint, now): "
                             f"{changed}; resume with the run's own --epochs, --steps-per-epoch, --batch-size, "
                             f"process count and --lr-* arguments (its args.json), or start anew from it with --weights")
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["lr_scheduler"])
        if ema is not None and checkpoint.get("model_ema_full") is not None:
            ema.load_state_dict(checkpoint["model_ema_full"])
        if scaler is not None and checkpoint.get("scaler"):
            scaler.load_state_dict(checkpoint["scaler"])
        stopper = recipe.EarlyStopping(args.monitor, args.early_stop_patience, args.early_stop_min_delta,
                                       **checkpoint["early_stopping"])
        start_epoch, best_metrics = checkpoint["epoch"] + 1, checkpoint.get("best_metrics")
        if ctx.world_size == 1 and checkpoint.get("rng_state") is not None:
            torch.set_rng_state(checkpoint["rng_state"])  # same MixUp/CutMix and dropout as an uninterrupted run
            if ctx.device.type == "cuda" and checkpoint.get("cuda_rng_state") is not None:
                torch.cuda.set_rng_state(checkpoint["cuda_rng_state"], ctx.device)  # dropout, GPU-side MixUp
        else:
            torch.manual_seed(args.seed + ctx.rank + 1_000_003 * start_epoch)
        log(f"resumed {checkpoint['path']} at epoch {start_epoch}")
        if stopper.should_stop:
            log(f"{checkpoint['path']} had stopped early ({args.monitor} did not improve for {stopper.bad_epochs} "
                f"epochs): nothing left to train; raise --early-stop-patience to continue it")
    end_epoch = start_epoch if stopper.should_stop else args.epochs

    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "labels.txt").write_text("".join(f"{c}\n" for c in classes))
        preprocess.save(out / "preprocess.json")
        (out / "args.json").write_text(json.dumps(vars(args), indent=2, default=str) + "\n")
    runlog = RunLog(out, ctx.is_main, args.tensorboard, resume=bool(args.resume), first_epoch=start_epoch)
    skipped: set[str] = set()

    def on_bad(indices: list[int], split=train_split) -> None:
        for i in indices:
            path = split.samples[i][0]
            if path not in skipped:
                skipped.add(path)  # every rank reports the files of its own shard
                tqdm.write(f"skipping unreadable image {path}" + (f" (rank {ctx.rank})" if ctx.distributed else ""))

    # --- epochs --------------------------------------------------------------------------------
    step_config = engine.StepConfig(args.amp, args.clip_grad_norm, args.progress, preprocess.input_shape)
    wrapped, opened, epoch = None, None, start_epoch - 1
    for epoch in range(start_epoch, end_epoch):
        started = time.perf_counter()
        stages_open = networks.trainable_stages(epoch, args.freeze_epochs, args.unfreeze_stages)
        if stages_open != opened or wrapped is None:  # DDP must see the trainable set it reduces
            trainable = networks.apply_freezing(model, stages_open, args.unfreeze_stages)
            wrapped, opened = _wrap(model, ctx), stages_open
            log(f"epoch {epoch}: {trainable} trainable tensors (backbone stages open: "
                f"{'all' if stages_open < 0 else stages_open})")
        train_sampler.set_epoch(epoch)
        metrics = engine.train_one_epoch(
            wrapped, _limit(train_loader, steps), criterion, optimizer, scheduler, ctx, step_config, epoch,
            mixer, ema, scaler, distiller, on_bad)
        distributed.average_buffers(model, ctx)
        val = engine.evaluate(model, val_loader, ctx, num_classes, progress=args.progress)
        if ema is not None:
            distributed.average_buffers(ema.module, ctx)
            ema_val = engine.evaluate(ema.module, val_loader, ctx, num_classes)
            metrics["model_val_top1"] = val["val_top1"]  # the raw weights, for comparison
            metrics["ema_val_top1"] = ema_val["val_top1"]
            val = ema_val  # the deployed weights are the ones monitored
        on_bad(val.pop("val_unreadable"), val_split)
        metrics.update(val, **_lrs(optimizer), trainable_tensors=sum(p.requires_grad for p in model.parameters()),
                       epoch_seconds=time.perf_counter() - started)
        improved = stopper.update(metrics)
        if improved:
            best_metrics = {"epoch": epoch, **{k: v for k, v in metrics.items() if k != "confusion"}}
        log(runlog.epoch(epoch, {k: v for k, v in metrics.items() if k != "confusion"}))
        if ctx.is_main:
            checkpoint = {
                "format": FORMAT, "model": model.state_dict(),
                "model_ema": None if ema is None else ema.module.state_dict(),
                "model_ema_full": None if ema is None else ema.state_dict(),
                "deploy": "model" if ema is None else "model_ema",
                "optimizer": optimizer.state_dict(), "lr_scheduler": scheduler.state_dict(),
                "scaler": None if scaler is None else scaler.state_dict(),
                "early_stopping": stopper.state_dict(), "epoch": epoch, "args": vars(args),
                "rng_state": torch.get_rng_state(),
                "cuda_rng_state": torch.cuda.get_rng_state(ctx.device) if ctx.device.type == "cuda" else None,
                "architecture": {"name": args.model, "num_classes": num_classes}, "classes": classes,
                "preprocess": preprocess.to_dict(), "metrics": metrics, "best_metrics": best_metrics,
                "data": {"train_dir": str(args.data_dir), "val_dir": args.val_dir,
                         "val_files": [p for p, _ in val_split.samples],
                         "val_labels": [label for _, label in val_split.samples]},
            }
            save_checkpoint(checkpoint, out / LAST)
            if improved:
                save_checkpoint(checkpoint, out / BEST)
        if args.session_epochs and epoch + 1 - start_epoch >= args.session_epochs and epoch + 1 < args.epochs:
            log(f"stopping after {args.session_epochs} epoch(s) of this session: --resume {out} to continue")
            break
        if stopper.should_stop:
            log(f"early stopping: {args.monitor} did not improve for {stopper.bad_epochs} epochs")
            break
    runlog.close()

    digests = distributed.gather_strings(distributed.state_digest(model), ctx)
    skipped_all = sorted(set().union(*map(json.loads, distributed.gather_strings(json.dumps(sorted(skipped)), ctx))))
    summary = {"rank": ctx.rank, "world_size": ctx.world_size, "output_dir": str(out), "classes": classes,
               "epochs_run": epoch + 1 - start_epoch, "last_epoch": epoch, "best": best_metrics,
               "finished": stopper.should_stop or epoch + 1 >= args.epochs,
               "teacher_val_top1": teacher_top1, "skipped_images": skipped_all, "rank_weight_digests": digests}
    if ctx.is_main:
        if best_metrics is not None:
            log(class_table(classes, counts, val_split.class_counts(), weights, best_metrics["val_per_class_recall"]))
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if len(set(digests)) > 1:
        raise RuntimeError(f"ranks ended with different weights: {digests}")
    distributed.shutdown(ctx)
    return summary


class _Columns(torch.nn.Module):
    """A 1000-class ImageNet model seen through the dataset's classes (for the teacher's accuracy)."""

    def __init__(self, model, columns):
        super().__init__()
        self.model, self.columns = model, columns

    def forward(self, x):
        return self.model(x)[:, self.columns]


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

