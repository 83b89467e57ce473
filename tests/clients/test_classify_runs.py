"""clients.classify over whole runs: --async within a small bounded queue, a server killed mid-run, files that
are no images to read (a FIFO, /dev/zero, over the size limit), --max-image-bytes for a server whose limit was
raised, and --batch on a restricted server whatever the URL's spelling, with or without its key. Real servers,
real files."""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import socket
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import psutil
import pytest
from PIL import Image

from build.repository.spec import DeploymentSpec, StageSpec
from common.contract import ImageLimits
from common.samples import ESPRESSO, sample_photos
from serving import access
from serving.server import Ports, TritonServer

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
QUEUE = 8  # clients.classify's default --concurrency


def classify(*args: str, cwd: Path = ROOT, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "clients.classify", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env={**os.environ, **(env or {})})


def coffee() -> str:
    return str(sample_photos(["coffee"])["coffee"])


def lines(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines()]


def tiny_server(artifacts: Path, root: Path, spec: DeploymentSpec, **options) -> TritonServer:
    from build.repository.writer import write_repository

    repo = root / "model_repository"
    write_repository(dataclasses.replace(spec, artifacts=str(artifacts)), "python-onnxruntime", repo, "tests")
    return TritonServer(repo, log_file=root / "tritonserver.log", **options)


@pytest.fixture(scope="module")
def small_queue(tiny_artifacts, tmp_path_factory):
    """One preprocess instance, one image at a time, behind a queue of QUEUE (no timeout: none depends on speed)."""
    one = StageSpec(instances=1, preferred_batch_sizes=[1], max_queue_delay_us=0, threads=1, queue_timeout_us=0)
    spec = DeploymentSpec(preprocess=dataclasses.replace(one, max_queue_size=QUEUE), classifier=one)
    with tiny_server(tiny_artifacts, tmp_path_factory.mktemp("small_queue"), spec) as server:
        yield server


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_async_stays_within_a_small_queue(small_queue, protocol):
    """Before, --async sent every image at once: past the queue, the server turned most of them away as busy."""
    url = small_queue.http_url if protocol == "http" else small_queue.grpc_url
    count = 10 * QUEUE
    done = classify(*[coffee()] * count, "--url", url, "--protocol", protocol, "--async", "--json", "--top-k", "1")
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr)
    assert [line["image"] for line in lines(done.stdout)] == [coffee()] * count
    # more in flight than the queue holds: the busy answers are retried, and all are answered
    over = classify(*[coffee()] * count, "--url", url, "--protocol", protocol, "--async", "--json",
                    "--concurrency", str(2 * QUEUE))
    assert over.returncode == 0 and len(lines(over.stdout)) == count, (over.stdout[-2000:], over.stderr)


def listening(address: str) -> bool:
    """Whether something accepts connections at host:port."""
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except ConnectionRefusedError:
        return False
    return True


