"""Every precision variant records the model.onnx it was built from; the gate and the plan builder refuse one
built from another (a re-export into the same folder leaves the old model's variants behind)."""
import json
import subprocess
import sys

import onnx
import pytest
from onnx import numpy_helper

from build.precision import calibrate, fp16, provenance, quantize, validate
from build.precision.imagesets import augmented_photos
from common.hashing import file_sha256
from common.preprocessing import PreprocessConfig

VARIANTS = {"fp16": "make fp16", "int8-cpu": "make quantize", "int8-trt": "make quantize"}


def build_variants(artifacts, config, images):
    fp16.convert(artifacts / "model.onnx", artifacts / fp16.OUTPUT_NAME)
    result = calibrate.calibrate(artifacts / "model.onnx", artifacts / "calibration", "max", images, config)
    for target in quantize.TARGETS:
        quantize.quantize(artifacts / "model.onnx", result, target, artifacts / quantize.output_name(target))


def re_export(artifacts) -> str:
    """model.onnx written again with other weights, as a new export would; its sha256."""
    model = onnx.load(str(artifacts / "model.onnx"))
    weight = next(t for t in model.graph.initializer if t.name == "W")
    weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) * 2, "W"))
    onnx.save(model, str(artifacts / "model.onnx"))
    return file_sha256(artifacts / "model.onnx")


@pytest.fixture
def built(artifacts):
    config = PreprocessConfig.load(artifacts / "preprocess.json")
    images = augmented_photos(("chelsea", "coffee"), 4, 0, config)
    build_variants(artifacts, config, images)
    return artifacts, config, images


def test_each_variant_records_its_source_and_the_gate_refuses_it_after_a_re_export(built):
    artifacts, config, images = built
    old = file_sha256(artifacts / "model.onnx")
    for name in VARIANTS:
        path = artifacts / validate.VARIANTS[name][0]
        assert provenance.recorded(path) == old and provenance.mismatch(path) is None
    gated = validate.validate(artifacts, list(VARIANTS), images, config, {"fp16": 0.0, "int8": 0.0})
    assert [(r.name, r.passed, r.reason) for r in gated[1:]] == [(name, True, "") for name in VARIANTS]

    new = re_export(artifacts)
    refused = validate.validate(artifacts, list(VARIANTS), images, config, {"fp16": 0.0, "int8": 0.0})
    for report, (name, rebuild) in zip(refused[1:], VARIANTS.items()):
        path = artifacts / validate.VARIANTS[name][0]
        assert not report.passed and report.reason == (
            f"not gated: {path} was built from another model.onnx (sha256 {old[:12]}, now {new[:12]}): "
            f"rebuild it with `{rebuild} ARTIFACTS={artifacts}`")
    cli = subprocess.run([sys.executable, "-m", "build.precision.validate", "--artifacts", str(artifacts), "--views", "2",
                          "--variants", "fp16"], capture_output=True, text=True, timeout=300)
    assert cli.returncode == 2 and f"  fp16: not gated: {artifacts / 'model.fp16.onnx'} was built from another " \
                                  f"model.onnx (sha256 {old[:12]}, now {new[:12]})" in cli.stdout, cli.stdout + cli.stderr

    build_variants(artifacts, config, images)  # rebuilt from the new model: gated again
    assert all(r.passed for r in validate.validate(artifacts, list(VARIANTS), images, config, {"fp16": 0.0, "int8": 0.0}))


def test_a_variant_without_the_record_is_refused_beside_a_model_and_built_alone(built, tmp_path):
    artifacts, config, images = built
    path = artifacts / fp16.OUTPUT_NAME
    model = onnx.load(str(path))
    del model.metadata_props[:]  # as written before variants were stamped
    onnx.save(model, str(path))
    [_, report] = validate.validate(artifacts, ["fp16"], images, config, {"fp16": 0.0})
    assert not report.passed and report.reason == (
        f"not gated: {path} records no source model (written before variants were stamped, or elsewhere): "
        f"rebuild it from {artifacts / 'model.onnx'} (sha256 {file_sha256(artifacts / 'model.onnx')[:12]}) "
        f"with `make fp16 ARTIFACTS={artifacts}`")
    alone = tmp_path / "alone" / fp16.OUTPUT_NAME  # no model.onnx beside it (plans --onnx): nothing to compare
    alone.parent.mkdir()
    onnx.save(model, str(alone))
    assert provenance.mismatch(alone) is None and provenance.mismatch(artifacts / "model.onnx") is None


