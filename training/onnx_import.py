"""Importing a foreign ONNX classifier: `python -m training.export --onnx model.onnx --labels ...`.

There is no source model to compare with: the checks are the graph's own (onnx.checker, a dynamic
batch in ONNX Runtime, the class count) and sane outputs on the sample photos; export.json has
`"parity": null` and the sample photos' top-1 instead.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

from common.preprocessing import PreprocessConfig, load_files
from common.samples import sample_photos
from training.artifacts import ExportResult, file_sha256, temp_model, write_artifacts
from training.onnx_graph import LOGITS, PROBABILITIES, canonicalize_classifier, check_onnx_file, run_onnxruntime


def import_onnx(
    onnx_path: str | Path,
    out_dir: str | Path,
    labels: list[str],
    preprocess: PreprocessConfig,
    outputs: str = LOGITS,
) -> ExportResult:
    """Any single-input, single-output ONNX image classifier -> canonical artifact directory.

    Checks: onnx.checker, ONNX Runtime at each of CHECK_BATCH_SIZES, and on the sample photos outputs of
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
    tmp_model = temp_model(out_dir)
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
        return write_artifacts(tmp_model, out_dir, labels, preprocess, reference, metadata)
    finally:
        tmp_model.unlink(missing_ok=True)
