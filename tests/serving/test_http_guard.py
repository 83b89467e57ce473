"""serving.http_guard: the checks on their own, then the guard in front of a real tritonserver (slow).

The slow tests send the bodies that Triton 2.51 answers with 500 (tests/serving/test_malformed_http.py pins
them) and the body that kills it, through the guard: 400 each, Triton untouched and serving; the project's
clients get the same answers through the guard as without it (binary and JSON tensors, gzip).
"""
from __future__ import annotations

import gzip
import http.client
import json
import random
import re
import signal
import threading
import time
import urllib.error
import urllib.request
import zlib

import numpy as np
import pytest

from serving import http_guard
from serving.http_guard import (Guard, GuardThread, Refused, check, check_generate, check_infer, outside_strings, parse,
                                too_deep)
from serving.probe_metrics import REFUSALS
from clients.client import DEFAULT_MODEL, IMAGE_INPUT
from common.contract import CLASSIFIER, ONNX_INPUT as CLASSIFIER_INPUT
from tests.serving.test_malformed_http import ANSWERED_400, DEEP, GENERATE_500, PINNED_500, SHAPE_BEYOND_DATA, VIEW
from tests.serving.test_self_healing import repository  # noqa: F401 (a fixture)

INFER = "/v2/models/image_classifier/infer"
GENERATE = "/v2/models/image_classifier/generate"
# The datatypes of the tiny repository's models' inputs, by name, as its metadata gives them.
TINY_INPUTS = {DEFAULT_MODEL: {IMAGE_INPUT: "BYTES"}, CLASSIFIER: {CLASSIFIER_INPUT: "FP32"}}


def generate(model: str) -> str:
    return f"/v2/models/{model}/generate"
LIMIT = 4 * 2**20


def refusal(path: str, body: bytes, headers: dict | None = None, max_depth: int = http_guard.MAX_DEPTH,
            inputs: dict | None = None) -> str | None:
    try:
        check(path, headers or {}, body, max_depth, LIMIT, inputs=inputs)
    except Refused as refused:
        return f"{refused.status} {refused.reason}"
    return None


def test_depth_counts_brackets_and_braces_outside_strings():
    assert not too_deep(b"[[[]]]", 3) and too_deep(b"[[[]]]", 2)
    assert not too_deep(b'{"a": [{"b": []}]}', 4) and too_deep(b'{"a": [{"b": []}]}', 3)
    assert not too_deep(b'{"a": "[[[[{{{{"}', 1)
    assert not too_deep(b'{"a": "\\"[[[[", "b": "]]]\\\\"}', 1)  # escaped quotes do not end a string
    assert not too_deep(b'{"a": "[[[[', 1)  # an unterminated string hides what follows (and fails to parse)
    assert too_deep(DEEP, 1000)


def depth_read_token_by_token(text: bytes, limit: int) -> bool:
    """too_deep's answer as a reading of the text from left to right gives it: a JSON string (escapes skipped, an
    unterminated one to the end) or one bracket at a time."""
    depth = 0
    for token in re.finditer(rb'"[^"\\]*(?:\\.[^"\\]*)*"?|[\[\]{}]', text):
        if token.group() in (b"[", b"{"):
            depth += 1
            if depth > limit:
                return True
        elif token.group() in (b"]", b"}"):
            depth -= 1
    return False


def json_documents(count: int, seed: int = 0):
    """`count` JSON documents (bytes) of every kind: nested lists and objects, numbers, and strings of brackets,
    quotes, escapes, non-ASCII text and lone high surrogates in keys and values, escaped or not."""
    rng = random.Random(seed)
    pieces = ["[", "]", "{", "}", '"', "\\", "\\\\", '\\"', "a", "\u00e9", "\n", "\ud83d", "\U0001f600"]

    def value(depth: int):
        kind = rng.random()
        if depth > 8 or kind < 0.3:
            return rng.choice([1, -2**70, 2.5, 1e300, None, True, "".join(rng.choice(pieces)
                                                                          for _ in range(rng.randint(0, 8)))])
        if kind < 0.65:
            return [value(depth + 1) for _ in range(rng.randint(0, 4))]
        return {"".join(rng.choice(pieces) for _ in range(rng.randint(0, 4))): value(depth + 1)
                for _ in range(rng.randint(0, 4))}

    for _ in range(count):
        yield json.dumps(value(0), ensure_ascii=rng.random() < 0.5).encode("utf-8", "surrogatepass")


def test_depth_is_what_a_reading_token_by_token_gives_for_any_json():
    """too_deep works on whole bytes at a time (itertools sums the brackets): on JSON documents of every kind it
    agrees with a reading token by token."""
    for text in json_documents(3000):
        for limit in (1, 2, 3, 5):
            assert too_deep(text, limit) == depth_read_token_by_token(text, limit), (text, limit)
    for text in (DEEP, b"[" * 40 + b"]" * 40, b'["' + b"[" * 40 + b'"]', b'{"a": "\\\\", "b": [[[[]]]]}'):
        assert too_deep(text, 3) == depth_read_token_by_token(text, 3), text


