"""Triton's own example image client (triton-inference-server/client, src/python/examples/image_client.py)
against what we serve: its `parse_model` checks, restated below from that file, hold for the classifier
model of a repository built with `classifier_outputs: ["probabilities"]`, on the served metadata and
config; then a request made the way that client makes it (FP32 NCHW batch, one output with
class_count) classifies the bundled photos."""
from __future__ import annotations

import numpy as np
import pytest

from build.repository.spec import DeploymentSpec
from build.repository.writer import write_repository
from common.contract import CLASSIFIER, ONNX_INPUT, ONNX_PROBABILITIES
from common.preprocessing import PreprocessConfig, load_batch
from common.samples import CAT_CLASSES, ESPRESSO
from serving.server import TritonServer


def image_client_refusal(metadata: dict, config: dict) -> str | None:
    """What image_client.py's parse_model raises for this model (None: it accepts it). Same checks, same
    order, on the HTTP client's JSON (the client converts the format enum name the same way)."""
    if len(metadata["inputs"]) != 1:
        return f"expecting 1 input, got {len(metadata['inputs'])}"
    if len(metadata["outputs"]) != 1:
        return f"expecting 1 output, got {len(metadata['outputs'])}"
    if len(config["input"]) != 1:
        return f"expecting 1 input in model configuration, got {len(config['input'])}"
    input_metadata, input_config, output_metadata = metadata["inputs"][0], config["input"][0], metadata["outputs"][0]
    max_batch_size = config.get("max_batch_size", 0)
    if output_metadata["datatype"] != "FP32":
        return f"expecting output datatype to be FP32, model has {output_metadata['datatype']}"
    output_batch_dim, non_one = max_batch_size > 0, 0
    for dim in output_metadata["shape"]:
        if output_batch_dim:
            output_batch_dim = False
        elif dim > 1:
            non_one += 1
            if non_one > 1:
                return "expecting model output to be a vector"
    expected_dims = 3 + (1 if max_batch_size > 0 else 0)
    if len(input_metadata["shape"]) != expected_dims:
        return f"expecting input to have {expected_dims} dimensions, model has {len(input_metadata['shape'])}"
    if input_config.get("format") not in ("FORMAT_NCHW", "FORMAT_NHWC"):
        return f"unexpected input format {input_config.get('format')}, expecting FORMAT_NCHW or FORMAT_NHWC"
    return None


def served_classifier(server) -> tuple[dict, dict]:
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(server.http_url)
    try:
        return client.get_model_metadata(CLASSIFIER), client.get_model_config(CLASSIFIER)
    finally:
        client.close()


@pytest.mark.slow
def test_default_repository_is_refused_for_its_two_outputs(tiny_artifacts, tmp_path):
    repo = tmp_path / "model_repository"
    write_repository(DeploymentSpec(artifacts=str(tiny_artifacts)), "python-onnxruntime", repo, "tests")
    with TritonServer(repo, log_file=tmp_path / "tritonserver.log") as server:
        metadata, config = served_classifier(server)
    assert image_client_refusal(metadata, config) == "expecting 1 output, got 2"
    assert config["input"][0]["format"] == "FORMAT_NCHW"  # the layout is declared either way


@pytest.mark.slow
def test_single_output_classifier_serves_image_client(lite0_artifacts, tmp_path, photos):
    import tritonclient.http as httpclient

    spec = DeploymentSpec(artifacts=str(lite0_artifacts), classifier_outputs=[ONNX_PROBABILITIES])
    repo = tmp_path / "model_repository"
    write_repository(spec, "python-onnxruntime", repo, "tests")
    config = PreprocessConfig.load(lite0_artifacts / "preprocess.json")
    batch = load_batch([photos["chelsea"], photos["coffee"]], config)
    with TritonServer(repo, log_file=tmp_path / "tritonserver.log") as server:
        metadata, model_config = served_classifier(server)
        assert image_client_refusal(metadata, model_config) is None
        assert (metadata["inputs"][0]["name"], metadata["outputs"][0]["name"]) == (ONNX_INPUT, ONNX_PROBABILITIES)
        # the request image_client.py sends: the one input, the one output with class_count=k
        client = httpclient.InferenceServerClient(server.http_url)
        try:
            tensor = httpclient.InferInput(ONNX_INPUT, list(batch.shape), "FP32")
            tensor.set_data_from_numpy(batch)
            answer = client.infer(CLASSIFIER, [tensor],
                                  outputs=[httpclient.InferRequestedOutput(ONNX_PROBABILITIES, class_count=3)])
        finally:
            client.close()
    top = answer.as_numpy(ONNX_PROBABILITIES)
    assert top.shape == (2, 3)
    indices = [[int(entry.decode().split(":")[1]) for entry in row] for row in top]
    assert CAT_CLASSES & set(indices[0]) and indices[1][0] == ESPRESSO
    assert all(0 < float(entry.decode().split(":")[0]) <= 1 for entry in np.ravel(top))


def test_classifier_outputs_must_keep_probabilities():
    for bad in (["logits"], [], ["probabilities", "probabilities"], ["probabilities", "scores"], "probabilities"):
        with pytest.raises(ValueError, match="classifier_outputs"):
            DeploymentSpec(classifier_outputs=bad)
