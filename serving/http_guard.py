"""A guard in front of Triton's HTTP port: malformed bodies answered 400 before Triton parses them.

    python -m serving.http_guard --listen 127.0.0.1:8010 --upstream 127.0.0.1:8000
    python -m serving.supervise --http-guard 0.0.0.0:8010 -- tritonserver ...   # the same, in the supervisor
    make serve GUARD_PORT=8010

Triton 2.51's HTTP frontend parses a body's JSON recursively, so brackets nested about 100,000 deep kill the
server (SIGSEGV) with every request in flight; it sizes a JSON tensor from its shape before it counts the data,
so a shape that claims 2^64-2 elements with one given kills it too (SIGABRT); and it answers HTTP 500 to a field
of a JSON type it does not read that field as (unparsable JSON, a negative shape, a number where it reads a
string, a tensor's data of the wrong type or count). Every request that reaches the guard is read whole (at most
--max-body-mb, else 413; within --body-timeout seconds, else 408), its JSON part (the whole body, or the first
Inference-Header-Content-Length bytes of a binary-data request, after gzip/deflate; at most --max-json-mb and
2^20 arrays and objects, else 413) parsed and checked, and only then
forwarded to Triton unchanged; Triton's answer comes back unchanged. Refused with a 400 and Triton's own error
form (`{"error": "..."}`), Triton never seeing them:

- JSON nested deeper than --max-depth (brackets and braces; a KServe v2 request needs 3 plus its tensor's rank),
- a body that is not JSON (NaN and Infinity included, which Triton's parser refuses too; a number beyond a
  double's range; a \\u escape of a high surrogate with no low one after it),
- an inference request (`.../infer`) whose JSON is not the KServe v2 form as Triton reads it: a body that is not
  an object or has no `inputs`; `inputs` or `outputs` not a list of objects; a name or datatype that is not a
  string; a shape that is not a list of integers from 0 to 2^63-1; `parameters` not an object; a parameter
  Triton reads (sequence_id, priority, timeout, binary_data_size, shared_memory_*, binary_data, classification,
  ...) of another JSON type or out of range; `data` that is not a list, holds another number of elements than
  the shape, or elements of another JSON type than the datatype's (strings for BYTES, true/false for BOOL,
  integers in range for INT*/UINT*, numbers for FP32/FP64),
- a generate request (`.../generate`, `.../generate_stream`) that is not an object or whose `parameters` is not
  one, or that gives one of the model's inputs (a key of the body or of its `parameters`) a value Triton cannot
  read as the input's datatype: one element or a list of them, of the datatype's JSON type as above (nested
  lists holding one element per item, but for BYTES). The datatypes are the model's metadata, asked of Triton for
  each generate request; where Triton does not give them (an unknown model), it answers the request itself.

An empty body goes through (Triton and the preprocess step answer it 400). When Triton does not answer the
guard says 503 (`the server behind the guard is not answering`), so a client sees the same as Triton
restarting. Refusals are counted by reason (`counts()`; the supervisor's /metrics exports them) and logged one
line each naming the client, at most 10 a minute (then how many were left out).
"""
from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import logging
import operator
import re
import sys
import threading
import time
import zlib
from collections import Counter
from typing import Any

import orjson
from aiohttp import ClientConnectorError, ClientError, ClientSession, ClientTimeout, TCPConnector, web

from serving.health import host_port, port_number, positive

log = logging.getLogger("serving.http_guard")

MAX_DEPTH = 32
MAX_BODY_MB = 64
# The JSON part is parsed into Python objects, 8 to 30 times its size (a float 32 bytes, an empty list 64): at
# most this much of it (JSON tensors of 5 images; binary tensors are not JSON) and MAX_CONTAINERS arrays and objects.
MAX_JSON_MB = 16
MAX_CONTAINERS = 1 << 20
INLINE_CHECK_BYTES = 1 << 20  # larger bodies are checked in a worker thread
BODY_TIMEOUT_S = 60.0  # a request's whole body must arrive within this (64 MiB at about 1 MB/s)
UPSTREAM_IDLE_S = 1.0  # an idle connection to Triton is closed after this (aiohttp checks as often)
LOG_PER_WINDOW, LOG_WINDOW_S = 10, 60.0  # refusals logged one line each, at most this many per window
# Request headers not forwarded (hop-by-hop, or recomputed for the upstream request), lower case.
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
                        "transfer-encoding", "upgrade", "host", "content-length", "expect"})