def test_json_is_read_as_pythons_json_reads_it():
    """parse() reads with orjson and, where orjson refuses, Python's json: the same values as Python's json on
    documents of every kind; the escape of a lone high surrogate refused (Python's json takes it, Triton's parser
    does not), one written as UTF-8 bytes, a lone low one (orjson refuses both, Triton takes them) and a byte
    order mark taken, a number beyond a double refused as Triton does."""
    # the escape of a high surrogate that no low one's follows (the documents hold no backslash before a "u")
    lone_escape = re.compile(rb"\\u[dD][89abAB][0-9a-fA-F]{2}(?!\\u[dD][c-fC-F])")
    for text in json_documents(3000, seed=1):
        expected = json.loads(text)
        if lone_escape.search(text):
            with pytest.raises(Refused, match="high surrogate"):
                parse(text, 32)
        else:
            assert parse(text, 32) == expected, text
    assert parse(b'["\\udc00"]', 32) == ["\udc00"] and parse(b'\xef\xbb\xbf[1]', 32) == [1]
    assert parse(b"[18446744073709551616]", 32) == [2.0**64]  # beyond 64 bits: a double, as Triton reads it
    for text in (b"[1e400]", b"[" + b"1" * 400 + b"]", b"[NaN]", b"[1] x", b'["\\ud83dx"]'):
        with pytest.raises(Refused):
            check(INFER, {}, b'{"inputs": [], "parameters": {"x": ' + text + b"}}", 32, LIMIT)


def test_every_body_triton_answers_500_is_refused_with_400():
    for case, body in PINNED_500.items():
        assert refusal(INFER, body) is not None and refusal(INFER, body).startswith("400 "), case
    for case, (model, body) in GENERATE_500.items():
        assert refusal(generate(model), body, inputs=TINY_INPUTS[model]) == "400 not_kserve_v2", case
    assert refusal(INFER, DEEP) == "400 too_deep"
    assert refusal(INFER, SHAPE_BEYOND_DATA) == "400 not_kserve_v2"
    assert refusal(INFER, b'{"inputs": [') == "400 not_json"
    assert refusal(INFER, b'{"inputs": [], "id": NaN}') == "400 not_json"  # Python's json would take NaN
    assert refusal(INFER, b"[1, 2, 3]") == "400 not_kserve_v2"


def test_what_triton_answers_itself_goes_through():
    for case, body in ANSWERED_400.items():
        assert refusal(INFER, body) is None, case
    tensor = {"inputs": [{"name": "IMAGE", "shape": [2, 1], "datatype": "BYTES", "data": [["a"], ["b"]]}],
              "outputs": [{"name": "PROBABILITIES", "parameters": {"classification": 3, "binary_data": False}}],
              "parameters": {"binary_data_output": True}, "id": "7"}
    assert refusal(INFER, json.dumps(tensor).encode()) is None
    assert refusal(GENERATE, json.dumps({"IMAGE": "abc", "parameters": {"max_tokens": 5}}).encode()) is None
    # a model whose inputs the guard does not know (Triton gives no metadata: an unknown model, which it answers
    # itself): only the body's form is checked
    for case, (model, body) in GENERATE_500.items():
        assert (refusal(generate(model), body) is None) == case.startswith(("a BYTES", "an FP32")), case
    # another endpoint's JSON is checked for depth and syntax only (Triton cannot read a number beyond a double)
    assert refusal("/v2/repository/index", b"[1]") is None
    assert refusal("/v2/repository/index", b"[1e400]") == "400 not_json"
    assert refusal("/v2/repository/index", b"[" * 40 + b"]" * 40) == "400 too_deep"


