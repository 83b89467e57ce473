"""Writing an artifact directory (its files: training.export) so that model.onnx implies the rest.

model.onnx is written to a temporary file (`temp_model`) and moved into place only after its checks
pass and the side files are written (`write_artifacts`): a failed check raises and leaves no new
model.onnx (an existing one from an earlier run is kept).
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from common.hashing import file_sha256
from common.labels import write_labels
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


def temp_model(out_dir: Path) -> Path:
    """An empty private file in `out_dir` that holds the model until it passes its checks."""
    fd, name = tempfile.mkstemp(dir=out_dir, prefix=".model-", suffix=".onnx.tmp")
    os.close(fd)
    return Path(name)


def write_artifacts(
    tmp_model: Path, out_dir: Path, labels: list[str], preprocess: PreprocessConfig, reference: dict, metadata: dict
) -> ExportResult:
    """Write the side files, then move the checked model into place (last, so it implies the rest)."""
    model_path = out_dir / "model.onnx"
    write_labels(out_dir / "labels.txt", labels)
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
        "versions": versions(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    (out_dir / "export.json").write_text(json.dumps(metadata, indent=2) + "\n")
    tmp_model.chmod(0o644)  # mkstemp makes it private
    os.replace(tmp_model, model_path)
    return ExportResult(out_dir=out_dir, model_path=model_path, metadata=metadata)


def versions() -> dict:
    import onnxscript

    return {
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": ort.__version__,
        "onnxscript": onnxscript.__version__,
        "numpy": np.__version__,
    }
