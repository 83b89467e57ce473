"""Bounded queues: the spec's queue policy in every generated config (defaults derived from instances and
batches), and a real server flooded past a small queue answering only successes or a clear "busy"
(HTTP 503 / gRPC UNAVAILABLE, ServerBusy in the clients), nothing else, and serving again afterwards."""
from __future__ import annotations

import collections
import dataclasses
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from build.repository import configs
from build.repository.spec import (DEFAULT_QUEUE_TIMEOUT_US, PREPROCESS_NICE, QUEUE_BATCHES, STUB_NICE, DeploymentSpec,
                                   StageSpec)
from clients.client import BUSY_MESSAGES  # a full queue, or a wait past the queue timeout
from common.contract import CLASSIFIER, ENSEMBLE

SHAPE = configs.ModelShape(input_dims=(3, 32, 32), num_classes=3)
REJECT = model_config_pb2.ModelQueuePolicy.REJECT


def parse(text: str) -> model_config_pb2.ModelConfig:
    return text_format.Parse(text, model_config_pb2.ModelConfig())


def policy(text: str) -> model_config_pb2.ModelQueuePolicy:
    cfg = parse(text)
    assert cfg.dynamic_batching.HasField("default_queue_policy"), text
    return cfg.dynamic_batching.default_queue_policy


def test_default_queues_are_derived_from_instances_and_batches():
    spec = DeploymentSpec.load("configs/deployment.json")
    pre, cls = spec.preprocess, spec.classifier
    first = QUEUE_BATCHES * pre.instances * spec.max_batch_size  # a burst of max batches is served
    p = policy(configs.preprocess_config(spec, SHAPE, "test"))
    assert (p.max_queue_size, p.default_timeout_microseconds) == (first, DEFAULT_QUEUE_TIMEOUT_US)
    assert p.timeout_action == REJECT and p.allow_timeout_override
    # the classifier takes a max batch from every preprocess instance at once
    c = policy(configs.classifier_config(spec, SHAPE, "python-onnxruntime", "test"))
    assert c.max_queue_size == pre.instances * spec.max_batch_size and c.timeout_action == REJECT
    assert c.default_timeout_microseconds == DEFAULT_QUEUE_TIMEOUT_US  # bounds the wait behind preprocess too
    fused = policy(configs.fused_config(spec, SHAPE, "test"))
    assert fused.max_queue_size == QUEUE_BATCHES * spec.fused.instances * spec.max_batch_size
    assert cls.max_queue_size is None  # the committed spec leaves the bound to the rule above


def test_explicit_queue_settings_and_zero_for_unbounded():
    spec = DeploymentSpec(preprocess=StageSpec(instances=1, max_queue_size=5, queue_timeout_us=250_000),
                          classifier=StageSpec(max_queue_size=0, queue_timeout_us=0))
    p = policy(configs.preprocess_config(spec, SHAPE, "test"))
    assert (p.max_queue_size, p.default_timeout_microseconds) == (5, 250_000)
    assert not parse(configs.classifier_config(spec, SHAPE, "onnxruntime", "test")).dynamic_batching.HasField(
        "default_queue_policy")  # 0 and 0: Triton's unbounded queue, no policy written
    open_door = DeploymentSpec(preprocess=StageSpec(instances=2, max_queue_size=0),  # behind an unbounded door,
                               classifier=StageSpec(instances=2))                    # no bound
    assert open_door.queue_policy("classifier") == (0, DEFAULT_QUEUE_TIMEOUT_US)
    # one instance derives no policy (Triton 2.51 stalls it behind one); set by hand, it is written all the same
    assert DeploymentSpec(preprocess=StageSpec(instances=1)).queue_policy("preprocess") == (0, 0)
    with pytest.raises(ValueError, match="preprocess.max_queue_size must be >= 0"):
        DeploymentSpec(preprocess=StageSpec(max_queue_size=-1))
    with pytest.raises(ValueError, match="classifier.queue_timeout_us must be >= 0"):
        DeploymentSpec.from_dict({"classifier": {"queue_timeout_us": -5}})


