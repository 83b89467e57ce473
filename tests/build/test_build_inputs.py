"""What `make engines PRECISION=...` does with awkward inputs: leftover plans on a CPU build, a layout the
onnxruntime backend cannot check, a model with other output names, damaged calibration files, a non-image
among the images, and the gate CLI's exit code."""
import shutil
import subprocess
import sys

import onnx
import pytest

from build.precision import calibrate, fp16, validate
from build.precision.imagesets import augmented_photos, calibration_set, folder_images, held_out_set
from build.precision.variants import GateFailed, VariantOptions, prepare, tensorrt_unavailable
from build.repository.spec import DeploymentSpec
from build.repository.writer import ArtifactsError
from common.preprocessing import ImageError, PreprocessConfig
from common.samples import sample_photos
from tests.tiny_model import write_near_tie_classifier


@pytest.fixture
def photos(tmp_path):
    """A small held-out folder: 3 bundled photos."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for name, path in sorted(sample_photos().items())[:3]:
        shutil.copy(path, folder / f"{name}{path.suffix}")
    return folder


def _written(artifacts):
    return sorted(p.name for p in artifacts.iterdir() if p.name not in ("model.onnx", "labels.txt", "preprocess.json"))


def test_a_leftover_plan_does_not_stop_a_cpu_build(artifacts, photos):
    if tensorrt_unavailable() is None:
        pytest.skip("TensorRT and a GPU are present here")
    (artifacts / "model.fp16.plan").touch()
    spec = DeploymentSpec(artifacts=str(artifacts), precision="fp16")
    options = VariantOptions(held_out=str(photos), thresholds={"fp16": 0.0})
    deployable = prepare(spec, "python-onnxruntime", "unused.json", options, lambda _: None)
    assert deployable.variant == "fp16" and [r.name for r in deployable.reports] == ["fp32", "fp16"]


def test_a_pass_judged_on_few_images_is_printed_with_a_caution(artifacts, photos):
    """Three held-out photos: FP16 passes, but one flip would move the figure by a third; the build says so."""
    spec = DeploymentSpec(artifacts=str(artifacts), precision="fp16")
    lines = []
    deployable = prepare(spec, "python-onnxruntime", "unused.json", VariantOptions(held_out=str(photos)), lines.append)
    assert deployable.variant == "fp16"
    (caution,) = [line for line in lines if line.startswith("caution:")]
    assert "images, too few for the figure to say much" in caution and "--held-out" in caution, caution


def test_the_gate_reports_a_plan_it_cannot_run_here(artifacts):
    why = tensorrt_unavailable()
    if why is None:
        pytest.skip("TensorRT and a GPU are present here")
    config = PreprocessConfig.load(artifacts / "preprocess.json")
    fp16.convert(artifacts / "model.onnx", artifacts / fp16.OUTPUT_NAME)
    (artifacts / "model.fp16.plan").touch()
    reports = validate.validate(artifacts, ["fp16", "fp16-plan"], held_out_set(config, views=2), config, {"fp16": 0.0})
    assert [r.name for r in reports] == ["fp32", "fp16", "fp16-plan"]
    assert reports[1].passed and not reports[2].passed and reports[2].reason == f"not gated: {why}"
    assert "nan" not in validate.format_table(reports)


def test_the_onnxruntime_backend_refuses_a_layout_it_cannot_check(artifacts):
    spec = DeploymentSpec(artifacts=str(artifacts), precision="int8")
    with pytest.raises(ValueError, match="^--int8-cpu-layout vnni cannot be served by Triton's onnxruntime backend"):
        prepare(spec, "onnxruntime", "unused.json", VariantOptions(cpu_layout="vnni"), lambda _: None)
    assert _written(artifacts) == []


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_a_model_with_other_output_names_fails_before_anything_is_written(artifacts, precision):
    model = onnx.load(str(artifacts / "model.onnx"))
    model.graph.node[-1].output[0] = "prob"
    model.graph.output[1].name = "prob"
    onnx.save(model, str(artifacts / "model.onnx"))
    spec = DeploymentSpec(artifacts=str(artifacts), precision=precision)
    with pytest.raises(ArtifactsError, match=r"outputs \['logits', 'prob'\]"):
        prepare(spec, "python-onnxruntime", "unused.json", VariantOptions(), lambda _: None)
    assert _written(artifacts) == []


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_allow_fallback_is_refused_for_a_tensorrt_classifier_before_anything_is_built(artifacts, precision):
    """The fallback deploys model.onnx, which a tensorrt classifier cannot serve: said before the build, not
    after minutes of it, whether TensorRT is here or not."""
    spec = DeploymentSpec(artifacts=str(artifacts), precision=precision)
    with pytest.raises(GateFailed, match="^--allow-fallback deploys the FP32 ONNX model, which a tensorrt classifier"):
        prepare(spec, "tensorrt", "unused.json", VariantOptions(allow_fallback=True), lambda _: None)
    assert _written(artifacts) == []


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
    near_tie = write_near_tie_classifier(tmp_path / "near-tie")  # logits FP16 cannot tell apart
    fp16.convert(near_tie / "model.onnx", near_tie / fp16.OUTPUT_NAME)
    failed = gate(near_tie)
    assert failed.returncode == 2 and "top-1 agreement 0.00% < 99.5%" in failed.stdout, failed.stderr
    error = gate(tmp_path / "missing")
    assert error.returncode == 1 and error.stderr.startswith("build.precision.validate: ")
