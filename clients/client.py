"""Client library for the `image_classifier` ensemble, over HTTP or gRPC, sync or asyncio.

    from clients.client import ImageClassifierClient
    with ImageClassifierClient("127.0.0.1:8000", protocol="http") as client:
        top5 = client.classify([open("cat.jpg", "rb").read()], top_k=5)[0]
        print(top5[0].label, top5[0].score)

`classify` asks Triton's classification extension for the top k (scores and labels computed on the
server); `probabilities` returns the full probability vectors. Several images go in one request.
Server-side errors raise ClassificationError carrying Triton's status and message.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

IMAGE_INPUT = "IMAGE"
PROBABILITIES = "PROBABILITIES"
DEFAULT_MODEL = "image_classifier"
PROTOCOLS = ("http", "grpc")
DEFAULT_URLS = {"http": "127.0.0.1:8000", "grpc": "127.0.0.1:8001"}


@dataclasses.dataclass(frozen=True)
class Prediction:
    index: int
    label: str
    score: float


UNAVAILABLE = "UNAVAILABLE"  # the status of a request that never reached a server


class ClassificationError(RuntimeError):
    def __init__(self, message: str, status: str | None = None):
        super().__init__(message)
        self.status = status  # e.g. "400" (HTTP) or "StatusCode.INVALID_ARGUMENT" (gRPC)

    @property
    def is_client_error(self) -> bool:
        return self.status is not None and (self.status.startswith("4") or "INVALID_ARGUMENT" in self.status)


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


def _error(exc) -> ClassificationError:
    status = exc.status() if hasattr(exc, "status") else None
    message = exc.message() if hasattr(exc, "message") else str(exc)
    return ClassificationError(message, None if status is None else str(status))


def _unreachable(url: str, exc: OSError) -> ClassificationError:
    return ClassificationError(f"cannot reach the server at {url} over HTTP: {exc}", UNAVAILABLE)


class ImageClassifierClient:
    """Blocking client. `url` is host:port (HTTP 8000, gRPC 8001 by default)."""

    def __init__(self, url: str | None = None, protocol: str = "http", model: str = DEFAULT_MODEL,
                 timeout_s: float = 60.0):
        self.protocol, self.model = protocol, model
        self._module = _module(protocol, asynchronous=False)
        url = url or DEFAULT_URLS[protocol]
        if protocol == "http":
            self._client = self._module.InferenceServerClient(url, connection_timeout=timeout_s,
                                                              network_timeout=timeout_s)
        else:
            self._client = self._module.InferenceServerClient(url)
        self._timeout, self._url = timeout_s, url

    def is_ready(self) -> bool:
        return bool(self._client.is_server_ready() and self._client.is_model_ready(self.model))

    def _infer(self, images: Sequence[bytes], top_k: int | None):
        inputs, outputs = _request(self._module, images, top_k)
        kwargs = {"client_timeout": self._timeout} if self.protocol == "grpc" else {}
        try:
            return self._client.infer(self.model, inputs, outputs=outputs, **kwargs)
        except self._module.InferenceServerException as exc:
            raise _error(exc) from None
        except OSError as exc:  # HTTP: connection refused or reset (gRPC reports these as UNAVAILABLE)
            raise _unreachable(self._url, exc) from None

    def classify(self, images: Sequence[bytes], top_k: int = 5) -> list[list[Prediction]]:
        """One request; the top `top_k` predictions of each image, best first."""
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
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


class AsyncImageClassifierClient:
    """asyncio client with the same methods as ImageClassifierClient (awaitable)."""

    def __init__(self, url: str | None = None, protocol: str = "http", model: str = DEFAULT_MODEL,
                 timeout_s: float = 60.0):
        self.protocol, self.model = protocol, model
        self._module = _module(protocol, asynchronous=True)
        url = url or DEFAULT_URLS[protocol]
        if protocol == "http":
            self._client = self._module.InferenceServerClient(url, conn_timeout=timeout_s)
        else:
            self._client = self._module.InferenceServerClient(url)
        self._timeout, self._url = timeout_s, url

    async def is_ready(self) -> bool:
        return bool(await self._client.is_server_ready() and await self._client.is_model_ready(self.model))

    async def _infer(self, images: Sequence[bytes], top_k: int | None):
        inputs, outputs = _request(self._module, images, top_k)
        kwargs = {"client_timeout": self._timeout} if self.protocol == "grpc" else {}
        try:
            return await self._client.infer(self.model, inputs, outputs=outputs, **kwargs)
        except self._module.InferenceServerException as exc:
            raise _error(exc) from None
        except OSError as exc:  # HTTP: connection refused or reset (gRPC reports these as UNAVAILABLE)
            raise _unreachable(self._url, exc) from None

    async def classify(self, images: Sequence[bytes], top_k: int = 5) -> list[list[Prediction]]:
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        return _top_k(await self._infer(images, top_k), len(images))

    async def probabilities(self, images: Sequence[bytes]) -> np.ndarray:
        return (await self._infer(images, None)).as_numpy(PROBABILITIES)

    async def close(self) -> None:
        await self._client.close()

    async def __aenter__(self) -> "AsyncImageClassifierClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
