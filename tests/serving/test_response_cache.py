"""The response cache as a spec option: a repository built with `response_cache_mb` served with a cache
answers repeated images from it (Triton's hit counters say so) with the same answers; without the
server's cache nothing is cached; `make serve` and serving.supervise (the images' entrypoint) turn the cache on
from the repository. Real servers."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from benchmarks.response_cache import cache_counts, distinct_images, metrics_text
from serving.cache import cache_args, repository_cache_mb
from serving.server import Ports, TritonServer, free_port
from serving.supervise import with_cache
from serving.tritonserver import build_command, locate_server

ROOT = Path(__file__).resolve().parents[2]
MODEL = "image_classifier"


def test_cache_flags():
    assert cache_args(0) == []
    assert cache_args(16) == [f"--cache-config=local,size={16 << 20}"]
    with pytest.raises(ValueError, match=">= 0"):
        cache_args(-1)
    # the launcher points a cache at the wheel's libraries (Triton looks in /opt/tritonserver/caches otherwise)
    install = locate_server()
    assert (install.cache_directory / "local" / "libtritoncache_local.so").is_file()
    given = ["--backend-directory=/b", "--cache-config=local,size=1"]
    assert f"--cache-directory={install.cache_directory}" in build_command(given, install)[0]
    ours = [a for a in build_command([*given, "--cache-directory=/c"], install)[0] if a.startswith("--cache-dir")]
    assert ours == ["--cache-directory=/c"]
    assert not [a for a in build_command(given[:1], install)[0] if a.startswith("--cache-directory")]


def test_distinct_images_differ(photos):
    images = distinct_images(list(photos.values())[:3], 12)
    assert len(set(images)) == 12 and all(i[:2] == b"\xff\xd8" for i in images)


@pytest.fixture(scope="module")
def cached_repository(tiny_artifacts, tmp_path_factory) -> Path:
    from build.repository.spec import DeploymentSpec
    from build.repository.writer import write_repository

    repo = tmp_path_factory.mktemp("cached") / "model_repository"
    write_repository(DeploymentSpec(artifacts=str(tiny_artifacts), response_cache_mb=16), "python-onnxruntime", repo,
                     "tests")
    assert repository_cache_mb(repo) == 16 and repository_cache_mb(repo.parent) == 0
    return repo


def send_each(url: str, protocol: str, images: list[bytes], times: int) -> list[np.ndarray]:
    from clients.client import ImageClassifierClient

    with ImageClassifierClient(url, protocol) as client:
        return [client.probabilities([image]) for _ in range(times) for image in images]


@pytest.mark.slow
def test_repeated_images_hit_the_cache_with_identical_answers(cached_repository, photos):
    images = list(photos.values())[:4]
    with TritonServer(cached_repository, log_file=cached_repository.parent / "cached.log",
                      extra_args=cache_args(repository_cache_mb(cached_repository))) as server:
        answers = send_each(server.http_url, "http", images, 3) + send_each(server.grpc_url, "grpc", images, 1)
        hits, misses = cache_counts(metrics_text(server.metrics_url), MODEL)
        with_labels = send_each(server.grpc_url, "grpc", images[:1], 1)[0]
    assert (hits, misses) == (3 * len(images), len(images))
    for i, answer in enumerate(answers):  # a hit returns the very probabilities its first request computed
        assert np.array_equal(answer, answers[i % len(images)])
    assert np.array_equal(with_labels, answers[0])


@pytest.mark.slow
def test_without_the_servers_cache_nothing_is_cached(cached_repository, photos):
    images = list(photos.values())[:2]
    with TritonServer(cached_repository, log_file=cached_repository.parent / "uncached.log") as server:
        send_each(server.grpc_url, "grpc", images, 2)
        assert cache_counts(metrics_text(server.metrics_url), MODEL) == (0, 0)


@pytest.mark.slow
def test_make_serve_starts_the_cache_the_repository_asks_for(cached_repository, tmp_path, photos):
    ports = Ports.free()
    make = ["make", "--no-print-directory", "-f", str(ROOT / "Makefile"), "-C", str(tmp_path),
            f"VENV={Path(sys.executable).parent.parent}", "STAMP="]
    serve = subprocess.run([*make, "serve", f"REPOSITORY={cached_repository}", f"HTTP_PORT={ports.http}",
                            f"GRPC_PORT={ports.grpc}", f"METRICS_PORT={ports.metrics}", f"WATCHDOG_PORT={free_port()}"],
                           capture_output=True, text=True, timeout=240)
    assert serve.returncode == 0, serve.stderr
    try:
        send_each(f"127.0.0.1:{ports.grpc}", "grpc", [photos["coffee"]], 3)
        metrics = metrics_text(f"http://127.0.0.1:{ports.metrics}/metrics")
        assert cache_counts(metrics, MODEL) == (2, 1)
    finally:
        stop = subprocess.run([*make, "stop"], capture_output=True, text=True, timeout=120)
    assert stop.returncode == 0, stop.stderr


def test_the_supervisor_asks_for_the_cache_its_repository_wants(cached_repository):
    command = ["tritonserver", f"--model-repository={cached_repository}", "--http-port=8000"]
    assert with_cache(command) == ([*command, f"--cache-config=local,size={16 << 20}"], 16)
    for unchanged in ([*command, "--cache-config=local,size=1"], ["tritonserver", "--model-repository=s3://b/r"],
                      ["tritonserver", f"--model-repository={cached_repository.parent}"],
                      ["sleep", f"--model-repository={cached_repository}"]):
        assert with_cache(unchanged) == (unchanged, 0)


@pytest.mark.slow
def test_the_supervisor_starts_the_cache_the_repository_asks_for(cached_repository, tmp_path, photos):
    """Before, only `make serve` did: the images and manifests (serving.supervise) served it uncached."""
    import signal

    from tests.serving.test_supervise import Supervised

    with Supervised(cached_repository, tmp_path / "supervise.log", restarts=0) as supervised:
        send_each(f"127.0.0.1:{supervised.ports.grpc}", "grpc", [photos["coffee"]], 3)
        metrics = metrics_text(f"http://127.0.0.1:{supervised.ports.metrics}/metrics")
        supervised.process.send_signal(signal.SIGTERM)
        assert supervised.process.wait(90) == 0
    assert cache_counts(metrics, MODEL) == (2, 1)
    assert "response cache: 16 MiB, as the repository's BUILD.json asks" in supervised.log.read_text()
