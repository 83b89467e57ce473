"""The optimisation recipe: optimizer, warmup + cosine schedule, loss, EMA, early stopping.

Pieces follow torchvision's classification reference: no weight decay on norms and biases,
per-iteration LR schedule (linear warmup, then cosine, optionally with warm restarts), label
smoothing, an exponential moving average of the weights (`torch.optim.swa_utils.AveragedModel`).
"""
from __future__ import annotations

import dataclasses
import math

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from training.networks import backbone_and_head

OPTIMIZERS = ("adamw", "sgd")
SCHEDULERS = ("cosine", "cosine-restarts", "constant")
MONITORS = {"val_top1": "max", "val_top5": "max", "val_loss": "min", "val_macro_f1": "max"}


def make_optimizer(model: torch.nn.Module, name: str, lr: float, backbone_lr: float, weight_decay: float,
                   momentum: float) -> torch.optim.Optimizer:
    """Four groups: {backbone, head} x {decayed, not decayed (norms, biases)}; every parameter is in
    one, frozen or not (a frozen one just has no gradient), so unfreezing needs no new optimizer."""
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer {name!r} is not one of {OPTIMIZERS}")
    backbone, head = backbone_and_head(model)
    groups = []
    for params, group_lr, role in ((backbone, backbone_lr, "backbone"), (head, lr, "head")):
        decay = [p for p in params if p.ndim > 1]
        no_decay = [p for p in params if p.ndim <= 1]
        groups += [{"params": decay, "lr": group_lr, "weight_decay": weight_decay, "role": role},
                   {"params": no_decay, "lr": group_lr, "weight_decay": 0.0, "role": role}]
    groups = [g for g in groups if g["params"]]
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=momentum > 0)
    return torch.optim.AdamW(groups, lr=lr)


@dataclasses.dataclass(frozen=True)
class Schedule:
    """LR multiplier per optimizer step: linear warmup from `warmup_start`, then cosine to `min_factor`."""

    kind: str
    total_steps: int
    warmup_steps: int
    warmup_start: float = 0.01
    min_factor: float = 0.0
    restart_steps: int = 0  # cosine-restarts: first cycle length
    restart_mult: int = 1  # each next cycle is this many times longer

    def __post_init__(self):
        if self.kind not in SCHEDULERS:
            raise ValueError(f"lr scheduler {self.kind!r} is not one of {SCHEDULERS}")
        if self.kind == "cosine-restarts" and self.restart_steps < 1:
            raise ValueError("cosine-restarts needs a first cycle of at least 1 step (--restart-epochs)")
        if self.restart_mult < 1:  # a cycle that does not grow never ends
            raise ValueError(f"cosine-restarts cycle growth must be at least 1 (--restart-mult), got {self.restart_mult}")

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.warmup_start + (1.0 - self.warmup_start) * step / self.warmup_steps
        if self.kind == "constant":
            return 1.0
        t = step - self.warmup_steps
        if self.kind == "cosine":
            period = max(1, self.total_steps - self.warmup_steps)
        else:
            period = self.restart_steps
            while t >= period:
                t -= period
                period *= self.restart_mult
        progress = min(1.0, t / period)
        return self.min_factor + (1.0 - self.min_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_scheduler(optimizer: torch.optim.Optimizer, schedule: Schedule) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


class ClassificationLoss(torch.nn.Module):
    """Cross-entropy with label smoothing and optional class weights; targets are class indices or
    soft distributions (MixUp/CutMix). Smoothing is applied to soft targets too."""

    def __init__(self, label_smoothing: float = 0.0, class_weights: torch.Tensor | None = None):
        super().__init__()
        self.label_smoothing = label_smoothing
        self.register_buffer("class_weights", class_weights, persistent=False)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        if targets.ndim == 1:
            return torch.nn.functional.cross_entropy(logits, targets, weight=self.class_weights,
                                                     label_smoothing=self.label_smoothing)
        classes = logits.shape[1]
        soft = targets * (1.0 - self.label_smoothing) + self.label_smoothing / classes
        per_sample = -(soft * torch.log_softmax(logits, dim=1))
        if self.class_weights is not None:
            per_sample = per_sample * self.class_weights
            return per_sample.sum(1).sum() / (targets * self.class_weights).sum()
        return per_sample.sum(1).mean()


def make_ema(model: torch.nn.Module, decay: float) -> AveragedModel:
    """EMA of parameters and buffers (torchvision's ExponentialMovingAverage), updated every step."""
    if not 0.0 < decay < 1.0:
        raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


class EarlyStopping:
    """Tracks the monitored metric: `best_seen` is the best value so far (best.pt), `best` the value
    of the last improvement larger than `min_delta`; it says when `patience` epochs went by without
    such an improvement. patience 0 = never stop early."""

    def __init__(self, monitor: str, patience: int, min_delta: float = 0.0, best: float | None = None,
                 bad_epochs: int = 0, best_seen: float | None = None):
        if monitor not in MONITORS:
            raise ValueError(f"monitor {monitor!r} is not one of {sorted(MONITORS)}")
        self.monitor, self.mode = monitor, MONITORS[monitor]
        self.patience, self.min_delta = patience, min_delta
        self.best, self.bad_epochs = best, bad_epochs
        self.best_seen = best if best_seen is None else best_seen  # checkpoints from before best_seen existed

    def _better(self, value: float, than: float | None, delta: float) -> bool:
        if than is None:
            return not math.isnan(value)
        return value > than + delta if self.mode == "max" else value < than - delta

    def update(self, metrics: dict) -> bool:
        """Record this epoch; True if it is the best so far (strictly better, whatever min_delta)."""
        value = metrics[self.monitor]
        if self._better(value, self.best, self.min_delta):
            self.best, self.bad_epochs = value, 0
        else:
            self.bad_epochs += 1
        is_best = self._better(value, self.best_seen, 0.0)
        if is_best:
            self.best_seen = value
        return is_best

    @property
    def should_stop(self) -> bool:
        return self.patience > 0 and self.bad_epochs >= self.patience

    def state_dict(self) -> dict:
        return {"best": self.best, "bad_epochs": self.bad_epochs, "best_seen": self.best_seen}
