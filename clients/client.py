"""Client library for the `image_classifier` ensemble, over HTTP or gRPC, sync or asyncio.

    from clients.client import ImageClassifierClient
    with ImageClassifierClient("127.0.0.1:8000", protocol="http") as client:
        top5 = client.classify([open("cat.jpg", "rb").read()], top_k=5)[0]
        print(top5[0].label, top5[0].score)

`classify` asks Triton's classification extension for the top k (scores and labels computed on the
server); `probabilities` returns the full probability vectors. Several images go in one request.
The URL may carry a scheme (`http://`, `grpc://`, which then sets the protocol; `https://`, `grpcs://` turn TLS
on). `tls=TLS(ca_file, cert_file, key_file)` (clients.tls) speaks TLS, the server's certificate always verified,
with a client certificate for mutual TLS. Server-side errors
raise ClassificationError carrying a gRPC status name (HTTP 400 is INVALID_ARGUMENT too) and the
server's message; UnknownModel (NOT_FOUND) when the server serves no model of the client's name. When
no server of the client's protocol answers at the URL (the host name does not resolve, nothing
listens, or it is the other protocol's or the metrics port, TLS where the client speaks plain or the reverse, a
certificate that does not verify, a client certificate asked for or refused), ServerUnavailable says what
answers there instead; a request whose connection fails while the server answers a fresh one (a kept-alive connection
a load balancer forgot, reset under the request) is sent once more on a fresh one. A server past its
bounded queue answers at once with ServerBusy (HTTP 503 / gRPC UNAVAILABLE): retry later. A request
the server does not answer within `timeout_s` fails alone, with ClassificationError DEADLINE_EXCEEDED
(`timeout_s`: seconds above 0, or None for no limit; every call, readiness and model config too).
`admin_key` (what `make serve` writes to .run/admin.key) is sent with the restricted calls (the model
config behind max_batch_size); without it a restricted server answers PERMISSION_DENIED. `inference_key` (what
`make serve INFERENCE_KEY=1` writes to .run/inference.key) is sent with every classification, the same.
"""
from __future__ import annotations

import asyncio
import dataclasses
import http.client
import math
from typing import Sequence

import numpy as np

from clients.endpoint import DEFAULT_URLS, NAMES, PROTOCOLS, diagnose, split_url
from clients.tls import TLS, tls_for
from serving.access import INFERENCE_KEY_HEADER, is_restricted_error, key_headers, missing_key

__all__ = ["AsyncImageClassifierClient", "ClassificationError", "DEFAULT_MODEL", "DEFAULT_URLS",
           "ImageClassifierClient", "PROTOCOLS", "Prediction", "ServerBusy", "ServerUnavailable", "TLS", "UnknownModel",
           "status_name"]

IMAGE_INPUT = "IMAGE"
PROBABILITIES = "PROBABILITIES"
DEFAULT_MODEL = "image_classifier"


@dataclasses.dataclass(frozen=True)
class Prediction:
    index: int
    label: str
    score: float


UNAVAILABLE = "UNAVAILABLE"  # the status of a request that never reached a server
DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"  # no answer within the client's timeout
# One status vocabulary, gRPC's names; HTTP status codes map onto them as Triton maps its own errors.
HTTP_STATUS = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
               405: "UNIMPLEMENTED", 409: "ALREADY_EXISTS", 429: "RESOURCE_EXHAUSTED", 499: "CANCELLED",
               500: "INTERNAL", 501: "UNIMPLEMENTED", 503: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED"}
CLIENT_ERRORS = frozenset({"INVALID_ARGUMENT", "NOT_FOUND", "ALREADY_EXISTS", "FAILED_PRECONDITION", "OUT_OF_RANGE",
                           "PERMISSION_DENIED", "UNAUTHENTICATED"})
# What a wrong or missing endpoint looks like (gRPC: UNAVAILABLE; HTTP: 404 / 405 from another server; no answer
# in time). From the right server, a request past the client's timeout stays that request's DEADLINE_EXCEEDED.
PROBED = frozenset({UNAVAILABLE, DEADLINE_EXCEEDED, "NOT_FOUND", "UNIMPLEMENTED", "UNKNOWN"})
# Triton's messages for a request turned away by a model's bounded queue: full, or waited past its timeout.
BUSY_MESSAGES = ("Exceeds maximum queue size", "Request timeout expired")
UNKNOWN_MODEL = "Request for unknown model"  # Triton's NOT_FOUND for a model it does not serve, over both protocols


