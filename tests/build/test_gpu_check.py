"""`make gpu-check` (build.gpu_check): fails fast without TensorRT or a GPU; with them (tests marked gpu),
the real exported model's FP32, FP16 and build.quantize INT8 plans, checked against ONNX Runtime, INT8
kernels chosen, variants.prepare with the tensorrt backend, and the repository served by Triton."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from build import gpu_check
from build.precision import plans
from build.repository import capabilities

ROOT = Path(__file__).resolve().parents[2]
from tests.build.test_plans import HAVE_TRT_AND_GPU, NEEDS_TRT  # noqa: E402  (one probe of TensorRT and the GPUs)


@pytest.mark.skipif(HAVE_TRT_AND_GPU, reason="TensorRT and a GPU are present here: nothing to fail on")
def test_make_gpu_check_stops_before_exporting_anything_and_says_why(tmp_path):
    artifacts, out = tmp_path / "no_model_yet", tmp_path / "out"
    done = subprocess.run(["make", "--no-print-directory", "gpu-check", f"ARTIFACTS={artifacts}",
                           f"GPU_CHECK_OUT={out}"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    said = [line for line in done.stderr.splitlines() if line.startswith("make gpu-check:")]
    assert len(said) == 1, done.stderr
    assert "cannot import tensorrt" in said[0] and "GPU: none" in said[0] and "nvcr.io/nvidia/tritonserver" in said[0]
    assert not artifacts.exists() and not out.exists()  # no export, no report: it stopped first
    cli = subprocess.run([sys.executable, "-m", "build.gpu_check", "--out", str(out)], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert cli.returncode == plans.EXIT_UNAVAILABLE and cli.stderr.strip() == said[0] and not out.exists()


def test_layer_precisions_count_what_the_engine_inspector_says():
    """The inspector's JSON layout (ProfilingVerbosity.DETAILED): a "Layers" list of dicts whose "Outputs"
    carry "Format/Datatype" strings; without details, layers are bare names."""
    info = {"Layers": [
        {"Name": "conv1", "LayerType": "CaskConvolution",
         "Outputs": [{"Name": "a", "Format/Datatype": "Channel major INT8 format where channel % 32 == 0"}]},
        {"Name": "conv2", "Outputs": [{"Name": "b", "Format/Datatype": "Int8 NC/32HW32"}]},
        {"Name": "head", "Outputs": [{"Name": "logits", "Format/Datatype": "Row major linear FP32"}]},
        {"Name": "dq", "Outputs": [{"Name": "c", "Format/Datatype": "Row major linear Half format"}]},
        "a layer without details"]}
    assert gpu_check.layer_precisions(info) == {"Int8": 2, "Float": 1, "Half": 1, "unknown": 1}
    assert gpu_check.layer_precisions({"Layers": [{"Outputs": [{"Format/Datatype": "Row major linear Float"}]}]}) == {
        "Float": 1}


def test_the_report_has_one_row_per_precision_and_lists_failures():
    report = {"date": "2026-12-02 08:00 UTC", "tensorrt": "10.13.2.6", "artifacts": "a",
              "gpu": {"name": "NVIDIA H100", "compute_capability": "9.0"},
              "precisions": {"fp32": {"plan": "p", "compare": {"top1_agreement": 1.0, "images": 40,
                                                               "max_abs_diff_probabilities": 1e-5},
                                      "layers": {"Float": 60}, "throughput": {1: 900.0, 8: 4000.0, 32: 9000.0}},
                             "fp16": {}, "int8": {}},
              "triton": {"skipped": "--no-serve"}, "failures": [{"step": "int8 plan", "error": "RuntimeError: x"}]}
    text = gpu_check.report_markdown(report)
    rows = [line for line in text.splitlines() if line.startswith("| fp")]
    assert len(rows) == 2 and rows[0].startswith("| fp32 | yes | 100.00% (40 views)") and "9000" in rows[0]
    assert "- FAILED int8 plan: RuntimeError: x" in text and "All steps passed" not in text
    assert json.loads(json.dumps(report, default=str))


def test_comparison_counts_top1_agreement_between_two_real_runners(tiny_artifacts, tmp_path):
    """The comparison step on two ONNX Runtime runners (the plan's place is taken by a changed model):
    the same file agrees everywhere; a model with its classes' order reversed disagrees where it should."""
    import numpy as np
    import onnx
    from onnx import helper

    rng = np.random.default_rng(0)
    batches = [rng.uniform(-2, 2, size=(8, 3, 32, 32)).astype(np.float32) for _ in range(3)]
    same = gpu_check.compare_runners(gpu_check.onnxrt_runner(tiny_artifacts / "model.onnx"),
                                     gpu_check.onnxrt_runner(tiny_artifacts / "model.onnx", "again"), batches, "fp32")
    assert same["images"] == 24 and same["top1_agreement"] == 1.0 and same["passed"]
    assert same["max_abs_diff_probabilities"] == 0.0 and same["polygraphy_allclose_atol_0.001"] is True

    model = onnx.load(tiny_artifacts / "model.onnx")  # reverse the class axis of both outputs
    graph = model.graph
    for out in graph.output:
        for node in graph.node:
            node.output[:] = [f"{o}_raw" if o == out.name else o for o in node.output]
            node.input[:] = [f"{i}_raw" if i == out.name else i for i in node.input]
        graph.node.append(helper.make_node("Slice", [f"{out.name}_raw", "rs", "re", "ra", "rp"], [out.name]))
    graph.initializer.extend([onnx.numpy_helper.from_array(np.array(v, np.int64), n) for n, v in
                              (("rs", [-1]), ("re", [-(2 ** 62)]), ("ra", [1]), ("rp", [-1]))])
    onnx.save(model, tmp_path / "reversed.onnx")
    reference = gpu_check.onnxrt_runner(tiny_artifacts / "model.onnx")
    flipped = gpu_check.compare_runners(reference, gpu_check.onnxrt_runner(tmp_path / "reversed.onnx", "rev"),
                                        batches, "int8")
    with gpu_check.onnxrt_runner(tiny_artifacts / "model.onnx", "check") as runner:
        top = np.concatenate([runner.infer({"images": b})["probabilities"] for b in batches])
    expected = float((top.argmax(1) == top.shape[1] - 1 - top.argmax(1)).mean())
    assert flipped["top1_agreement"] == expected < 1.0 and not flipped["passed"]


# ---------------------------------------------------------------- with TensorRT and a GPU

@NEEDS_TRT
@pytest.mark.gpu
def test_gpu_check_on_the_real_model(lite0_artifacts, tmp_path):
    """FP32, FP16 and the real build.quantize INT8 file as plans; each agrees with ONNX Runtime FP32 on
    held-out views; the INT8 plan runs INT8 layers; throughput at batch 1/8/32; one report."""
    artifacts = tmp_path / "lite0"
    shutil.copytree(lite0_artifacts, artifacts)
    report = gpu_check.main(gpu_check.get_args_parser().parse_args([
        "--artifacts", str(artifacts), "--out", str(tmp_path / "out"), "--no-serve"]))
    assert report["failures"] == [], report["failures"]
    for precision in gpu_check.PRECISIONS:
        row = report["precisions"][precision]
        assert row["compare"]["top1_agreement"] >= gpu_check.MIN_AGREEMENT[precision], row
        assert set(row["throughput"]) == set(gpu_check.BATCHES) and all(r > 0 for r in row["throughput"].values())
    assert report["precisions"]["int8"]["layers"].get("Int8", 0) > 0
    assert report["precisions"]["fp16"]["layers"].get("Half", 0) > 0
    assert (tmp_path / "out" / "gpu_check.md").is_file() and (tmp_path / "out" / "gpu_check.json").is_file()


@NEEDS_TRT
@pytest.mark.gpu
def test_prepare_with_the_tensorrt_backend_deploys_a_gated_plan(lite0_artifacts, tmp_path):
    from build.precision.variants import VariantOptions, prepare
    from build.repository.spec import DeploymentSpec

    artifacts = tmp_path / "lite0"
    shutil.copytree(lite0_artifacts, artifacts)
    spec = DeploymentSpec(artifacts=str(artifacts), precision="fp16")
    spec_path = tmp_path / "deployment.json"
    spec.save(spec_path)
    deployable = prepare(spec, "tensorrt", str(spec_path), VariantOptions())
    assert deployable.variant == "fp16-plan" and deployable.model_file.suffix == ".plan"
    assert any(r.name == "fp16-plan" and r.passed for r in deployable.reports)


@NEEDS_TRT
@pytest.mark.gpu
@pytest.mark.slow
def test_the_int8_plan_is_served_by_triton(lite0_artifacts, tmp_path):
    caps = capabilities.detect()
    if "tensorrt" not in caps.server_backends:
        pytest.skip(f"needs a Triton server with the tensorrt backend (an NGC image): {caps.line()}")
    artifacts = tmp_path / "lite0"
    shutil.copytree(lite0_artifacts, artifacts)
    served = gpu_check.serve(gpu_check.DEFAULT_SPEC_PATH, artifacts, tmp_path)
    from common.samples import CAT_CLASSES, ESPRESSO

    assert served["answers"]["coffee"][0][0] == ESPRESSO and served["answers"]["chelsea"][0][0] in CAT_CLASSES