def test_response_cache_marks_the_ensemble_only():
    plain, cached = DeploymentSpec(), DeploymentSpec(response_cache_mb=64)
    assert not parse(configs.ensemble_config(plain, SHAPE, "test")).HasField("response_cache")
    assert parse(configs.ensemble_config(cached, SHAPE, "test")).response_cache.enable
    assert not parse(configs.classifier_config(cached, SHAPE, "onnxruntime", "test")).HasField("response_cache")
    with pytest.raises(ValueError, match="response_cache_mb must be >= 0"):
        DeploymentSpec(response_cache_mb=-1)


def test_the_overload_benchmark_opens_every_queue():
    from benchmarks.overload import unbounded

    spec = unbounded(DeploymentSpec.load("configs/deployment.json"))
    for stage in ("preprocess", "classifier", "fused"):
        assert spec.queue_policy(stage) == (0, 0)


def test_the_overload_benchmarks_servers_differ_only_in_the_stubs_nice_or_the_doors_size(tiny_artifacts, tmp_path):
    from benchmarks.overload import CONFIGS, budget_door, write_repositories
    from build.repository.writer import write_repository

    served = tmp_path / "served"
    write_repository(DeploymentSpec(artifacts=str(tiny_artifacts)), "python-onnxruntime", served, "tests")
    with pytest.raises(ValueError, match="budget-door needs its door's size"):
        write_repositories(served, tmp_path / "no_door")
    door = budget_door(95.0, 100.0)
    assert door == 9 and budget_door(5.0, 100.0) == 1
    repos = write_repositories(served, tmp_path / "bench", door=door)
    assert set(repos) == set(CONFIGS)

    def read(config: str, model: str) -> model_config_pb2.ModelConfig:
        return parse((repos[config] / model / "config.pbtxt").read_text())

    # same-priority: every stub at the server's; flat-stubs: preprocess at the classifier's
    for config, expected in (("same-priority", {"preprocess": 0, "classifier": 0}),
                             ("flat-stubs", {"preprocess": STUB_NICE, "classifier": STUB_NICE})):
        for model in ("preprocess", "classifier"):
            bounded, other = read("bounded", model), read(config, model)
            assert int(bounded.parameters["nice"].string_value) == DeploymentSpec().nice(model)
            assert int(other.parameters["nice"].string_value) == expected[model], (config, model)
            other.parameters["nice"].string_value = bounded.parameters["nice"].string_value
            assert other == bounded, (config, model)
    assert DeploymentSpec().nice("preprocess") == PREPROCESS_NICE > STUB_NICE == DeploymentSpec().nice("classifier")
    # budget-door: only the door's (preprocess's) queue bound differs
    assert read("budget-door", "classifier") == read("bounded", "classifier")
    bounded, sized = read("bounded", "preprocess"), read("budget-door", "preprocess")
    assert sized.dynamic_batching.default_queue_policy.max_queue_size == door
    assert bounded.dynamic_batching.default_queue_policy.max_queue_size == DeploymentSpec().queue_policy("preprocess")[0]
    sized.dynamic_batching.default_queue_policy.max_queue_size = bounded.dynamic_batching.default_queue_policy.max_queue_size
    assert sized == bounded


# ---- a real server past its queue -------------------------------------------------------------

@pytest.fixture(scope="module")
def small_queue(tiny_artifacts, tmp_path_factory):
    """One preprocess instance taking one image at a time behind a queue of 2."""
    from build.repository.writer import write_repository
    from serving.server import TritonServer

    one = StageSpec(instances=1, preferred_batch_sizes=[1], max_queue_delay_us=0, threads=1)
    spec = DeploymentSpec(artifacts=str(tiny_artifacts), preprocess=dataclasses.replace(one, max_queue_size=2),
                          classifier=one)
    repo = tmp_path_factory.mktemp("small_queue") / "model_repository"
    write_repository(spec, "python-onnxruntime", repo, "tests")
    with TritonServer(repo, log_file=repo.parent / "tritonserver.log") as server:
        yield server


def flood(url: str, protocol: str, images: list[bytes], requests: int = 240, threads: int = 32) -> collections.Counter:
    """`requests` one-image requests from `threads` threads at once: {outcome: count}."""
    from clients.client import ClassificationError, ImageClassifierClient, ServerBusy

    def one(i: int) -> str:
        with ImageClassifierClient(url, protocol) as client:
            try:
                top = client.classify([images[i % len(images)]], top_k=1)
                return "answer" if len(top) == 1 and len(top[0]) == 1 else "short answer"
            except ServerBusy as exc:
                assert exc.status == "UNAVAILABLE" and any(m in str(exc) for m in BUSY_MESSAGES), str(exc)
                return "busy"
            except ClassificationError as exc:
                return f"{exc.status}: {exc}"

    with ThreadPoolExecutor(threads) as pool:
        return collections.Counter(pool.map(one, range(requests)))


