"""Shared fixtures: real artifacts, a real model repository and a real tritonserver on free ports."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from common.preprocessing import PreprocessConfig


def write_tiny_classifier(out: Path, num_classes: int = 3, crop: int = 32) -> Path:
    """A small but real ONNX classifier with the project's IO names, plus labels and preprocess.json:
    images -> global average pool -> linear -> logits -> softmax -> probabilities."""
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    weight = helper.make_tensor("W", TensorProto.FLOAT, [3, num_classes], rng.normal(size=(3, num_classes)).ravel())
    bias = helper.make_tensor("B", TensorProto.FLOAT, [num_classes], np.zeros(num_classes))
    nodes = [
        helper.make_node("GlobalAveragePool", ["images"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"]),
        helper.make_node("Gemm", ["flat", "W", "B"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=-1),
    ]
    graph = helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, crop, crop])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", num_classes]),
         helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", num_classes])],
        initializer=[weight, bias],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    onnx.save(model, out / "model.onnx")
    (out / "labels.txt").write_text("".join(f"class {i}\n" for i in range(num_classes)))
    PreprocessConfig(resize=crop + 8, crop=crop).save(out / "preprocess.json")
    return out


@pytest.fixture(scope="session")
def tiny_artifacts(tmp_path_factory) -> Path:
    return write_tiny_classifier(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def lite0_artifacts(tmp_path_factory) -> Path:
    """The bundled EfficientNet-Lite0, exported (with its parity check) once per session."""
    from training.export import export_bundled

    out = tmp_path_factory.mktemp("lite0")
    export_bundled(out)
    return out


@pytest.fixture(scope="session")
def lite0_repository(lite0_artifacts, tmp_path_factory) -> Path:
    from build.repository import write_repository
    from build.spec import DeploymentSpec

    repo = tmp_path_factory.mktemp("served") / "model_repository"
    write_repository(DeploymentSpec(artifacts=str(lite0_artifacts)), "python-onnxruntime", repo, "tests")
    return repo


@pytest.fixture(scope="session")
def server(lite0_repository):
    """A real tritonserver (the `tritonserver` launcher) on free loopback ports."""
    from serving.server import TritonServer

    log = lite0_repository.parent / "tritonserver.log"
    with TritonServer(lite0_repository, log_file=log) as running:
        yield running
    assert running.process.returncode == 0, f"tritonserver did not shut down cleanly; see {log}"


@pytest.fixture(scope="session")
def photos() -> dict[str, bytes]:
    from common.samples import sample_photos

    return {name: path.read_bytes() for name, path in sample_photos().items()}
