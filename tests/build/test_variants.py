"""build.precision.variants (the chain behind `make engines PRECISION=...`) and the gate's thresholds."""
import shutil

import numpy as np
import onnxruntime as ort
import pytest

from build.precision import validate
from build.precision.imagesets import folder_images
from build.repository.spec import DeploymentSpec
from build.precision.variants import GateFailed, VariantOptions, prepare, tensorrt_unavailable
from common.labels import read_labels
from common.preprocessing import PreprocessConfig
from common.samples import sample_photos


def test_every_variant_but_the_reference_has_a_threshold():
    thresholds = {"fp16": 0.97, "int8": 0.9}
    assert validate.threshold_for("fp32", thresholds) is None
    assert validate.threshold_for("fp32-plan", thresholds) == 0.97  # as strict as FP16
    assert validate.threshold_for("fp32-plan", {**thresholds, "fp32": 0.999}) == 0.999
    assert validate.threshold_for("fp32-plan", {"int8": 0.9}) == validate.THRESHOLDS["fp16"]
    assert validate.threshold_for("fp16-plan", thresholds) == validate.threshold_for("fp16", thresholds) == 0.97
    assert validate.threshold_for("int8-plan", thresholds) == validate.threshold_for("int8-cpu", thresholds) == 0.9
    assert all(validate.threshold_for(v, validate.THRESHOLDS) is not None for v in validate.VARIANTS if v != "fp32")


def _report(name, agreement):
    filename, precision, runs_on = validate.VARIANTS[name]
    return validate.VariantReport(name, filename, precision, runs_on, images=100, top1_agreement=agreement,
                                  top5_overlap=1.0, max_abs_error=0.01, mean_abs_error=1e-4,
                                  confident_images=50, confident_agreement=agreement)


def test_the_fp32_plan_is_gated_and_not_called_the_reference():
    thresholds = dict(validate.THRESHOLDS)
    reference = validate.gate(_report("fp32", 1.0), thresholds)
    bad_plan = validate.gate(_report("fp32-plan", 0.99), thresholds)
    good_plan = validate.gate(_report("fp32-plan", 1.0), thresholds)
    assert reference.passed and reference.threshold is None
    assert not bad_plan.passed and bad_plan.reason == ("top-1 agreement 99.00% < 99.5% on the 50 held-out images "
                                                       "where FP32 is decided (50 near-ties left out): not deployed")
    assert good_plan.passed and good_plan.threshold == thresholds["fp16"]
    rows = validate.format_table([reference, bad_plan, good_plan]).splitlines()
    assert rows[2].startswith("fp32 ") and rows[2].endswith("reference")
    assert rows[3].startswith("fp32-plan") and rows[3].endswith("FAIL (agreement >= 99.5%)")
    assert rows[4].endswith("PASS (agreement >= 99.5%)") and sum("reference" in r for r in rows) == 1


def _image_folder(root, labels):
    """Bundled photos sorted into class folders named as in labels.txt (2 photos per class)."""
    photos = sorted(sample_photos().items())
    for i, (name, path) in enumerate(photos[: 2 * len(labels)]):
        folder = root / labels[i % len(labels)]
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, folder / f"{name}{path.suffix}")
    return root


