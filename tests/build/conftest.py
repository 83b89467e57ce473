import shutil

import pytest


@pytest.fixture
def artifacts(tiny_artifacts, tmp_path):
    """A copy of the tiny model's artifacts without calibration or variants: each test builds its own."""
    out = tmp_path / "tiny"
    shutil.copytree(tiny_artifacts, out, ignore=shutil.ignore_patterns("calibration", "model.*.onnx"))
    return out
