"""Malformed HTTP inference bodies: what Triton 2.51's HTTP frontend answers, pinned.

Some bodies that are the client's fault (unparsable JSON, a negative shape, a field or a tensor's data of a JSON
type Triton does not read it as) get HTTP 500 from Triton itself (before any model runs), where its other
malformed-request answers are 400 (an empty body reaches the preprocess step, which answers 400). This test pins
Triton's own behaviour, so that a Triton that answers 4xx shows up here; the supervisor's HTTP guard answers them
all 400 in front of Triton (tests/serving/test_http_guard.py, docs/operations.md). Each answer leaves the server
serving, but two: a body of brackets nested a million deep and a tensor whose shape claims 2^64-2 elements kill
Triton 2.51, and the supervisor that `make serve` and the containers run brings it back.
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
from common.contract import CLASSIFIER, ONNX_INPUT as CLASSIFIER_INPUT
from tests.serving.test_self_healing import get, repository  # noqa: F401 (repository: a fixture)
from tests.serving.test_supervise import Supervised, ready_codes_until_healed

pytestmark = pytest.mark.slow


def _request(inputs: dict | None = None, **fields) -> bytes:
    """An inference request for one image input with `inputs` changing its fields and `fields` the request's."""
    image = {"name": IMAGE_INPUT, "shape": [1, 1], "datatype": "BYTES", "data": ["abc"], **(inputs or {})}
    return json.dumps({"inputs": [{k: v for k, v in image.items() if v is not None}], **fields}).encode()


PINNED_500 = {
    "unparsable JSON": b'{"inputs": [',
    "negative shape": _request({"shape": [-1, 1]}),
    "inputs not a list": json.dumps({"inputs": {"name": IMAGE_INPUT}}).encode(),
    "a JSON list for a body": b"[1, 2, 3]",
    "BYTES data as numbers": _request({"data": [1]}),
    "classification count not an integer": _request(outputs=[{"name": "PROBABILITIES",
                                                              "parameters": {"classification": -1}}]),
    # found on 2026-12-06 by sending each field of the request every JSON type Triton does not read it as
    "no inputs at all": b"{}",
    "an input without a shape": _request({"shape": None}),
    "an input without a datatype": _request({"datatype": None}),
    "a shape dimension of 2^64": _request({"shape": [2**64, 1]}),
    "data not a list": _request({"data": "abc"}),
    "fewer data than the shape": _request({"datatype": "FP32", "data": []}),
    "FP32 data as booleans": _request({"datatype": "FP32", "data": [True]}),
    "INT8 data as a fraction": _request({"datatype": "INT8", "data": [1.5]}),
    "UINT8 data negative": _request({"datatype": "UINT8", "data": [-1]}),
    "BOOL data as a number": _request({"datatype": "BOOL", "data": [1]}),
    "a number beyond a double": _request({"datatype": "FP32", "data": [1.0]}).replace(b"1.0", b"1e400"),
    "a lone high surrogate": _request({"data": ["\ud83dx"]}),
    "text after the JSON": _request() + b" x",
    "sequence_id negative": _request(parameters={"sequence_id": -1}),
    "sequence_start a number": _request(parameters={"sequence_start": 1}),
    "priority a fraction": _request(parameters={"priority": 1.0}),
    "timeout a string": _request(parameters={"timeout": "1"}),
    "binary_data_output a number": _request(parameters={"binary_data_output": 5}),
    "binary_data_size negative": _request({"data": None, "parameters": {"binary_data_size": -5}}),
    "shared_memory_offset a string": _request({"parameters": {"shared_memory_offset": "0"}}),
    "an output's binary_data a number": _request(outputs=[{"name": "PROBABILITIES", "parameters": {"binary_data": 1}}]),
    "an output's name a number": _request(outputs=[{"name": 5}]),
}
# Triton 2.51's generate endpoints (`/v2/models/<model>/generate`), by the model posted to: the same answers to the
# same faults, and a value for one of the model's inputs (a key of the body or of its parameters) that Triton cannot
# read as its datatype (the tiny classifier's images: FP32, 3 x 32 x 32 a view).
VIEW = 3 * 32 * 32
GENERATE_500 = {
    "a JSON list for a body": (DEFAULT_MODEL, b"[1]"),
    "parameters not an object": (DEFAULT_MODEL, json.dumps({IMAGE_INPUT: "abc", "parameters": 5}).encode()),
    "a BYTES input a number": (DEFAULT_MODEL, json.dumps({IMAGE_INPUT: 5}).encode()),
    "a BYTES input null": (DEFAULT_MODEL, json.dumps({IMAGE_INPUT: None}).encode()),
    "a BYTES input a list of numbers": (DEFAULT_MODEL, json.dumps({IMAGE_INPUT: [1, 2]}).encode()),
    "a BYTES input a string and a number": (DEFAULT_MODEL, json.dumps({IMAGE_INPUT: ["abc", 1]}).encode()),
    "a BYTES input in the parameters, an object":
        (DEFAULT_MODEL, json.dumps({"parameters": {IMAGE_INPUT: {}}}).encode()),
    "an FP32 input of strings": (CLASSIFIER, json.dumps({CLASSIFIER_INPUT: ["1.0"] * VIEW}).encode()),
    "an FP32 input of booleans": (CLASSIFIER, json.dumps({CLASSIFIER_INPUT: [True] * VIEW}).encode()),
    "an FP32 input nested, more elements than items":
        (CLASSIFIER, json.dumps({CLASSIFIER_INPUT: [[1.0, 1.0]] + [1.0] * (VIEW - 1)}).encode()),
}
# A tensor whose shape claims 2^64-2 elements with one given: Triton 2.51 sizes its buffer from the shape before
# it counts the data, and dies of it (std::length_error, SIGABRT; a shape of 2^59 x 8 SIGSEGV).
SHAPE_BEYOND_DATA = _request({"shape": [2**63 - 1, 2], "datatype": "FP32", "data": [1.0]})