@pytest.mark.parametrize("datatype, value, refused", [
    ("BYTES", "abc", None), ("BYTES", ["a", "b"], None), ("BYTES", [["a"], ["b"]], None),
    ("BYTES", [["a", "b"]], None),  # Triton counts BYTES elements itself (400)
    ("BYTES", 5, "the generate input X's BYTES data must be strings"),
    ("BYTES", ["a", True], "BYTES data must be strings"),
    ("FP32", [1, 2.5], None), ("FP32", 1.5, None), ("FP32", [[1.0], [2.0]], None),
    ("FP32", ["1.0"], "FP32 data must be numbers"), ("FP32", None, "FP32 data must be numbers"),
    ("FP32", [[1.0, 2.0], 3.0], "a list of 2 items holding 3 elements"),
    ("FP64", [[]], "a list of 1 items holding 0 elements"),
    ("INT64", [-2**63, 2**63 - 1], None), ("INT64", [2**63], "INT64 data must be integers"),
    ("UINT8", [-1], "UINT8 data must be integers"), ("INT32", [1.5], "INT32 data must be integers"),
    ("BOOL", [True, False], None), ("BOOL", [1], "BOOL data must be true or false"),
    ("FP16", ["anything"], None),  # Triton answers 400 itself
])
def test_a_generate_requests_inputs_are_read_by_the_models_datatypes(datatype, value, refused):
    """The model's inputs (here X) are checked wherever the body names them: at its top level or in its parameters;
    a key that names no input is a request parameter (Triton answers a wrong one 400)."""
    for request in ({"X": value}, {"parameters": {"X": value}}, {"X": value, "not_an_input": [{}]}):
        if refused is None:
            check_generate(request, {"X": datatype, "Y": "BYTES"})
        else:
            with pytest.raises(Refused, match=refused):
                check_generate(request, {"X": datatype, "Y": "BYTES"})
        check_generate(request, None)
        check_generate(request, {"Y": datatype})


@pytest.mark.parametrize("request_body, message", [
    ({"inputs": [{"name": "IMAGE", "shape": [1, 1.5], "datatype": "BYTES", "data": ["a"]}]}, "shape"),
    ({"inputs": [{"name": "IMAGE", "shape": [1, True], "datatype": "BYTES", "data": ["a"]}]}, "shape"),
    ({"inputs": [{"name": 3, "shape": [1], "datatype": "BYTES", "data": ["a"]}]}, "name"),
    ({"inputs": [{"name": "IMAGE", "shape": [1], "datatype": ["BYTES"]}]}, "datatype"),
    ({"inputs": [{"name": "IMAGE", "shape": [2, 1], "datatype": "BYTES", "data": [["a"], [None]]}]}, "BYTES"),
    ({"inputs": [{"name": "IMAGE", "shape": [1], "datatype": "BYTES", "parameters": []}]}, "parameters"),
    ({"inputs": [], "outputs": [{"name": "P", "parameters": {"classification": True}}]}, "classification"),
    ({"inputs": [], "outputs": ["P"]}, "outputs"),
    ({"inputs": [], "id": 7}, "id"),
    ({"outputs": []}, "needs inputs"),
    ({"inputs": [{"name": "X", "shape": [2, 2], "datatype": "FP32", "data": [[1.0, 2.0], [3.0]]}]},
     r"hold 3 elements where its shape \[2, 2\] needs 4"),
    ({"inputs": [{"name": "X", "shape": [2], "datatype": "INT64", "data": [1, 2**63]}]}, "INT64 data must be integers"),
    ({"inputs": [{"name": "X", "shape": [2], "datatype": "UINT16", "data": [[1], [-1]]}]}, "UINT16 data"),
    ({"inputs": [{"name": "X", "shape": [2], "datatype": "FP64", "data": [1.0, "2"]}]}, "FP64 data must be numbers"),
    ({"inputs": [{"name": "X", "shape": [2], "datatype": "FP64", "data": [1.0, 10**400]}]}, "beyond a double"),
    ({"inputs": [{"name": "X", "shape": [1], "datatype": "BOOL", "data": [0]}]}, "BOOL data"),
    ({"inputs": [{"name": "X", "shape": [1], "datatype": "BYTES", "data": {"a": "b"}}]}, "must be a JSON list"),
    ({"inputs": [{"name": "X", "shape": [2**63], "datatype": "BYTES", "parameters": {"binary_data_size": 4}}]},
     "from 0 to 2\\^63-1"),
    ({"inputs": [{"name": "X", "shape": [1], "datatype": "BYTES", "parameters": {"shared_memory_region": 1}}]},
     "parameter shared_memory_region must be a string"),
    ({"inputs": [], "parameters": {"sequence_end": "yes"}}, "parameter sequence_end must be true or false"),
    ({"inputs": [], "parameters": {"sequence_id": True}}, "sequence_id must be an integer from 0 to 2\\^64-1 or a"),
    ({"inputs": [], "parameters": {"timeout": 2**64}}, "parameter timeout"),
    ({"inputs": [], "outputs": [{"name": "P", "parameters": {"shared_memory_byte_size": -1}}]}, "shared_memory_byte"),
])
def test_each_wrong_field_is_named(request_body, message):
    with pytest.raises(Refused, match=message):
        check_infer(request_body)


