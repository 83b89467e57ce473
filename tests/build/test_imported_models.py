"""An imported classifier of the kinds other tools leave (channels-last, ending in Softmax, grayscale, weights in a
file beside the model) goes through `build.engines` and is served by a real tritonserver: its answers are the
source model's."""
import stat
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from build.engines import get_args_parser, main
from build.precision import provenance
from build.repository.writer import deployed_model_file, read_manifest
from clients.client import ImageClassifierClient
from common.contract import MODEL_ONNX
from common.onnxfiles import save_like, weight_files
from common.preprocessing import PreprocessConfig, load_batch
from serving.server import TritonServer
from tests.training.tiny_torch import TinyNet, export_fixed_batch, export_with_external_data
from training.export import import_onnx, onnxruntime_session, run_onnxruntime

NHWC = PreprocessConfig(resize=72, crop=64, layout="NHWC")


def test_an_nhwc_softmax_model_builds_and_serves_its_own_answers(tmp_path, photos):
    net = TinyNet(head="probabilities", nhwc=True)
    labels = [f"class {i}" for i in range(7)]
    artifacts = import_onnx(export_fixed_batch(net, tmp_path / "keras-like.onnx"), tmp_path / "mine", labels, NHWC,
                            outputs="probabilities").out_dir
    int8 = main(get_args_parser().parse_args(["--artifacts", str(artifacts), "--out", str(tmp_path / "int8"),
                                              "--precision", "int8", "--min-agreement-int8", "0"]))
    assert int8["variant"] == "int8-cpu"  # calibrated, quantized and gated through the log-probabilities
    repo = tmp_path / "repo"
    main(get_args_parser().parse_args(["--artifacts", str(artifacts), "--out", str(repo)]))
    images = [photos[name] for name in ("chelsea", "coffee", "rocket")]
    with torch.no_grad():
        expected = net(torch.from_numpy(load_batch(images, NHWC))).numpy()
    with TritonServer(repo, log_file=tmp_path / "server.log") as server:
        with ImageClassifierClient(server.http_url, "http") as client:
            np.testing.assert_allclose(client.probabilities(images), expected, atol=1e-5)
            assert [answer[0].label for answer in client.classify(images, top_k=1)] == \
                [labels[i] for i in expected.argmax(1)]


@pytest.mark.slow
def test_a_grayscale_model_builds_and_serves_its_answers_on_the_luma(tmp_path, photos):
    """A 1-channel (MNIST-like) model: the import puts the luma of R, G, B in front, so the RGB pipeline serves
    it unchanged. Before, the import refused it on its input shape."""
    from tests.training import test_import_models as imports

    labels = ["a", "b", "c", "d"]
    source = imports.gray_model(tmp_path / "gray.onnx")
    artifacts = import_onnx(source, tmp_path / "mine", labels, imports.GRAY).out_dir
    repo = tmp_path / "repo"
    main(get_args_parser().parse_args(["--artifacts", str(artifacts), "--out", str(repo)]))
    images = [photos[name] for name in ("chelsea", "coffee", "rocket")]
    session = onnxruntime_session(source)
    logits = np.concatenate([session.run(None, {"x": imports.luma(image[None], "NCHW")})[0]
                             for image in load_batch(images, imports.GRAY)])
    expected = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    with TritonServer(repo, log_file=tmp_path / "server.log") as server:
        with ImageClassifierClient(server.http_url, "http") as client:
            np.testing.assert_allclose(client.probabilities(images), expected, atol=1e-5)


def _build(artifacts, repo, precision: str) -> Path:
    """`make engines PRECISION=<precision>` into `repo` (any agreement passes: the answers are compared here);
    the classifier's version folder model file."""
    manifest = main(get_args_parser().parse_args(["--artifacts", str(artifacts), "--out", str(repo), "--precision",
                                                  precision, "--min-agreement-int8", "0", "--min-agreement-fp16", "0"]))
    assert manifest["variant"] == {"int8": "int8-cpu"}.get(precision, precision)  # gated, not a fallback
    return repo / "classifier" / "1" / MODEL_ONNX


def test_a_model_with_external_data_builds_and_serves_with_its_data_files(tmp_path, photos):
    """An import that keeps its weights beside model.onnx (ONNX external data, as models over 2 GB must): every
    variant `make engines` writes has its own data file (int8's Q/DQ file too), each version folder holds the
    file its model names and loads it from there, a real tritonserver serves it, and every answer is the
    single-file import's. A changed data file is a changed model where its hash is checked. Before, the import
    wrote one file."""
    net, labels, config = TinyNet(), [f"class {i}" for i in range(7)], PreprocessConfig(resize=72, crop=64)
    single = import_onnx(export_fixed_batch(net, tmp_path / "single.onnx"), tmp_path / "one", labels, config).out_dir
    artifacts = import_onnx(export_with_external_data(net, tmp_path / "big" / MODEL_ONNX), tmp_path / "mine",
                            labels, config).out_dir
    images = [photos[name] for name in ("chelsea", "coffee", "rocket")]
    batch = load_batch(images, config)
    served = {}
    for precision, variant in (("fp32", MODEL_ONNX), ("int8", "model.int8.cpu.onnx"), ("fp16", "model.fp16.onnx")):
        model = _build(artifacts, tmp_path / precision, precision)
        assert weight_files(artifacts / variant) == [f"{variant}.data"]
        assert (model.parent / f"{variant}.data").read_bytes() == (artifacts / f"{variant}.data").read_bytes()
        # readable by whoever may read the model file (a container's server user over a mounted repository)
        assert stat.S_IMODE((model.parent / f"{variant}.data").stat().st_mode) == stat.S_IMODE(model.stat().st_mode)
        reference = run_onnxruntime(_build(single, tmp_path / f"single-{precision}", precision), batch)
        for name, value in run_onnxruntime(model, batch).items():  # loaded from the version folder
            np.testing.assert_array_equal(value, reference[name])
        served[precision] = reference["probabilities"]
    assert weight_files(artifacts / "model.int8.trt.onnx") == ["model.int8.trt.onnx.data"]
    with TritonServer(tmp_path / "int8", log_file=tmp_path / "server.log") as server:
        with ImageClassifierClient(server.http_url, "http") as client:
            np.testing.assert_allclose(client.probabilities(images), served["int8"], atol=1e-5)

    data = artifacts / "model.onnx.data"  # the same model.onnx, other weights
    model = onnx.load(str(artifacts / MODEL_ONNX))
    for weight in model.graph.initializer:
        weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) * np.float32(1.5), weight.name))
    before = data.read_bytes()
    save_like(model, artifacts / MODEL_ONNX, artifacts / MODEL_ONNX)
    assert data.read_bytes() != before
    assert "was built from another model.onnx" in provenance.mismatch(artifacts / "model.int8.cpu.onnx")
    with pytest.raises(ValueError, match="has changed since"):
        deployed_model_file(read_manifest(tmp_path / "fp32"))
