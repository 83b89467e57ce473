"""One training epoch and one evaluation pass (torchvision reference's train_one_epoch / evaluate).

Progress: a tqdm bar per epoch on rank 0 (loss, accuracy, images/s). Evaluation runs in float32
on the serving preprocess; with several ranks each evaluates its shard and the confusion matrices
are summed, so the numbers are exact (no padded duplicates).
"""
from __future__ import annotations

import contextlib
import dataclasses
import time

import numpy as np
import torch
from tqdm import tqdm

from training import distributed
from training.distillation import Distiller

AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, amp: str):
    dtype = AMP_DTYPES[amp]
    if dtype is None:
        return contextlib.nullcontext()
    if device.type == "cpu" and dtype == torch.float16:
        raise ValueError("--amp fp16 needs a GPU; on CPU use --amp bf16 or none")
    return torch.autocast(device.type, dtype=dtype)


@dataclasses.dataclass
class StepConfig:
    amp: str = "none"
    clip_grad_norm: float = 0.0
    progress: bool = True
    input_shape: tuple[int, int, int] = (3, 224, 224)


def _empty_loss(model, shape, device) -> torch.Tensor:
    """A batch whose images all failed to decode: a zero-weighted loss on a dummy image (eval mode:
    BatchNorm statistics untouched), so that every DDP rank still runs the same forward, backward, step,
    GradScaler update and EMA update."""
    model.eval()
    loss = model(torch.zeros((1, *shape), device=device)).float().sum() * 0.0
    model.train()
    return loss


def train_one_epoch(model, loader, criterion, optimizer, scheduler, ctx: distributed.Context, step: StepConfig,
                    epoch: int, mixer=None, ema=None, scaler=None, distiller: Distiller | None = None,
                    on_bad=lambda indices: None) -> dict:
    model.train()
    device = ctx.device
    totals = torch.zeros(3, dtype=torch.float64)  # loss sum, correct, images
    start = time.perf_counter()
    bar = tqdm(loader, desc=f"epoch {epoch}", unit="batch", leave=False, disable=not (step.progress and ctx.is_main),
               dynamic_ncols=True)
    for images, labels, _, bad in bar:
        if len(bad):
            on_bad(bad.tolist())
        if images is None:
            loss = _empty_loss(model, step.input_shape, device)
        else:
            images = images.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            targets = labels
            if mixer is not None:
                images, targets = mixer(images, labels)
            with autocast(device, step.amp):
                logits = model(images)
                loss = criterion(logits, targets) if distiller is None else distiller.loss(logits, targets, images)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
        else:
            loss.backward()
        if step.clip_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], step.clip_grad_norm)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        scheduler.step()
        if ema is not None:
            ema.update_parameters(model)
        if images is None:
            continue
        n = images.shape[0]
        hard = targets.argmax(1) if targets.ndim == 2 else targets
        totals += torch.tensor([loss.item() * n, (logits.argmax(1) == hard).sum().item(), n], dtype=torch.float64)
        elapsed = time.perf_counter() - start
        bar.set_postfix(loss=f"{totals[0] / totals[2]:.4f}", acc=f"{totals[1] / totals[2]:.2%}",
                        img_s=f"{totals[2] * ctx.world_size / elapsed:.0f}", lr=f"{scheduler.get_last_lr()[-1]:.2e}")
    bar.close()
    elapsed = time.perf_counter() - start
    totals = distributed.all_reduce_sum(totals, ctx)
    images_seen = max(1.0, totals[2].item())
    return {"train_loss": totals[0].item() / images_seen, "train_acc": totals[1].item() / images_seen,
            "train_images": int(totals[2].item()), "train_images_per_s": totals[2].item() / elapsed,
            "train_seconds": elapsed}


@torch.no_grad()
def predict(model, loader, device: torch.device, progress: bool = False, desc: str = "eval"):
    """-> (probabilities (n, C) float32, labels (n,), dataset indices (n,), bad indices list)."""
    model.eval()
    probabilities, labels, indices, bad_indices = [], [], [], []
    for images, batch_labels, batch_indices, bad in tqdm(loader, desc=desc, leave=False, disable=not progress):
        bad_indices += bad.tolist()
        if images is None:
            continue
        logits = model(images.to(device, non_blocking=True)).float()
        probabilities.append(torch.softmax(logits, 1).cpu())
        labels.append(batch_labels)
        indices.append(batch_indices)
    if not probabilities:
        return np.zeros((0, 0), np.float32), np.zeros(0, np.int64), np.zeros(0, np.int64), bad_indices
    return (torch.cat(probabilities).numpy(), torch.cat(labels).numpy(), torch.cat(indices).numpy(), bad_indices)


def summarize(probabilities: np.ndarray, labels: np.ndarray, num_classes: int) -> torch.Tensor:
    """Sufficient statistics to reduce over ranks: [confusion (C*C), nll sum, top-5 correct]."""
    confusion = np.zeros((num_classes, num_classes), np.float64)
    nll, top5 = 0.0, 0.0
    if len(labels):
        np.add.at(confusion, (labels, probabilities.argmax(1)), 1)
        nll = float(-np.log(np.clip(probabilities[np.arange(len(labels)), labels], 1e-12, None)).sum())
        k = min(5, num_classes)
        topk = np.argpartition(-probabilities, k - 1, axis=1)[:, :k]
        top5 = float((topk == labels[:, None]).any(1).sum())
    return torch.from_numpy(np.concatenate([confusion.ravel(), [nll, top5]]))


def metrics_from_summary(summary: torch.Tensor, num_classes: int, prefix: str = "val") -> dict:
    confusion = summary[: num_classes * num_classes].reshape(num_classes, num_classes).numpy()
    nll, top5 = summary[-2].item(), summary[-1].item()
    n = max(1.0, confusion.sum())
    tp = np.diag(confusion)
    precision = np.divide(tp, confusion.sum(0), out=np.zeros_like(tp), where=confusion.sum(0) > 0)
    recall = np.divide(tp, confusion.sum(1), out=np.zeros_like(tp), where=confusion.sum(1) > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros_like(tp), where=(precision + recall) > 0)
    return {f"{prefix}_top1": tp.sum() / n, f"{prefix}_top5": top5 / n, f"{prefix}_loss": nll / n,
            f"{prefix}_macro_f1": float(f1.mean()), f"{prefix}_images": int(confusion.sum()),
            f"{prefix}_per_class_recall": recall.tolist(), "confusion": confusion.astype(int).tolist()}


def evaluate(model, loader, ctx: distributed.Context, num_classes: int, prefix: str = "val",
             progress: bool = False) -> dict:
    probabilities, labels, _, bad = predict(model, loader, ctx.device, progress and ctx.is_main, desc=prefix)
    summary = distributed.all_reduce_sum(summarize(probabilities, labels, num_classes), ctx)
    metrics = metrics_from_summary(summary, num_classes, prefix)
    metrics[f"{prefix}_unreadable"] = bad
    return metrics
