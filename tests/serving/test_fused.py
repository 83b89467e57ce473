"""The fused pipeline (preprocessing + ONNX Runtime in one python model) on a real server: same
answers as in process, same client errors for bad input, batching."""
import numpy as np
import onnxruntime as ort
import pytest

from build.repository.writer import write_repository
from build.repository.spec import DeploymentSpec
from clients.client import ClassificationError, ImageClassifierClient
from common.preprocessing import PreprocessConfig, load_batch
from serving.server import TritonServer
from tests.serving.test_bad_input import BAD, client_error_status
from tests.serving.test_dynamic_batching import batch_sizes

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def fused_server(lite0_artifacts, tmp_path_factory):
    repo = tmp_path_factory.mktemp("fused") / "model_repository"
    write_repository(DeploymentSpec(artifacts=str(lite0_artifacts), pipeline="fused"), "python-onnxruntime", repo)
    with TritonServer(repo, log_file=repo.parent / "tritonserver.log") as server:
        yield server


def test_fused_answers_match_in_process_and_batch(fused_server, lite0_artifacts, photos):
    images = list(photos.values())
    config = PreprocessConfig.load(lite0_artifacts / "preprocess.json")
    session = ort.InferenceSession(str(lite0_artifacts / "model.onnx"), providers=["CPUExecutionProvider"])
    (expected,) = session.run(["probabilities"], {"images": load_batch(images, config)})
    for protocol, url in (("http", fused_server.http_url), ("grpc", fused_server.grpc_url)):
        with ImageClassifierClient(url, protocol) as client:
            np.testing.assert_allclose(client.probabilities(images), expected, atol=1e-5)
    assert any(size > 1 for size in batch_sizes(fused_server.grpc_url, "classifier"))  # one request, many images


@pytest.mark.parametrize("case", sorted(BAD))
def test_fused_bad_input_is_a_client_error(fused_server, photos, case):
    make, expected = BAD[case]
    with ImageClassifierClient(fused_server.grpc_url, "grpc") as client:
        with pytest.raises(ClassificationError) as info:
            client.classify([photos["coffee"], make(photos)])
        assert info.value.status == client_error_status("grpc") and expected in str(info.value)
        assert client.classify([photos["coffee"]], top_k=1)[0][0].label == "espresso"
    assert fused_server.is_ready()
