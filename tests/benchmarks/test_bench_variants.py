"""`make bench` and `make tune` measure the classifier file `make engines` deployed (here the INT8 CPU
variant of a small real model), not the FP32 model.onnx beside it."""
import json
import os
import shutil
import urllib.request

import numpy as np
import onnxruntime as ort
import pytest

from benchmarks import bench, inprocess, tune
from benchmarks.fastapi_service import FastAPIService
from build.engines import get_args_parser as engines_args, main as engines
from build.repository.spec import DeploymentSpec
from common.preprocessing import PreprocessConfig, load_batch
from serving.server import free_port

PYTHON = "python-onnxruntime"


@pytest.fixture(scope="module")
def int8_build(tiny_artifacts, tmp_path_factory):
    """(artifacts, repository, BUILD.json) of `make engines PRECISION=int8` on a copy of the tiny model."""
    root = tmp_path_factory.mktemp("int8")
    artifacts, repo = root / "tiny", root / "model_repository"
    shutil.copytree(tiny_artifacts, artifacts)
    engines(engines_args().parse_args(["--artifacts", str(artifacts), "--out", str(repo), "--precision", "int8",
                                       "--min-agreement-int8", "0"]))
    return artifacts, repo, json.loads((repo / "BUILD.json").read_text())


def test_bench_compares_against_the_served_file(int8_build):
    artifacts, _, build = int8_build
    model, text = bench.comparison_model(build, artifacts)
    assert model == artifacts / "model.int8.cpu.onnx"
    assert "(int8-cpu)" in text and "run the same file" in text
    model, text = bench.comparison_model(build, artifacts, artifacts_given=True)
    assert model == artifacts / "model.onnx" and "compare different models" in text
    plan = {**build, "classifier_model": {"source": str(artifacts / "model.plan")}, "variant": "int8-plan"}
    model, text = bench.comparison_model(plan, artifacts)
    assert model == artifacts / "model.onnx" and "(int8-plan)" in text and "different models" in text


def test_fastapi_and_the_bound_run_the_file_they_are_given(int8_build, photos):
    """FastAPI's scores are the INT8 session's (which differ from FP32's on this photo), and the
    in-process bound runs the INT8 file."""
    artifacts, _, _ = int8_build
    int8, fp32 = artifacts / "model.int8.cpu.onnx", artifacts / "model.onnx"
    config = PreprocessConfig.load(artifacts / "preprocess.json")
    batch = load_batch([photos["coffee"]], config)
    expected = {path: ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
                .run(["probabilities"], {"images": batch})[0][0] for path in (int8, fp32)}
    assert np.abs(expected[int8] - expected[fp32]).max() > 1e-4  # else the check below could not tell them apart
    with FastAPIService(artifacts, free_port(), intra_op_threads=1, model=int8) as service:
        request = urllib.request.Request(f"{service.url}/classify?top_k=3", data=photos["coffee"])
        with urllib.request.urlopen(request, timeout=30) as response:
            predictions = json.loads(response.read())["predictions"]
    scores = np.array([p["score"] for p in sorted(predictions, key=lambda p: p["index"])])
    np.testing.assert_allclose(scores, expected[int8], atol=1e-6)
    (result,) = inprocess.measure(artifacts, [photos["coffee"]], [2], 4, 1, 1, model=int8)
    assert result.images == 4 and result.throughput > 0
    with pytest.raises(Exception, match="model.int8.gone.onnx"):
        inprocess.measure(artifacts, [photos["coffee"]], [1], 1, 1, 1, model=artifacts / "model.int8.gone.onnx")


def test_tune_picks_the_deployed_file_or_says_what_to_build(int8_build, tmp_path):
    artifacts, repo, _ = int8_build
    spec = DeploymentSpec(artifacts=str(artifacts), precision="int8")
    assert tune.classifier_model(spec, PYTHON, repo) == artifacts / "model.int8.cpu.onnx"
    relative = spec.replace(artifacts=os.path.relpath(artifacts))  # the same folder, spelled differently
    assert tune.classifier_model(relative, PYTHON, repo) == artifacts / "model.int8.cpu.onnx"
    assert tune.classifier_model(spec.replace(precision="fp32"), PYTHON, repo) is None  # model.onnx
    with pytest.raises(ValueError, match=r"built with precision int8.*make engines PRECISION=fp16"):
        tune.classifier_model(spec.replace(precision="fp16"), PYTHON, repo)
    with pytest.raises(ValueError, match="backend python-onnxruntime"):  # a plan is needed, not this build
        tune.classifier_model(spec, "tensorrt", repo)
    with pytest.raises(ValueError, match="there is no .*BUILD.json"):
        tune.classifier_model(spec, PYTHON, tmp_path / "nothing")


@pytest.mark.slow
def test_tune_serves_the_int8_variant_and_keeps_the_spec_precision(int8_build, perf_tool, perf_venv, tmp_path):
    artifacts, repo, _ = int8_build
    spec_path = tmp_path / "deployment.json"
    DeploymentSpec(artifacts=str(artifacts)).save(spec_path)  # precision fp32
    out = tmp_path / "tune"
    best = tune.main(tune.get_args_parser().parse_args([
        "--spec", str(spec_path), "--precision", "int8", "--model-repository", str(repo),
        "--knobs", "classifier.layout", "--concurrency", "2", "--p99-budget-ms", "10000",
        "--measurement-ms", "500", "--max-candidates", "1", "--perf-venv", str(perf_venv), "--out", str(out)]))
    served = out / "model_repository" / "classifier" / "1" / "model.onnx"
    assert served.read_bytes() == (artifacts / "model.int8.cpu.onnx").read_bytes()
    trials = json.loads((out / "tune.json").read_text())["trials"]
    assert len(trials) == 1 and trials[0]["throughput"] > 0 and not trials[0]["error"]
    assert best.precision == "fp32" and DeploymentSpec.load(spec_path).precision == "fp32"
