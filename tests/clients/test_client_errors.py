"""What the client library and its command lines say when a request cannot be answered: a host name that
does not resolve, port 0, an unknown protocol, a timeout of no seconds, --top-k below 1, demo ports out of range,
a gRPC server that holds or times out its calls, and (real server) a request past its timeout and a kept-alive
connection a load balancer forgot."""
from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import re
import socket
import subprocess
import sys
import threading
from pathlib import Path

import grpc
import pytest
from tritonclient.grpc import service_pb2, service_pb2_grpc

from clients import demo
from clients.classify import _requested
from clients.client import AsyncImageClassifierClient, ClassificationError, ImageClassifierClient, ServerUnavailable
from clients.endpoint import split_url
from serving.server import free_port
from tests.clients.proxies import ForgetfulBalancer

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


class GrpcStandin(service_pb2_grpc.GRPCInferenceServiceServicer):
    """Triton's gRPC service, served by grpcio: ready at once, except the calls named in `held` (answered only once
    `release` is set) and those in `expired` (answered DEADLINE_EXCEEDED, as a proxy whose upstream did not answer
    in time says)."""

    def __init__(self, held: frozenset[str] = frozenset(), expired: frozenset[str] = frozenset()):
        self.held, self.expired, self.release = held, expired, threading.Event()

    def _answer(self, name: str, context, answer):
        if name in self.expired:
            context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "upstream request timeout")
        if name in self.held:
            self.release.wait(120)
        return answer

    def ServerReady(self, request, context):
        return self._answer("ServerReady", context, service_pb2.ServerReadyResponse(ready=True))

    def ModelReady(self, request, context):
        return self._answer("ModelReady", context, service_pb2.ModelReadyResponse(ready=True))

    def ModelConfig(self, request, context):
        return self._answer("ModelConfig", context, service_pb2.ModelConfigResponse())


@contextlib.contextmanager
def grpc_standin(servicer: GrpcStandin):
    """host:port of a real grpc.server on loopback serving `servicer`."""
    server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=8))
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        servicer.release.set()
        server.stop(grace=None)


def raised_within(seconds: float, call) -> BaseException | None:
    """What call() raised (None if nothing), run in a thread given `seconds`: far more than the client's timeout,
    only so that a call that never returns fails the test instead of hanging it."""
    outcome: list[BaseException | None] = []

    def run():
        try:
            call()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            outcome.append(exc)
        else:
            outcome.append(None)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert outcome, f"no answer and no error after {seconds} s"
    return outcome[0]


def sync_and_async(url: str, method: str, **options):
    """Calls of `method` on a new sync and a new async gRPC client."""
    def sync():
        with ImageClassifierClient(url, "grpc", **options) as client:
            getattr(client, method)()

    async def async_():
        async with AsyncImageClassifierClient(url, "grpc", **options) as client:
            await getattr(client, method)()

    return {"sync": sync, "async": lambda: asyncio.run(async_())}


@pytest.mark.parametrize("held, method", [("ServerReady", "is_ready"), ("ModelReady", "is_ready"),
                                          ("ModelConfig", "max_batch_size")])
def test_a_grpc_call_the_server_holds_times_out(held, method):
    """Before, only inference had the client's timeout over gRPC: readiness and the model config (--batch's
    max_batch_size) waited for as long as the server held them."""
    with grpc_standin(GrpcStandin(held=frozenset({held}))) as url:
        for kind, call in sync_and_async(url, method, timeout_s=1).items():
            raised = raised_within(60, call)
            assert isinstance(raised, ClassificationError) and not isinstance(raised, ServerUnavailable), (kind, raised)
            assert raised.status == "DEADLINE_EXCEEDED", (kind, raised)
            assert str(raised) == f"no gRPC answer from {url}: timed out after 1 s", (kind, raised)


def test_a_deadline_exceeded_without_a_client_timeout_is_a_classification_error():
    """timeout_s=None sets no limit, so a DEADLINE_EXCEEDED is the far end's own. Before, its message formatted
    None as seconds and raised TypeError instead."""
    with grpc_standin(GrpcStandin(expired=frozenset({"ServerReady"}))) as url:
        for kind, call in sync_and_async(url, "is_ready", timeout_s=None).items():
            raised = raised_within(60, call)
            assert isinstance(raised, ClassificationError) and raised.status == "DEADLINE_EXCEEDED", (kind, raised)
            assert str(raised) == f"no gRPC answer from {url}: timed out (upstream request timeout)", (kind, raised)


@pytest.mark.slow
def test_a_connection_a_load_balancer_forgot_is_retried_on_a_fresh_one(server, photos):
    """Before, a kept-alive HTTP connection reset under the next request (geventhttpclient sends no POST twice)
    was reported as no server answering, although the probe found Triton answering a fresh connection:
    clients.classify then failed every image left. (A proxy that tells HTTP/2's exchanges apart is more than this
    one: gRPC takes the same path in the client.)"""
    protocol = "http"
    balancer = ForgetfulBalancer(server.http_url)
    try:
        with ImageClassifierClient(balancer.url, protocol) as client:
            first = client.classify([photos["coffee"]], 1)[0][0].index
            assert client.classify([photos["coffee"]], 1)[0][0].index == first

        async def twice():
            async with AsyncImageClassifierClient(balancer.url, protocol) as client:
                return [(await client.classify([photos["coffee"]], 1))[0][0].index for _ in range(2)]

        assert asyncio.run(twice()) == [first, first]
    finally:
        balancer.close()
