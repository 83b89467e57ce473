"""Writing an artifact directory (its files: training.export) so that model.onnx implies the rest.

model.onnx is written into a temporary folder (`temp_model`) and moved into place only after its checks
pass and the side files are written (`write_artifacts`): a failed check raises and leaves no new
model.onnx (an existing one from an earlier run is kept). A model with external data (common.onnxfiles)
has its weights file moved beside it first, under the name the model records; export.json lists it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from common.contract import MODEL_ONNX
from common.hashing import file_sha256
from common.labels import write_labels
from common.onnxfiles import data_file, model_sha256, weight_files
from common.preprocessing import PreprocessConfig
from training.onnx_graph import default_opset, io_summary
from training.parity import Parity


@dataclasses.dataclass
class ExportResult:
    """What an export wrote: the directory, its model.onnx, export.json's contents and, for an export
    from PyTorch, the parity record."""

    out_dir: Path
    model_path: Path
    metadata: dict
    parity: Parity | None = None

    @property
    def sha256(self) -> str:
        return self.metadata["onnx"]["sha256"]


@contextlib.contextmanager
def temp_model(out_dir: Path) -> Iterator[Path]:
    """A path for the model in a private folder in `out_dir` (its weights file, if any, is written beside it)
    until it passes its checks; the folder, and what write_artifacts did not move out of it, goes at the end."""
    folder = Path(tempfile.mkdtemp(dir=out_dir, prefix=".model-"))
    try:
        yield folder / MODEL_ONNX
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def write_artifacts(
    tmp_model: Path, out_dir: Path, labels: list[str], preprocess: PreprocessConfig, reference: dict, metadata: dict
) -> ExportResult:
    """Write the side files, then move the checked model into place (last, so it implies the rest)."""
    model_path = out_dir / MODEL_ONNX
    write_labels(out_dir / "labels.txt", labels)
    preprocess.save(out_dir / "preprocess.json")
    np.savez(out_dir / "reference.npz", **reference)
    model = onnx.load(str(tmp_model), load_external_data=False)
    weights = weight_files(tmp_model)
    metadata = {
        **metadata,
        "onnx": {
            "file": model_path.name,
            "sha256": model_sha256(tmp_model),
            "bytes": tmp_model.stat().st_size,
            **({"external_data": _listed(tmp_model.parent, weights)} if weights else {}),
            "opset": default_opset(model),
            **metadata.get("onnx", {}),
        },
        **io_summary(model),
        "num_classes": len(labels),
        "preprocess": preprocess.to_dict(),
        "versions": versions(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    (out_dir / "export.json").write_text(json.dumps(metadata, indent=2) + "\n")
    for name in weights:  # the weights before the model that names them
        os.replace(tmp_model.parent / name, out_dir / name)
    if data_file(model_path).name not in weights:  # an earlier export's, which this model does not read
        data_file(model_path).unlink(missing_ok=True)
    os.replace(tmp_model, model_path)
    return ExportResult(out_dir=out_dir, model_path=model_path, metadata=metadata)


def _listed(folder: Path, names: list[str]) -> list[dict]:
    """export.json's record of a model's weights files: each one's name, sha256 and size."""
    return [{"file": name, "sha256": file_sha256(folder / name), "bytes": (folder / name).stat().st_size}
            for name in names]


def versions() -> dict:
    import onnxscript

    return {
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": ort.__version__,
        "onnxscript": onnxscript.__version__,
        "numpy": np.__version__,
    }