@pytest.mark.parametrize("mode", [[], ["--batch"], ["--async"]], ids=["sync", "batch", "async"])
def test_a_server_killed_mid_run_keeps_the_answers_already_printed(tiny_artifacts, tmp_path, mode):
    """Before, every answer was held until the end and a server gone mid-run threw them all away (one line, no
    results). Now they are printed as they come, and the images left each fail with the reason."""
    spec = DeploymentSpec(preprocess=StageSpec(instances=1, preferred_batch_sizes=[1], threads=1))
    count, seen = 200, 40  # --batch: the first request's 32 and then some
    with tiny_server(tiny_artifacts, tmp_path, spec) as server:
        with open(tmp_path / "stderr", "w+") as stderr:
            run = subprocess.Popen([sys.executable, "-m", "clients.classify", *[coffee()] * count, "--url",
                                    server.grpc_url, "--protocol", "grpc", "--json", *mode], cwd=ROOT,
                                   stdout=subprocess.PIPE, stderr=stderr, text=True)
            # The client may see the server gone only once nothing listens on its port (else its probe meets a port
            # that accepts and never answers, not one where nothing listens): a server killed -9 leaves its stubs
            # holding its listening sockets, and a killed process whose main thread is a zombie may still hold them
            # while its other threads exit. So the client is stopped first, then the server and its stubs are
            # killed, and the client goes on once the port refuses connections.
            client, triton = psutil.Process(run.pid), psutil.Process(server.process.pid)
            stubs = triton.children(recursive=True)
            try:
                printed = [json.loads(run.stdout.readline()) for _ in range(seen if mode == ["--batch"] else 5)]
                for process in (client, triton, *stubs):
                    process.suspend()
                for process in (*stubs, triton):
                    process.kill()
                for _ in range(1200):
                    if not listening(server.grpc_url):
                        break
                    time.sleep(0.05)
                client.resume()
                printed += lines(run.stdout.read())  # what the pipe's reader already holds too
                run.wait(timeout=120)
            finally:
                run.kill()
                for stub in stubs:
                    with contextlib.suppress(psutil.Error):
                        stub.kill()
            stderr.seek(0)
            err = stderr.read()
    assert run.returncode == 1 and len(printed) == count and "Traceback" not in err, err
    assert "top" in printed[0] and "top" in printed[4]
    failed = [i for i, line in enumerate(printed) if "error" in line]
    assert failed and failed == list(range(failed[0], count)), failed  # answers first, then only failures
    assert {printed[i]["status"] for i in failed} == {"UNAVAILABLE"}
    assert f"nothing listens at {server.grpc_url}" in printed[-1]["error"]


@pytest.mark.parametrize("mode", [[], ["--batch"], ["--async"]], ids=["sync", "batch", "async"])
def test_files_that_are_no_images_fail_alone_unread(server, tmp_path, mode):
    """Before, every file was read first: a FIFO hung the run and /dev/zero filled the memory."""
    fifo, sparse = tmp_path / "fifo.jpg", tmp_path / "huge.jpg"
    os.mkfifo(fifo)
    with open(sparse, "wb") as f:
        f.truncate(ImageLimits.max_image_bytes + 1)
    done = classify(str(fifo), "/dev/zero", str(sparse), str(tmp_path), coffee(), "--url", server.http_url, "--json",
                    *mode)
    out = lines(done.stdout)
    assert done.returncode == 1 and done.stderr == "" and len(out) == 5, (done.stdout, done.stderr)
    assert [line.get("error") for line in out[:4]] == [
        "not a regular file (a FIFO)", "not a regular file (a character device)",
        f"over the image size limit of {ImageLimits.max_image_bytes} bytes (--max-image-bytes)",
        "not a regular file (a directory)"]
    assert {line["status"] for line in out[:4]} == {"INVALID_ARGUMENT"}
    assert out[4]["top"][0]["index"] == ESPRESSO


def padded_png(size: int) -> bytes:
    """A 64 x 64 PNG of exactly `size` bytes: an ancillary chunk that decoders skip holds the padding."""
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 100, 50)).save(buf, "PNG")
    png = buf.getvalue()
    pad = b"\0" * (size - len(png) - 12)
    chunk = struct.pack(">I", len(pad)) + b"prVt" + pad + struct.pack(">I", zlib.crc32(b"prVt" + pad))
    return png[:-12] + chunk + png[-12:]  # before IEND, the last 12 bytes


