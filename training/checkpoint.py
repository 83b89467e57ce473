"""Training checkpoints: everything to resume a run, rebuild its model, and export it.

A checkpoint (`runs/<run>/checkpoint.pt` = last epoch, `best.pt` = best monitored epoch) is a dict:
    run_id                    the run's, minted when it starts, kept by --resume (absent from checkpoints written before)
    model, model_ema          state dicts (unwrapped); `deploy` names the one to serve
    optimizer, lr_scheduler, scaler, early_stopping, epoch
    args                      the resolved command-line arguments (torchvision reference style)
    architecture              {"name", "num_classes"}: networks.build_network rebuilds it
    classes                   class names, index i = class i (labels.txt at export)
    preprocess                the eval PreprocessConfig (preprocess.json at export)
    data                      train/val folders, the validation files and their labels (evaluation, export parity),
                              relative_files: every train and val image's path within its folder, zlib-packed
                              (state.pack_paths; --resume from moved folders; absent from checkpoints written before)
    metrics                   that epoch's metrics
    pruning                   (training.prune only) torch-pruning's history of removed channels and the input
                              shape it was traced with: `model_from_checkpoint` replays it on the rebuilt network
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from common.preprocessing import PreprocessConfig
from training.networks import build_network

FORMAT = "training.train/1"
LAST, BEST = "checkpoint.pt", "best.pt"
REQUIRED = ("format", "model", "deploy", "architecture", "classes", "preprocess", "args", "epoch")


def save_checkpoint(checkpoint: dict, path: str | Path) -> Path:
    """Write atomically (temp file + rename): a crash never leaves a half-written checkpoint."""
    path = Path(path)
    missing = [k for k in REQUIRED if k not in checkpoint]
    if missing:
        raise ValueError(f"checkpoint lacks {missing}")
    tmp = path.with_name(path.name + ".tmp")
    torch.save(checkpoint, tmp)
    os.replace(tmp, path)
    return path


def resolve_checkpoint_path(path: str | Path, prefer: str = BEST) -> Path:
    """A checkpoint file, or a run directory (-> its best.pt, else checkpoint.pt)."""
    path = Path(path)
    if path.is_dir():
        for name in (prefer, LAST, BEST):
            if (path / name).is_file():
                return path / name
        raise FileNotFoundError(f"run directory {path} has neither {BEST} nor {LAST}")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    return path


def load_checkpoint(path: str | Path, prefer: str = BEST) -> dict:
    path = resolve_checkpoint_path(path, prefer)
    # Our own checkpoints hold plain Python containers (args, metrics) besides tensors.
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # pickle / zip / torch errors of every kind: not a checkpoint
        raise ValueError(f"{path} is not a readable training.train checkpoint ({type(exc).__name__}: {exc})") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != FORMAT:
        raise ValueError(f"{path} is not a training.train checkpoint (format {FORMAT}); for a bare state dict "
                         "train with --weights instead")
    checkpoint["path"] = str(path)
    return checkpoint


def model_from_checkpoint(checkpoint: dict, weights: str | None = None) -> torch.nn.Module:
    """The network with the checkpoint's deploy weights (or `weights`: 'model' / 'model_ema'), eval mode."""
    key = weights or checkpoint["deploy"]
    if checkpoint.get(key) is None:
        raise ValueError(f"checkpoint has no {key!r} weights; it has {[k for k in ('model', 'model_ema') if checkpoint.get(k)]}")
    arch = checkpoint["architecture"]
    model = build_network(arch["name"], arch["num_classes"]).eval()
    if checkpoint.get("pruning"):
        replay_pruning(model, checkpoint["pruning"])
    model.load_state_dict(checkpoint[key])
    return model.eval()


def replay_pruning(model: torch.nn.Module, pruning: dict) -> torch.nn.Module:
    """Cut a freshly built network to a pruned checkpoint's shape, in place: torch-pruning removes the
    channels its recorded history names (weights do not matter, only which channels went)."""
    import torch_pruning as tp  # only pruned checkpoints need it

    example = torch.zeros((1, *pruning["input_shape"]))
    with torch.enable_grad():  # the dependency graph is traced through autograd
        graph = tp.DependencyGraph().build_dependency(model, example_inputs=example)
    graph.load_pruning_history(pruning["history"])
    return model


def preprocess_from_checkpoint(checkpoint: dict) -> PreprocessConfig:
    return PreprocessConfig.from_dict(checkpoint["preprocess"])
