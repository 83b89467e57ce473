"""The network that quantization-aware training fine-tunes, and the float network it gives back.

    prepare(model, input_shape) -> QatNetwork, a copy of `model` with
      - each BatchNorm that follows a convolution folded into it (torch.nn.utils.fusion), its statistics
        frozen: the weights fake-quantized are the folded weights that the exported ONNX holds and that
        build.precision.quantize turns into int8;
      - every Conv2d / Linear weight fake-quantized per output channel, symmetric int8 in [-127, 127],
        scale max|w| / 127 taken from the current weights at every step: what ONNX Runtime's quantizer
        computes from the exported weights;
      - every Conv2d / Linear *input* fake-quantized per tensor, symmetric int8 in [-127, 127], scale
        amax / 127 with amax a moving average of the batches' ranges: TensorRT's explicit quantization puts
        Q/DQ on the inputs of convolutions and GEMMs, never on their outputs. Modules that read the same tensor
        share one quantizer, as the ONNX graph has one tensor and one scale there. It observes and rounds where
        the tensor enters the outermost module holding its readers (a residual block: its skip connection gets
        the rounded tensor too, as TensorRT quantizes a residual Add's skip input), and rounds again at each
        reader with the same scale (a no-op on values already on the grid; right after a dropout, which only
        trains).
    QatNetwork.float_model() -> the original architecture holding the fine-tuned weights; each folded
      BatchNorm becomes an identity that carries the folded bias (weight 1, bias b, mean 0, var 1 - eps), which
      the export folds back into the convolution.

The quantizers are torch.ao.quantization's own (QConfig, FakeQuantize, MovingAverage*MinMaxObserver). They are
placed here rather than by `prepare_qat`: eager-mode `prepare_qat` observes module *outputs* and swaps only
exact `nn.Conv2d` (timm's Conv2dSame is a subclass), and FX mode's TensorRT backend config is marked
experimental by torch itself.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools

import torch
from torch import nn
from torch.ao.quantization import (FakeQuantize, MovingAverageMinMaxObserver, MovingAveragePerChannelMinMaxObserver,
                                   QConfig)
from torch.nn.utils import parametrize
from torch.nn.utils.fusion import fuse_conv_bn_eval

QUANTIZED = (nn.Conv2d, nn.Linear)
QMAX = 127  # symmetric int8 as TensorRT and the project's cache use it: scale = amax / 127
INT8 = {"quant_min": -QMAX, "quant_max": QMAX, "dtype": torch.qint8}
QAT_QCONFIG = QConfig(
    activation=FakeQuantize.with_args(observer=MovingAverageMinMaxObserver, qscheme=torch.per_tensor_symmetric,
                                      **INT8),
    weight=FakeQuantize.with_args(observer=MovingAveragePerChannelMinMaxObserver, averaging_constant=1.0,
                                  qscheme=torch.per_channel_symmetric, ch_axis=0, **INT8),
)
WEIGHT_KEY = "parametrizations.weight.original"


def _foldable(norm: nn.Module) -> bool:
    from timm.layers import BatchNormAct2d

    return type(norm) in (nn.BatchNorm2d, BatchNormAct2d) and norm.affine and norm.track_running_stats


class FoldedNorm(nn.Module):
    """What stays of a BatchNorm folded into its convolution: timm's norm + act layers keep their drop and act."""

    def __init__(self, norm: nn.Module):
        super().__init__()
        self.drop = getattr(norm, "drop", nn.Identity())
        self.act = getattr(norm, "act", nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(x))


@dataclasses.dataclass
class InputQuantizer:
    """One quantized tensor: the Conv2d / Linear modules reading it (call order), the outermost module it
    enters (where it is quantized; "" = the network's input) and its fake quantizer."""

    modules: list[str]
    at: str
    fake_quant: FakeQuantize

    def hook(self, network: nn.Module) -> None:
        network.get_submodule(self.at).register_forward_pre_hook(functools.partial(_quantize_input, self.fake_quant))
        for name in self.modules:
            if name != self.at:
                network.get_submodule(name).register_forward_pre_hook(functools.partial(_round_again, self.fake_quant))

    @property
    def scale(self) -> float:
        """The scale the last forward pass used (amax / 127)."""
        return float(self.fake_quant.scale)

    def set_range(self, low: float, high: float) -> None:
        """Start the moving average at [low, high] (a calibration's range)."""
        observer = self.fake_quant.activation_post_process
        observer.min_val.copy_(torch.tensor(low))
        observer.max_val.copy_(torch.tensor(high))
        scale, zero_point = observer.calculate_qparams()
        self.fake_quant.scale.copy_(scale)
        self.fake_quant.zero_point.copy_(zero_point)


def _quantize_input(fake_quant: FakeQuantize, _module: nn.Module, args: tuple) -> tuple:
    return (fake_quant(args[0]), *args[1:])


def _round_again(fake_quant: FakeQuantize, _module: nn.Module, args: tuple) -> tuple | None:
    if not fake_quant.fake_quant_enabled[0]:
        return None
    rounded = torch.fake_quantize_per_tensor_affine(args[0], fake_quant.scale, fake_quant.zero_point,
                                                    fake_quant.quant_min, fake_quant.quant_max)
    return (rounded, *args[1:])


def _key(tensor: torch.Tensor) -> tuple[int, int]:
    return id(tensor), tensor._version  # the same object, not modified in place since


