"""A tiny random conv net in PyTorch, exported the way other tools leave ONNX classifiers: arbitrary IO names,
a fixed batch of 1, and the head, layout and spatial axes a test asks for."""
from __future__ import annotations

import warnings
from pathlib import Path

import torch


class TinyNet(torch.nn.Module):
    """heads: logits, probabilities (Softmax), manual-softmax (exp / sum), sigmoid, fixed-reshape (a batch of 1
    baked into a Reshape); `nhwc` takes images channels-last."""

    def __init__(self, num_classes: int = 7, head: str = "logits", nhwc: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 8, 3, stride=4)
        self.fc = torch.nn.Linear(8, num_classes)
        self.head, self.nhwc = head, nhwc

    def forward(self, x):
        x = x.permute(0, 3, 1, 2) if self.nhwc else x
        x = torch.relu(self.conv(x)).mean((2, 3), keepdim=True)
        x = x.reshape(1, -1) if self.head == "fixed-reshape" else torch.flatten(x, 1)
        x = self.fc(x)
        if self.head == "probabilities":
            return torch.softmax(x, 1)
        if self.head == "manual-softmax":
            return x.exp() / x.exp().sum(1, keepdim=True)
        return torch.sigmoid(x) if self.head == "sigmoid" else x


class FreshBatchNormNet(torch.nn.Module):
    """Two convolutions with batch norms at their initial statistics, then a linear layer: folded into the
    convolutions (eval mode), the batch norms give both the same bias, which the TorchScript exporter writes
    once and gives the second layer through an Identity node."""

    def __init__(self, num_classes: int = 7):
        super().__init__()
        torch.manual_seed(0)
        self.conv1, self.bn1 = torch.nn.Conv2d(3, 8, 3, stride=2, bias=False), torch.nn.BatchNorm2d(8)
        self.conv2, self.bn2 = torch.nn.Conv2d(8, 8, 3, stride=2, bias=False), torch.nn.BatchNorm2d(8)
        self.fc = torch.nn.Linear(8, num_classes)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(torch.flatten(x.mean((2, 3), keepdim=True), 1))


def export_fixed_batch(net: torch.nn.Module, path: Path, size: int = 64, dynamic_size: bool = False) -> Path:
    """`net` -> ONNX with the input "input.1" and the output "output_0" at batch 1; `dynamic_size` names the
    spatial axes (as exports for several image sizes do)."""
    shape = (1, size, size, 3) if getattr(net, "nhwc", False) else (1, 3, size, size)
    spatial = (1, 2) if getattr(net, "nhwc", False) else (2, 3)
    axes = {"input.1": {axis: f"s{axis}" for axis in spatial}} if dynamic_size else None
    with warnings.catch_warnings():  # the legacy exporter warns that it is deprecated
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(net.eval(), (torch.zeros(*shape),), str(path), dynamo=False, opset_version=17,
                          input_names=["input.1"], output_names=["output_0"], dynamic_axes=axes)
    return path


def export_with_external_data(net: torch.nn.Module, path: Path, location: str = "weights.bin") -> Path:
    """`export_fixed_batch`, saved again with every initializer in the file `location` beside `path`
    (size_threshold=0), as ONNX saves models over 2 GB."""
    import onnx

    path.parent.mkdir(parents=True, exist_ok=True)
    model = onnx.load(str(export_fixed_batch(net, path)))
    onnx.save_model(model, str(path), save_as_external_data=True, location=location, size_threshold=0)
    return path
