"""Locust users for `make soak` (benchmarks/soak.py): real photos mixed with bad images, every request logged.

    locust -f benchmarks/soak_users.py --headless -u 8 -r 8 -t 600s --host 127.0.0.1:8000 \
        --soak-log requests.csv --bad-share 0.1 SoakHttpUser

A request is `good` (a real photo: success = the top k came back) or `bad` (not an image, a truncated
JPEG, an image below the minimum side, an empty input: success = a client error, 4xx / INVALID_ARGUMENT).
Each request is one line of --soak-log: unix time, kind, milliseconds, outcome (`ok`, `client_error`,
`busy`, `server_error`, `unavailable`, `wrong_answer`) and the gRPC status name.
"""
from __future__ import annotations

import io
import random
import time

import grpc.experimental.gevent as grpc_gevent
from locust import User, constant, events, task

from benchmarks.workload import load_photos
from clients.client import DEFAULT_MODEL, ClassificationError, ImageClassifierClient, ServerBusy, ServerUnavailable
from serving.health import SEEDS, number
from serving.server import inference_key_for

grpc_gevent.init_gevent()

SERVER_ERRORS = frozenset({"INTERNAL", "UNKNOWN", "DATA_LOSS", "UNIMPLEMENTED"})


def bad_images(photo: bytes) -> dict[str, bytes]:
    """Inputs a client may send by mistake, each of which the pipeline must refuse as the client's fault."""
    from PIL import Image

    small = io.BytesIO()
    Image.new("RGB", (4, 4), (200, 10, 10)).save(small, format="PNG")
    return {"not_an_image": b"this is not an image", "truncated_jpeg": photo[: len(photo) // 8],
            "too_small": small.getvalue(), "empty": b""}


def outcome(exc: Exception | None) -> tuple[str, str]:
    if exc is None:
        return "ok", "OK"
    if isinstance(exc, ServerBusy):
        return "busy", exc.status or ""
    if isinstance(exc, ServerUnavailable):
        return "unavailable", exc.status or ""
    if isinstance(exc, ClassificationError):
        if exc.is_client_error:
            return "client_error", exc.status or ""
        server_error = exc.status in SERVER_ERRORS or exc.status is None
        return ("server_error" if server_error else "unavailable"), exc.status or ""
    return "wrong_answer", type(exc).__name__


@events.init_command_line_parser.add_listener
def _add_arguments(parser) -> None:
    parser.add_argument("--soak-log", default="soak_requests.csv", help="one line per request (default: %(default)s)")
    parser.add_argument("--bad-share", type=number(float, 0, 1), default=0.1,
                        help="share of bad images, 0 to 1 (default: %(default)s)")
    parser.add_argument("--triton-model", default=DEFAULT_MODEL, help="ensemble to call (default: %(default)s)")
    parser.add_argument("--seed", type=number(int, *SEEDS), default=0,
                        help="random seed, a 64-bit signed integer (default: %(default)s)")


@events.init.add_listener
def _setup(environment, **_kwargs) -> None:
    options = environment.parsed_options
    environment.soak_photos = list(load_photos("jpeg").values())
    environment.soak_bad = list(bad_images(environment.soak_photos[0]).items())
    environment.soak_log = open(options.soak_log if options else "soak_requests.csv", "a", buffering=1)
    environment.soak_users = 0


@events.quitting.add_listener
def _close(environment, **_kwargs) -> None:
    environment.soak_log.close()


class SoakUser(User):
    abstract = True
    protocol = "http"
    wait_time = constant(0)

    def on_start(self) -> None:
        options = self.environment.parsed_options
        self.environment.soak_users += 1
        self.rng = random.Random(f"{options.seed if options else 0}/{self.environment.soak_users}")
        self.bad_share = options.bad_share if options else 0.1
        self.model = options.triton_model if options else DEFAULT_MODEL
        self.client = ImageClassifierClient(self.host, protocol=self.protocol, model=self.model,
                                            inference_key=inference_key_for(self.host))

    def on_stop(self) -> None:
        self.client.close()

    @task
    def classify(self) -> None:
        bad = self.rng.random() < self.bad_share
        name, image = self.rng.choice(self.environment.soak_bad) if bad else ("photo", self.rng.choice(
            self.environment.soak_photos))
        error: Exception | None = None
        start = time.perf_counter()
        try:
            top = self.client.classify([image], top_k=1)
            if len(top) != 1 or len(top[0]) != 1:
                raise RuntimeError(f"expected 1 x 1 prediction, got {[len(t) for t in top]}")
        except Exception as exc:  # classified below, never raised into the user loop
            error = exc
        ms = (time.perf_counter() - start) * 1000
        result, status = outcome(error)
        passed = result == ("client_error" if bad else "ok")
        kind = "bad" if bad else "good"
        self.environment.soak_log.write(f"{time.time():.3f},{kind},{name},{ms:.2f},{result},{status}\n")
        self.environment.events.request.fire(
            request_type=self.protocol, name=f"{kind} {name}" if bad else kind, response_time=ms, response_length=0,
            exception=None if passed else (error or RuntimeError(f"a bad image ({name}) was answered")), context={})


class SoakHttpUser(SoakUser):
    protocol = "http"


class SoakGrpcUser(SoakUser):
    protocol = "grpc"
