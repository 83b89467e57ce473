"""What `make engines PRECISION=...` does with awkward inputs: damaged calibration files and a non-image
among the images, and the gate CLI's exit code."""
import shutil
import subprocess
import sys

import pytest

from build.precision import calibrate, fp16
from build.precision.imagesets import augmented_photos, calibration_set, folder_images, held_out_set
from common.preprocessing import ImageError, PreprocessConfig
from common.samples import sample_photos


@pytest.fixture
def artifacts(tiny_artifacts, tmp_path):
    out = tmp_path / "tiny"
    shutil.copytree(tiny_artifacts, out, ignore=shutil.ignore_patterns("calibration", "model.*.onnx"))
    return out


@pytest.fixture
def photos(tmp_path):
    """A small held-out folder: 3 bundled photos."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for name, path in sorted(sample_photos().items())[:3]:
        shutil.copy(path, folder / f"{name}{path.suffix}")
    return folder


@pytest.fixture
def calibrated(artifacts):
    config = PreprocessConfig.load(artifacts / "preprocess.json")
    images = augmented_photos(("chelsea", "coffee"), 2, 0, config)
    result = calibrate.calibrate(artifacts / "model.onnx", artifacts / "calibration", "max", images, config)
    return result, images, config


def _truncate(path, keep):
    path.write_text(path.read_text()[:keep])


def test_a_truncated_calibration_json_recalibrates_saying_why(artifacts, calibrated):
    first, images, config = calibrated
    meta = first.cache.with_suffix(".json")
    _truncate(meta, 60)
    again = calibrate.calibrate(artifacts / "model.onnx", artifacts / "calibration", "max", images, config)
    assert not again.reused and f"unreadable: {meta}: not valid JSON" in again.message, again.message
    assert again.scales == first.scales and calibrate.load_calibration(first.cache).meta == first.meta


def test_a_truncated_cache_line_names_the_file_and_line(artifacts, calibrated):
    first, images, config = calibrated
    lines = first.cache.read_text().splitlines()
    first.cache.write_text("\n".join([*lines[:2], lines[2][:-3]]) + "\n")
    with pytest.raises(ValueError, match=f"^{first.cache}: malformed line 3 "):
        calibrate.read_cache(first.cache)
    with pytest.raises(ValueError, match=f"^{first.cache}: malformed line 3 .*; run `make calibrate`$"):
        calibrate.load_calibration(first.cache)
    again = calibrate.calibrate(artifacts / "model.onnx", artifacts / "calibration", "max", images, config)
    assert not again.reused and f"unreadable: {first.cache}: malformed line 3" in again.message
    assert again.scales == first.scales


def test_a_non_image_among_the_images_is_named(photos, artifacts):
    config = PreprocessConfig.load(artifacts / "preprocess.json")
    bad = photos / "notes.jpg"
    bad.write_bytes(b"not an image")
    for load in (folder_images, calibration_set, held_out_set):
        with pytest.raises(ImageError, match=f"^{bad}: not a recognised image format"):
            load(photos, config) if load is folder_images else load(config, str(photos))


def test_the_gate_cli_exits_2_on_a_failed_gate_and_1_on_an_error(artifacts, tmp_path):
    fp16.convert(artifacts / "model.onnx", artifacts / fp16.OUTPUT_NAME)

    def gate(folder, *flags):
        return subprocess.run([sys.executable, "-m", "build.precision.validate", "--artifacts", str(folder),
                               "--views", "2", "--variants", "fp16", *flags], capture_output=True, text=True,
                              timeout=300)

    assert gate(artifacts).returncode == 0
    failed = gate(artifacts, "--min-agreement-fp16", "1.01")
    assert failed.returncode == 2 and "FAIL" in failed.stdout, failed.stderr
    error = gate(tmp_path / "missing")
    assert error.returncode == 1 and error.stderr.startswith("build.precision.validate: ")