@dataclasses.dataclass
class Trace:
    calls: list[tuple[str, tuple]]  # (Conv2d / Linear name, key of its input tensor), in call order
    pairs: list[tuple[str, str]]  # (convolution, the BatchNorm2d that reads its output)
    entered: dict[tuple, list[str]]  # key of a tensor -> the modules that received it, outermost first

    def quantize_at(self, key: tuple, readers: list[str]) -> str:
        """The outermost module that received the tensor and holds all its readers ("" = the network)."""
        def holds(name: str) -> bool:
            return all(name == "" or r == name or r.startswith(name + ".") for r in readers)
        return next(name for name in self.entered[key] if holds(name))


def trace(model: nn.Module, input_shape: tuple[int, int, int]) -> Trace:
    """One forward pass of `model` (eval mode) on zeros, watched by hooks."""
    result, conv_outputs, alive, hooks = Trace([], [], {}), {}, [], []

    def on_enter(name, _module, args):
        if args and isinstance(args[0], torch.Tensor):
            alive.append(args[0])  # ids stay unique while the pass runs
            result.entered.setdefault(_key(args[0]), []).append(name)  # containers are entered before their children

    def on_weighted(name, module, args, output):
        if any(called == name for called, _ in result.calls):
            raise ValueError(f"{name} runs more than once in a forward pass: QAT supports one call per module")
        alive.append(output)
        result.calls.append((name, _key(args[0])))
        if isinstance(module, nn.Conv2d):
            conv_outputs[id(output)] = name

    def on_norm(name, _module, args):
        if id(args[0]) in conv_outputs:
            result.pairs.append((conv_outputs[id(args[0])], name))

    for name, module in model.named_modules():
        hooks.append(module.register_forward_pre_hook(functools.partial(on_enter, name)))
        if isinstance(module, QUANTIZED):
            hooks.append(module.register_forward_hook(functools.partial(on_weighted, name)))
        elif isinstance(module, nn.BatchNorm2d):
            hooks.append(module.register_forward_pre_hook(functools.partial(on_norm, name)))
    try:
        with torch.no_grad():
            model.eval()(torch.zeros((1, *input_shape)))
    finally:
        for hook in hooks:
            hook.remove()
    return result


@dataclasses.dataclass
class QatNetwork:
    original: nn.Module  # the trained float network, untouched
    model: nn.Module  # the copy that trains, with fake quantization
    inputs: list[InputQuantizer]  # in the order their first module runs
    folded: list[tuple[str, str]]  # (convolution, BatchNorm folded into it)
    calls: list[str]  # the fake-quantized Conv2d / Linear modules, in call order

    def weighted_modules(self) -> list[tuple[str, tuple[int, ...]]]:
        """(name, weight shape) of every fake-quantized Conv2d / Linear, in call order."""
        return [(name, tuple(self.model.get_submodule(name).parametrizations.weight.original.shape))
                for name in self.calls]

    def freeze_ranges(self) -> None:
        """Stop the input ranges' moving averages (weight scales keep following the weights)."""
        for q in self.inputs:
            q.fake_quant.disable_observer()

    @contextlib.contextmanager
    def ranges_fixed(self):
        """For evaluation: validation images must not move the input ranges."""
        observing = [bool(q.fake_quant.observer_enabled) for q in self.inputs]
        self.freeze_ranges()
        try:
            yield
        finally:
            for q, on in zip(self.inputs, observing):
                q.fake_quant.enable_observer(on)

    def float_model(self) -> nn.Module:
        """The original architecture with the fine-tuned weights, fake quantization gone, in eval mode."""
        result = copy.deepcopy(self.original).eval()
        state = result.state_dict()
        trained = {k.replace(WEIGHT_KEY, "weight"): v for k, v in self.model.state_dict().items()}
        for key in state:
            if key in trained and trained[key].shape == state[key].shape:
                state[key] = trained[key].detach().clone()
        for conv, norm in self.folded:
            bias = trained[f"{conv}.bias"].detach().clone()
            if f"{conv}.bias" in state:
                state[f"{conv}.bias"] = torch.zeros_like(bias)
            eps = result.get_submodule(norm).eps
            state.update({f"{norm}.weight": torch.ones_like(bias), f"{norm}.bias": bias,
                          f"{norm}.running_mean": torch.zeros_like(bias),
                          f"{norm}.running_var": torch.full_like(bias, 1.0 - eps)})
        result.load_state_dict(state)
        return result


def prepare(model: nn.Module, input_shape: tuple[int, int, int], qconfig: QConfig = QAT_QCONFIG) -> QatNetwork:
    """The network to fine-tune (train mode) with BatchNorms folded and fake quantization in place."""
    original = model
    model = copy.deepcopy(model).eval()
    traced = trace(model, input_shape)
    for conv_name, norm_name in traced.pairs:
        norm = model.get_submodule(norm_name)
        if not _foldable(norm):
            raise ValueError(f"{norm_name} ({type(norm).__name__}) follows convolution {conv_name} but is not a "
                             "BatchNorm QAT can fold (affine nn.BatchNorm2d or timm BatchNormAct2d with running stats)")
        model.set_submodule(conv_name, fuse_conv_bn_eval(model.get_submodule(conv_name), norm))
        model.set_submodule(norm_name, FoldedNorm(norm))
    for name, _ in traced.calls:
        parametrize.register_parametrization(model.get_submodule(name), "weight", qconfig.weight())
    readers: dict[tuple, list[str]] = {}
    for name, key in traced.calls:
        readers.setdefault(key, []).append(name)
    inputs = [InputQuantizer(names, traced.quantize_at(key, names), qconfig.activation()) for key, names in readers.items()]
    for q in inputs:
        q.hook(model)
    model.qat_input_quantizers = nn.ModuleList(q.fake_quant for q in inputs)  # moved by .to(), saved by state_dict
    return QatNetwork(original, model.train(), inputs, traced.pairs, [name for name, _ in traced.calls])
