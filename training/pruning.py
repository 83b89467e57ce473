"""Structured (channel) pruning with torch-pruning: which channels matter, removing them, counting what is left.

torch-pruning traces the network into a dependency graph, so removing an output channel of a
convolution also removes everything coupled to it (its BatchNorm, the next layer's input, both sides
of a residual add, a depthwise convolution's group); the result is a smaller dense network. The
classifier head is never pruned: it keeps one output per class. What was removed is recorded as
torch-pruning's pruning history, which `training.checkpoint.replay_pruning` replays on a freshly
built network. `python -m training.prune` is the command.
"""
from __future__ import annotations

import itertools
from typing import Callable, Iterable

import torch
import torch_pruning as tp
from tqdm import tqdm

from training import networks

CRITERIA = ("l1", "l2", "taylor", "random")
MAX_RATIO = 0.9  # no layer loses more of its channels than this


def importance(criterion: str) -> tp.importance.Importance:
    """torch-pruning's channel importance for `criterion` (one of CRITERIA)."""
    if criterion not in CRITERIA:
        raise ValueError(f"criterion {criterion!r} is not one of {CRITERIA}")
    if criterion in ("l1", "l2"):
        return tp.importance.MagnitudeImportance(p=1 if criterion == "l1" else 2)
    return tp.importance.TaylorImportance() if criterion == "taylor" else tp.importance.RandomImportance()


def model_size(model: torch.nn.Module, example: torch.Tensor) -> dict:
    """MACs and parameters (torch-pruning's counter, for one `example` input) and the output channels
    of all convolutions."""
    macs, params = tp.utils.count_ops_and_params(model, example)
    channels = sum(m.out_channels for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    return {"macs": int(macs), "params": int(params), "conv_channels": channels}


def prune_channels(model: torch.nn.Module, example: torch.Tensor, criterion: str, ratio: float | None = None,
                   target_reduction: float | None = None, ratio_step: float = 0.02, round_to: int = 1,
                   gradients: Callable[[], None] | None = None, progress: bool = False) -> tuple[float, list]:
    """Remove output channels of `model` in place; -> (fraction of each layer's channels removed,
    torch-pruning's pruning history).

    `ratio`: that fraction of every prunable layer, in one step. `target_reduction`: `ratio_step`
    more per step, channels re-ranked between steps, until the MACs are at most (1 - target) of the
    original (ValueError if MAX_RATIO is not enough). `gradients` fills the weights' .grad before each
    step (the taylor criterion reads them). The model is traced in eval mode (BatchNorm statistics
    stay as they are).
    """
    if (ratio is None) == (target_reduction is None):
        raise ValueError("give exactly one of ratio and target_reduction")
    steps = 1 if target_reduction is None else max(1, round(MAX_RATIO / ratio_step))
    head = model.get_submodule(networks.head_name(model))
    with torch.enable_grad():  # the dependency graph is traced through autograd
        pruner = tp.pruner.BasePruner(model.eval(), example, importance(criterion), iterative_steps=steps,
                                      pruning_ratio=MAX_RATIO if ratio is None else ratio, ignored_layers=[head],
                                      round_to=round_to if round_to > 1 else None)
    base, left = model_size(model, example)["macs"], 1.0
    bar = tqdm(range(1, steps + 1), desc="prune", unit="step", leave=False, disable=not progress)
    for step in bar:
        if gradients is not None:
            gradients()
        pruner.step()
        left = model_size(model, example)["macs"] / base
        bar.set_postfix(macs_left=f"{left:.1%}")
        if target_reduction is None or left <= 1.0 - target_reduction:
            bar.close()
            model.zero_grad(set_to_none=True)
            return pruner.per_step_pruning_ratio[step], pruner.pruning_history()
    raise ValueError(f"removing {MAX_RATIO:.0%} of every layer's channels leaves {left:.1%} of the MACs: a "
                     f"{target_reduction:.0%} reduction is out of reach for this network")


def loss_gradients(model: torch.nn.Module, batches: Iterable, loss: torch.nn.Module, count: int,
                   device: torch.device) -> Callable[[], None]:
    """-> a function that puts the gradient of `loss` over the first `count` (images, labels, ...)
    batches into the weights' .grad (eval mode: BatchNorm statistics untouched)."""
    def fill():
        model.eval().zero_grad(set_to_none=True)
        for images, labels, *_ in itertools.islice(batches, count):
            if images is not None:
                loss(model(images.to(device)), labels.to(device)).backward()
    return fill
