"""The admin key: restricted APIs (model control, config, shared memory, statistics, trace, logging)
answer only with it, over HTTP and gRPC; health, metadata and inference need none; `make serve` makes a
fresh 0600 key, its clients send it, `make stop` removes it. Real servers on loopback."""
from __future__ import annotations

import dataclasses
import json
import stat
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from serving import access
from serving.server import Ports, TritonServer, free_port

ROOT = Path(__file__).resolve().parents[2]
MODEL = "image_classifier"


def test_key_file_is_fresh_and_owner_only(tmp_path):
    path = tmp_path / ".run" / "admin.key"
    first = access.write_key(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    path.chmod(0o644)
    with open(path) as opened_while_loose:
        second = access.write_key(path)
        assert opened_while_loose.read() == first + "\n"  # the new key never sat in the 0644 file
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and second != first and len(second) >= 32
    assert [p.name for p in path.parent.iterdir()] == ["admin.key"]
    assert access.read_key(path) == second
    assert access.admin_headers(path, "http") == {"triton-admin-key": second}
    assert access.admin_headers(path, "grpc") == {"triton-grpc-protocol-triton-admin-key": second}
    assert access.remove_key(path) and not path.exists() and access.admin_headers(path) == {}
    with pytest.raises(ValueError, match="protocol 'ftp'"):
        access.key_headers("k", "ftp")


@pytest.fixture(scope="module")
def tiny_repository(tiny_artifacts, tmp_path_factory) -> Path:
    from build.repository.spec import DeploymentSpec
    from build.repository.writer import write_repository

    repo = tmp_path_factory.mktemp("protected") / "model_repository"
    write_repository(DeploymentSpec(artifacts=str(tiny_artifacts)), "python-onnxruntime", repo, "tests")
    return repo


KEY = "test-admin-key"


@pytest.fixture(scope="module")
def restricted(tiny_repository):
    with TritonServer(tiny_repository, log_file=tiny_repository.parent / "tritonserver.log",
                      extra_args=access.restricted_args(KEY)) as server:
        yield server


def http_status(url: str, method: str = "GET", headers: dict | None = None, body: bytes | None = None) -> int:
    request = urllib.request.Request(url, method=method, headers=headers or {}, data=body)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


RESTRICTED_HTTP = [  # one call per restricted API: (api, method, path, body)
    ("model-config", "GET", f"/v2/models/{MODEL}/config", None),
    ("statistics", "GET", "/v2/models/stats", None),
    ("model-repository", "POST", "/v2/repository/index", b"{}"),
    ("shared-memory", "GET", "/v2/systemsharedmemory/status", None),
    ("trace", "GET", "/v2/trace/setting", None),
    ("logging", "GET", "/v2/logging", None),
]


@pytest.mark.slow
@pytest.mark.parametrize("api, method, path, body", RESTRICTED_HTTP, ids=[r[0] for r in RESTRICTED_HTTP])
def test_http_restricted_apis_need_the_key(restricted, api, method, path, body):
    url = f"http://{restricted.http_url}{path}"
    assert http_status(url, method, body=body) == 403
    assert http_status(url, method, {access.KEY_HEADER: "wrong"}, body) == 403
    assert http_status(url, method, access.key_headers(KEY, "http"), body) == 200


@pytest.mark.slow
def test_http_health_metadata_and_inference_need_no_key(restricted, photos):
    base = f"http://{restricted.http_url}"
    for path in ("/v2/health/live", "/v2/health/ready", "/v2", f"/v2/models/{MODEL}", f"/v2/models/{MODEL}/ready"):
        assert http_status(base + path) == 200, path
    from clients.client import ImageClassifierClient

    with ImageClassifierClient(restricted.http_url, "http") as client:
        assert client.is_ready() and len(client.classify([photos["coffee"]], top_k=2)[0]) == 2


GRPC_CALLS = {  # restricted API -> a call of it
    "model-config": lambda c, h: c.get_model_config(MODEL, headers=h),
    "statistics": lambda c, h: c.get_inference_statistics(headers=h),
    "model-repository": lambda c, h: c.get_model_repository_index(headers=h),
    "shared-memory": lambda c, h: c.get_system_shared_memory_status(headers=h),
    "trace": lambda c, h: c.get_trace_settings(headers=h),
    "logging": lambda c, h: c.get_log_settings(headers=h),
}


@pytest.mark.slow
def test_grpc_restricted_protocols_need_the_key(restricted, photos):
    assert set(GRPC_CALLS) == set(access.RESTRICTED)
    client = grpcclient.InferenceServerClient(restricted.grpc_url)
    try:
        for api, call in GRPC_CALLS.items():
            # Triton 2.51 answers a missing gRPC key with UNAVAILABLE (not PERMISSION_DENIED), naming the header
            wrong = {access.GRPC_KEY_PREFIX + access.KEY_HEADER: "wrong"}
            for headers in (None, wrong, access.key_headers(KEY, "http")):
                with pytest.raises(InferenceServerException) as denied:
                    call(client, headers)
                assert denied.value.status() == "StatusCode.UNAVAILABLE", api
                assert access.is_restricted_error(denied.value.message()), api
            call(client, access.key_headers(KEY, "grpc"))
        assert client.is_server_ready() and client.is_model_ready(MODEL) and client.get_model_metadata(MODEL)
        image = grpcclient.InferInput("IMAGE", [1, 1], "BYTES")
        image.set_data_from_numpy(np.array([[photos["coffee"]]], dtype=np.object_))
        assert client.infer(MODEL, [image]).as_numpy("PROBABILITIES").shape[0] == 1
    finally:
        client.close()


@pytest.mark.slow
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_project_clients_send_the_key(restricted, protocol):
    from benchmarks.serverstats import snapshot
    from clients.client import ClassificationError, ImageClassifierClient

    url = restricted.http_url if protocol == "http" else restricted.grpc_url
    with ImageClassifierClient(url, protocol) as client:
        with pytest.raises(ClassificationError) as denied:
            client.max_batch_size()
        assert denied.value.status == "PERMISSION_DENIED" and "admin key" in str(denied.value)
    with ImageClassifierClient(url, protocol, admin_key=KEY) as client:
        assert client.max_batch_size() == 32
    with pytest.raises(InferenceServerException):
        snapshot(url, protocol)
    assert MODEL in snapshot(url, protocol, admin_key=KEY)


@pytest.mark.slow
def test_perf_analyzer_sends_the_key(restricted, photos, tmp_path):
    from benchmarks.perf import PerfAnalyzer, PerfAnalyzerError, photo_inputs

    try:
        tool = PerfAnalyzer.locate()
    except PerfAnalyzerError as exc:
        pytest.skip(f"perf_analyzer is not set up here ({exc})")
    inputs = photo_inputs([photos["coffee"]], tmp_path)
    for protocol, url in (("http", restricted.http_url), ("grpc", restricted.grpc_url)):
        with pytest.raises(PerfAnalyzerError, match="restricted"):
            tool.measure(MODEL, url, protocol, 1, tmp_path / f"{protocol}-nokey.csv", inputs, 500, 3, 1000)
        keyed = dataclasses.replace(tool, headers=tuple(access.key_headers(KEY, protocol).items()))
        result = keyed.measure(MODEL, url, protocol, 1, tmp_path / f"{protocol}.csv", inputs, 500, 3, 1000)
        assert result.throughput > 0


def make(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    command = ["make", "--no-print-directory", "-f", str(ROOT / "Makefile"), "-C", str(cwd),
               f"VENV={Path(sys.executable).parent.parent}", "STAMP=", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=240)


@pytest.mark.slow
def test_make_serve_makes_a_key_its_clients_use_and_make_stop_removes_it(tiny_repository, tmp_path, photos):
    ports = Ports.free()
    serve = make(tmp_path, "serve", f"REPOSITORY={tiny_repository}", f"HTTP_PORT={ports.http}",
                 f"GRPC_PORT={ports.grpc}", f"METRICS_PORT={ports.metrics}", f"WATCHDOG_PORT={free_port()}")
    assert serve.returncode == 0, serve.stderr
    key_file = tmp_path / access.KEY_FILE
    try:
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600 and "admin key" in serve.stdout
        key = access.read_key(key_file)
        config = f"http://127.0.0.1:{ports.http}/v2/models/{MODEL}/config"
        assert http_status(config) == 403 and http_status(config, headers=access.key_headers(key, "http")) == 200
        assert http_status(f"http://127.0.0.1:{ports.http}/v2/health/ready") == 200
        assert http_status(f"http://127.0.0.1:{ports.metrics}/metrics") == 200  # Prometheus needs no key
        for protocol in ([], ["PROTOCOL=grpc"]):
            done = make(tmp_path, "classify", *protocol)
            assert done.returncode == 0 and "chelsea" in done.stdout, done.stderr
        images = [str(p) for p in (tmp_path / "a.jpg", tmp_path / "b.jpg")]
        for path, name in zip(images, ("coffee", "chelsea")):
            Path(path).write_bytes(photos[name])
        for protocol in ("http", "grpc"):  # --batch reads max_batch_size from the restricted model config
            batch = subprocess.run([sys.executable, "-m", "clients.classify", *images, "--batch", "--json",
                                    "--protocol", protocol], cwd=tmp_path, capture_output=True, text=True, timeout=60)
            assert batch.returncode == 0, batch.stderr
            assert [json.loads(line)["image"] for line in batch.stdout.splitlines()] == images
    finally:
        stop = make(tmp_path, "stop")
    assert stop.returncode == 0, stop.stderr
    assert not key_file.exists()


@pytest.mark.slow
def test_a_second_start_while_the_first_is_starting_leaves_its_key_and_log_alone(tiny_repository, tmp_path):
    """`make serve` twice at once: the second is refused in one line naming the first, before it writes
    anything, so the first comes up with the key in .run/admin.key and its log whole."""
    import time

    ports = Ports.free()
    cli = [sys.executable, "-m", "serving.server", "start", "--model-repository", str(tiny_repository),
           "--http-port", str(ports.http), "--grpc-port", str(ports.grpc), "--metrics-port", str(ports.metrics),
           "--watchdog-port", str(free_port())]
    key_file, log_file = tmp_path / access.KEY_FILE, tmp_path / ".run" / "tritonserver.log"
    first = subprocess.Popen(cli, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not (log_file.exists() and log_file.stat().st_size) and time.monotonic() < deadline:
            time.sleep(0.05)
        key, logged = access.read_key(key_file), log_file.read_bytes()
        assert key and logged and first.poll() is None
        second = subprocess.run(cli, cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert first.poll() is None, "the first start ended before the second was tried"
        assert second.returncode == 1 and second.stderr.splitlines() == [
            f"serving.server: another `make serve` (pid {first.pid}) is starting a server in .run: wait for it, "
            "or `make stop` once it is up"], second.stderr
        assert access.read_key(key_file) == key and log_file.read_bytes().startswith(logged)
        out, err = first.communicate(timeout=200)
        assert first.returncode == 0, err
        config = f"http://127.0.0.1:{ports.http}/v2/models/{MODEL}/config"
        assert http_status(config, headers=access.key_headers(access.read_key(key_file), "http")) == 200
        assert access.read_key(key_file) == key
    finally:
        if first.poll() is None:  # let it finish, so that stop finds the server it started
            first.communicate(timeout=200)
        stop = subprocess.run([sys.executable, "-m", "serving.server", "stop"], cwd=tmp_path, capture_output=True,
                              text=True, timeout=120)
    assert stop.returncode == 0, stop.stderr


INFERENCE_KEY = "test-inference-key"


@pytest.fixture(scope="module")
def inference_restricted(tiny_repository):
    """The admin APIs behind KEY, inference behind INFERENCE_KEY (`make serve INFERENCE_KEY=1`'s flags)."""
    keys = [*access.restricted_args(KEY), *access.inference_restricted_args(INFERENCE_KEY)]
    with TritonServer(tiny_repository, log_file=tiny_repository.parent / "tritonserver-inference.log",
                      extra_args=keys) as server:
        yield server


@pytest.mark.slow
def test_http_inference_key_guards_inference_alone(inference_restricted):
    base = f"http://{inference_restricted.http_url}"
    infer, config = f"{base}/v2/models/{MODEL}/infer", f"{base}/v2/models/{MODEL}/config"
    body = json.dumps({"inputs": [{"name": "IMAGE", "shape": [1, 1], "datatype": "BYTES", "data": ["x"]}]}).encode()
    inference = access.key_headers(INFERENCE_KEY, "http", access.INFERENCE_KEY_HEADER)
    generate = f"{base}/v2/models/{MODEL}/generate"
    for headers in ({}, access.key_headers(KEY, "http"), {access.INFERENCE_KEY_HEADER: "wrong"}):
        assert http_status(infer, "POST", headers, body) == 403
        assert http_status(generate, "POST", headers, b'{"IMAGE": "x"}') == 403
    assert http_status(infer, "POST", inference, body) == 400  # past the key: the bytes are no image
    assert http_status(generate, "POST", inference, b'{"IMAGE": "x"}') == 400
    assert http_status(config, headers=inference) == 403 and http_status(config, headers=access.key_headers(KEY)) == 200
    for path in ("/v2/health/live", "/v2/health/ready", "/v2", f"/v2/models/{MODEL}", f"/v2/models/{MODEL}/ready"):
        assert http_status(base + path) == 200, path


@pytest.mark.slow
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_project_clients_send_the_inference_key(inference_restricted, protocol, photos):
    import asyncio

    from clients.client import AsyncImageClassifierClient, ClassificationError, ImageClassifierClient

    url = inference_restricted.http_url if protocol == "http" else inference_restricted.grpc_url
    for keys in ({}, {"admin_key": KEY}, {"inference_key": "wrong"}):
        with ImageClassifierClient(url, protocol, **keys) as client:
            assert client.is_ready()  # health and metadata stay open
            with pytest.raises(ClassificationError) as denied:
                client.classify([photos["coffee"]])
            assert denied.value.status == "PERMISSION_DENIED" and "inference key" in str(denied.value), keys
    with ImageClassifierClient(url, protocol, inference_key=INFERENCE_KEY) as client:
        with pytest.raises(ClassificationError, match="admin key"):
            client.max_batch_size()  # the inference key opens inference only
        assert len(client.classify([photos["coffee"], photos["chelsea"]], top_k=2)) == 2

    async def classify(key: str | None):
        async with AsyncImageClassifierClient(url, protocol, inference_key=key) as client:
            return await client.classify([photos["coffee"]], top_k=1)

    with pytest.raises(ClassificationError, match="inference key"):
        asyncio.run(classify(None))
    assert len(asyncio.run(classify(INFERENCE_KEY))[0]) == 1


@pytest.mark.slow
def test_make_serve_inference_key_its_clients_use_and_make_stop_removes_it(tiny_repository, tmp_path, photos,
                                                                            monkeypatch):
    from serving.rollout import served_server

    ports, guard = Ports.free(), free_port()
    where = [f"REPOSITORY={tiny_repository}", f"HTTP_PORT={ports.http}", f"GRPC_PORT={ports.grpc}",
             f"METRICS_PORT={ports.metrics}", f"WATCHDOG_PORT={free_port()}", f"GUARD_PORT={guard}"]
    key_file, admin_file = tmp_path / access.INFERENCE_KEY_FILE, tmp_path / access.KEY_FILE
    serve = make(tmp_path, "serve", *where, "INFERENCE_KEY=1")
    assert serve.returncode == 0, serve.stderr
    try:
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600 and "inference key" in serve.stdout
        key = access.read_key(key_file)
        assert key and key != access.read_key(admin_file)
        image = tmp_path / "coffee.jpg"
        image.write_bytes(photos["coffee"])
        no_key = subprocess.run([sys.executable, "-m", "clients.classify", str(image), "--url",
                                 f"127.0.0.1:{ports.http}"], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert no_key.returncode != 0 and "PERMISSION_DENIED" in no_key.stderr, no_key.stderr  # not make serve's folder
        for protocol in ([], ["PROTOCOL=grpc"]):
            done = make(tmp_path, "classify", *protocol)
            assert done.returncode == 0 and "chelsea" in done.stdout, done.stderr
        for mode in (["--async"], ["--batch"], ["--url", f"127.0.0.1:{guard}"]):  # the guard forwards the key
            run = subprocess.run([sys.executable, "-m", "clients.classify", str(image), *mode, "--json"], cwd=tmp_path,
                                 capture_output=True, text=True, timeout=60)
            assert run.returncode == 0 and json.loads(run.stdout)["image"] == str(image), run.stderr
        monkeypatch.setenv("TRITON_RUN_DIR", str(tmp_path / ".run"))
        server, repository = served_server(None)  # make rollout's checks and A/B arms classify with it
        assert server.inference_key == key and repository == tiny_repository
    finally:
        stop = make(tmp_path, "stop")
    assert stop.returncode == 0, stop.stderr
    assert not key_file.exists() and not admin_file.exists()
    restart = make(tmp_path, "serve", *where)
    try:
        assert restart.returncode == 0, restart.stderr
        assert "inference key" not in restart.stdout
        done = make(tmp_path, "classify")
        assert done.returncode == 0 and "chelsea" in done.stdout, done.stderr
    finally:
        assert make(tmp_path, "stop").returncode == 0


@pytest.mark.slow
def test_perf_sends_the_inference_key_from_the_environment(inference_restricted, tmp_path, monkeypatch):
    from benchmarks.perf import PerfAnalyzer, PerfAnalyzerError, get_args_parser, main

    try:
        PerfAnalyzer.locate()
    except PerfAnalyzerError as exc:
        pytest.skip(f"perf_analyzer is not set up here ({exc})")
    admin = tmp_path / "admin.key"
    admin.write_text(KEY + "\n")
    args = get_args_parser().parse_args([
        "--url", inference_restricted.grpc_url, "--models", MODEL, "--concurrency", "1", "--measurement-ms", "500",
        "--admin-key-file", str(admin), "--out", str(tmp_path / "perf")])
    monkeypatch.delenv(access.INFERENCE_KEY_ENV, raising=False)
    with pytest.raises(PerfAnalyzerError, match=access.INFERENCE_KEY_HEADER):
        main(args)
    monkeypatch.setenv(access.INFERENCE_KEY_ENV, INFERENCE_KEY)
    [result] = main(args)
    assert result.throughput > 0


@pytest.mark.slow
@pytest.mark.parametrize("user_class", ["TritonGrpcUser", "TritonHttpUser"])
def test_locust_users_send_the_inference_key(inference_restricted, user_class, tmp_path):
    import os

    from benchmarks.locust_run import locust_command

    host = inference_restricted.grpc_url if user_class == "TritonGrpcUser" else inference_restricted.http_url
    env = {k: v for k, v in os.environ.items() if k != access.INFERENCE_KEY_ENV}
    totals = {}
    for name, key in (("without", {}), ("with", {access.INFERENCE_KEY_ENV: INFERENCE_KEY})):
        command = locust_command(user_class, host, 1, 2, tmp_path / name, "jpeg", MODEL)
        command[-1:-1] = ["--top-k", "2"]  # the tiny model has 3 classes
        done = subprocess.run(command, env={**env, **key}, capture_output=True, text=True, timeout=120)
        assert done.returncode in (0, 1), done.stderr  # 1: some request failed
        totals[name] = json.loads((tmp_path / f"{name}_totals.json").read_text())
    assert totals["without"]["requests"] > 0 and totals["without"]["failures"] == totals["without"]["requests"]
    assert totals["with"]["requests"] > 0 and totals["with"]["failures"] == 0