# aiohttp's client adds these where a request lacks them; Triton would then compress its answer (Accept-Encoding)
# for a client that never asked for it
NO_AUTO_HEADERS = ("Accept-Encoding", "Content-Type", "User-Agent")
BINARY_HEADER = "Inference-Header-Content-Length"
# Besides Content-*, the client's headers not sent with the guard's own metadata request: an uncompressed answer
METADATA_DROPPED = frozenset({BINARY_HEADER.lower(), "accept-encoding"})
# aiohttp's request handler: bodies read as sent (a gzip body is checked after `decoded` and forwarded as is)
SERVER_OPTIONS = {"auto_decompress": False}
INFER_PATH = re.compile(r"^/v2/models/[^/]+(/versions/[^/]+)?/infer$")
GENERATE_PATH = re.compile(r"^/v2/models/[^/]+(/versions/[^/]+)?/generate(_stream)?$")
# Every byte but the brackets, braces and quotes that too_deep reads.
NOT_STRUCTURE = bytes(sorted(set(range(256)) - set(b'[]{}"')))
DEPTH_STEP = bytes.maketrans(b"[{]}", b"\x02\x02\x00\x00")
DEPTH_CHUNK = 1 << 16  # too_deep sums this many brackets at a time (and stops after the first too deep)


class Refused(Exception):
    """A request the guard answers itself: `status`, Triton's {"error": ...} body, a short `reason` label."""

    def __init__(self, status: int, reason: str, message: str):
        super().__init__(message)
        self.status, self.reason = status, reason


def outside_strings(text: bytes) -> bytes:
    """The brackets and braces of JSON `text` that lie outside its strings, in order. Done by whole bytes
    operations rather than a loop over the text: escaped backslashes and quotes dropped, then all but brackets,
    braces and quotes, then what lies between quotes (an unterminated string hides what follows)."""
    structure = text.replace(b"\\\\", b"").replace(b'\\"', b"").translate(None, NOT_STRUCTURE)
    return b"".join(structure.split(b'"')[0::2])


def too_deep(text: bytes, limit: int, outside: bytes | None = None) -> bool:
    """Whether JSON `text` nests brackets and braces deeper than `limit` outside its strings: the running sum of
    outside_strings (+1 an opening, -1 a closing one; `outside`, where the caller has it), summed in C by
    itertools, a chunk at a time."""
    if text.count(b"[") + text.count(b"{") <= limit:
        return False
    outside = outside_strings(text) if outside is None else outside
    depth = 0
    for start in range(0, len(outside) if len(outside) > limit else 0, DEPTH_CHUNK):
        # each byte as 2 (opening) or 0 (closing), summed, less one per byte: the depth after each
        steps = outside[start:start + DEPTH_CHUNK].translate(DEPTH_STEP)
        running = list(map(operator.sub, itertools.accumulate(steps), itertools.count(1)))
        if depth + max(running) > limit:
            return True
        depth += running[-1]
    return False


def containers(text: bytes, outside: bytes | None = None) -> int:
    """How many arrays and objects JSON `text` holds (counted outside its strings, `outside` where the caller
    has it, only where the bytes alone would say more than MAX_CONTAINERS)."""
    upper = text.count(b"[") + text.count(b"{")
    if upper <= MAX_CONTAINERS:
        return upper
    outside = outside_strings(text) if outside is None else outside
    return outside.count(b"[") + outside.count(b"{")


def decoded(body: bytes, encoding: str, limit: int) -> bytes:
    """The body as Triton reads it: gzip or deflate undone (at most `limit` bytes, else 413)."""
    encoding = encoding.strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding not in ("gzip", "deflate"):
        raise Refused(415, "content_encoding", f"unsupported Content-Encoding {encoding!r}: gzip, deflate or none")
    inflate = zlib.decompressobj(zlib.MAX_WBITS | (16 if encoding == "gzip" else 0))
    try:
        data = inflate.decompress(body, limit + 1)
    except zlib.error as exc:
        raise Refused(400, "content_encoding", f"the body is not valid {encoding} data: {exc}") from None
    if len(data) > limit or inflate.unconsumed_tail:
        raise Refused(413, "too_large", f"the decompressed body is larger than {limit} bytes")
    return data


