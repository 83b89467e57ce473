"""The deployment spec: one small file that every generated `config.pbtxt` is rendered from.

    configs/deployment.json  ->  DeploymentSpec  ->  model_repository/*/config.pbtxt

Edit the JSON (or let `make tune` write it); never edit the generated configs.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import re
from pathlib import Path

import pydantic
from PIL import Image

from common import contract
from common.contract import ImageLimits
from common.priority import MAX_NICE

PIPELINES = ("ensemble", "fused")
BACKENDS = ("auto", "python-onnxruntime", "onnxruntime", "tensorrt")
PRECISIONS = ("fp32", "fp16", "int8")
INSTANCE_KINDS = ("KIND_CPU", "KIND_GPU")
DEFAULT_SPEC_PATH = Path("configs/deployment.json")
QUEUE_BATCHES = 1  # derived queue bound: this many max batches per instance
DEFAULT_QUEUE_TIMEOUT_US = 1_000_000
# measured (docs/results/2026-12-03-single-instance-stall.md): one instance with any default_queue_policy
SINGLE_INSTANCE_STALL = ("Triton 2.51's batcher then leaves it idle for 500 ms now and then, at any load (2 clients: "
                         "5-56 stalls of 503 ms a minute; none without the policy, nor with 2 instances at 2-8 "
                         "clients)")
STUB_NICE = 10  # derived nice increment of the classifier's (and the fused model's) python stub
PREPROCESS_NICE = MAX_NICE  # of the preprocess stub: below the classifier's
MODEL_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")  # a folder of the repository and a config.pbtxt string
TARGET_SERVER_KEYS = ("image", "tensorrt", "compute_capability", "version_compatible", "hardware_compatibility")
PREPROCESSING = ("python", "dali")
# pydantic's validation of a loaded spec (DeploymentSpec.from_dict): each value of its field's type exactly
STRICT = {"strict": True, "extra": "forbid"}
# The widest value each field's type in Triton's model config (protobuf) holds: a larger one fails the model's load.
INT32_MAX, UINT64_MAX = 2**31 - 1, 2**64 - 1
TRITON_TYPES = {"instances": ("int32", INT32_MAX), "max_queue_size": ("int32", INT32_MAX),
                "max_queue_delay_us": ("uint64", UINT64_MAX), "queue_timeout_us": ("uint64", UINT64_MAX)}
TYPE_NAMES = {"int_type": "an integer", "float_type": "a number", "string_type": "a string", "list_type": "a list",
              "dict_type": "an object", "bool_type": "true or false"}


@dataclasses.dataclass
class StageSpec:
    """Batching and instances of one served model (preprocess or classifier)."""

    __pydantic_config__ = STRICT

    instances: int = 1
    preferred_batch_sizes: list[int] = dataclasses.field(default_factory=lambda: [4, 8])
    max_queue_delay_us: int = 2000
    threads: int = 2  # decode threads (preprocess) / ONNX Runtime intra-op threads (classifier)
    # The bounded queue (Triton's default_queue_policy, timeout_action REJECT): a request that finds it full,
    # or waits in it longer than the timeout, is answered "busy" (HTTP 503 / gRPC UNAVAILABLE).
    # None: derived (DeploymentSpec.queue_policy); 0: unbounded / no timeout.
    max_queue_size: int | None = None
    queue_timeout_us: int | None = None
    # Added to tritonserver's nice value for this model's python stub (common/priority.py), 0..19.
    # None: derived (DeploymentSpec.nice); 0: the server's own priority.
    nice: int | None = None

    def check(self, name: str, max_batch_size: int) -> None:
        if self.instances < 1:
            raise ValueError(f"{name}.instances must be >= 1, got {self.instances}")
        if self.threads < 1:
            raise ValueError(f"{name}.threads must be >= 1, got {self.threads}")
        if self.max_queue_delay_us < 0:
            raise ValueError(f"{name}.max_queue_delay_us must be >= 0, got {self.max_queue_delay_us}")
        for key in ("max_queue_size", "queue_timeout_us"):
            if getattr(self, key) is not None and getattr(self, key) < 0:
                raise ValueError(f"{name}.{key} must be >= 0 (0: unbounded) or null (derived), "
                                 f"got {getattr(self, key)}")
        for key, (kind, top) in TRITON_TYPES.items():
            if (getattr(self, key) or 0) > top:
                raise ValueError(f"{name}.{key} must be at most {top} (Triton's field is {kind}), "
                                 f"got {getattr(self, key)}")
        if self.nice is not None and not 0 <= self.nice <= MAX_NICE:
            raise ValueError(f"{name}.nice must be within 0..{MAX_NICE} (0: the server's priority) or null (derived), "
                             f"got {self.nice}")
        bad = [b for b in self.preferred_batch_sizes if not 1 <= b <= max_batch_size]
        if bad:
            raise ValueError(f"{name}.preferred_batch_sizes {bad} outside 1..max_batch_size ({max_batch_size})")


@dataclasses.dataclass
class DeploymentSpec:
    __pydantic_config__ = STRICT

    artifacts: str = "artifacts/efficientnet_lite0"  # from `python -m training.export`
    ensemble_name: str = contract.ENSEMBLE
    preprocess_name: str = contract.PREPROCESS
    classifier_name: str = contract.CLASSIFIER
    backend: str = "auto"
    # "ensemble": preprocess -> classifier (two models). "fused": one python model does both
    # (python-onnxruntime only): no inter-process tensor hop per batch (docs/benchmarks.md).
    pipeline: str = "ensemble"
    precision: str = "fp32"
    max_batch_size: int = contract.MAX_BATCH_SIZE
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
    # Triton's response cache on the ensemble: an image sent before is answered from memory, without
    # preprocessing or inference. 0: off; else the cache's size in MiB (`make serve` starts the server with it).
    response_cache_mb: int = 0
    # The Triton server that will load a TensorRT plan (docs/gpu.md): {"image": NGC tag (for messages),
    # "tensorrt": its TensorRT version, "compute_capability": its GPU's, "version_compatible": bool,
    # "hardware_compatibility": none | ampere_plus | same_compute_capability}. Empty: this machine's.
    target_server: dict = dataclasses.field(default_factory=dict)
    # "python": the preprocess model is the python backend (common/preprocessing.py); "dali": a DALI pipeline
    # for servers with the DALI backend (NGC images; build/repository/dali.py, docs/gpu.md).
    preprocessing: str = "python"
    # Outputs the classifier model declares (a subset of the ONNX model's, "probabilities" always: the
    # ensemble reads it). ["probabilities"] gives one output, what single-output clients such as
    # Triton's image_client.py require (docs/deploy.md).
    classifier_outputs: list[str] = dataclasses.field(default_factory=lambda: list(contract.ONNX_OUTPUTS))
    # Where the classifier's instances run: null, its backend's own (KIND_CPU for the ONNX Runtime backends,
    # KIND_GPU for tensorrt); "KIND_GPU" puts Triton's onnxruntime backend on the GPU (its CUDA provider).
    classifier_kind: str | None = None

    def __post_init__(self):
        for key, kind in (("preprocess", StageSpec), ("classifier", StageSpec), ("fused", StageSpec),
                          ("limits", ImageLimits)):
            value = getattr(self, key)
            if isinstance(value, dict):
                setattr(self, key, kind(**value))
            elif not isinstance(value, kind):  # e.g. "preprocess": null in the JSON
                raise ValueError(f"{key} must be an object of {_fields(key)}, got {value!r}")
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
        if self.max_batch_size > INT32_MAX:
            raise ValueError(f"max_batch_size must be at most {INT32_MAX} (Triton's field is int32), "
                             f"got {self.max_batch_size}")
        names = [self.ensemble_name, self.preprocess_name, self.classifier_name]
        if len(set(names)) != 3:
            raise ValueError(f"model names must differ, got {names}")
        bad = [n for n in names if not isinstance(n, str) or not MODEL_NAME.fullmatch(n)]
        if bad:
            raise ValueError(f"model names are letters, digits, '_', '.' and '-' (not first), got {bad}")
        self.limits.check(Image.MAX_IMAGE_PIXELS)
        unknown_target = set(self.target_server) - set(TARGET_SERVER_KEYS)
        if unknown_target:
            raise ValueError(f"unknown target_server keys {sorted(unknown_target)}; valid: {list(TARGET_SERVER_KEYS)}")
        if self.preprocessing not in PREPROCESSING:
            raise ValueError(f"preprocessing {self.preprocessing!r} is not one of {PREPROCESSING}")
        if self.pipeline == "fused" and self.backend not in ("auto", "python-onnxruntime"):
            raise ValueError(f"the fused pipeline runs in the python backend: backend must be 'auto' or "
                             f"'python-onnxruntime', got {self.backend!r}")
        if self.pipeline == "fused" and self.preprocessing != "python":
            raise ValueError(f"the fused pipeline preprocesses in its python model: preprocessing must be 'python', "
                             f"got {self.preprocessing!r}")
        outputs = self.classifier_outputs
        if (not isinstance(outputs, list) or contract.ONNX_PROBABILITIES not in outputs
                or not set(outputs) <= set(contract.ONNX_OUTPUTS) or len(set(outputs)) != len(outputs)):
            raise ValueError(f"classifier_outputs must be distinct names from {list(contract.ONNX_OUTPUTS)} including "
                             f"{contract.ONNX_PROBABILITIES!r}, got {outputs!r}")
        if self.classifier_kind is not None and self.classifier_kind not in INSTANCE_KINDS:
            raise ValueError(f"classifier_kind {self.classifier_kind!r} is not one of {INSTANCE_KINDS} or null "
                             "(the backend's own)")
        if self.response_cache_mb < 0:
            raise ValueError(f"response_cache_mb must be >= 0 (0: off), got {self.response_cache_mb}")
        self.preprocess.check("preprocess", self.max_batch_size)
        self.classifier.check("classifier", self.max_batch_size)
        self.fused.check("fused", self.max_batch_size)
        for stage in ("preprocess", "classifier", "fused"):
            self._check_queue(stage)

    def _check_queue(self, stage: str) -> None:
        """The resolved queue policy of `stage` is one Triton can hold and one a lone request gets through: a
        batching delay as long as the queue timeout times out every request no batch fills in time (all of them
        on an idle server)."""
        this = getattr(self, stage)
        size, timeout = self.queue_policy(stage)
        if size > INT32_MAX:
            raise ValueError(f"{stage}: the derived max_queue_size {size} exceeds {INT32_MAX} (Triton's field is "
                             "int32): set max_queue_size, or fewer instances or a smaller max_batch_size")
        if timeout and this.max_queue_delay_us >= timeout:
            given = "queue_timeout_us" if this.queue_timeout_us is not None else "its derived queue timeout"
            raise ValueError(f"{stage}.max_queue_delay_us {this.max_queue_delay_us} must be below {given} {timeout}: "
                             "a request waiting that long for a batch times out (every one on an idle server); "
                             "lower the delay, or raise the timeout (0: none)")

    def queue_policy(self, stage: str) -> tuple[int, int]:
        """(max_queue_size, timeout_us) of `stage` (preprocess, classifier or fused), defaults resolved. A model
        that takes the ensemble's requests first (preprocess, fused) holds QUEUE_BATCHES max batches per
        instance (a burst of that many requests on an idle server is served, not turned away); the classifier
        behind preprocess holds one max batch from every preprocess instance at once (what preprocess hands on
        in one go), so it turns nothing away below capacity. Both time out, so that an accepted request's wait
        stays bounded whichever model is the slower. A stage with one instance derives no policy at all:
        Triton 2.51's batcher leaves a single instance behind any queue policy idle for its 500 ms wait now and
        then, at any load (SINGLE_INSTANCE_STALL); set the fields to bound it anyway (`cautions` then says so)."""
        this = getattr(self, stage)
        single = this.instances == 1  # derives neither a bound nor a timeout
        if this.max_queue_size is not None:
            size = this.max_queue_size
        elif single:
            size = 0
        elif stage == "classifier":
            size = self.preprocess.instances * self.max_batch_size if self.queue_policy("preprocess")[0] else 0
        else:
            size = QUEUE_BATCHES * this.instances * self.max_batch_size
        if this.queue_timeout_us is not None:
            timeout = this.queue_timeout_us
        else:
            timeout = 0 if single else DEFAULT_QUEUE_TIMEOUT_US
        return size, timeout

    def served_stages(self) -> tuple[str, ...]:
        """The stages this pipeline serves, the door (the model that takes the ensemble's requests) first."""
        return ("fused",) if self.pipeline == "fused" else ("preprocess", "classifier")

    def cautions(self) -> list[str]:
        """What in this spec is valid but measured to behave badly (printed by `make engines`): a queue policy
        in front of a single instance, which Triton 2.51's batcher leaves idle for its default 500 ms wait now
        and then (SINGLE_INSTANCE_STALL); and a single-instance door, which therefore turns nothing away."""
        out = []
        for stage in self.served_stages():
            if getattr(self, stage).instances != 1:
                continue
            size, timeout = self.queue_policy(stage)
            if size or timeout:
                out.append(f"{stage}: one instance behind a queue policy (max_queue_size {size}, timeout {timeout} "
                           f"us): {SINGLE_INSTANCE_STALL}; give it 2 or more instances, or no policy (both 0)")
            elif stage == self.served_stages()[0]:
                out.append(f"{stage}: the door has one instance and so no queue bound (a policy would stall it: "
                           f"{SINGLE_INSTANCE_STALL}): past capacity every request waits; give it 2 or more instances")
        return out

    def nice(self, stage: str) -> int:
        """The nice increment of `stage`'s python stub (preprocess, classifier or fused), defaults resolved.
        Every stub runs below tritonserver, whose own threads parse requests and answer "busy": on a saturated
        CPU that answer then does not wait for a core behind the models' work. Preprocess runs below the
        classifier: it gets the CPU the classifier leaves, so past capacity requests wait, and are turned
        away, at the ensemble's door rather than after their decoding, in the classifier's queue."""
        this = getattr(self, stage)
        if this.nice is not None:
            return this.nice
        return PREPROCESS_NICE if stage == "preprocess" else STUB_NICE

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "DeploymentSpec":
        """The spec of a JSON object: every value checked against its field's type by pydantic, strictly (2.5, "2"
        or true is no instance count), then by `check`; ValueError naming the key."""
        if not isinstance(data, dict):
            raise ValueError(f"a deployment spec is a JSON object, got {data!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown deployment-spec keys {sorted(unknown)}; valid: {sorted(known)}")
        try:
            return _validator().validate_json(json.dumps(data))
        except pydantic.ValidationError as exc:
            raise ValueError("; ".join(_explain(error) for error in exc.errors())) from None

    @classmethod
    def load_or_default(cls, path: str | Path) -> tuple["DeploymentSpec", str]:
        """(spec, where it came from): `path`'s; the built-in default only where `path` is the default
        spec's and it does not exist (a clone without configs/). Any other missing path is an error: a
        mistyped --spec would otherwise build (or tune) a spec nobody chose."""
        if Path(path).exists():
            return cls.load(path), str(path)
        if Path(path) == DEFAULT_SPEC_PATH:
            return cls(), "the built-in default DeploymentSpec"
        raise FileNotFoundError(f"spec {path} not found (the committed specs are in {DEFAULT_SPEC_PATH.parent}/)")

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


@functools.cache
def _validator() -> pydantic.TypeAdapter:
    return pydantic.TypeAdapter(DeploymentSpec)


def _fields(key: str) -> list[str]:
    return sorted(f.name for f in dataclasses.fields(ImageLimits if key == "limits" else StageSpec))


def _explain(error: dict) -> str:
    """One pydantic error as the spec's other errors read: the key, what it must be, what it got."""
    if error["type"] == "value_error":  # raised by check()
        return str(error["ctx"]["error"])
    loc = error["loc"]
    key = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc).lstrip(".")
    got = error.get("input")
    if error["type"] == "dataclass_type":
        return f"{key} must be an object of {_fields(str(loc[-1]))}, got {got!r}"
    if error["type"] in ("unexpected_keyword_argument", "extra_forbidden"):
        return f"unknown {loc[0]} key {loc[-1]!r}; valid: {_fields(str(loc[0]))}"
    if error["type"] in TYPE_NAMES:
        return f"{key} must be {TYPE_NAMES[error['type']]}, got {got!r}"
    return f"{key}: {error['msg']}, got {got!r}"
