"""Trainable classifiers by name, their heads, and freezing for transfer learning.

Model names:
    bundled-efficientnet-lite0     timm efficientnet_lite0 (pad_type="same", bn_eps=1e-3) with the
                                   bundled ImageNet weights (the only pretrained start available offline)
    timm/<name>                    any timm architecture, random init (e.g. timm/resnet18)
    torchvision/<name>             any torchvision classification architecture, random init
Nothing is downloaded: other architectures start from random weights or from `--weights PATH`
(a state dict or a training checkpoint of the same architecture; a run directory: its best.pt).
"""
from __future__ import annotations

import difflib
from pathlib import Path

import torch

from training import models

PREFIXES = ("timm/", "torchvision/")
# Without aux_logits=False these return a namedtuple with auxiliary logits in training mode, which the
# loss cannot take; init_weights=True is what None means, without its FutureWarning.
TORCHVISION_KWARGS = {name: {"aux_logits": False, "init_weights": True} for name in ("googlenet", "inception_v3")}


def _timm_names() -> list[str]:
    import timm

    return timm.list_models()


def _torchvision_names() -> list[str]:
    import torchvision

    return torchvision.models.list_models(module=torchvision.models)


def _unknown(name: str) -> ValueError:
    known = [models.BUNDLED_EFFICIENTNET_LITE0] + [f"timm/{n}" for n in _timm_names()] + [
        f"torchvision/{n}" for n in _torchvision_names()]
    close = difflib.get_close_matches(name, known, n=5, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return ValueError(f"unknown model {name!r}: use {models.BUNDLED_EFFICIENTNET_LITE0}, timm/<name> or "
                      f"torchvision/<name> ({len(known)} names){hint}")


def build_network(name: str, num_classes: int) -> torch.nn.Module:
    """Random-init network `name` with a `num_classes` head (the bundled name gives Lite0's shape)."""
    if name == models.BUNDLED_EFFICIENTNET_LITE0:
        import timm

        return timm.create_model(models.EFFICIENTNET_LITE0_TIMM_NAME, pretrained=False,
                                 num_classes=num_classes, **models.EFFICIENTNET_LITE0_TIMM_KWARGS)
    if name.startswith("timm/"):
        import timm

        if name[5:] not in _timm_names():
            raise _unknown(name)
        return timm.create_model(name[5:], pretrained=False, num_classes=num_classes)
    if name.startswith("torchvision/"):
        import torchvision

        if name[12:] not in _torchvision_names():
            raise _unknown(name)
        return torchvision.models.get_model(name[12:], weights=None, num_classes=num_classes,
                                            **TORCHVISION_KWARGS.get(name[12:], {}))
    raise _unknown(name)


def head_name(model: torch.nn.Module) -> str:
    """Qualified name of the final Linear layer (timm: its classifier; torchvision: the last Linear)."""
    if hasattr(model, "get_classifier"):
        classifier = model.get_classifier()
        for name, module in model.named_modules():
            if module is classifier and isinstance(module, torch.nn.Linear):
                return name
    linears = [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no Linear classifier head")
    return linears[-1]


def replace_head(model: torch.nn.Module, num_classes: int, seed: int = 0) -> torch.nn.Module:
    """A freshly initialised `num_classes` Linear head in place of the old one."""
    name = head_name(model)
    old = model.get_submodule(name)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    new = torch.nn.Linear(old.in_features, num_classes, bias=old.bias is not None)
    torch.random.set_rng_state(generator_state)
    model.set_submodule(name, new)
    return model


def read_weights_file(path: str | Path) -> dict:
    """torch.load a local weights file (a run directory: its best.pt); a missing, unreadable or non-dict
    file is a ValueError / FileNotFoundError naming it (not a pickle traceback)."""
    path = Path(path)
    if path.is_dir():
        if not (path / "best.pt").is_file():
            raise FileNotFoundError(f"{path} is a directory without best.pt: --weights takes a weights file "
                                    "(a state dict or a training checkpoint) or a run directory holding best.pt")
        path = path / "best.pt"
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # pickle / zip / torch errors of every kind
        raise ValueError(f"{path} is not a readable PyTorch file ({type(exc).__name__}: {exc})") from None
    if not isinstance(loaded, dict):
        raise ValueError(f"{path} holds a {type(loaded).__name__}, not a state dict or training checkpoint")
    return loaded


def extract_state_dict(checkpoint: dict) -> dict:
    """A training checkpoint (its deploy weights) or a bare state dict -> state dict."""
    if "model" in checkpoint and isinstance(checkpoint["model"], dict):
        key = checkpoint.get("deploy", "model")
        return checkpoint[key]
    return checkpoint


def load_weights(model: torch.nn.Module, path: str | Path, skip_head: bool, state: dict | None = None) -> None:
    """Load a local state dict / checkpoint (`state`: its already-read contents); with `skip_head`,
    the head's tensors are not loaded. A file of another architecture is a ValueError naming it."""
    path = Path(path)
    state = extract_state_dict(read_weights_file(path) if state is None else state)
    state = {k.removeprefix("module."): v for k, v in state.items()}
    head = head_name(model) + "."
    if skip_head:
        state = {k: v for k, v in state.items() if not k.startswith(head)}
    own = model.state_dict()
    wrong_shape = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items()
                   if k in own and hasattr(v, "shape") and tuple(v.shape) != tuple(own[k].shape)]
    if wrong_shape:
        raise ValueError(f"{path} does not fit this architecture: {len(wrong_shape)} tensor(s) of another shape, "
                         f"e.g. {wrong_shape[:3]}")
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (skip_head and k.startswith(head)) and not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise ValueError(f"{path} does not fit this architecture: missing {missing[:5]}, unexpected {unexpected[:5]}")


def create_model(name: str, num_classes: int, weights: str | Path | None = None, seed: int = 0) -> torch.nn.Module:
    """The network to fine-tune. The bundled Lite0 gets its ImageNet weights (unless `weights` is
    given) and a new head; other names start random; `weights` loads a local checkpoint (its head
    too when the class count matches)."""
    if name == models.BUNDLED_EFFICIENTNET_LITE0 and weights is None:
        model = models.load_bundled_efficientnet_lite0()
        if num_classes != models.IMAGENET_NUM_CLASSES:
            replace_head(model, num_classes, seed)
        return model.train()
    with torch.random.fork_rng(devices=[]):  # seeded init without resetting the caller's RNG (per-rank augmentation)
        torch.manual_seed(seed)
        model = build_network(name, num_classes)
    if weights is not None:
        head = model.get_submodule(head_name(model))
        loaded = read_weights_file(weights)
        state = {k.removeprefix("module."): v for k, v in extract_state_dict(loaded).items()}
        head_key = head_name(model) + ".weight"
        fits = head_key in state and tuple(state[head_key].shape) == tuple(head.weight.shape)
        load_weights(model, weights, skip_head=not fits, state=loaded)
    return model.train()


def check_input_size(model: torch.nn.Module, name: str, input_shape: tuple[int, int, int],
                     device: torch.device) -> None:
    """One eval-mode forward of a zero image: a network that cannot take `input_shape` (a ViT built for 224 px,
    a window that does not divide the feature map) fails here in one line, before a run writes anything."""
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(torch.zeros((1, *input_shape), device=device))
    except (AssertionError, RuntimeError, ValueError) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ValueError(f"--model {name} cannot take {input_shape[1]}x{input_shape[2]} px inputs (--crop-size "
                         f"{input_shape[1]}): {reason}; choose another --crop-size or model") from None
    finally:
        model.train(was_training)


def backbone_and_head(model: torch.nn.Module) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
    head = head_name(model) + "."
    backbone = [p for n, p in model.named_parameters() if not n.startswith(head)]
    head_params = [p for n, p in model.named_parameters() if n.startswith(head)]
    return backbone, head_params


def backbone_stages(model: torch.nn.Module, count: int) -> list[list[torch.nn.Parameter]]:
    """The backbone's parameters in forward order, cut into `count` contiguous stages of about
    equal size (by number of tensors); the last stage is nearest the head."""
    backbone, _ = backbone_and_head(model)
    count = max(1, min(count, len(backbone)))
    bounds = [round(i * len(backbone) / count) for i in range(count + 1)]
    return [backbone[bounds[i]:bounds[i + 1]] for i in range(count)]


def trainable_stages(epoch: int, freeze_epochs: int, unfreeze_stages: int) -> int:
    """How many backbone stages (counted from the head) train in `epoch` (0-based).

    Frozen for `freeze_epochs` epochs; then, with `unfreeze_stages` = K > 0, one more of K stages
    per epoch; K = 0 unfreezes everything at once. Returns -1 for "all".
    """
    if epoch < freeze_epochs:
        return 0
    if unfreeze_stages <= 0:
        return -1
    opened = epoch - freeze_epochs + 1
    return -1 if opened >= unfreeze_stages else opened


def apply_freezing(model: torch.nn.Module, stages_open: int, unfreeze_stages: int) -> int:
    """Set requires_grad for this epoch; returns the number of trainable parameter tensors."""
    stages = backbone_stages(model, max(1, unfreeze_stages))
    for index, stage in enumerate(stages):
        train = stages_open < 0 or index >= len(stages) - stages_open
        for p in stage:
            p.requires_grad_(train)
    for p in backbone_and_head(model)[1]:
        p.requires_grad_(True)
    return sum(p.requires_grad for p in model.parameters())