def status_name(status) -> str:
    """'400' -> 'INVALID_ARGUMENT', 'StatusCode.UNAVAILABLE' -> 'UNAVAILABLE', None -> 'UNKNOWN'."""
    text = "" if status is None else str(status)
    if text.isdigit():
        code = int(text)
        return HTTP_STATUS.get(code, "FAILED_PRECONDITION" if 400 <= code < 500 else "UNKNOWN")
    return text.removeprefix("StatusCode.") or "UNKNOWN"


class ClassificationError(RuntimeError):
    def __init__(self, message: str, status: str | None = None):
        super().__init__(message)
        self.status = status  # a gRPC status name: "INVALID_ARGUMENT", "UNAVAILABLE", "NOT_FOUND", ...

    @property
    def is_client_error(self) -> bool:
        return self.status in CLIENT_ERRORS


class ServerBusy(ClassificationError):
    """The server is past its capacity (a model's queue is full or the request waited past its timeout):
    answered at once, nothing was computed; retry later or elsewhere."""

    def __init__(self, message: str):
        super().__init__(f"server busy: {message}", UNAVAILABLE)


class UnknownModel(ClassificationError):
    """The server answers but serves no model of the client's name (a mistyped model): every request fails alike."""

    def __init__(self, message: str):
        super().__init__(message, "NOT_FOUND")


class ServerUnavailable(ClassificationError):
    """No server of the client's protocol answers at its URL; the message says what does and what to use."""

    def __init__(self, message: str):
        super().__init__(message, UNAVAILABLE)


def _module(protocol: str, asynchronous: bool):
    if protocol == "http":
        if asynchronous:
            import tritonclient.http.aio as module
        else:
            import tritonclient.http as module
    elif protocol == "grpc":
        if asynchronous:
            import tritonclient.grpc.aio as module
        else:
            import tritonclient.grpc as module
    else:
        raise ValueError(f"protocol {protocol!r} is not one of {PROTOCOLS}")
    return module


def _transport_errors(protocol: str, asynchronous: bool) -> tuple[type[Exception], ...]:
    """What the protocol's client raises, besides its InferenceServerException, when the far end is no
    server of its protocol: refused or reset connections, replies that are not HTTP, bodies that are
    not JSON (gRPC reports all of it as UNAVAILABLE)."""
    if protocol == "grpc":
        return (OSError,)
    if asynchronous:
        import aiohttp

        return (OSError, ValueError, aiohttp.ClientError)
    return (OSError, ValueError, http.client.HTTPException)  # geventhttpclient's HTTPParseError is one


def parse_classification(entry: bytes | str) -> Prediction:
    """Triton's classification string 'score:index[:label]' -> Prediction."""
    text = entry.decode() if isinstance(entry, bytes) else entry
    score, index, *label = text.split(":", 2)
    return Prediction(index=int(index), label=label[0] if label else str(index), score=float(score))


def _request(module, images: Sequence[bytes], top_k: int | None):
    if not images:
        raise ValueError("no images to classify")
    data = np.empty((len(images), 1), dtype=np.object_)
    for i, image in enumerate(images):
        data[i, 0] = bytes(image)
    infer_input = module.InferInput(IMAGE_INPUT, list(data.shape), "BYTES")
    infer_input.set_data_from_numpy(data)
    output = module.InferRequestedOutput(PROBABILITIES, class_count=top_k or 0)
    return [infer_input], [output]


def _top_k(result, count: int) -> list[list[Prediction]]:
    rows = result.as_numpy(PROBABILITIES).reshape(count, -1)
    return [[parse_classification(e) for e in row] for row in rows]


def _check_top_k(top_k: int) -> None:
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")


def _check_timeout(timeout_s: float | None) -> None:
    """tritonclient reads a timeout of 0, below 0, NaN or infinity each its own way (an immediate gRPC deadline,
    HTTP's 'Timeout value out of range' reported as no server, no limit at all, an OverflowError): refused."""
    if timeout_s is None:
        return
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not 0 < timeout_s < math.inf:
        raise ValueError(f"timeout_s must be seconds above 0 (finite) or None for no limit, got {timeout_s!r}")


def _max_batch_size(config: dict) -> int:
    """The model config's max_batch_size (gRPC nests the config under "config")."""
    return int(config.get("config", config).get("max_batch_size", 0))