def write_plan(artifacts, precision: str, onnx_name: str):
    """A plan's file and the record build.precision.plans writes beside it (the bytes are never read here)."""
    from build.precision import plans

    plan, onnx_path = artifacts / f"model.{precision}.plan", artifacts / onnx_name
    plan.write_bytes(b"serialized engine")
    metadata = plans.plan_metadata(
        tensorrt_version="10.0", gpu={}, onnx_path=onnx_path, onnx_sha256=file_sha256(onnx_path),
        precision=precision, summary={}, profile={}, workspace_bytes=1, timing_cache=artifacts / "timing.cache",
        timing_cache_status="new", build_seconds=1.0, plan=plan, plan_sha256="0" * 64, network_io=[], options={})
    plans.metadata_path(plan).write_text(json.dumps(metadata))
    return plan


def test_a_plan_is_traced_through_its_onnx_to_the_model_beside_it(built):
    """Before, the gate checked ONNX variants only: a plan built from the old model's files was gated and
    deployed after a re-export. Now its <plan>.json leads to the ONNX file and that file to model.onnx."""
    artifacts, config, images = built
    fp32, fp16_plan = write_plan(artifacts, "fp32", "model.onnx"), write_plan(artifacts, "fp16", fp16.OUTPUT_NAME)
    assert provenance.plan_mismatch(fp32) is None and provenance.plan_mismatch(fp16_plan) is None
    assert validate.stale(fp16_plan, file_sha256(artifacts / "model.onnx")) is None

    old, new = file_sha256(artifacts / "model.onnx"), re_export(artifacts)
    assert provenance.plan_mismatch(fp32) == (
        f"{fp32} was built from model.onnx (sha256 {old[:12]}, now {new[:12]}): "
        f"rebuild it with `make plans PRECISION=fp32 ARTIFACTS={artifacts}`")
    assert provenance.plan_mismatch(fp16_plan) == (
        f"{fp16_plan} was built from a stale {fp16.OUTPUT_NAME} ({artifacts / fp16.OUTPUT_NAME} was built from "
        f"another model.onnx (sha256 {old[:12]}, now {new[:12]}): rebuild it with `make fp16 ARTIFACTS={artifacts}`)")
    assert validate.stale(fp16_plan, new) == provenance.plan_mismatch(fp16_plan)

    fp16.convert(artifacts / "model.onnx", artifacts / fp16.OUTPUT_NAME)  # the variant rebuilt, the plan not
    was = json.loads((artifacts / "model.fp16.plan.json").read_text())["onnx"]["sha256"]
    assert provenance.plan_mismatch(fp16_plan) == (
        f"{fp16_plan} was built from {fp16.OUTPUT_NAME} (sha256 {was[:12]}, "
        f"now {file_sha256(artifacts / fp16.OUTPUT_NAME)[:12]}): rebuild it with "
        f"`make plans PRECISION=fp16 ARTIFACTS={artifacts}`")
    assert provenance.plan_mismatch(write_plan(artifacts, "fp16", fp16.OUTPUT_NAME)) is None  # rebuilt: current

    (artifacts / "model.fp16.plan.json").unlink()
    assert provenance.plan_mismatch(fp16_plan) == (
        f"{fp16_plan} records no source ONNX (no readable model.fp16.plan.json beside it): "
        f"rebuild it with `make plans PRECISION=fp16 ARTIFACTS={artifacts}`")
    (artifacts / "model.onnx").unlink()
    assert provenance.plan_mismatch(fp16_plan) is None  # no model beside it: nothing to compare