def json_part(body: bytes, header: str | None) -> bytes:
    """The JSON of a request: the whole body, or its first Inference-Header-Content-Length bytes."""
    if header is None:
        return body
    try:
        size = int(header)
    except ValueError:
        raise Refused(400, "binary_header", f"{BINARY_HEADER} {header!r} is not an integer") from None
    if not 0 <= size <= len(body):
        raise Refused(400, "binary_header", f"{BINARY_HEADER} {size} is not within the body's {len(body)} bytes")
    return body[:size]


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def parse(text: bytes, max_depth: int) -> Any:
    """JSON `text` parsed, or Refused: nested deeper than `max_depth`, or not JSON as Triton's parser reads it.
    orjson parses (about 6x Python's json on a 3 MB tensor); what it refuses, Python's json decides, whose
    reading of JSON is Triton's but for what it lets through below (NaN, Infinity and numbers beyond a double
    are refused by both; orjson also refuses a lone low surrogate's escape and a byte order mark, which Triton
    takes)."""
    # both read the brackets outside strings where the bytes alone hold more than they allow: found once
    brackets = text.count(b"[") + text.count(b"{")
    outside = outside_strings(text) if brackets > max_depth and brackets > MAX_CONTAINERS else None
    if too_deep(text, max_depth, outside):
        raise Refused(400, "too_deep", f"the JSON is nested deeper than {max_depth} levels")
    held = containers(text, outside)
    if held > MAX_CONTAINERS:
        raise Refused(413, "too_large", f"the JSON holds {held} arrays and objects, more than {MAX_CONTAINERS}")
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        pass
    try:
        value = json.loads(text, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:
        raise Refused(400, "not_json", f"the request body is not valid JSON: {exc}") from None
    if HIGH_SURROGATE_ESCAPE.search(text) and _lone_high_surrogate(value):
        raise Refused(400, "not_json", "the request body is not valid JSON: a \\u escape of a high surrogate that "
                                       "no low surrogate's escape follows")
    return value


def _lone_high_surrogate(value: Any) -> bool:
    """Whether a parsed JSON value holds a string (or a key) with a high surrogate left alone (json.loads joins
    the escapes of a surrogate pair into one character)."""
    if isinstance(value, str):
        return LONE_HIGH_SURROGATE.search(value) is not None
    if isinstance(value, dict):
        return any(_lone_high_surrogate(k) or _lone_high_surrogate(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_lone_high_surrogate(v) for v in value)
    return False


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise Refused(400, "not_kserve_v2", message)


def _is_int(value: Any, low: int, high: int) -> bool:
    """An integer (a JSON true or false is not one) with low <= value < high."""
    return isinstance(value, int) and not isinstance(value, bool) and low <= value < high


# The JSON types Triton 2.51's HTTP frontend reads these fields and parameters as; another type is its HTTP 500.
UINT64 = ("an integer from 0 to 2^64-1", lambda v: _is_int(v, 0, 2**64))
BOOL = ("true or false", lambda v: isinstance(v, bool))
STRING = ("a string", lambda v: isinstance(v, str))
SEQUENCE_ID = ("an integer from 0 to 2^64-1 or a string", lambda v: isinstance(v, str) or _is_int(v, 0, 2**64))
SHARED_MEMORY = {"shared_memory_region": STRING, "shared_memory_byte_size": UINT64, "shared_memory_offset": UINT64}
REQUEST_PARAMETERS = {"sequence_id": SEQUENCE_ID, "sequence_start": BOOL, "sequence_end": BOOL, "priority": UINT64,
                      "timeout": UINT64, "binary_data_output": BOOL}
INPUT_PARAMETERS = {"binary_data_size": UINT64, **SHARED_MEMORY}
OUTPUT_PARAMETERS = {"binary_data": BOOL, "classification": UINT64, **SHARED_MEMORY}
# A tensor's JSON data as Triton reads it, by datatype: the JSON types of its elements and their range.
INTEGERS = {f"INT{n}": (-2**63, 2**63) for n in (8, 16, 32, 64)} | {f"UINT{n}": (0, 2**64) for n in (8, 16, 32, 64)}
FLOATS = ("FP32", "FP64")
DOUBLE_MAX = sys.float_info.max  # a JSON number beyond it is a parse error for Triton (and inf for Python)
MAX_DIM = 2**63 - 1  # the protocol's shapes are int64
# A \u escape of a UTF-16 high surrogate; Triton refuses one that no low surrogate's escape follows.
HIGH_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89abAB]")
LONE_HIGH_SURROGATE = re.compile("[\ud800-\udbff]")


def _check_parameters(where: str, item: dict, known: dict) -> None:
    parameters = item.get("parameters", {})
    _check(isinstance(parameters, dict), f"{where}'s parameters must be a JSON object")
    for name, (kind, ok) in known.items():
        if name in parameters:
            _check(ok(parameters[name]), f"{where}'s parameter {name} must be {kind}, got {parameters[name]!r}")


def _elements(data: list) -> tuple[int, set, list]:
    """The elements of tensor data given as nested JSON lists: their count, their Python types, and the
    (lowest, highest) pair of each run of numbers (the lists are walked, their elements only typed in C)."""
    count, types, bounds, pending = 0, set(), [], [data]
    while pending:
        items = pending.pop()
        kinds = set(map(type, items))
        if list in kinds:
            pending.extend(v for v in items if type(v) is list)
            kinds.discard(list)
            items = [v for v in items if type(v) is not list]
        count += len(items)
        types |= kinds
        if items and kinds <= {int, float}:
            bounds.append((min(items), max(items)))
    return count, types, bounds


def _check_data(where: str, datatype: str, shape: list, data: Any) -> None:
    """Refused unless `data` holds as many elements as `shape` and of the JSON type and range that Triton reads
    `datatype` as. A shape that claims far more elements than the data hold is what kills Triton 2.51 (it sizes
    the tensor from the shape before it counts the data: 2^63-1 x 2 FP32 elements abort it, 2^59 x 8 crash it)."""
    _check(isinstance(data, list), f"{where}'s data must be a JSON list, got {type(data).__name__}")
    count, types, bounds = _elements(data)
    elements = 1
    for d in shape:
        elements *= d
    _check(count == elements, f"{where}'s data hold {count} elements where its shape {shape} needs {elements}")
    _check_elements(where, datatype, types, bounds)


def _check_elements(where: str, datatype: str, types: set, bounds: list) -> None:
    """Refused unless elements of these Python `types` and (lowest, highest) `bounds` (`_elements`) are of the
    JSON type and range that Triton reads `datatype` as."""
    numbers = types <= {int, float}
    _check(not numbers or all(-DOUBLE_MAX <= low and high <= DOUBLE_MAX for low, high in bounds),
           f"{where}'s data hold a number beyond a double's range")
    if datatype == "BYTES":
        _check(types <= {str}, f"{where}'s BYTES data must be strings")
    elif datatype == "BOOL":
        _check(types <= {bool}, f"{where}'s BOOL data must be true or false")
    elif datatype in INTEGERS:
        low, high = INTEGERS[datatype]
        _check(types <= {int} and all(low <= a and b < high for a, b in bounds),
               f"{where}'s {datatype} data must be integers from {low} to {high - 1}")
    elif datatype in FLOATS:
        _check(numbers, f"{where}'s {datatype} data must be numbers")
    # other datatypes (FP16, BF16, unknown ones): Triton answers 400 itself


def _numbers_fit(value: Any) -> bool:
    """Whether every number in a parsed JSON value is within a double's range."""
    if isinstance(value, dict):
        return all(_numbers_fit(v) for v in value.values())
    if isinstance(value, list):
        return all(_numbers_fit(v) for v in value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return -DOUBLE_MAX <= value <= DOUBLE_MAX
    return True


def check_infer(request: Any) -> None:
    """Refused (400) unless `request` has the KServe v2 inference request's form as far as Triton 2.51 answers
    a wrong one with 500 or dies of it (docs/operations.md, tests/serving/test_malformed_http.py)."""
    _check(isinstance(request, dict), "an inference request must be a JSON object")
    _check("inputs" in request, "an inference request needs inputs")
    _check(isinstance(request.get("id", ""), str), "the request's id must be a string")
    _check_parameters("the request", request, REQUEST_PARAMETERS)
    for field in ("inputs", "outputs"):
        items = request.get(field, [])
        _check(isinstance(items, list) and all(isinstance(i, dict) for i in items),
               f"{field} must be a list of JSON objects")
        for n, item in enumerate(items):
            where = f"{field}[{n}]"
            _check(isinstance(item.get("name"), str), f"{where} needs a name that is a string")
            _check_parameters(where, item, OUTPUT_PARAMETERS if field == "outputs" else INPUT_PARAMETERS)
            _check(_numbers_fit({k: v for k, v in item.items() if k != "data"}),
                   f"{where} holds a number beyond a double's range")
            if field == "outputs":
                continue
            _check(isinstance(item.get("datatype"), str), f"{where} needs a datatype that is a string")
            shape = item.get("shape")
            _check(isinstance(shape, list) and all(_is_int(d, 0, MAX_DIM + 1) for d in shape),
                   f"{where}'s shape must be a list of integers from 0 to 2^63-1, got {shape!r}")
            if "data" in item:
                _check_data(where, item["datatype"], shape, item["data"])
    _check(_numbers_fit({k: v for k, v in request.items() if k not in ("inputs", "outputs")}),
           "the request holds a number beyond a double's range")


def check_generate(request: Any, inputs: dict[str, str] | None = None) -> None:
    """Refused (400) unless `request` is a JSON object with `parameters` an object, which Triton 2.51's generate
    endpoints need, and each value it gives one of the model's `inputs` (name -> datatype; None: not known) is
    what Triton reads as that datatype. Triton takes a key of the body, or of its `parameters`, that names an
    input as that input: one element, or a list whose length is the element count (nested lists must hold as
    many elements in all, but for BYTES), of the datatype's JSON type; another value is its HTTP 500."""
    _check(isinstance(request, dict), "a generate request must be a JSON object")
    parameters = request.get("parameters", {})
    _check(isinstance(parameters, dict), "the request's parameters must be a JSON object")
    _check(_numbers_fit(request), "the request holds a number beyond a double's range")
    for values in (request, parameters):
        for name in sorted(values.keys() & (inputs or {}).keys()):
            value = values[name]
            given = value if isinstance(value, list) else [value]
            count, types, bounds = _elements(given)
            # (BYTES elements Triton counts itself, and answers a wrong count 400)
            _check(count == len(given) or inputs[name] == "BYTES", f"the generate input {name} is a list of "
                   f"{len(given)} items holding {count} elements: nested lists must hold one element per item")
            _check_elements(f"the generate input {name}", inputs[name], types, bounds)


def check(path: str, headers, body: bytes, max_depth: int, max_body: int, max_json: int = MAX_JSON_MB << 20,
          inputs: dict[str, str] | None = None) -> None:
    """Refused unless the request to `path` with `headers` and `body` is safe to hand to Triton; `inputs`: the
    datatypes of the inputs of the model a generate request names (`Guard.input_datatypes`), where known."""
    if not body:
        return
    text = json_part(decoded(body, headers.get("Content-Encoding", ""), max_body), headers.get(BINARY_HEADER))
    if len(text) > max_json:
        raise Refused(413, "too_large", f"the request's JSON is {len(text)} bytes, more than {max_json}: send "
                                        f"tensors as binary data (Inference-Header-Content-Length)")
    request = parse(text, max_depth)
    if INFER_PATH.match(path):
        check_infer(request)
    elif GENERATE_PATH.match(path):
        check_generate(request, inputs)
    elif not _numbers_fit(request):
        raise Refused(400, "not_json", "the body holds a number beyond a double's range")


class Guard:
    """The aiohttp application: checks each request (`check`) and forwards it to `upstream` (host:port)."""

    def __init__(self, upstream: str, max_depth: int = MAX_DEPTH, max_body_mb: float = MAX_BODY_MB,
                 log_window_s: float = LOG_WINDOW_S, body_timeout_s: float = BODY_TIMEOUT_S,
                 max_json_mb: float = MAX_JSON_MB):
        self.upstream, self.max_depth, self.body_timeout_s = upstream, max_depth, body_timeout_s
        self.max_body, self.max_json = int(max_body_mb * 2**20), int(max_json_mb * 2**20)
        self.refused: Counter[str] = Counter()
        self.forwarded = 0
        self._lock = threading.Lock()
        self.session: ClientSession | None = None
        # a flood of bad requests logs LOG_PER_WINDOW lines per window, then how many it left out
        self.log_window_s, self._window_start, self._logged, self._unlogged = log_window_s, time.monotonic(), 0, 0

    def counts(self) -> dict:
        """Requests forwarded and refused (by reason) so far."""
        with self._lock:
            return {"forwarded": self.forwarded, "refused": dict(self.refused)}

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.max_body)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        app.on_startup.append(self._open)
        app.on_cleanup.append(self._close)
        return app

    async def _open(self, _app) -> None:
        # Triton's own answers are passed on as they are: compressed or not, however long they take. Pooled
        # connections close after UPSTREAM_IDLE_S unused: on SIGTERM Triton's HTTP frontend waits for every open
        # connection, and an idle one kept longer would hold it until its exit timeout (then it exits 1). A
        # connection per request instead cost 0.86-0.90x the throughput (docs/results/2026-12-06-http-guard.md).
        connector = TCPConnector(limit=0, keepalive_timeout=UPSTREAM_IDLE_S)
        self.session = ClientSession(connector=connector, auto_decompress=False,
                                     timeout=ClientTimeout(total=None, sock_connect=10))

    async def _close(self, _app) -> None:
        await self.session.close()

    def _refuse(self, request: web.Request, refused: Refused) -> web.Response:
        now, unlogged = time.monotonic(), 0
        with self._lock:
            self.refused[refused.reason] += 1
            if now - self._window_start >= self.log_window_s:
                unlogged, self._unlogged, self._window_start, self._logged = self._unlogged, 0, now, 0
            logged = self._logged < LOG_PER_WINDOW
            self._logged += logged
            self._unlogged += not logged
        if unlogged:
            log.info("%d more refused requests not logged in the last %.0f s", unlogged, self.log_window_s)
        if logged:
            log.info("refused %s %s from %s: %d %s", request.method, request.path, request.remote, refused.status,
                     refused)
        return web.json_response({"error": str(refused)}, status=refused.status)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await asyncio.wait_for(request.read(), self.body_timeout_s)
        except web.HTTPRequestEntityTooLarge:
            return self._refuse(request, Refused(413, "too_large", f"the body is larger than {self.max_body} bytes"))
        except asyncio.TimeoutError:  # a client that holds a connection open by sending slowly, or stops
            return self._refuse(request, Refused(408, "slow_body",
                                                 f"the body did not arrive within {self.body_timeout_s:g} s"))
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        try:
            inputs = await self.input_datatypes(request, headers) if body and GENERATE_PATH.match(request.path) \
                else None
            options = (request.path, request.headers, body, self.max_depth, self.max_body, self.max_json, inputs)
            if len(body) > INLINE_CHECK_BYTES:  # a big JSON body: parsed off the event loop, other requests go on
                await asyncio.get_running_loop().run_in_executor(None, check, *options)
            else:
                check(*options)
        except Refused as refused:
            return self._refuse(request, refused)
        except ClientConnectorError as exc:
            return self._not_answering(request, exc)
        except ClientError as exc:
            return self._failed(request, exc)
        # the path and query as sent (an absolute-form target's host is dropped: the upstream is fixed)
        url = f"http://{self.upstream}{request.rel_url.raw_path_qs}"
        try:
            async with self.session.request(request.method, url, headers=headers, data=body, allow_redirects=False,
                                            skip_auto_headers=NO_AUTO_HEADERS) as answer:
                with self._lock:
                    self.forwarded += 1
                out = {k: v for k, v in answer.headers.items() if k.lower() not in HOP_BY_HOP}
                if answer.headers.get("Content-Length") is not None:
                    return web.Response(status=answer.status, reason=answer.reason, headers=out,
                                        body=await answer.read())
                stream = web.StreamResponse(status=answer.status, reason=answer.reason, headers=out)
                await stream.prepare(request)
                async for chunk in answer.content.iter_any():
                    await stream.write(chunk)
                await stream.write_eof()
                return stream
        except ClientConnectorError as exc:
            return self._not_answering(request, exc)
        except ClientError as exc:
            return self._failed(request, exc)

    async def input_datatypes(self, request: web.Request, headers: dict) -> dict[str, str] | None:
        """The datatypes of the inputs of the model (and version) a generate `request` names, by name: Triton's
        model metadata (GET /v2/models/<model>[/versions/<version>], with the client's own `headers`). None where
        Triton gives none (an unknown model: it answers the request itself)."""
        url = f"http://{self.upstream}{request.rel_url.raw_path.rsplit('/', 1)[0]}"
        asked = {k: v for k, v in headers.items()
                 if not k.lower().startswith("content-") and k.lower() not in METADATA_DROPPED}
        async with self.session.get(url, headers=asked, allow_redirects=False,
                                    skip_auto_headers=NO_AUTO_HEADERS) as answer:
            metadata = await answer.read() if answer.status == 200 else b""
        try:
            return {i["name"]: i["datatype"] for i in orjson.loads(metadata)["inputs"]}
        except (orjson.JSONDecodeError, KeyError, TypeError):
            return None

    @staticmethod
    def _not_answering(request: web.Request, exc: Exception) -> web.Response:
        # the client is told no more than that: the upstream's address stays here
        log.info("the server behind the guard is not answering %s %s: %s", request.method, request.path, exc)
        return web.json_response({"error": "the server behind the guard is not answering"}, status=503)

    @staticmethod
    def _failed(request: web.Request, exc: Exception) -> web.Response:
        # it closed the connection or answered what is not HTTP
        log.warning("the server behind the guard failed %s %s: %r", request.method, request.path, exc)
        return web.json_response({"error": "the server behind the guard failed the request"}, status=502)


class GuardThread:
    """A Guard listening on host:port in a thread of its own (the supervisor's), until stop()."""

    def __init__(self, guard: Guard, host: str, port: int):
        self.guard, self.host, self.port = guard, host, port
        self.loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._runner: web.AppRunner | None = None
        self._thread = threading.Thread(target=self._run, name="http-guard", daemon=True)

    def start(self) -> "GuardThread":
        self._thread.start()
        self._started.wait()
        if self._error is not None:
            raise OSError(f"http guard on {host_port(self.host, self.port)}: {self._error}")
        return self

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self._runner = web.AppRunner(self.guard.app(), access_log=None, handle_signals=False, **SERVER_OPTIONS)
            self.loop.run_until_complete(self._runner.setup())
            site = web.TCPSite(self._runner, self.host, self.port, reuse_address=True)
            self.loop.run_until_complete(site.start())
            if self.port == 0:
                self.port = self._runner.addresses[0][1]
        except BaseException as exc:  # noqa: BLE001 (handed to start()'s caller)
            self._error = exc
            self._started.set()
            return
        self._started.set()
        self.loop.run_forever()
        self.loop.run_until_complete(self._runner.cleanup())
        left = asyncio.all_tasks(self.loop)  # a connection's handler still lingering over an unread body
        for task in left:
            task.cancel()
        self.loop.run_until_complete(asyncio.gather(*left, return_exceptions=True))
        self.loop.close()

    def stop(self) -> None:
        if self._thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=30)


