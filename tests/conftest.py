"""Shared fixtures: real artifacts, a real model repository and a real tritonserver on free ports; a parser's refusal."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from tests.tiny_model import write_tiny_classifier


@pytest.fixture
def parse_error(capsys):
    """parse_error(parser, argv) -> the one line argparse ends with when it refuses `argv` (exit 2)."""
    def refused(parser, argv: list[str]) -> str:
        with pytest.raises(SystemExit) as exited:
            parser.parse_args(argv)
        assert exited.value.code == 2
        return capsys.readouterr().err.splitlines()[-1]
    return refused


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
    from build.repository.writer import write_repository
    from build.repository.spec import DeploymentSpec

    repo = tmp_path_factory.mktemp("served") / "model_repository"
    spec = DeploymentSpec(artifacts=str(lite0_artifacts))
    # No queue timeout: whether a request waits past one depends on the machine's speed and load, and no
    # test may depend on wall-clock time. The overload tests build servers with timeouts of their own.
    spec = spec.replace(preprocess=dataclasses.replace(spec.preprocess, queue_timeout_us=0))
    write_repository(spec, "python-onnxruntime", repo, "tests")
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