@pytest.mark.slow
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_past_the_queue_the_server_says_busy_and_nothing_else(small_queue, photos, protocol):
    from benchmarks.overload import settled_successes, successes, turned_away_after_preprocess

    images = list(photos.values())
    url = small_queue.http_url if protocol == "http" else small_queue.grpc_url
    # settled: the other protocol's run, just before on the same server, ends with an answer that Triton may count
    # after the client has it (counted here, it was one answer too many: 4 for 3)
    before = settled_successes(small_queue.metrics_url)
    outcomes = flood(url, protocol, images)
    assert set(outcomes) <= {"answer", "busy"}, outcomes
    assert outcomes["busy"] > 0 and outcomes["answer"] > 0, outcomes
    # what the overload benchmark reads from the metrics: the ensemble answered exactly these, and of the busy
    # ones, those that preprocess answered and the classifier did not
    for _ in range(100):  # Triton counts a request when it releases it, which may follow its answer (each model's)
        now = successes(small_queue.metrics_url)
        if min(now[m] - before[m] for m in (ENSEMBLE, CLASSIFIER)) >= outcomes["answer"]:
            break
        time.sleep(0.1)
    answered = settled_successes(small_queue.metrics_url)  # each model's count, not only the ensemble's
    answered.subtract(before)
    assert answered[ENSEMBLE] == answered[CLASSIFIER] == outcomes["answer"], (answered, outcomes)
    assert 0 <= turned_away_after_preprocess(answered) <= outcomes["busy"], (answered, outcomes)
    # afterwards it serves as before
    from clients.client import ImageClassifierClient

    with ImageClassifierClient(url, protocol) as client:
        assert client.is_ready() and len(client.classify([images[0]], top_k=1)) == 1


OPEN_LOOP = """
import json, sys
from benchmarks.overload import use_gevent
use_gevent()
from benchmarks.overload import run_users
from common.samples import sample_photos
images = [path.read_bytes() for path in sample_photos().values()]
o = run_users(sys.argv[1], sys.argv[2], images, int(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5]))
print(json.dumps({"sends": o.sends, "errors": dict(o.errors)}))
"""