def split_host_port(text: str) -> tuple[str, int]:
    """`host:port` or `[v6]:port` -> (host, port); argparse's type for --listen and --upstream."""
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise argparse.ArgumentTypeError(f"{text!r} is not host:port")
    return host.strip("[]"), port_number(port)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--listen", type=split_host_port, default=("127.0.0.1", 8010),
                   help="host:port the guard listens on (default: 127.0.0.1:8010)")
    p.add_argument("--upstream", type=split_host_port, default=("127.0.0.1", 8000),
                   help="host:port of Triton's HTTP endpoint (default: 127.0.0.1:8000)")
    p.add_argument("--max-depth", type=positive(int), default=MAX_DEPTH,
                   help="deepest JSON nesting forwarded (default: %(default)s)")
    p.add_argument("--max-body-mb", type=positive(float), default=MAX_BODY_MB,
                   help="largest body forwarded, after decompression, MiB (default: %(default)s)")
    p.add_argument("--max-json-mb", type=positive(float), default=MAX_JSON_MB,
                   help="largest JSON part of a body forwarded (the whole body, or a binary-data request's JSON "
                        "header), MiB (default: %(default)s)")
    p.add_argument("--body-timeout", type=positive(float), default=BODY_TIMEOUT_S,
                   help="seconds a request's body may take to arrive (default: %(default)s)")
    return p


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    guard = Guard(host_port(*args.upstream), args.max_depth, args.max_body_mb, body_timeout_s=args.body_timeout,
                  max_json_mb=args.max_json_mb)
    host, port = args.listen
    log.info("guarding http://%s on http://%s", guard.upstream, host_port(host, port))
    web.run_app(guard.app(), host=host, port=port, access_log=None, print=None, **SERVER_OPTIONS)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(get_args_parser().parse_args()))
    except (OSError, ValueError) as exc:
        sys.exit(f"serving.http_guard: {exc}")
