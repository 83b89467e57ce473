"""The one sha256 of a file, used wherever an artifact is keyed by its content (ONNX models, checkpoints,
calibration caches, plans)."""
from __future__ import annotations

import hashlib
from pathlib import Path


def file_sha256(path: str | Path, *more: str | Path) -> str:
    """sha256 of the file's bytes, followed by those of `more` (an ONNX file's weights files: common.onnxfiles)."""
    digest = hashlib.sha256()
    for name in (path, *more):
        with open(name, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()
