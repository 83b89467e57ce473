"""Locust users: Triton over gRPC and HTTP (tritonclient, via clients.client), and the FastAPI service.

    make locust                                     # own server, both Triton users, CSV + HTML report
    locust -f benchmarks/locustfile.py --headless -u 8 -r 8 -t 30s --host 127.0.0.1:8001 TritonGrpcUser
    locust -f benchmarks/locustfile.py --headless -u 8 -r 8 -t 30s --host 127.0.0.1:8000 TritonHttpUser
    locust -f benchmarks/locustfile.py --headless -u 8 -r 8 -t 30s --host http://127.0.0.1:8080 FastAPIUser

Each user is one closed loop (no wait time): `-u N` users = N requests in flight, like
perf_analyzer's concurrency. Every request carries one random real photo (`--photos jpeg|original`)
and asks for the top `--top-k`; a request whose answer does not hold k predictions is a failure.
Triton users call the ensemble `--triton-model` (the spec's `ensemble_name`), with the inference key of a
server that restricts inference (what `make serve` wrote for it, else $TRITON_INFERENCE_KEY). `--seed` makes the
photo order repeatable: the n-th user started draws from its own stream, seeded by (seed, n).
Triton requests are reported to Locust's statistics by hand (request_type grpc/http); the FastAPI
user is Locust's own FastHttpUser. `--latencies-file PATH` writes every successful request's latency
(ms, one a line; those before a --reset-stats reset left out) at quit: Locust's own percentiles are
rounded to its buckets and count failures too (benchmarks.locust_run computes them from this file).
`--totals-file PATH` writes, at the same moment, Locust's final totals as JSON: requests and failures
since the reset, and the window they ran in (`start`: the reset, `end`: the last request, Unix s).
Locust's `_stats.csv` is rewritten once a second and not at quit, so it misses the last second's requests.
"""
from __future__ import annotations

import json
import random
import time

import grpc.experimental.gevent as grpc_gevent
from locust import FastHttpUser, User, constant, events, task

from benchmarks.workload import ENCODINGS, load_photos
from clients.client import DEFAULT_MODEL, ImageClassifierClient
from serving.health import SEEDS, number
from serving.server import inference_key_for

grpc_gevent.init_gevent()  # gRPC's blocking calls must yield to gevent, or the users run one at a time


@events.init_command_line_parser.add_listener
def _add_arguments(parser) -> None:
    parser.add_argument("--photos", default="jpeg", choices=ENCODINGS, help="photo encoding (default: jpeg)")
    parser.add_argument("--top-k", type=number(int, 1), default=5, help="predictions asked for (default: 5)")
    parser.add_argument("--seed", type=number(int, *SEEDS), default=0,
                        help="random photo order seed, a 64-bit signed integer (default: 0)")
    parser.add_argument("--triton-model", default=DEFAULT_MODEL,
                        help=f"the ensemble Triton users call (default: {DEFAULT_MODEL})")
    parser.add_argument("--latencies-file", default="",
                        help="write each successful request's latency (ms) here at quit (default: none)")
    parser.add_argument("--totals-file", default="",
                        help="write the final request and failure counts and their window (JSON) here at quit "
                             "(default: none)")


@events.init.add_listener
def _load_photos(environment, **_kwargs) -> None:
    options = environment.parsed_options
    environment.benchmark_photos = list(load_photos(options.photos if options else "jpeg").items())
    environment.benchmark_users_started = 0
    _record_latencies(environment)


def _record_latencies(environment) -> None:
    """Keep each successful request's latency (ms) in environment.benchmark_latencies_ms, from Locust's
    statistics reset on (--reset-stats, when spawning completes); at quit, after the users stopped, write
    them to --latencies-file and Locust's totals to --totals-file, both of the same final state."""
    kept = environment.benchmark_latencies_ms = []

    def on_request(response_time, exception=None, **_kwargs) -> None:
        if exception is None:  # a success; Triton's users and FastAPI's all report here
            kept.append(response_time)

    def on_spawning_complete(**_kwargs) -> None:
        if environment.reset_stats:
            kept.clear()

    def on_quitting(**_kwargs) -> None:
        options = environment.parsed_options
        if options and options.latencies_file:
            with open(options.latencies_file, "w") as f:
                f.writelines(f"{ms:.3f}\n" for ms in kept)
        if options and options.totals_file:
            total = environment.stats.total
            with open(options.totals_file, "w") as f:
                json.dump({"requests": total.num_requests, "failures": total.num_failures,
                           "start": total.start_time, "end": total.last_request_timestamp}, f)

    environment.events.request.add_listener(on_request)
    environment.events.spawning_complete.add_listener(on_spawning_complete)
    environment.events.quitting.add_listener(on_quitting)


class _Photos:
    """Random photo per request; each user has its own random stream, seeded by (--seed, its start order)."""

    def on_start(self) -> None:
        options = self.environment.parsed_options
        self.top_k = options.top_k if options else 5
        self.environment.benchmark_users_started += 1
        self.rng = random.Random(f"{options.seed if options else 0}/{self.environment.benchmark_users_started}")
        self.photos = self.environment.benchmark_photos

    def photo(self) -> tuple[str, bytes]:
        return self.rng.choice(self.photos)


class TritonUser(_Photos, User):
    abstract = True
    protocol = "grpc"
    wait_time = constant(0)

    def on_start(self) -> None:
        super().on_start()
        options = self.environment.parsed_options
        self.model = options.triton_model if options else DEFAULT_MODEL
        self.client = ImageClassifierClient(self.host, protocol=self.protocol, model=self.model,
                                            inference_key=inference_key_for(self.host))

    def on_stop(self) -> None:
        self.client.close()

    @task
    def classify(self) -> None:
        _, data = self.photo()
        exception = None
        start = time.perf_counter()
        try:
            top = self.client.classify([data], top_k=self.top_k)
            if len(top) != 1 or len(top[0]) != self.top_k:
                raise RuntimeError(f"expected 1 x {self.top_k} predictions, got {[len(t) for t in top]}")
        except Exception as exc:  # reported to Locust as a failure, never raised into the user loop
            exception = exc
        # response_length stays 0: tritonclient does not expose the size of the reply it decoded
        self.environment.events.request.fire(
            request_type=self.protocol, name=f"triton {self.model}", response_time=(time.perf_counter() - start) * 1000,
            response_length=0, exception=exception, context={})


class TritonGrpcUser(TritonUser):
    protocol = "grpc"


class TritonHttpUser(TritonUser):
    protocol = "http"


class FastAPIUser(_Photos, FastHttpUser):
    wait_time = constant(0)

    def on_start(self) -> None:
        super().on_start()

    @task
    def classify(self) -> None:
        _, data = self.photo()
        with self.client.post(f"/classify?top_k={self.top_k}", data=data, name="fastapi /classify",
                              headers={"Content-Type": "application/octet-stream"}, catch_response=True) as r:
            if r.status_code != 200:
                r.failure(f"HTTP {r.status_code}: {r.text[:200]}")
            elif len(r.json().get("predictions", [])) != self.top_k:
                r.failure(f"expected {self.top_k} predictions: {r.text[:200]}")
