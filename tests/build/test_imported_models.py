"""An imported classifier of the kinds other tools leave (channels-last, ending in Softmax) goes through
`build.engines` at FP32 and INT8 and is served by a real tritonserver: its answers are the source model's."""
import numpy as np
import torch

from build.engines import get_args_parser, main
from clients.client import ImageClassifierClient
from common.preprocessing import PreprocessConfig, load_batch
from serving.server import TritonServer
from tests.training.tiny_torch import TinyNet, export_fixed_batch
from training.export import import_onnx

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
