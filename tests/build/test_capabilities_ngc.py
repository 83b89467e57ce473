"""Capability detection inside NGC-layout images: the server under /opt/tritonserver (bin/tritonserver,
one folder per backend in backends/), here a fake layout in a temporary folder (TRITON_SERVER_ROOT)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from build.repository import capabilities
from build.repository.spec import DeploymentSpec

ROOT = Path(__file__).resolve().parents[2]
NGC_BACKENDS = ("onnxruntime", "python", "pytorch", "tensorrt")


def ngc_layout(root: Path, backends=NGC_BACKENDS, binary: bool = True) -> Path:
    (root / "bin").mkdir(parents=True)
    (root / "backends").mkdir()
    if binary:
        (root / "bin" / "tritonserver").write_bytes(b"\x7fELF")
    for name in backends:
        (root / "backends" / name).mkdir(parents=True)
        (root / "backends" / name / f"libtriton_{name}.so").write_bytes(b"")
    return root


def run(module: str, *args: str, server_root: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, TRITON_SERVER_ROOT=str(server_root))
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def test_an_ngc_layout_is_the_server_that_runs(tmp_path):
    root = ngc_layout(tmp_path / "opt" / "tritonserver")
    assert capabilities.server_backend_directory(root) == root / "backends"
    caps = capabilities.detect(server_root=root)
    assert caps.server_backends == NGC_BACKENDS
    backend, why = capabilities.resolve_backend("auto", caps)
    assert backend == ("tensorrt" if caps.tensorrt and caps.gpus else "onnxruntime"), why


def test_a_backends_folder_without_the_server_binary_is_not_an_install(tmp_path):
    root = ngc_layout(tmp_path / "opt" / "tritonserver", binary=False)
    assert capabilities.server_backend_directory(root) != root / "backends"


def test_make_capabilities_reports_the_ngc_backends(tmp_path):
    root = ngc_layout(tmp_path / "tritonserver", backends=("python",))
    done = run("build.repository.capabilities", server_root=root)
    assert done.returncode == 0, done.stderr
    assert "server backends: python;" in done.stdout
    assert "classifier backend: python-onnxruntime" in done.stdout
    empty = ngc_layout(tmp_path / "empty", backends=())
    done = run("build.repository.capabilities", server_root=empty)
    assert done.returncode != 0 and "can run no classifier backend" in done.stderr


@pytest.mark.slow
def test_backend_auto_builds_for_the_ngc_server(tiny_artifacts, tmp_path):
    root = ngc_layout(tmp_path / "tritonserver")
    out = tmp_path / "model_repository"
    DeploymentSpec().save(tmp_path / "spec.json")  # the built-in default
    done = run("build.engines", "--spec", str(tmp_path / "spec.json"), "--artifacts", str(tiny_artifacts),
               "--out", str(out), server_root=root)
    assert done.returncode == 0, done.stderr
    config = (out / "classifier" / "config.pbtxt").read_text()
    assert 'platform: "onnxruntime_onnx"' in config or 'platform: "tensorrt_plan"' in config