ANSWERED_400 = {
    # no inputs at all: the ensemble's preprocess step sees an empty image and says so (400)
    "empty body": b"",
    "wrong datatype": json.dumps({"inputs": [{"name": IMAGE_INPUT, "shape": [1, 1], "datatype": "FP32",
                                              "data": [1.0]}]}).encode(),
    "wrong input name": json.dumps({"inputs": [{"name": "NOT_AN_INPUT", "shape": [1, 1], "datatype": "BYTES",
                                                "data": ["abc"]}]}).encode(),
    # well formed, of the types Triton reads (the guard lets them through): "abc" is no image
    "sequence_id a string": _request(parameters={"sequence_id": "abc"}),
    "a request parameter of the project's own, a fraction": _request(parameters={"mine": 1.5}),
    "FP16 data as JSON": _request({"datatype": "FP16", "data": [1.0]}),
    "a lone low surrogate": _request({"data": ["\udc00"]}),
    "a backslash before u": _request({"data": ["\\ud83d"]}),
    "data nested as the shape": _request({"shape": [1, 2], "data": [["abc", "def"]]}),
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


def post(http_url: str, body: bytes, endpoint: str = "infer", model: str = DEFAULT_MODEL) -> tuple[int, str]:
    request = urllib.request.Request(f"http://{http_url}/v2/models/{model}/{endpoint}", data=body,
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


@pytest.mark.parametrize("case", sorted(GENERATE_500))
def test_triton_answers_these_generate_bodies_with_500(tiny_server, photos, case):
    model, request = GENERATE_500[case]
    status, body = post(tiny_server.http_url, request, "generate", model)
    assert status == 500, f"{case}: Triton now answers {status} ({body[:200]}): update docs/operations.md"
    assert still_serves(tiny_server, photos["chelsea"])


@pytest.mark.parametrize("case", sorted(ANSWERED_400))
def test_other_malformed_bodies_get_400(tiny_server, photos, case):
    status, body = post(tiny_server.http_url, ANSWERED_400[case])
    assert status == 400, (case, body[:200])
    assert still_serves(tiny_server, photos["chelsea"])


DEEP = b'{"inputs": ' + b"[" * 1_000_000 + b"]" * 1_000_000 + b"}"  # 2 MB


def killed_and_brought_back(repository, tmp_path, photo: bytes, body: bytes, exit_code: int,
                            answered_400: bytes = b"") -> float:
    """Send `body` to a supervised Triton (after `answered_400`, if given, answered 400): the server dies of it
    (no answer; it exits with `exit_code`), /ready answers 503 until the supervisor has started it again, and it
    classifies `photo`. Seconds from the body until ready."""
    from clients.client import ImageClassifierClient

    with Supervised(repository, tmp_path / "supervise.log", restarts=1) as supervised:
        first = supervised.server_pid()
        if answered_400:
            assert post(f"127.0.0.1:{supervised.ports.http}", answered_400)[0] == 400
        connection = http.client.HTTPConnection("127.0.0.1", supervised.ports.http, timeout=30)
        sent = time.monotonic()
        connection.request("POST", f"/v2/models/{DEFAULT_MODEL}/infer", body=body)
        try:
            answer = connection.getresponse().status
        except (ConnectionError, http.client.HTTPException) as exc:
            answer = repr(exc)
        assert not isinstance(answer, int), f"Triton now answers {answer}: update docs/operations.md"
        codes = ready_codes_until_healed(supervised)
        healed = time.monotonic() - sent
        status = get(supervised.url + "/status")[1]
        assert status["server_exits"] == [exit_code] and status["server_pid"] != first, status
        assert 503 in codes and codes[-1] == 200, (codes, status)
        with ImageClassifierClient(f"127.0.0.1:{supervised.ports.http}", protocol="http") as client:
            assert len(client.classify([photo], top_k=1)) == 1
    return healed


def test_a_body_nested_a_million_deep_kills_triton_and_the_supervisor_brings_it_back(repository, tmp_path, photos):
    """Triton 2.51 parses an HTTP body's JSON recursively (RapidJSON without its iterative flag; made iterative
    upstream in triton-inference-server/common#156, after 2.51), so a body of nested brackets overflows the
    HTTP thread's stack: the server dies of SIGSEGV with every request in flight. Pinned: a Triton that
    survives it fails here (docs/operations.md then changes). Under serving.supervise /ready answers 503
    while the server is down, the server is started again and serves. The same brackets 10,000 deep are
    answered 400 (with an 8 MB stack, 100,000 were, 105,000 killed it)."""
    healed = killed_and_brought_back(repository, tmp_path, photos["coffee"], DEEP, -signal.SIGSEGV,
                                     answered_400=b'{"inputs": ' + b"[" * 10_000 + b"]" * 10_000 + b"}")
    print(f"\nbody nested 10^6 deep: the server died and was ready again {healed:.1f} s later")


def test_a_shape_far_beyond_its_data_kills_triton_and_the_supervisor_brings_it_back(repository, tmp_path, photos):
    """A JSON tensor of shape [2^63-1, 2] with one FP32 element: Triton 2.51 sizes the tensor's buffer from the
    shape before it counts the data (std::length_error, then SIGABRT). Pinned as the nested body above; the
    supervisor's HTTP guard answers it 400 (it counts the data against the shape)."""
    healed = killed_and_brought_back(repository, tmp_path, photos["coffee"], SHAPE_BEYOND_DATA, -signal.SIGABRT)
    print(f"\nFP32 shape [2^63-1, 2], one element: the server died and was ready again {healed:.1f} s later")
