"""`make classify` talks to the server `make serve` started (its recorded ports), over HTTP or gRPC;
clients.demo takes ports and runs beside another server. Real `make`, real servers."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from common.samples import ESPRESSO, sample_photos
from serving.server import Ports

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


def make(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """The project's Makefile run in `cwd` (its own .run/), with this environment's Python and no setup step."""
    command = ["make", "--no-print-directory", "-f", str(ROOT / "Makefile"), "-C", str(cwd),
               f"VENV={Path(sys.executable).parent.parent}", "STAMP=", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=240)


def test_make_classify_finds_the_server_make_serve_started(lite0_repository, server, tmp_path):
    ports = Ports.free()
    serve = make(tmp_path, "serve", f"REPOSITORY={lite0_repository}", f"HTTP_PORT={ports.http}",
                 f"GRPC_PORT={ports.grpc}", f"METRICS_PORT={ports.metrics}")
    assert serve.returncode == 0, serve.stderr
    try:
        for protocol in ([], ["PROTOCOL=grpc"]):
            done = make(tmp_path, "classify", *protocol)
            assert done.returncode == 0, done.stderr
            assert "espresso" in done.stdout and "chelsea" in done.stdout
        coffee = str(sample_photos(["coffee"])["coffee"])
        direct = subprocess.run([sys.executable, "-m", "clients.classify", coffee, "--json", "--protocol", "grpc"],
                                cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert direct.returncode == 0 and json.loads(direct.stdout)["top"][0]["index"] == ESPRESSO, direct.stderr
        # ports on the command line name another server: the session's
        named = make(tmp_path, "classify", f"IMAGES={coffee}", f"HTTP_PORT={server.ports.http}")
        assert named.returncode == 0 and f"--url 127.0.0.1:{server.ports.http}" in named.stdout, named.stderr
        wrong = make(tmp_path, "classify", f"IMAGES={coffee}", f"URL=127.0.0.1:{ports.grpc}")
        assert wrong.returncode != 0 and "--protocol grpc" in wrong.stderr
    finally:
        stop = make(tmp_path, "stop")
    assert stop.returncode == 0, stop.stderr


def demo(repository: Path, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "clients.demo", "--model-repository", str(repository),
                           "--log-file", str(tmp_path / "demo.log"), *args], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)


def test_demo_takes_ports_and_runs_beside_a_server(lite0_repository, server, tmp_path):
    clash = demo(lite0_repository, tmp_path, "--http-port", str(server.ports.http))
    assert clash.returncode == 1 and "Traceback" not in clash.stderr
    assert clash.stderr.startswith(f"clients.demo: http port {server.ports.http} on 127.0.0.1 already in use")
    ports = Ports.free()
    done = demo(lite0_repository, tmp_path, "--http-port", str(ports.http), "--grpc-port", str(ports.grpc))
    assert done.returncode == 0, done.stderr
    assert f"ready: HTTP 127.0.0.1:{ports.http}, gRPC 127.0.0.1:{ports.grpc}" in done.stdout
    assert "demo OK" in done.stdout
