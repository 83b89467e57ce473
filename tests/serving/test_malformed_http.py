"""Malformed HTTP inference bodies: what Triton 2.51's HTTP frontend answers, pinned.

Some bodies that are the client's fault (unparsable JSON, a negative shape, JSON of the wrong kinds) get
HTTP 500 from Triton itself (before any model runs), where its other malformed-request answers are 400 (an
empty body reaches the preprocess step, which answers 400). This test pins Triton's own behaviour, so that a
Triton that answers 4xx shows up here; the supervisor's HTTP guard answers them all 400 in front of Triton
(tests/serving/test_http_guard.py, docs/operations.md). Each answer leaves the server serving, but one: a body
of brackets nested a million deep kills Triton 2.51, and the supervisor that `make serve` and the containers
run brings it back.
"""
from __future__ import annotations

import http.client
import json
import signal
import time
import urllib.error
import urllib.request

import pytest

from clients.client import DEFAULT_MODEL, IMAGE_INPUT
from tests.serving.test_self_healing import get, repository  # noqa: F401 (repository: a fixture)
from tests.serving.test_supervise import Supervised, ready_codes_until_healed

pytestmark = pytest.mark.slow

PINNED_500 = {
    "unparsable JSON": b'{"inputs": [',
    "negative shape": json.dumps({"inputs": [{"name": IMAGE_INPUT, "shape": [-1, 1], "datatype": "BYTES",
                                              "data": ["abc"]}]}).encode(),
    "inputs not a list": json.dumps({"inputs": {"name": IMAGE_INPUT}}).encode(),
    "a JSON list for a body": b"[1, 2, 3]",
    "BYTES data as numbers": json.dumps({"inputs": [{"name": IMAGE_INPUT, "shape": [1, 1], "datatype": "BYTES",
                                                     "data": [1]}]}).encode(),
    "classification count not an integer": json.dumps({
        "inputs": [{"name": IMAGE_INPUT, "shape": [1, 1], "datatype": "BYTES", "data": ["abc"]}],
        "outputs": [{"name": "PROBABILITIES", "parameters": {"classification": -1}}]}).encode(),
}
ANSWERED_400 = {
    # no inputs at all: the ensemble's preprocess step sees an empty image and says so (400)
    "empty body": b"",
    "wrong datatype": json.dumps({"inputs": [{"name": IMAGE_INPUT, "shape": [1, 1], "datatype": "FP32",
                                              "data": [1.0]}]}).encode(),
    "wrong input name": json.dumps({"inputs": [{"name": "NOT_AN_INPUT", "shape": [1, 1], "datatype": "BYTES",
                                                "data": ["abc"]}]}).encode(),
}


@pytest.fixture(scope="module")
def tiny_server(tiny_artifacts, tmp_path_factory):
    from build.repository.spec import DeploymentSpec
    from build.repository.writer import write_repository
    from serving.server import TritonServer

    repo = tmp_path_factory.mktemp("malformed") / "model_repository"
    write_repository(DeploymentSpec(artifacts=str(tiny_artifacts)), "python-onnxruntime", repo, "tests")
    with TritonServer(repo, log_file=repo.parent / "tritonserver.log") as server:
        yield server


def post(http_url: str, body: bytes) -> tuple[int, str]:
    request = urllib.request.Request(f"http://{http_url}/v2/models/{DEFAULT_MODEL}/infer", data=body,
                                     method="POST", headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return r.status, r.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")


def still_serves(server, photo: bytes) -> bool:
    from clients.client import ImageClassifierClient

    with ImageClassifierClient(server.http_url, protocol="http") as client:
        return len(client.classify([photo], top_k=1)[0]) == 1


@pytest.mark.parametrize("case", sorted(PINNED_500))
def test_triton_answers_these_malformed_bodies_with_500(tiny_server, photos, case):
    status, body = post(tiny_server.http_url, PINNED_500[case])
    assert status == 500, f"{case}: Triton now answers {status} ({body[:200]}): update docs/operations.md"
    assert "error" in json.loads(body)
    assert still_serves(tiny_server, photos["chelsea"])


@pytest.mark.parametrize("case", sorted(ANSWERED_400))
def test_other_malformed_bodies_get_400(tiny_server, photos, case):
    status, body = post(tiny_server.http_url, ANSWERED_400[case])
    assert status == 400, (case, body[:200])
    assert still_serves(tiny_server, photos["chelsea"])


DEEP = b'{"inputs": ' + b"[" * 1_000_000 + b"]" * 1_000_000 + b"}"  # 2 MB


def test_a_body_nested_a_million_deep_kills_triton_and_the_supervisor_brings_it_back(repository, tmp_path, photos):
    """Triton 2.51 parses an HTTP body's JSON recursively (RapidJSON without its iterative flag; made iterative
    upstream in triton-inference-server/common#156, after 2.51), so a body of nested brackets overflows the
    HTTP thread's stack: the server dies of SIGSEGV with every request in flight. Pinned: a Triton that
    survives it fails here (docs/operations.md then changes). Under serving.supervise /ready answers 503
    while the server is down, the server is started again and serves. The same brackets 10,000 deep are
    answered 400 (with an 8 MB stack, 100,000 were, 105,000 killed it)."""
    from clients.client import ImageClassifierClient

    with Supervised(repository, tmp_path / "supervise.log", restarts=1) as supervised:
        first = supervised.server_pid()
        http_url = f"127.0.0.1:{supervised.ports.http}"
        assert post(http_url, b'{"inputs": ' + b"[" * 10_000 + b"]" * 10_000 + b"}")[0] == 400
        connection = http.client.HTTPConnection("127.0.0.1", supervised.ports.http, timeout=30)
        sent = time.monotonic()
        connection.request("POST", f"/v2/models/{DEFAULT_MODEL}/infer", body=DEEP)
        try:
            answer = connection.getresponse().status
        except (ConnectionError, http.client.HTTPException) as exc:
            answer = repr(exc)
        assert not isinstance(answer, int), f"Triton now answers {answer}: update docs/operations.md"
        codes = ready_codes_until_healed(supervised)
        status = get(supervised.url + "/status")[1]
        assert status["server_exits"] == [-signal.SIGSEGV] and status["server_pid"] != first, status
        assert 503 in codes and codes[-1] == 200, (codes, status)
        print(f"\nbody nested 10^6 deep: the server died and was ready again {time.monotonic() - sent:.1f} s later")
        with ImageClassifierClient(http_url, protocol="http") as client:
            assert len(client.classify([photos["coffee"]], top_k=1)) == 1