@pytest.mark.slow
def test_open_loop_users_stay_spread_over_time(small_queue):
    """The overload benchmark's open-loop users keep their random phases period after period (Locust's
    constant_pacing counts from each user's creation and brings them back into step after one period: one
    burst of every user per period, which a bounded queue mostly turns away)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from benchmarks.overload import BURST_WINDOW_S, Outcomes, drain

    users, pacing, seconds = 20, 1.0, 3.6
    done = subprocess.run([sys.executable, "-c", OPEN_LOOP, small_queue.http_url, ENSEMBLE, str(users), str(seconds),
                           str(pacing)], capture_output=True, text=True, timeout=120, cwd=Path(__file__).parents[2])
    # the requests its users left in flight when they stopped stay queued in the server (the niced preprocess
    # stub on a busy CPU took 10 s to answer two): the next test on this server would find its queue full
    drain(small_queue.metrics_url)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert not result["errors"], result["errors"]
    sends = sorted(result["sends"])
    assert len(sends) >= 3 * users, len(sends)  # every user in every period: busy answers come at once
    later = Outcomes(sends=[t for t in sends if t >= sends[0] + pacing])  # after the first period
    assert len(later.sends) >= 2 * users, len(later.sends)
    assert later.largest_burst() <= users // 2, (later.largest_burst(), BURST_WINDOW_S)


@pytest.mark.slow
def test_the_stubs_run_below_the_server_which_keeps_its_priority(small_queue):
    """Each python model's nice increment (DeploymentSpec.nice), applied in its stub (common/priority.py) to every
    thread it runs, preprocess below the classifier; tritonserver's own threads (HTTP, batching, the "busy"
    answers) stay where they were started."""
    import os
    from pathlib import Path

    import psutil

    from serving.stubs import STUB

    def nice(process: psutil.Process) -> set[int]:
        return {os.getpriority(os.PRIO_PROCESS, t.id) for t in process.threads()}

    server = psutil.Process(small_queue.process.pid)
    (base,) = nice(server)
    stubs = {Path(child.cmdline()[1]).parent.parent.name: child for child in server.children()
             if Path(child.cmdline()[0]).name == STUB}
    assert set(stubs) == {"preprocess", "classifier"}, stubs  # one instance each
    for model, stub in stubs.items():
        assert nice(stub) == {min(19, base + DeploymentSpec().nice(model))}, (model, stub.cmdline())


@pytest.mark.slow
def test_busy_is_http_503_and_grpc_unavailable(small_queue, photos):
    """What Triton 2.51 itself answers through the ensemble, below the project's client."""
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    image = list(photos.values())[0]

    def raw(module, url: str) -> str:
        client = module.InferenceServerClient(url)
        data = module.InferInput("IMAGE", [1, 1], "BYTES")
        data.set_data_from_numpy(np.array([[image]], dtype=np.object_))
        try:
            client.infer("image_classifier", [data])
            return "answer"
        except InferenceServerException as exc:
            return f"{exc.status()} {exc.message()}"
        finally:
            client.close()

    for module, url, busy in ((httpclient, small_queue.http_url, "503"),
                              (grpcclient, small_queue.grpc_url, "StatusCode.UNAVAILABLE")):
        with ThreadPoolExecutor(32) as pool:
            seen = collections.Counter(pool.map(lambda _: raw(module, url), range(160)))
        failures = {k: v for k, v in seen.items() if k != "answer"}
        assert failures and all(k.startswith(busy) and any(m in k for m in BUSY_MESSAGES) for k in failures), seen
        assert any("Exceeds maximum queue size" in k for k in failures), seen


@pytest.mark.slow
def test_the_benchmarks_http_request_and_its_outcomes(small_queue, photos):
    """What benchmarks.overload's Locust users post, answered by a real server, and how it is counted."""
    import urllib.error
    import urllib.request

    from benchmarks.overload import classify_outcome, infer_body

    body, headers = infer_body(photos["coffee"], 2)
    request = urllib.request.Request(f"http://{small_queue.http_url}/v2/models/image_classifier/infer", data=body,
                                     headers=headers, method="POST")
    with urllib.request.urlopen(request, timeout=60) as response:
        assert classify_outcome(response.status, response.read(), 2) == ("accepted", "")
    bad = urllib.request.Request(request.full_url, data=body[:-10], headers=headers, method="POST")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(bad, timeout=60)
    outcome, detail = classify_outcome(refused.value.code, refused.value.read(), 2)
    assert outcome == "error" and detail.startswith("HTTP 400")
    full = b'{"error":"in ensemble \'image_classifier\', Exceeds maximum queue size"}'
    assert classify_outcome(503, full, 2) == ("busy", "queue full")
    assert classify_outcome(503, b'{"error":"in ensemble \'image_classifier\', Request timeout expired"}', 2) == \
        ("busy", "queue timeout")
    assert classify_outcome(503, b'{"error":"something else"}', 2)[0] == "error"


def test_the_overload_benchmark_pins_server_and_load_generator_apart():
    """--server-cpus / --client-cpus: what the server starts inherits its CPUs, Locust keeps its own."""
    import os
    import subprocess
    import sys

    from argparse import ArgumentTypeError

    from benchmarks.overload import cpu_list, cpus

    assert cpu_list("0") == {0} and cpu_list("0-2,5") == {0, 1, 2, 5}
    with pytest.raises(ArgumentTypeError, match="CPU numbers"):
        cpu_list("one")
    mine = os.sched_getaffinity(0)
    first = {min(mine)}
    with cpus(first):
        child = subprocess.run([sys.executable, "-c", "import os; print(sorted(os.sched_getaffinity(0)))"],
                               capture_output=True, text=True, check=True)
        assert os.sched_getaffinity(0) == first
    assert child.stdout.strip() == str(sorted(first)) and os.sched_getaffinity(0) == mine
    with pytest.raises(ValueError, match="not available"):
        with cpus({max(mine) + 1}):
            pass