def test_binary_requests_and_compressed_bodies_are_checked_as_triton_reads_them():
    header = json.dumps({"inputs": [{"name": "IMAGE", "shape": [1, 1], "datatype": "BYTES",
                                     "parameters": {"binary_data_size": 8}}]}).encode()
    body = header + b"\x04\x00\x00\x00[[[["  # a binary tensor: brackets there are not JSON
    assert refusal(INFER, body, {"Inference-Header-Content-Length": str(len(header))}) is None
    assert refusal(INFER, body) == "400 not_json"  # without the header it all is JSON
    assert refusal(INFER, body, {"Inference-Header-Content-Length": "x"}) == "400 binary_header"
    assert refusal(INFER, body, {"Inference-Header-Content-Length": str(len(body) + 1)}) == "400 binary_header"
    assert refusal(INFER, gzip.compress(DEEP), {"Content-Encoding": "gzip"}) == "400 too_deep"
    assert refusal(INFER, zlib.compress(PINNED_500["negative shape"]), {"Content-Encoding": "deflate"}) \
        == "400 not_kserve_v2"
    assert refusal(INFER, gzip.compress(ANSWERED_400["wrong datatype"]), {"Content-Encoding": "gzip"}) is None
    assert refusal(INFER, gzip.compress(b" " * (LIMIT + 1)), {"Content-Encoding": "gzip"}) == "413 too_large"
    assert refusal(INFER, b"not gzip", {"Content-Encoding": "gzip"}) == "400 content_encoding"
    assert refusal(INFER, b"{}", {"Content-Encoding": "br"}) == "415 content_encoding"


def test_json_that_would_cost_the_guard_gigabytes_to_parse_is_a_413():
    """Python's objects for a JSON body are 8-30 times its size (a 57 MiB body of empty lists took the guard from
    151 MB to 1.8 GB): the JSON part is parsed up to 16 MiB and 2^20 arrays and objects; binary tensors beyond
    it, and brackets inside strings, do not count."""
    def lists(n: int) -> bytes:  # n empty lists in a body of the KServe v2 form, which has 5 more of its own
        return b'{"inputs": [{"name": "IMAGE", "shape": [%d, 0], "datatype": "BYTES", "data": [' % n \
            + b"[]," * (n - 1) + b"[]]}]}"

    assert refusal(INFER, lists((1 << 20) - 4)) == "413 too_large" and len(lists(1 << 20)) < LIMIT  # 3 MB
    assert refusal(INFER, lists((1 << 20) - 5)) is None
    strings = json.dumps({"inputs": [{"name": "IMAGE", "shape": [1, 1], "datatype": "BYTES",
                                      "data": ["[]" * (1 << 20)]}]}).encode()
    assert refusal(INFER, strings) is None
    floats = json.dumps({"inputs": [{"name": "X", "shape": [2**21], "datatype": "FP32",
                                     "data": [0.5] * 2**21}]}).encode()  # 10 MiB
    with pytest.raises(Refused, match="send tensors as binary data"):
        check(INFER, {}, floats, 32, 64 << 20, max_json=len(floats) - 1)
    assert refusal(INFER, floats) is None  # under the default 16 MiB
    header = json.dumps({"inputs": [{"name": "X", "shape": [2**21], "datatype": "FP32",
                                     "parameters": {"binary_data_size": 2**23}}]}).encode()
    binary = header + bytes(2**23)
    check(INFER, {"Inference-Header-Content-Length": str(len(header))}, binary, 32, 64 << 20, max_json=2**20)


def test_a_body_of_many_brackets_is_read_for_them_once(monkeypatch):
    """Where the bytes alone hold more brackets than both the depth and the container limits allow, both read
    the brackets outside strings from one pass over the body."""
    passes = []

    def counted(text: bytes) -> bytes:
        passes.append(len(text))
        return outside_strings(text)

    monkeypatch.setattr(http_guard, "outside_strings", counted)
    in_a_string = json.dumps({"inputs": [{"name": "IMAGE", "shape": [1, 1], "datatype": "BYTES",
                                          "data": ["[" * (1 << 20)]}]}).encode()
    assert refusal(INFER, in_a_string) is None and len(passes) == 1
    assert refusal(INFER, b"[" * (1 << 20) + b"]" * (1 << 20)) == "400 too_deep" and len(passes) == 2
    assert refusal(INFER, b"[" + b"[]," * (1 << 20) + b"[]]") == "413 too_large" and len(passes) == 3
    assert refusal(INFER, b"[" + b"[]," * 40 + b"[]]") == "400 not_kserve_v2" and len(passes) == 4  # depth only


def test_every_refusal_reason_has_a_metric_series():
    source = open(http_guard.__file__).read()

    used = set(re.findall(r'Refused\(\d+, "([a-z_]+)"', source)) | {"not_kserve_v2"}
    assert used == set(REFUSALS)


def test_the_supervisors_guard_address_is_checked_by_its_parser(capsys):
    from serving.supervise import get_args_parser

    parser = get_args_parser()
    assert parser.parse_args(["--http-guard", "[::1]:8010", "--", "tritonserver"]).http_guard == ("::1", 8010)
    for wrong, message in (("8010", "'8010' is not host:port"), ("0.0.0.0:80800", "port 80800 is not in 0-65535")):
        with pytest.raises(SystemExit):
            parser.parse_args(["--http-guard", wrong, "--", "tritonserver"])
        assert message in capsys.readouterr().err