def _probed(error: ClassificationError) -> bool:
    """Whether the error may mean no server of this protocol at the URL (a busy server is one, and so is Triton
    naming the model it does not serve)."""
    return error.status in PROBED and not isinstance(error, (ServerBusy, UnknownModel))


class _Client:
    """What the sync and async clients share: the URL and its TLS, the tritonclient module, and turning its
    errors into ClassificationError / ServerUnavailable."""

    asynchronous = False

    def __init__(self, url: str | None = None, protocol: str | None = None, model: str = DEFAULT_MODEL,
                 timeout_s: float = 60.0, admin_key: str | None = None, tls: TLS | None = None,
                 inference_key: str | None = None):
        if protocol not in (None, *PROTOCOLS):
            raise ValueError(f"protocol {protocol!r} is not one of {PROTOCOLS}")
        _check_timeout(timeout_s)
        self.protocol, self.url = split_url(url or DEFAULT_URLS[protocol or "http"], protocol)
        self.tls = tls_for(url, tls)
        self._tls_context = self.tls.context(self.protocol) if self.tls else None  # its files checked here
        self.model, self._timeout = model, timeout_s
        self._admin_headers = key_headers(admin_key, self.protocol) or None
        self._inference_headers = key_headers(inference_key, self.protocol, INFERENCE_KEY_HEADER) or None
        self._module = _module(self.protocol, self.asynchronous)
        self._transport = _transport_errors(self.protocol, self.asynchronous)
        self._client = self._new_client()

    def _new_client(self):
        return self._module.InferenceServerClient(self.url, **self._client_options())

    def _client_options(self) -> dict:
        tls = self.tls.client_options(self.protocol, self.asynchronous) if self.tls else {}
        if self.protocol == "grpc":
            return tls
        if self.asynchronous:
            return {"conn_timeout": self._timeout, **tls}
        return {"connection_timeout": self._timeout, "network_timeout": self._timeout, **tls}

    def _call_options(self) -> dict:
        return {"client_timeout": self._timeout} if self.protocol == "grpc" else {}

    def _config_options(self) -> dict:
        options = {"headers": self._admin_headers}
        return {**options, "as_json": True} if self.protocol == "grpc" else options

    def _failure(self, exc: Exception) -> ClassificationError | None:
        """Our error for what a tritonclient call raised (None: not a server or transport error)."""
        if isinstance(exc, self._module.InferenceServerException):
            message = exc.message() if hasattr(exc, "message") else str(exc)
            if any(m in message for m in BUSY_MESSAGES):
                return ServerBusy(message)
            if is_restricted_error(message):  # HTTP 403, gRPC UNAVAILABLE
                return ClassificationError(f"{message}: this server restricts the call; pass {missing_key(message)}",
                                           "PERMISSION_DENIED")
            status = status_name(exc.status() if hasattr(exc, "status") else None)
            if status == "NOT_FOUND" and UNKNOWN_MODEL in message:
                return UnknownModel(f"{message} at {self.url}: check the model name (default: {DEFAULT_MODEL})")
            if status == DEADLINE_EXCEEDED and self.protocol == "grpc":
                return self._timed_out(message)
            return ClassificationError(message, status)
        if isinstance(exc, (TimeoutError, asyncio.TimeoutError)):
            return self._timed_out(str(exc))
        if isinstance(exc, self._transport):
            reason = str(exc) or type(exc).__name__
            return ClassificationError(f"no {NAMES[self.protocol]} answer from {self.url}: {reason}", UNAVAILABLE)
        return None

    def _probed_failure(self, exc: Exception) -> ClassificationError:
        """_failure(exc) when it calls for a look at what answers at the URL; else it, or `exc` itself, raised."""
        error = self._failure(exc)
        if error is None:
            raise exc
        if not _probed(error):
            raise error from None
        return error

    def _timed_out(self, reason: str = "") -> ClassificationError:
        """DEADLINE_EXCEEDED. With no limit of the client's (timeout_s None) the system or the far end timed out
        (a proxy in front of the server, the kernel giving up on a connection): its own reason is what there is."""
        if self._timeout is None:
            why = f"timed out ({reason or 'no limit set by the client'})"
        else:
            why = f"timed out after {self._timeout:g} s"
        return ClassificationError(f"no {NAMES[self.protocol]} answer from {self.url}: {why}", DEADLINE_EXCEEDED)

    def _diagnose(self) -> str | None:
        """What is wrong with the URL as this client's endpoint (over its TLS), None if the right server answers."""
        return diagnose(self.url, self.protocol, self._tls_context)

    def _stale(self, error: ClassificationError, problem: str | None) -> bool:
        """Whether the right server answers a fresh connection although the request's connection failed: one the
        client kept alive and a load balancer forgot (idle timeout: a reset under the next request), or closed
        as the request went; geventhttpclient checks a kept connection before reuse but retries no POST.
        Classifying twice does no harm, so it is worth one retry."""
        return error.status == UNAVAILABLE and problem is None

    def _explain(self, error: ClassificationError, problem: str | None) -> ClassificationError:
        """`error`, or what is wrong with the URL (_diagnose) when that is no server of this protocol."""
        if problem:
            return ServerUnavailable(problem)
        return ServerUnavailable(str(error)) if error.status == UNAVAILABLE else error