def test_make_engines_reports_true_accuracy_on_an_image_folder(artifacts, tmp_path):
    labels = read_labels(artifacts / "labels.txt")
    held_out = _image_folder(tmp_path / "held", labels)
    spec = DeploymentSpec(artifacts=str(artifacts), precision="fp16")
    logged = []
    deployable = prepare(spec, "onnxruntime", "unused.json",
                         VariantOptions(held_out=str(held_out), thresholds={"fp16": 0.0}), logged.append)
    assert deployable.variant == "fp16"
    assert any("(labelled: true accuracy reported)" in line for line in logged), logged
    table = [line for line in logged if not line.startswith("caution:")][-1]  # a few photos: a caution follows
    assert "accuracy" in table.splitlines()[0]  # the gate's table has the column

    config = PreprocessConfig.load(artifacts / "preprocess.json")
    images = folder_images(held_out, config)
    truth = np.array([labels.index(name.split("/")[-2]) for name in images.names])
    session = ort.InferenceSession(str(artifacts / "model.onnx"), providers=["CPUExecutionProvider"])
    (probabilities,) = session.run(["probabilities"], {"images": next(images.batches(config, len(images)))})
    fp32 = deployable.reports[0]
    assert fp32.name == "fp32" and fp32.accuracy == pytest.approx(float((probabilities.argmax(1) == truth).mean()))
    assert deployable.reports[1].accuracy is not None

    flat = tmp_path / "flat"  # not an ImageFolder: agreement only, no accuracy
    flat.mkdir()
    for path in held_out.rglob("*.*"):
        shutil.copy(path, flat / path.name)
    plain = prepare(spec, "onnxruntime", "unused.json", VariantOptions(held_out=str(flat), thresholds={"fp16": 0.0}),
                    logged.append)
    assert all(r.accuracy is None for r in plain.reports)


def test_tensorrt_backend_without_tensorrt_says_what_happens(artifacts):
    why = tensorrt_unavailable()
    if why is None:
        pytest.skip("TensorRT and a GPU are present here")
    spec = DeploymentSpec(artifacts=str(artifacts), precision="fp16")
    logged = []
    with pytest.raises(GateFailed) as info:
        prepare(spec, "tensorrt", "unused.json", VariantOptions(), logged.append)
    assert str(info.value) == (f"{why}; the tensorrt backend needs the fp16-plan variant, so nothing is built or "
                               "deployed (--backend onnxruntime or python-onnxruntime serves the fp16 variant on CPU)")
    assert not (artifacts / "model.fp16.onnx").exists() and not any("instead" in line for line in logged)


def test_the_gate_holds_decided_images_to_the_threshold_and_labels_to_fp32s_accuracy():
    """Near-ties are left out of the gate's agreement and counted; with labels, a variant more than the
    allowed drop below FP32's true top-1 fails even when it agrees."""
    thresholds = {"int8": 0.99, "accuracy_drop": 0.01}
    flips_near_ties = _report("int8-cpu", 1.0)
    flips_near_ties.top1_agreement = 0.8  # only near-ties flipped: the decided 50 all agree
    assert validate.gate(flips_near_ties, thresholds).passed
    no_decided = validate.VariantReport("int8-cpu", "f", "int8", "r", images=10, top1_agreement=0.5, top5_overlap=1.0,
                                        max_abs_error=0.1, mean_abs_error=0.01, confident_images=0,
                                        confident_agreement=float("nan"))
    failed = validate.gate(no_decided, thresholds)
    assert not failed.passed and "on all 10 held-out images (none where FP32 is decided)" in failed.reason
    worse = _report("int8-cpu", 1.0)
    worse.accuracy = 0.90
    assert not validate.gate(worse, thresholds, reference_accuracy=0.92).passed
    assert "true top-1 90.00% is more than 1.0% below FP32's 92.00%" in worse.reason
    close = _report("int8-cpu", 1.0)
    close.accuracy = 0.915
    assert validate.gate(close, thresholds, reference_accuracy=0.92).passed
    # With labels, agreement is reported, not held: a file more accurate than FP32 that disagrees with it
    # where FP32 is wrong passes (QAT's can); the same agreement without labels fails.
    better = _report("int8-cpu", 0.97)
    better.accuracy = 0.93
    assert validate.gate(better, thresholds, reference_accuracy=0.92).passed
    assert "true top-1 >= FP32's - 1.0%" in validate.format_table([better])
    assert not validate.gate(_report("int8-cpu", 0.97), thresholds).passed
    assert "nan" not in validate.format_table([failed])