def test_max_image_bytes_follows_a_raised_server_limit(tiny_artifacts, tmp_path):
    """A deployment spec may raise limits.max_image_bytes. Before, the CLI still refused locally, unsent, a file
    over the built-in 20 MiB that such a server takes: no option raised its own check."""
    one = StageSpec(instances=1, preferred_batch_sizes=[1], threads=1)
    raised = ImageLimits(max_image_bytes=2 * ImageLimits.max_image_bytes)
    spec = DeploymentSpec(limits=raised, preprocess=one, classifier=one, fused=one)
    big = tmp_path / "big.png"
    big.write_bytes(padded_png(ImageLimits.max_image_bytes + 1))
    with tiny_server(tiny_artifacts, tmp_path, spec) as server:
        for mode in ([], ["--batch"], ["--async"]):
            refused = classify(str(big), "--url", server.http_url, "--json", *mode)
            assert [line.get("error") for line in lines(refused.stdout)] == [
                f"over the image size limit of {ImageLimits.max_image_bytes} bytes (--max-image-bytes)"], refused
            sent = classify(str(big), "--url", server.http_url, "--json", "--max-image-bytes",
                            str(raised.max_image_bytes), *mode)
            assert sent.returncode == 0 and len(lines(sent.stdout)[0]["top"]) > 0, (sent.stdout, sent.stderr)
    bad = classify(str(big), "--max-image-bytes", "0")
    assert bad.returncode == 2 and "argument --max-image-bytes: must be at least 1, got 0" in bad.stderr, bad.stderr


def test_batch_on_the_recorded_server_however_its_address_is_spelt(lite0_repository, tmp_path):
    """`make serve`'s server restricts the model config behind --batch's max_batch_size. Before, its key went to
    '127.0.0.1:PORT' only ('localhost:PORT' was refused) and no other key could be given."""
    ports = Ports.free()
    start = subprocess.run([sys.executable, "-m", "serving.server", "start", "--model-repository",
                            str(lite0_repository), "--http-port", str(ports.http), "--grpc-port", str(ports.grpc),
                            "--metrics-port", str(ports.metrics), "--watchdog-port", "0"],
                           cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert start.returncode == 0, start.stderr
    images = [coffee()] * 33  # two requests of at most 32
    try:
        for url in (f"localhost:{ports.http}", f"grpc://localhost:{ports.grpc}"):
            done = classify(*images, "--url", url, "--batch", "--json", "--top-k", "1", cwd=tmp_path)
            assert done.returncode == 0 and len(lines(done.stdout)) == 33, done.stderr
        key = tmp_path / ".run" / "admin.key"
        elsewhere = tmp_path / "elsewhere"  # no .run/ here: the key comes from the option or the environment
        elsewhere.mkdir()
        for given in (["--admin-key-file", str(key)], []):
            done = classify(*images, "--url", f"localhost:{ports.http}", "--batch", "--json", *given, cwd=elsewhere,
                            env={"TRITON_ADMIN_KEY": key.read_text().strip()} if not given else None)
            assert done.returncode == 0 and len(lines(done.stdout)) == 33, done.stderr
        empty = tmp_path / "empty.key"
        empty.write_text("")
        refused = classify(coffee(), "--url", f"localhost:{ports.http}", "--admin-key-file", str(empty), cwd=elsewhere)
        assert refused.returncode == 1 and refused.stderr == f"clients.classify: --admin-key-file {empty}: no admin " \
                                                             "key there\n"
    finally:
        subprocess.run([sys.executable, "-m", "serving.server", "stop"], cwd=tmp_path, timeout=120)


def test_batch_without_a_key_falls_back_to_the_servers_limit(tiny_artifacts, tmp_path):
    """A restricted server and no key: requests of the spec's default max_batch_size, then of the smaller limit
    the server names in its refusal."""
    one = StageSpec(instances=1, preferred_batch_sizes=[1], threads=1)
    spec = DeploymentSpec(max_batch_size=4, preprocess=one, classifier=one, fused=one)
    restricted = access.restricted_args("a key this client is not given")
    with tiny_server(tiny_artifacts, tmp_path, spec, extra_args=restricted) as server:
        for url in (server.http_url, f"grpc://{server.grpc_url}"):
            done = classify(*[coffee()] * 10, "--url", url, "--batch", "--json", cwd=tmp_path)
            assert done.returncode == 0 and len(lines(done.stdout)) == 10, (done.stdout, done.stderr)
