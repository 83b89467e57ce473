"""The served ensemble answers exactly like an in-process ONNX Runtime run of the same model."""
import asyncio
import json
import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image
import io

from clients.client import AsyncImageClassifierClient, ImageClassifierClient
from common.preprocessing import PreprocessConfig, load_batch
from common.samples import CAT_CLASSES, ESPRESSO

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def reference(lite0_artifacts, photos):
    """Probabilities from ONNX Runtime in this process, through the same preprocessing."""
    config = PreprocessConfig.load(lite0_artifacts / "preprocess.json")
    session = ort.InferenceSession(str(lite0_artifacts / "model.onnx"), providers=["CPUExecutionProvider"])
    (probabilities,) = session.run(["probabilities"], {"images": load_batch(list(photos.values()), config)})
    return probabilities


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_served_answers_match_in_process_onnxruntime(server, photos, reference, lite0_artifacts, protocol):
    sizes = {Image.open(io.BytesIO(b)).size for b in photos.values()}
    assert len(sizes) > 3  # one request carries images of different sizes
    url = server.http_url if protocol == "http" else server.grpc_url
    labels = (lite0_artifacts / "labels.txt").read_text().splitlines()
    with ImageClassifierClient(url, protocol) as client:
        assert client.is_ready()
        probabilities = client.probabilities(list(photos.values()))
        top5 = client.classify(list(photos.values()), top_k=5)
    np.testing.assert_allclose(probabilities, reference, atol=1e-5)
    for row, ref in zip(top5, reference):
        assert [p.index for p in row] == list(np.argsort(-ref, kind="stable")[:5])
        assert [p.label for p in row] == [labels[p.index] for p in row]
        np.testing.assert_allclose([p.score for p in row], np.sort(ref)[::-1][:5], atol=1e-5)  # printed as text
    names = list(photos)
    assert CAT_CLASSES & {p.index for p in top5[names.index("chelsea")][:3]}
    assert top5[names.index("coffee")][0].index == ESPRESSO


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_async_client_concurrent_requests(server, photos, reference, protocol):
    url = server.http_url if protocol == "http" else server.grpc_url
    names = list(photos)

    async def run():
        async with AsyncImageClassifierClient(url, protocol) as client:
            assert await client.is_ready()
            return await asyncio.gather(*(client.classify([photos[n]], top_k=3) for n in names))

    results = asyncio.run(run())
    for name, ref, (top,) in zip(names, reference, results):
        assert [p.index for p in top] == list(np.argsort(-ref, kind="stable")[:3]), name


def test_cli_prints_predictions_and_names_failing_images(server, tmp_path):
    from common.samples import sample_photos

    paths = sample_photos(["chelsea", "coffee"])
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"definitely not a jpeg")
    cli = [sys.executable, "-m", "clients.classify", "--url", server.grpc_url, "--protocol", "grpc"]
    ok = subprocess.run([*cli, "--json", "--top-k", "3", *map(str, paths.values())],
                        capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    lines = [json.loads(line) for line in ok.stdout.splitlines()]
    assert [len(line["top"]) for line in lines] == [3, 3]
    assert lines[1]["top"][0]["index"] == ESPRESSO
    failed = subprocess.run([*cli, "--batch", str(paths["coffee"]), str(bad)], capture_output=True, text=True,
                            timeout=60)
    assert failed.returncode == 1
    assert f"{bad}: ERROR" in failed.stderr and "not a recognised image format" in failed.stderr


@pytest.mark.parametrize("mode", [[], ["--batch"], ["--async"]])
def test_cli_answers_every_argument(server, tmp_path, mode):
    """A path given twice is answered twice, in order; a file that cannot be read fails alone."""
    from common.samples import sample_photos

    coffee, chelsea = map(str, sample_photos(["coffee", "chelsea"]).values())
    missing = str(tmp_path / "missing.jpg")
    cli = [sys.executable, "-m", "clients.classify", "--url", server.grpc_url, "--protocol", "grpc", "--json"]
    done = subprocess.run([*cli, *mode, coffee, missing, chelsea, coffee], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 1, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert [line["image"] for line in lines] == [coffee, missing, chelsea, coffee]
    assert "cannot read the file" in lines[1]["error"]
    assert lines[0]["top"][0]["index"] == lines[3]["top"][0]["index"] == ESPRESSO
    assert "top" in lines[2]


def listening_addresses(port: int) -> set[str]:
    """Local addresses of sockets listening on `port`, read from /proc (IPv4 and IPv6)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            next(f)
            for line in f:
                local, state = line.split()[1], line.split()[3]
                address, hexport = local.split(":")
                if state == "0A" and int(hexport, 16) == port:  # 0A = LISTEN
                    found.add(address)
    return found


def test_server_binds_to_loopback_only(server):
    loopback = {"0100007F", "0000000000000000FFFF00000100007F", "00000000000000000000000001000000"}
    for port in (server.ports.http, server.ports.grpc, server.ports.metrics):
        addresses = listening_addresses(port)
        assert addresses and addresses <= loopback, (port, addresses)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_no_server_is_the_same_error_over_both_protocols(photos, protocol):
    """Nothing listening: both clients, sync and async, raise ClassificationError (not a bare OSError
    over HTTP) naming the server as unreachable, and it is not the client's fault."""
    from clients.client import ClassificationError
    from serving.server import free_port

    url = f"127.0.0.1:{free_port()}"
    with ImageClassifierClient(url, protocol, timeout_s=5) as client:
        with pytest.raises(ClassificationError) as info:
            client.classify([photos["coffee"]])
    assert "UNAVAILABLE" in info.value.status and not info.value.is_client_error

    async def run_async():
        async with AsyncImageClassifierClient(url, protocol, timeout_s=5) as client:
            await client.classify([photos["coffee"]])

    with pytest.raises(ClassificationError) as info:
        asyncio.run(run_async())
    assert "UNAVAILABLE" in info.value.status and not info.value.is_client_error
