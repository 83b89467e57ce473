"""`make classify` talks to the server `make serve` started (its recorded ports), over HTTP or gRPC;
clients.demo takes ports and runs beside another server. Real `make`, real servers."""
from __future__ import annotations

import dataclasses
import json
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest

from clients.client import ImageClassifierClient, ServerUnavailable
from common.samples import ESPRESSO, sample_photos
from serving.server import Ports, TritonServer, free_port

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
                 f"GRPC_PORT={ports.grpc}", f"METRICS_PORT={ports.metrics}", f"WATCHDOG_PORT={free_port()}")
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


def _ipv6_loopback() -> str | None:
    """Why this machine cannot bind ::1, or None."""
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError as exc:
        return f"no IPv6 loopback here ({exc})"
    return None


@pytest.mark.skipif(_ipv6_loopback() is not None, reason=str(_ipv6_loopback()))
def test_make_serve_binds_ipv6_and_the_tools_reach_it(lite0_repository, tmp_path):
    """`make serve ADDRESS=::1 GUARD_PORT=...`: Triton's three endpoints, the supervisor's and its HTTP guard
    listen on ::1 only; `make classify` (the recorded URLs, and ADDRESS on the command line) and `make stop` reach
    it; /ready and /metrics answer; the guard classifies and refuses a body nested too deep."""
    ports, watchdog, guard = Ports.free(), free_port(), free_port()
    address = [f"HTTP_PORT={ports.http}", f"GRPC_PORT={ports.grpc}", f"METRICS_PORT={ports.metrics}",
               f"WATCHDOG_PORT={watchdog}", "ADDRESS=::1"]
    serve = make(tmp_path, "serve", f"REPOSITORY={lite0_repository}", *address, f"GUARD_PORT={guard}")
    assert serve.returncode == 0, serve.stderr
    try:
        recorded = json.loads((tmp_path / ".run" / "tritonserver.json").read_text())
        assert (recorded["http"], recorded["grpc"]) == (f"[::1]:{ports.http}", f"[::1]:{ports.grpc}")
        listening = {(c.laddr.ip, c.laddr.port) for c in psutil.net_connections("inet") if c.status == "LISTEN"}
        for port in (*dataclasses.astuple(ports), watchdog, guard):
            assert ("::1", port) in listening and ("127.0.0.1", port) not in listening, port
        assert recorded["guard"] == f"[::1]:{guard}" and f"http://[::1]:{guard}/v2/models" in serve.stdout
        coffee = sample_photos(["coffee"])["coffee"].read_bytes()
        with ImageClassifierClient(recorded["guard"], "http") as client:
            assert client.classify([coffee])[0][0].index == ESPRESSO
        deep = urllib.request.Request(f"http://[::1]:{guard}/v2/models/image_classifier/infer", method="POST",
                                      data=b"[" * 1000 + b"]" * 1000)
        with pytest.raises(urllib.error.HTTPError, match="400"):
            urllib.request.urlopen(deep, timeout=30)
        for protocol in ([], ["PROTOCOL=grpc"]):
            done = make(tmp_path, "classify", *protocol)
            assert done.returncode == 0 and "espresso" in done.stdout, done.stderr
        named = make(tmp_path, "classify", "PROTOCOL=grpc", *address)
        assert named.returncode == 0 and f"--url [::1]:{ports.grpc}" in named.stdout, named.stderr
        with urllib.request.urlopen(f"http://[::1]:{watchdog}/ready", timeout=10) as answer:
            assert json.loads(answer.read())["ready"] is True
        with urllib.request.urlopen(f"http://[::1]:{ports.metrics}/metrics", timeout=10) as answer:
            assert b"nv_inference_request_success" in answer.read()
    finally:
        stop = make(tmp_path, "stop")
    assert stop.returncode == 0, stop.stderr
    assert not (tmp_path / ".run" / "tritonserver.json").exists()


@pytest.mark.skipif(_ipv6_loopback() is not None, reason=str(_ipv6_loopback()))
def test_a_server_on_every_ipv6_interface_answers_as_docs_serving_md_says(lite0_repository, tmp_path):
    """ADDRESS=:: (pins Triton 2.51's behaviour): HTTP and metrics over IPv6 only, gRPC over IPv4 too."""
    with TritonServer(lite0_repository, address="::", log_file=tmp_path / "tritonserver.log") as server:
        assert server.http_url == f"[::]:{server.ports.http}" and server.is_ready()
        coffee = sample_photos(["coffee"])["coffee"].read_bytes()
        for host in ("[::1]", "127.0.0.1"):
            with ImageClassifierClient(f"{host}:{server.ports.grpc}", "grpc") as client:
                assert client.classify([coffee])[0][0].index == ESPRESSO
        with ImageClassifierClient(f"[::1]:{server.ports.http}", "http") as client:
            assert client.classify([coffee])[0][0].index == ESPRESSO
        with pytest.raises(ServerUnavailable, match=f"nothing listens at 127.0.0.1:{server.ports.http}"):
            ImageClassifierClient(f"127.0.0.1:{server.ports.http}", "http").classify([coffee])
        with urllib.request.urlopen(f"http://[::1]:{server.ports.metrics}/metrics", timeout=10) as answer:
            assert answer.status == 200
        with pytest.raises(urllib.error.URLError):
            urllib.request.urlopen(f"http://127.0.0.1:{server.ports.metrics}/metrics", timeout=10)


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
