"""The deployment spec: one small file that every generated `config.pbtxt` is rendered from.

    configs/deployment.json  ->  DeploymentSpec  ->  model_repository/*/config.pbtxt

Edit the JSON (or let `make tune` write it); never edit the generated configs.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from common import contract
from common.contract import ImageLimits

PIPELINES = ("ensemble", "fused")
BACKENDS = ("auto", "python-onnxruntime", "onnxruntime", "tensorrt")
PRECISIONS = ("fp32", "fp16", "int8")
INSTANCE_KINDS = ("KIND_CPU", "KIND_GPU")
DEFAULT_SPEC_PATH = Path("configs/deployment.json")


@dataclasses.dataclass
class StageSpec:
    """Batching and instances of one served model (preprocess or classifier)."""

    instances: int = 1
    preferred_batch_sizes: list[int] = dataclasses.field(default_factory=lambda: [4, 8])
    max_queue_delay_us: int = 2000
    threads: int = 2  # decode threads (preprocess) / ONNX Runtime intra-op threads (classifier)

    def check(self, name: str, max_batch_size: int) -> None:
        if self.instances < 1:
            raise ValueError(f"{name}.instances must be >= 1, got {self.instances}")
        if self.threads < 1:
            raise ValueError(f"{name}.threads must be >= 1, got {self.threads}")
        if self.max_queue_delay_us < 0:
            raise ValueError(f"{name}.max_queue_delay_us must be >= 0, got {self.max_queue_delay_us}")
        bad = [b for b in self.preferred_batch_sizes if not 1 <= b <= max_batch_size]
        if bad:
            raise ValueError(f"{name}.preferred_batch_sizes {bad} outside 1..max_batch_size ({max_batch_size})")


@dataclasses.dataclass
class DeploymentSpec:
    artifacts: str = "artifacts/efficientnet_lite0"  # from `python -m training.export`
    ensemble_name: str = contract.ENSEMBLE
    preprocess_name: str = contract.PREPROCESS
    classifier_name: str = contract.CLASSIFIER
    backend: str = "auto"
    # "ensemble": preprocess -> classifier (two models). "fused": one python model does both
    # (python-onnxruntime only): no inter-process tensor hop per batch (docs/benchmarks.md).
    pipeline: str = "ensemble"
    precision: str = "fp32"
    max_batch_size: int = 32
    preprocess: StageSpec = dataclasses.field(
        default_factory=lambda: StageSpec(instances=2, preferred_batch_sizes=[4, 8], threads=1)
    )
    # Defaults that suit a GPU classifier (TensorRT likes batches). On CPU, small batches on several
    # 1-thread instances win: the committed configs/deployment.json is what `make tune` chose on
    # the project's 2-core machines (docs/benchmarks.md).
    classifier: StageSpec = dataclasses.field(
        default_factory=lambda: StageSpec(instances=1, preferred_batch_sizes=[8, 16], threads=2)
    )
    # The one model of the fused pipeline: decode inline, `threads` ONNX Runtime threads per instance.
    # Two single-threaded instances keep both cores busy; batches of 2, sent at once, keep both
    # instances fed (a larger preferred size hands one instance the queue while the other idles)
    # (docs/benchmarks.md; `make tune`).
    fused: StageSpec = dataclasses.field(
        default_factory=lambda: StageSpec(instances=2, preferred_batch_sizes=[2], max_queue_delay_us=0, threads=1)
    )
    limits: ImageLimits = dataclasses.field(default_factory=ImageLimits)

    def __post_init__(self):
        for key, kind in (("preprocess", StageSpec), ("classifier", StageSpec), ("fused", StageSpec),
                          ("limits", ImageLimits)):
            value = getattr(self, key)
            if isinstance(value, dict):
                setattr(self, key, kind(**value))
            elif not isinstance(value, kind):  # e.g. "preprocess": null in the JSON
                raise ValueError(f"{key} must be an object of {sorted(f.name for f in dataclasses.fields(kind))}, "
                                 f"got {value!r}")
        self.check()

    def check(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"backend {self.backend!r} is not one of {BACKENDS}")
        if self.pipeline not in PIPELINES:
            raise ValueError(f"pipeline {self.pipeline!r} is not one of {PIPELINES}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision {self.precision!r} is not one of {PRECISIONS}")
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {self.max_batch_size}")
        names = [self.ensemble_name, self.preprocess_name, self.classifier_name]
        if len(set(names)) != 3:
            raise ValueError(f"model names must differ, got {names}")
        self.limits.check()
        self.preprocess.check("preprocess", self.max_batch_size)
        self.classifier.check("classifier", self.max_batch_size)
        self.fused.check("fused", self.max_batch_size)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "DeploymentSpec":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown deployment-spec keys {sorted(unknown)}; valid: {sorted(known)}")
        return cls(**data)

    @classmethod
    def load(cls, path: str | Path) -> "DeploymentSpec":
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{path}: {exc}") from None

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    def replace(self, **changes) -> "DeploymentSpec":
        return dataclasses.replace(self, **changes)