def test_guard_http_takes_the_servers_http_place_and_moves_the_server_to_loopback():
    """--guard-http (the images' default): the guard listens where tritonserver's flags put its HTTP endpoint,
    Triton's default 0.0.0.0:8000 without them, in either flag form; the server moves to a free loopback port
    and keeps every other flag; a command that is no tritonserver, or serves no HTTP, is refused."""
    from serving.supervise import flag_values, guard_in_place, http_url

    command = ["tritonserver", "--model-repository", "/models", "--http-port", "9000", "--http-address=ipv6:::1",
               "--grpc-port=9001", "--load-model=*"]
    moved, place = guard_in_place(command)
    assert place == ("::1", 9000)
    flags = flag_values(moved)
    assert flags["http-address"] == ["127.0.0.1"] and len(flags["http-port"]) == 1
    assert int(flags["http-port"][0]) not in (0, 9000) and http_url(moved) == f"127.0.0.1:{flags['http-port'][0]}"
    assert moved[:-2] == ["tritonserver", "--model-repository", "/models", "--grpc-port=9001", "--load-model=*"]
    assert guard_in_place(["/opt/tritonserver/bin/tritonserver", "--model-repository=/models"])[1] == ("0.0.0.0", 8000)
    for wrong, message in ((["python3", "-m", "http.server"], "needs a tritonserver command"),
                           (["tritonserver", "--allow-http=false"], "HTTP endpoint is off"),
                           (["tritonserver", "--http-port=80a"], "--http-port: invalid port '80a'"),
                           (["tritonserver", "--http-port", "0"], "--http-port is 0")):
        with pytest.raises(ValueError, match=message):
            guard_in_place(wrong)


def test_guard_http_and_http_guard_are_one_or_the_other(tmp_path):
    from serving.supervise import get_args_parser, main

    args = get_args_parser().parse_args(["--guard-http", "--http-guard", "127.0.0.1:8010", "--new-key-file",
                                         str(tmp_path / "key"), "--", "tritonserver"])
    with pytest.raises(ValueError, match="give one"):
        main(args)
    assert not (tmp_path / "key").exists()


def test_json_parse_limits_depth_before_json_loads():
    with pytest.raises(Refused, match="deeper than 5"):
        parse(b"[" * 6 + b"]" * 6, 5)
    assert parse(b"[" * 5 + b"]" * 5, 5) == [[[[[]]]]]


# -- in front of a real tritonserver -------------------------------------------------------------------


@pytest.fixture(scope="module")
def guarded(tiny_artifacts, tmp_path_factory):
    """A tiny repository served by tritonserver and a guard in front of its HTTP port: (server, guard thread)."""
    from build.repository.spec import DeploymentSpec
    from build.repository.writer import write_repository
    from serving.server import TritonServer

    repo = tmp_path_factory.mktemp("guard") / "model_repository"
    write_repository(DeploymentSpec(artifacts=str(tiny_artifacts)), "python-onnxruntime", repo, "tests")
    with TritonServer(repo, log_file=repo.parent / "tritonserver.log") as server:
        guard = GuardThread(Guard(server.http_url), "127.0.0.1", 0).start()
        try:
            yield server, guard
        finally:
            guard.stop()


