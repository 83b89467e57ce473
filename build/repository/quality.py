"""The quality reference of a classifier version: what it answers on held-out images, recorded at build time.

    model file + held-out images (build.precision.imagesets) -> <classifier>/<version>/quality_reference.json

The served python classifier exports it as gauges next to its live answers (templates/quality_metrics.py),
and Prometheus compares the two (deploy/monitoring/rules/: prediction drift, confidence drop). The
reference is only as representative as its images: the bundled photos by default, `--held-out DIR`
(`make engines ENGINES_ARGS="--held-out DIR"`) for images of your own traffic (docs/operations.md). The
reference and BUILD.json record which (held_out_source), so that a rollout computes its candidate's
reference from the same images (serving.rollout).
"""
from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path

import numpy as np

from build.precision.imagesets import IMAGE_SUFFIXES, ImageSet, held_out_set
from build.repository.templates.quality_metrics import (CONFIDENCE_BUCKETS, LOW_CONFIDENCE_REFERENCE_SHARE,
                                                        MAX_TRACKED_CLASSES, OTHER, REFERENCE_JSON)
from common.contract import ONNX_INPUT, ONNX_PROBABILITIES

__all__ = ["REFERENCE_JSON", "reference_from_probabilities", "compute_reference", "write_reference",
           "held_out_source", "folder_digest"]


def tracked_classes(top1: np.ndarray, num_classes: int, max_tracked: int = MAX_TRACKED_CLASSES) -> list[int]:
    """Every class when there are at most `max_tracked`; else the reference's `max_tracked` most frequent
    answers (ties: the lower index), the rest counted together as OTHER."""
    if num_classes <= max_tracked:
        return list(range(num_classes))
    counts = np.bincount(top1, minlength=num_classes)
    order = sorted((c for c in range(num_classes) if counts[c]), key=lambda c: (-counts[c], c))
    return sorted(order[:max_tracked])


def low_confidence_bound(shares: list[float], buckets=CONFIDENCE_BUCKETS,
                         at_most: float = LOW_CONFIDENCE_REFERENCE_SHARE) -> float:
    """The largest bucket bound with at most `at_most` of the reference's answers at or below it (the
    lowest bound when even that one holds more)."""
    under = [b for b, share in zip(buckets, shares) if share <= at_most]
    return max(under) if under else buckets[0]


def reference_from_probabilities(probabilities: np.ndarray, labels: list[str], description: str,
                                 max_tracked: int = MAX_TRACKED_CLASSES) -> dict:
    """The reference (JSON-ready) from a model's probabilities [images, classes] on held-out images."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    if probabilities.ndim != 2 or len(probabilities) == 0:
        raise ValueError(f"need probabilities [images, classes], got shape {probabilities.shape}")
    num_classes = probabilities.shape[1]
    if len(labels) != num_classes:
        raise ValueError(f"{len(labels)} labels for {num_classes} classes")
    top1 = probabilities.argmax(axis=1)
    confidence = probabilities[np.arange(len(top1)), top1]
    tracked = tracked_classes(top1, num_classes, max_tracked)
    has_other = num_classes > max_tracked
    counts = np.bincount(top1, minlength=num_classes) / len(top1)
    shares = [float(np.mean(confidence <= b)) for b in CONFIDENCE_BUCKETS]
    class_share = {str(c): float(counts[c]) for c in tracked}
    if has_other:
        class_share[OTHER] = float(max(0.0, 1.0 - sum(class_share.values())))
    return {
        "output": ONNX_PROBABILITIES,  # the classifier output the served model counts
        "images": int(len(top1)),
        "description": description,
        "num_classes": int(num_classes),
        "tracked": tracked,
        "has_other": has_other,
        "labels": {str(c): labels[c] for c in tracked},
        "class_share": class_share,
        "confidence_buckets": list(CONFIDENCE_BUCKETS),
        "confidence_share": shares,
        "confidence_mean": float(confidence.mean()),
        "low_confidence_bound": low_confidence_bound(shares),
    }


def folder_digest(folder: str | Path) -> str:
    """sha256 of the image files under `folder` (the ones folder_images reads): each relative path and size."""
    folder = Path(folder)
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    listing = "".join(f"{p.relative_to(folder).as_posix()}\t{p.stat().st_size}\n" for p in paths)
    return hashlib.sha256(listing.encode()).hexdigest()


def held_out_source(held_out: str | None) -> dict:
    """What the held-out images were: {"folder": absolute path, "files_sha256": folder_digest}, or
    {"folder": None} for the bundled held-out photos."""
    if not held_out:
        return {"folder": None}
    return {"folder": str(Path(held_out).resolve()), "files_sha256": folder_digest(held_out)}


@functools.lru_cache(maxsize=4)
def _held_out(config, held_out: str | None) -> ImageSet:
    """The held-out views, made once per process for each preprocessing and folder (repositories are
    written many times in one test session)."""
    return held_out_set(config, held_out)


def compute_reference(model_file: str | Path, artifacts: str | Path, held_out: str | None = None,
                      batch_size: int = 16) -> dict:
    """Run `model_file` (ONNX, through the serving path's ONNX Runtime session) on the held-out images of
    build.precision.imagesets (the accuracy gate's: the bundled photos' views, or a folder)."""
    from common.contract import LABELS_TXT, PREPROCESS_JSON
    from common.labels import read_labels
    from common.onnxsession import cpu_session
    from common.preprocessing import PreprocessConfig

    artifacts = Path(artifacts)
    config = PreprocessConfig.load(artifacts / PREPROCESS_JSON)
    images = _held_out(config, held_out)
    session = cpu_session(str(model_file), intra_op_threads=0)
    probabilities = np.concatenate([session.run([ONNX_PROBABILITIES], {ONNX_INPUT: batch})[0]
                                    for batch in images.batches(config, batch_size)])
    reference = reference_from_probabilities(probabilities, read_labels(artifacts / LABELS_TXT), images.description)
    reference["model_file"] = Path(model_file).name
    reference["held_out"] = held_out_source(held_out)
    return reference


def write_reference(version_dir: str | Path, reference: dict) -> Path:
    path = Path(version_dir) / REFERENCE_JSON
    path.write_text(json.dumps(reference, indent=2) + "\n")
    return path
