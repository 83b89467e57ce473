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
from serving.server import Ports, TritonServer

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
                 f"GRPC_PORT={ports.grpc}", f"METRICS_PORT={ports.metrics}")
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

    from serving.server import free_port

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