def post(url: str, body: bytes, headers: dict | None = None, path: str = INFER) -> tuple[int, dict]:
    request = urllib.request.Request(f"http://{url}{path}", data=body, method="POST",
                                     headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def check_guarded_server(guard: str, status_url: str, photo: bytes) -> None:
    """A server behind a supervisor's guard at `guard` (host:port): the project's client classifies `photo`
    through it, the body that kills Triton 2.51 is answered 400, and the supervisor's /status (`status_url`)
    shows no server exit and that one refusal."""
    assert probabilities(guard, [photo]).shape[0] == 1
    deep = urllib.request.Request(f"http://{guard}{INFER}", data=DEEP)
    with pytest.raises(urllib.error.HTTPError, match="400"):
        urllib.request.urlopen(deep, timeout=30)
    with urllib.request.urlopen(status_url, timeout=5) as answer:
        status = json.load(answer)
    assert status["server_exits"] == [] and status["http_guard"]["refused"] == {"too_deep": 1}, status


def probabilities(url: str, images: list[bytes], **options) -> np.ndarray:
    from clients.client import ImageClassifierClient

    with ImageClassifierClient(url, protocol="http", **options) as client:
        return client.probabilities(images)


@pytest.mark.slow
def test_the_bodies_that_triton_answers_500_or_dies_of_get_400_and_triton_serves_on(guarded, photos):
    server, guard = guarded
    url = f"127.0.0.1:{guard.port}"
    pid = server.process.pid
    for case, body in {**PINNED_500, "nested a million deep": DEEP, "a shape far beyond its data": SHAPE_BEYOND_DATA,
                       "gzip, nested a million deep": gzip.compress(DEEP)}.items():
        headers = {"Content-Encoding": "gzip"} if case.startswith("gzip") else {}
        status, answer = post(url, body, headers)
        assert status == 400 and answer["error"], (case, status, answer)
    for case, (model, body) in GENERATE_500.items():
        status, answer = post(url, body, path=generate(model))
        assert status == 400 and answer["error"], (case, status, answer)
    assert server.process.poll() is None and server.process.pid == pid
    refused = guard.guard.counts()["refused"]
    assert refused["too_deep"] == 2 and sum(refused.values()) == len(PINNED_500) + 3 + len(GENERATE_500), refused
    assert probabilities(url, [photos["chelsea"]]).shape[0] == 1


@pytest.mark.slow
def test_what_triton_answers_itself_comes_back_unchanged(guarded):
    server, guard = guarded
    for case, body in ANSWERED_400.items():
        direct, through = post(server.http_url, body), post(f"127.0.0.1:{guard.port}", body)
        assert direct == through and direct[0] == 400, (case, direct, through)
    for case, model, body in [("an image that is no image", DEFAULT_MODEL, {IMAGE_INPUT: "abc"}),
                              ("an unknown model", "no_such_model", {IMAGE_INPUT: 5}),
                              ("a BYTES item of two strings", DEFAULT_MODEL, {IMAGE_INPUT: [["abc", "def"]]}),
                              ("a view of the wrong size", CLASSIFIER, {CLASSIFIER_INPUT: [1.0] * (VIEW - 1)})]:
        request = json.dumps(body).encode()
        direct = post(server.http_url, request, path=generate(model))
        through = post(f"127.0.0.1:{guard.port}", request, path=generate(model))
        assert direct == through and direct[0] in (400, 404), (case, direct, through)
    view = json.dumps({CLASSIFIER_INPUT: [0.5] * VIEW}).encode()
    direct, through = post(server.http_url, view, path=generate(CLASSIFIER)), post(f"127.0.0.1:{guard.port}", view,
                                                                                    path=generate(CLASSIFIER))
    assert direct == through and direct[0] == 200 and len(direct[1]["probabilities"]) == 3, (direct, through)
    for path in ("/v2/health/ready", "/v2/models/image_classifier", "/v2/models/no_such_model"):
        with urllib.request.urlopen(f"http://{server.http_url}{path}") if path != "/v2/models/no_such_model" \
                else _error(f"http://{server.http_url}{path}") as direct:
            with urllib.request.urlopen(f"http://127.0.0.1:{guard.port}{path}") if path != "/v2/models/no_such_model" \
                    else _error(f"http://127.0.0.1:{guard.port}{path}") as through:
                assert (direct.status, direct.read()) == (through.status, through.read()), path


@pytest.mark.slow
def test_the_answers_headers_are_tritons(guarded, photos):
    """What the client asked for, no more: a request without Accept-Encoding gets an uncompressed answer with
    Triton's headers (aiohttp's client would add Accept-Encoding, and Triton then gzips); one that asks for
    gzip gets Triton's gzip answer."""
    server, guard = guarded
    header = json.dumps({"inputs": [{"name": "IMAGE", "shape": [1, 1], "datatype": "BYTES",
                                     "parameters": {"binary_data_size": len(photos["coffee"]) + 4}}],
                         "outputs": [{"name": "PROBABILITIES", "parameters": {"binary_data": True}}]}).encode()
    body = header + len(photos["coffee"]).to_bytes(4, "little") + photos["coffee"]

    def answer(port: int, accept: str | None) -> tuple[int, dict, bytes]:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        connection.putrequest("POST", INFER, skip_accept_encoding=True)
        for name, value in {"Inference-Header-Content-Length": str(len(header)), "Content-Length": str(len(body)),
                            **({"Accept-Encoding": accept} if accept else {})}.items():
            connection.putheader(name, value)
        connection.endheaders(body)
        r = connection.getresponse()
        headers = {k.lower(): v for k, v in r.getheaders() if k.lower() not in ("date", "server")}
        return r.status, headers, r.read()

    for accept in (None, "gzip"):
        direct, through = answer(server.ports.http, accept), answer(guard.port, accept)
        assert direct[:2] == through[:2] and direct[0] == 200, (accept, direct[:2], through[:2])
        assert ("content-encoding" in through[1]) == (accept is not None), through[1]
        if accept is None:
            assert direct[2] == through[2]


def _error(url: str):
    try:
        urllib.request.urlopen(url)
    except urllib.error.HTTPError as exc:
        return exc
    raise AssertionError(f"{url} answered 200")


@pytest.mark.slow
def test_the_clients_get_the_same_answers_through_the_guard(guarded, photos):
    server, guard = guarded
    images = [photos["chelsea"], photos["coffee"]]
    direct = probabilities(server.http_url, images)
    assert np.array_equal(probabilities(f"127.0.0.1:{guard.port}", images), direct)
    # JSON (not binary) tensors and a gzip-compressed request body
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(f"127.0.0.1:{guard.port}")
    image = httpclient.InferInput("IMAGE", [1, 1], "BYTES")
    image.set_data_from_numpy(np.array([[photos["chelsea"]]], dtype=object), binary_data=True)
    output = httpclient.InferRequestedOutput("PROBABILITIES", binary_data=False)
    answer = client.infer("image_classifier", [image], outputs=[output], request_compression_algorithm="gzip")
    assert np.allclose(answer.as_numpy("PROBABILITIES")[0], direct[0], atol=1e-6)


@pytest.mark.slow
def test_good_requests_carry_on_while_bad_ones_are_refused(guarded, photos):
    server, guard = guarded
    url = f"127.0.0.1:{guard.port}"
    errors: list[str] = []

    def good() -> None:
        try:
            for _ in range(10):
                assert probabilities(url, [photos["coffee"]]).shape[0] == 1
        except Exception as exc:  # noqa: BLE001 (collected, asserted below)
            errors.append(repr(exc))

    threads = [threading.Thread(target=good) for _ in range(3)]
    for t in threads:
        t.start()
    codes = [post(url, DEEP)[0] for _ in range(5)]
    for t in threads:
        t.join(120)
    assert codes == [400] * 5 and errors == []


@pytest.mark.slow
def test_a_big_json_body_and_an_absolute_form_target_go_to_triton(guarded, photos):
    """A body over the size checked inline (parsed in a worker thread) is checked and forwarded alike; a request
    line naming another host (absolute form) still reaches only the guard's own upstream."""
    server, guard = guarded
    padding = "x" * (http_guard.INLINE_CHECK_BYTES + 1)
    body = json.dumps({"id": padding, "inputs": [{"name": "NOT_AN_INPUT", "shape": [1, 1], "datatype": "BYTES",
                                                   "data": ["abc"]}]}).encode()
    assert post(f"127.0.0.1:{guard.port}", body) == post(server.http_url, body) and post(server.http_url, body)[0] == 400
    deep = json.dumps({"id": padding}).encode()[:-1] + b', "inputs": ' + b"[" * 100 + b"]" * 100 + b"}"
    assert post(f"127.0.0.1:{guard.port}", deep)[0] == 400
    connection = http.client.HTTPConnection("127.0.0.1", guard.port, timeout=30)
    connection.request("GET", "http://example.invalid:1/v2/health/ready")
    assert connection.getresponse().status == 200


@pytest.mark.slow
def test_a_flood_of_refusals_logs_ten_lines_a_window_then_how_many_it_left_out(guarded, caplog):
    server, _ = guarded
    guard = GuardThread(Guard(server.http_url, log_window_s=0.5), "127.0.0.1", 0).start()
    try:
        with caplog.at_level("INFO", logger="serving.http_guard"):
            for _ in range(http_guard.LOG_PER_WINDOW + 3):
                assert post(f"127.0.0.1:{guard.port}", b"[" * 40)[0] == 400
            while guard.guard._window_start + 0.5 > time.monotonic():
                time.sleep(0.05)
            assert post(f"127.0.0.1:{guard.port}", b"{")[0] == 400
    finally:
        guard.stop()
    lines = [r.getMessage() for r in caplog.records if r.name == "serving.http_guard"]
    refused = [line for line in lines if line.startswith("refused POST ")]
    assert len(refused) == http_guard.LOG_PER_WINDOW + 1 and "from 127.0.0.1: 400" in refused[0], lines
    assert "3 more refused requests not logged" in " ".join(lines)
    assert guard.guard.counts()["refused"] == {"too_deep": http_guard.LOG_PER_WINDOW + 3, "not_json": 1}


@pytest.mark.slow
def test_a_body_that_does_not_arrive_in_time_is_a_408_and_frees_the_connection(guarded):
    server, _ = guarded
    guard = GuardThread(Guard(server.http_url, body_timeout_s=0.5), "127.0.0.1", 0).start()
    try:
        connection = http.client.HTTPConnection("127.0.0.1", guard.port, timeout=30)
        connection.putrequest("POST", INFER)
        connection.putheader("Content-Length", "100")
        connection.endheaders(b'{"inputs": ')  # 11 of the 100 bytes, then nothing
        answer = connection.getresponse()
        assert answer.status == 408 and "did not arrive within 0.5 s" in json.loads(answer.read())["error"]
        connection.close()  # else aiohttp lingers up to 10 s reading what is left of the body, then closes
        assert guard.guard.counts()["refused"] == {"slow_body": 1}
        assert post(f"127.0.0.1:{guard.port}", b"[1]")[0] == 400  # the guard serves on
    finally:
        guard.stop()


@pytest.mark.slow
def test_a_server_that_does_not_answer_is_a_503():
    from serving.server import free_port

    guard = GuardThread(Guard(f"127.0.0.1:{free_port()}"), "127.0.0.1", 0).start()
    try:
        connection = http.client.HTTPConnection("127.0.0.1", guard.port, timeout=30)
        connection.request("GET", "/v2/health/ready")
        answer = connection.getresponse()
        error = json.loads(answer.read())["error"]
        assert answer.status == 503 and error == "the server behind the guard is not answering"  # no address
    finally:
        guard.stop()


@pytest.mark.slow
def test_the_supervisors_guard_keeps_the_killing_body_from_triton_and_counts_it(repository, tmp_path, photos):
    """`serving.supervise --http-guard` (make serve GUARD_PORT=..., the containers): the body that kills
    Triton 2.51 (test_malformed_http) answered 400 through the guard, the server never restarted; the
    refusal in /status and on /metrics (triton_supervisor_guard_refused_total)."""
    from serving.server import free_port
    from tests.serving.test_self_healing import get
    from tests.serving.test_supervise import Supervised

    port = free_port()
    with Supervised(repository, tmp_path / "supervise.log", restarts=1,
                    options=("--http-guard", f"127.0.0.1:{port}")) as supervised:
        url = f"127.0.0.1:{port}"
        assert post(url, DEEP)[0] == 400
        assert probabilities(url, [photos["chelsea"]]).shape[0] == 1
        status = get(supervised.url + "/status")[1]
        assert status["server_exits"] == [] and status["starts"] == 1, status
        assert status["http_guard"]["refused"] == {"too_deep": 1} and status["http_guard"]["forwarded"] >= 1, status
        with urllib.request.urlopen(supervised.url + "/metrics") as r:
            page = r.read().decode()
        assert 'triton_supervisor_guard_refused_total{reason="too_deep"} 1.0' in page
        assert 'triton_supervisor_guard_refused_total{reason="not_json"} 0.0' in page
        # SIGTERM right after: the guard keeps no idle connection to Triton for long, else Triton's HTTP frontend
        # waits for it until its exit timeout (10 s here) and exits 1 (seen in a fresh clone: the KServe runtime's
        # tests, with aiohttp's default of 15 s)
        supervised.process.send_signal(signal.SIGTERM)
        code = supervised.process.wait(60)
    log = (tmp_path / "supervise.log").read_text(errors="replace")
    assert code == 0 and "Exit timeout expired" not in log, log[-2000:]


@pytest.mark.slow
def test_the_supervisor_guards_the_servers_own_http_port_with_guard_http(repository, tmp_path, photos):
    """`serving.supervise --guard-http -- tritonserver --http-port=P ...` (the images' entrypoint): port P is the
    guard's (the body that kills Triton 2.51 answered 400, the client classifies through it), the server's own
    HTTP endpoint listens elsewhere on loopback only, its readiness and model control (the watchdog's reload
    after a killed stub) go straight to it, and SIGTERM ends it all with code 0."""
    import psutil

    from tests.serving.test_self_healing import get
    from tests.serving.test_supervise import Supervised, ready_codes_until_healed

    with Supervised(repository, tmp_path / "supervise.log", restarts=0, options=("--guard-http",)) as supervised:
        public = supervised.ports.http
        listening = {c.laddr.port: c.pid for c in psutil.net_connections("inet") if c.status == "LISTEN"}
        assert listening.get(public) == supervised.process.pid, "the guard is not where the server's flags put HTTP"
        server = psutil.Process(supervised.server_pid())
        own = {c.laddr for c in server.net_connections("inet") if c.status == "LISTEN"}
        assert public not in {a.port for a in own}
        moved = [a for a in own if a.port not in (supervised.ports.grpc, supervised.ports.metrics)]
        assert [a.ip for a in moved] == ["127.0.0.1"], own
        check_guarded_server(f"127.0.0.1:{public}", supervised.url + "/status", photos["chelsea"])
        next(s for s in supervised.stubs() if "/classifier/" in " ".join(s.cmdline())).kill()
        codes = ready_codes_until_healed(supervised)  # the model reloaded through the server's own port
        assert 503 in codes and codes[-1] == 200, codes[-20:]
        assert get(supervised.url + "/status")[1]["reloads"] >= 1
        assert probabilities(f"127.0.0.1:{public}", [photos["coffee"]]).shape[0] == 1
        supervised.process.send_signal(signal.SIGTERM)
        code = supervised.process.wait(60)
    log = (tmp_path / "supervise.log").read_text(errors="replace")
    assert code == 0 and "Exit timeout expired" not in log, log[-2000:]
