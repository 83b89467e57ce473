"""What the client library and its command lines say when a request cannot be answered: a host name that
does not resolve, port 0, an unknown protocol, a timeout of no seconds, --top-k below 1, demo ports out of range,
and (real server) a request past its timeout."""
from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from clients import demo
from clients.classify import _requested
from clients.client import AsyncImageClassifierClient, ClassificationError, ImageClassifierClient, ServerUnavailable
from clients.endpoint import split_url
from serving.server import free_port

ROOT = Path(__file__).resolve().parents[2]


async def _classify_async(url: str, protocol: str) -> None:
    async with AsyncImageClassifierClient(url, protocol) as client:
        await client.classify([b"x"])


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_unresolvable_host_is_named(protocol):
    for classify in (lambda url: ImageClassifierClient(url, protocol).classify([b"x"]),
                     lambda url: asyncio.run(_classify_async(url, protocol))):
        with pytest.raises(ServerUnavailable, match=r"the host name of nosuchhost\.invalid:\d+ does not resolve"):
            classify("nosuchhost.invalid")


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_a_port_that_accepts_and_answers_nothing_is_named(protocol):
    """Before, it was 'something that speaks neither HTTP nor gRPC': what a killed tritonserver's stubs look like
    while they still hold its port, or a server that is stopping."""
    listener = socket.create_server(("127.0.0.1", 0))
    address = f"127.0.0.1:{listener.getsockname()[1]}"

    def hang_up():
        with contextlib.suppress(OSError):  # closed at the end of the test
            while True:
                listener.accept()[0].close()

    threading.Thread(target=hang_up, daemon=True).start()
    try:
        for classify in (lambda url: ImageClassifierClient(url, protocol, timeout_s=10).classify([b"x"]),
                         lambda url: asyncio.run(_classify_async(url, protocol))):
            with pytest.raises(ServerUnavailable, match=rf"{address} accepts connections but answers nothing"):
                classify(address)
    finally:
        listener.shutdown(socket.SHUT_RDWR)  # wakes the accept
        listener.close()


def test_port_zero_is_refused():
    assert split_url("127.0.0.1") == ("http", "127.0.0.1:8000")
    for url in ("127.0.0.1:0", "grpc://127.0.0.1:0"):
        with pytest.raises(ValueError, match=r"port 0 is no server's port"):
            split_url(url)


@pytest.mark.parametrize("timeout_s", [0, -1, float("nan"), float("inf"), "5", True])
def test_a_timeout_that_is_no_positive_number_is_a_value_error(timeout_s):
    """Before, tritonclient took each its own way: gRPC timed out at once (0, -1, NaN, even infinity), HTTP said
    the server was unavailable (0: 'Operation now in progress', -1: 'Timeout value out of range'), asyncio HTTP
    raised OverflowError on infinity."""
    for client in (ImageClassifierClient, AsyncImageClassifierClient):
        for protocol in ("http", "grpc"):
            with pytest.raises(ValueError, match=rf"timeout_s must be seconds above 0 \(finite\) or None for no "
                                                 rf"limit, got {re.escape(repr(timeout_s))}$"):
                client("127.0.0.1:8000", protocol, timeout_s=timeout_s)
    for timeout_s in (None, 0.001, 60):  # None: no limit
        ImageClassifierClient("127.0.0.1:8000", "grpc", timeout_s=timeout_s).close()


def test_unknown_protocol_is_a_value_error():
    for url in (None, "127.0.0.1:8000"):
        with pytest.raises(ValueError, match=r"protocol 'https' is not one of \('http', 'grpc'\)"):
            ImageClassifierClient(url, protocol="https")


@pytest.mark.parametrize("module", ["clients.classify", "clients.demo"])
@pytest.mark.parametrize("top_k", ["0", "-3"])
def test_top_k_below_one_is_refused_by_the_command_line(tmp_path, module, top_k):
    args = ["x.jpg", "--url", f"127.0.0.1:{free_port()}"] if module == "clients.classify" else [
        "--model-repository", str(tmp_path / "none"), "--log-file", str(tmp_path / "demo.log")]
    done = subprocess.run([sys.executable, "-m", module, *args, "--top-k", top_k], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert f"argument --top-k: must be at least 1, got {top_k}" in done.stderr


@pytest.mark.parametrize("argv, message", [
    (["--http-port", "70000"], "--http-port: port 70000 is not in 0-65535"),
    (["--grpc-port", "-1"], "--grpc-port: port -1 is not in 0-65535"),
    (["--metrics-port", "x"], "--metrics-port: invalid port 'x'"),
])
def test_demo_ports_are_checked_at_parsing(argv, message, parse_error):
    assert parse_error(demo.get_args_parser(), argv).endswith(f"error: argument {message}")
    assert demo.demo_ports(demo.get_args_parser().parse_args(["--http-port", "0"])).http > 0  # 0: a free port


@pytest.mark.slow
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_a_request_past_its_timeout_is_that_requests_failure(server, photos, protocol):
    url = server.http_url if protocol == "http" else server.grpc_url
    expected = rf"no {'HTTP' if protocol == 'http' else 'gRPC'} answer from {url}: timed out after 0\.001 s"
    with ImageClassifierClient(url, protocol, timeout_s=0.001) as client:
        with pytest.raises(ClassificationError, match=expected) as raised:
            client.classify([photos["coffee"]])
        assert not isinstance(raised.value, ServerUnavailable) and raised.value.status == "DEADLINE_EXCEEDED"
        (outcome,) = _requested(client, [photos["coffee"]], 5)  # clients.classify: the image fails, not the run
        assert isinstance(outcome, ClassificationError) and outcome.status == "DEADLINE_EXCEEDED"

    async def classify_async():
        async with AsyncImageClassifierClient(url, protocol, timeout_s=0.001) as client:
            await client.classify([photos["coffee"]])

    with pytest.raises(ClassificationError, match=expected) as raised:
        asyncio.run(classify_async())
    assert not isinstance(raised.value, ServerUnavailable) and raised.value.status == "DEADLINE_EXCEEDED"
