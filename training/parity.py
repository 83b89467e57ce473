"""Does the exported model compute what the source model computes? The parity record of an export.

The source model (PyTorch) and ONNX Runtime run the same preprocessed images; the export passes when
the largest |logits difference| is within `atol`. The record goes into export.json (`parity`).
"""
from __future__ import annotations

import dataclasses

import numpy as np

from training.onnx_graph import LOGITS


class ParityError(ValueError):
    """The exported model does not reproduce the source model within tolerance."""

    def __init__(self, message: str, parity: "Parity"):
        super().__init__(message)
        self.parity = parity


@dataclasses.dataclass
class Parity:
    """Source model vs ONNX Runtime on the same preprocessed photos."""

    names: list[str]
    reference_top1: list[int]
    onnx_top1: list[int]
    max_abs_diff_per_photo: list[float]
    atol: float

    @property
    def max_abs_diff(self) -> float:
        return max(self.max_abs_diff_per_photo)

    @property
    def top1_agreement(self) -> float:
        same = sum(a == b for a, b in zip(self.reference_top1, self.onnx_top1))
        return same / len(self.names)

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.atol

    def to_dict(self) -> dict:
        return {
            "reference": "pytorch",
            "candidate": "onnxruntime CPUExecutionProvider",
            "compared": LOGITS,
            "photos": self.names,
            "max_abs_diff": self.max_abs_diff,
            "top1_agreement": self.top1_agreement,
            "atol": self.atol,
            "passed": self.passed,
        }

    def report(self, labels: list[str]) -> str:
        lines = [f"{'photo':14s} {'pytorch top-1':32s} {'onnx top-1':32s} max|diff|"]
        for name, ref, got, diff in zip(
            self.names, self.reference_top1, self.onnx_top1, self.max_abs_diff_per_photo
        ):
            lines.append(f"{name:14s} {_short(ref, labels):32s} {_short(got, labels):32s} {diff:.2e}")
        verdict = "PASS" if self.passed else "FAIL"
        lines.append(
            f"{verdict}: max |logits diff| {self.max_abs_diff:.2e} (atol {self.atol:g}), "
            f"top-1 agreement {self.top1_agreement:.0%} on {len(self.names)} photos"
        )
        return "\n".join(lines)


def _short(index: int, labels: list[str]) -> str:
    return f"{index} {labels[index].split(',')[0]}"[:32]


def compare_logits(reference: np.ndarray, candidate: np.ndarray, names: list[str], atol: float) -> Parity:
    diff = np.abs(reference.astype(np.float64) - candidate.astype(np.float64)).max(axis=1)
    return Parity(
        names=list(names),
        reference_top1=reference.argmax(1).tolist(),
        onnx_top1=candidate.argmax(1).tolist(),
        max_abs_diff_per_photo=diff.tolist(),
        atol=atol,
    )