class ImageClassifierClient(_Client):
    """Blocking client. `url` is [http:// | https:// | grpc:// | grpcs://]host:port (HTTP 8000, gRPC 8001 by
    default; 443 with the TLS schemes)."""

    def _call(self, name: str, *args, **kwargs):
        """The tritonclient client's method `name`, its failure translated; once on a fresh client if stale."""
        for retried in (False, True):
            try:
                return getattr(self._client, name)(*args, **kwargs, **self._call_options())
            except Exception as exc:  # noqa: BLE001 - _probed_failure picks what is ours to translate
                error = self._probed_failure(exc)
            problem = self._diagnose()
            if retried or not self._stale(error, problem):
                raise self._explain(error, problem)
            self._client.close()
            self._client = self._new_client()

    def is_ready(self) -> bool:
        return bool(self._call("is_server_ready") and self._call("is_model_ready", self.model))

    def max_batch_size(self) -> int:
        """The served model's max_batch_size (images per request), from its config."""
        return _max_batch_size(self._call("get_model_config", self.model, **self._config_options()))

    def _infer(self, images: Sequence[bytes], top_k: int | None):
        inputs, outputs = _request(self._module, images, top_k)
        return self._call("infer", self.model, inputs, outputs=outputs, headers=self._inference_headers)

    def classify(self, images: Sequence[bytes], top_k: int = 5) -> list[list[Prediction]]:
        """One request; the top `top_k` predictions of each image, best first."""
        _check_top_k(top_k)
        return _top_k(self._infer(images, top_k), len(images))

    def probabilities(self, images: Sequence[bytes]) -> np.ndarray:
        """One request; float32 (len(images), classes)."""
        return self._infer(images, None).as_numpy(PROBABILITIES)

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> "ImageClassifierClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncImageClassifierClient(_Client):
    """asyncio client with the same methods as ImageClassifierClient (awaitable)."""

    asynchronous = True

    async def _call(self, name: str, *args, **kwargs):
        """As ImageClassifierClient._call, awaited. The client is shared by concurrent requests: the first to find
        it stale replaces it, the others retry on its replacement; the requests still in flight on the one closed
        fail as stale in turn and are retried too."""
        for retried in (False, True):
            client = self._client
            try:
                return await getattr(client, name)(*args, **kwargs, **self._call_options())
            except Exception as exc:  # noqa: BLE001 - _probed_failure picks what is ours to translate
                error = self._probed_failure(exc)
            problem = await asyncio.to_thread(self._diagnose)
            if retried or not self._stale(error, problem):
                raise self._explain(error, problem)
            if client is self._client:
                self._client = self._new_client()
                await client.close()

    async def is_ready(self) -> bool:
        return bool(await self._call("is_server_ready") and await self._call("is_model_ready", self.model))

    async def max_batch_size(self) -> int:
        return _max_batch_size(await self._call("get_model_config", self.model, **self._config_options()))

    async def _infer(self, images: Sequence[bytes], top_k: int | None):
        inputs, outputs = _request(self._module, images, top_k)
        return await self._call("infer", self.model, inputs, outputs=outputs, headers=self._inference_headers)

    async def classify(self, images: Sequence[bytes], top_k: int = 5) -> list[list[Prediction]]:
        _check_top_k(top_k)
        return _top_k(await self._infer(images, top_k), len(images))

    async def probabilities(self, images: Sequence[bytes]) -> np.ndarray:
        return (await self._infer(images, None)).as_numpy(PROBABILITIES)

    async def close(self) -> None:
        await self._client.close()

    async def __aenter__(self) -> "AsyncImageClassifierClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
