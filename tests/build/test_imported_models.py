"""An imported classifier of the kinds other tools leave (channels-last, ending in Softmax, grayscale) goes through
`build.engines` and is served by a real tritonserver: its answers are the source model's."""
import numpy as np
import pytest
import torch

from build.engines import get_args_parser, main
from clients.client import ImageClassifierClient
from common.preprocessing import PreprocessConfig, load_batch
from serving.server import TritonServer
from tests.training.tiny_torch import TinyNet, export_fixed_batch
from training.export import import_onnx, onnxruntime_session

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
