"""clients.classify as people type it: URLs with or without a scheme, wrong ports and a mistyped model named in
one line, --batch beyond max_batch_size, one status vocabulary, output piped into `head -1`, and the README's curl
request. Real server."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from clients.client import ImageClassifierClient, UnknownModel
from common.samples import ESPRESSO, sample_photos
from serving.server import free_port

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


def classify(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "clients.classify", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120)


def coffee() -> str:
    return str(sample_photos(["coffee"])["coffee"])


def espresso_lines(stdout: str) -> list[bool]:
    return [json.loads(line)["top"][0]["index"] == ESPRESSO for line in stdout.splitlines()]


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_url_with_or_without_scheme(server, protocol):
    address = server.http_url if protocol == "http" else server.grpc_url
    urls = [address, f"{protocol}://{address}"] + ([f"http://{address}/v2/models/image_classifier"]
                                                     if protocol == "http" else [])
    for url in urls:
        done = classify(coffee(), "--url", url, *(["--protocol", protocol] if "://" not in url else []), "--json")
        assert done.returncode == 0 and espresso_lines(done.stdout) == [True], (url, done.stderr)
    other = "grpc" if protocol == "http" else "http"
    clash = classify(coffee(), "--url", f"{protocol}://{address}", "--protocol", other)
    assert clash.returncode == 1 and clash.stderr.count("\n") == 1 and "drop the scheme or the protocol" in clash.stderr


WRONG_PORTS = {  # (protocol, port the URL names) -> what the one line must say
    ("http", "grpc"): ["is a gRPC port, not HTTP", "--protocol grpc"],
    ("grpc", "http"): ["is a Triton HTTP port, not gRPC", "--protocol http"],
    ("http", "metrics"): ["metrics port", "HTTP port", "gRPC port"],
    ("grpc", "metrics"): ["metrics port", "HTTP port", "gRPC port"],
}


@pytest.mark.parametrize("mode", [[], ["--batch"], ["--async"]], ids=["sync", "batch", "async"])
@pytest.mark.parametrize("protocol,port", sorted(WRONG_PORTS))
def test_wrong_port_is_named_in_one_line(server, protocol, port, mode):
    url = f"127.0.0.1:{getattr(server.ports, port)}"
    done = classify(coffee(), coffee(), "--url", url, "--protocol", protocol, *mode)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.startswith(f"clients.classify: {url} ") and done.stderr.count("\n") == 1, done.stderr
    for words in WRONG_PORTS[protocol, port]:
        assert words in done.stderr, done.stderr


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_nothing_listening_is_one_line(protocol):
    url = f"127.0.0.1:{free_port()}"
    for mode in ([], ["--async"]):
        done = classify(coffee(), "--url", url, "--protocol", protocol, *mode)
        assert done.returncode == 1 and done.stderr.count("\n") == 1, done.stderr
        assert f"nothing listens at {url}" in done.stderr and "make serve" in done.stderr


def test_batch_splits_at_max_batch_size(server, tmp_path):
    with ImageClassifierClient(server.grpc_url, "grpc") as client:
        size = client.max_batch_size()
    assert size == 32
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image at all")
    paths = [coffee()] * (size + 1) + [str(bad)]  # 34 images: requests of 32 and 2; the bad one in the second
    for protocol in ("http", "grpc"):
        url = server.http_url if protocol == "http" else server.grpc_url
        done = classify(*paths, "--url", url, "--protocol", protocol, "--batch", "--json", "--top-k", "1")
        lines = [json.loads(line) for line in done.stdout.splitlines()]
        assert done.returncode == 1 and len(lines) == size + 2, done.stderr
        assert all(line["top"][0]["index"] == ESPRESSO for line in lines[:size])  # the first request: all answered
        assert lines[-1]["image"] == str(bad) and lines[-1]["status"] == "INVALID_ARGUMENT"
        assert lines[-2]["top"][0]["index"] == ESPRESSO  # the bad one's request partner, resent without it


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_batch_one_bad_image_fails_alone(server, tmp_path, protocol):
    """Before, the good images of a request that one bad image failed were 'not classified' and never resent,
    though the server's message names the bad one ("image 1: ...")."""
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"not an image at all")
    url = server.http_url if protocol == "http" else server.grpc_url
    done = classify(coffee(), str(bad), coffee(), "--url", url, "--protocol", protocol, "--batch", "--json")
    out = [json.loads(line) for line in done.stdout.splitlines()]
    assert done.returncode == 1 and [line.get("status", "ok") for line in out] == ["ok", "INVALID_ARGUMENT", "ok"]
    assert out[1]["image"] == str(bad) and "image 1:" in out[1]["error"], out[1]
    assert out[0]["top"][0]["index"] == ESPRESSO and out[2]["top"][0]["index"] == ESPRESSO


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_json_status_has_one_vocabulary(server, tmp_path, protocol):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image at all")
    url = server.http_url if protocol == "http" else server.grpc_url
    done = classify(str(bad), str(tmp_path / "missing.jpg"), "--url", url, "--protocol", protocol, "--json")
    assert [json.loads(line)["status"] for line in done.stdout.splitlines()] == ["INVALID_ARGUMENT", "NOT_FOUND"]


@pytest.mark.parametrize("mode", [[], ["--batch"], ["--async"]], ids=["sync", "batch", "async"])
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_a_mistyped_model_is_one_line(server, protocol, mode):
    """Before, every image failed alone with the same NOT_FOUND, each request probing the URL first."""
    url = server.http_url if protocol == "http" else server.grpc_url
    done = classify(coffee(), coffee(), coffee(), "--url", url, "--protocol", protocol, "--json",
                    "--model", "no_such_model", *mode)
    assert done.returncode == 1 and done.stdout == "" and done.stderr.count("\n") == 1, (done.stdout, done.stderr)
    assert done.stderr.startswith("clients.classify: ") and "'no_such_model'" in done.stderr, done.stderr
    assert f"at {url}: check the model name (default: image_classifier)" in done.stderr, done.stderr
    with ImageClassifierClient(url, protocol, model="no_such_model") as client:
        with pytest.raises(UnknownModel, match="no_such_model") as raised:
            client.classify([b"x"])
    assert raised.value.status == "NOT_FOUND"


@pytest.mark.parametrize("mode", [[], ["--async"]], ids=["sync", "async"])
def test_output_piped_into_a_reader_that_stops_early_ends_quietly(server, tmp_path, mode):
    """`python -m clients.classify *.jpg | head -1`. Before, the closed pipe was the run's error ('[Errno 32]
    Broken pipe') followed by Python's 'Exception ignored ... BrokenPipeError'. Lines of 1000 predictions each
    fill the pipe within two images: the run is still writing when its reader goes."""
    with open(tmp_path / "stderr", "w+") as stderr:
        run = subprocess.Popen([sys.executable, "-m", "clients.classify", *[coffee()] * 5, "--url", server.http_url,
                                "--json", "--top-k", "1000", *mode], cwd=ROOT, stdout=subprocess.PIPE, stderr=stderr,
                               text=True)
        try:
            first = json.loads(run.stdout.readline())
            run.stdout.close()
            run.wait(timeout=120)
        finally:
            run.kill()
        stderr.seek(0)
        err = stderr.read()
    assert first["top"][0]["index"] == ESPRESSO and len(first["top"]) == 1000
    assert err == "" and run.returncode == 141, (run.returncode, err)


def readme_curl() -> str:
    """The README's curl example, as typed."""
    readme = (ROOT / "README.md").read_text()
    (block,) = [b for b in re.findall(r"```bash\n(.*?)```", readme, re.S) if "curl" in b]
    return block


@pytest.mark.parametrize("shell", ["bash", "sh"])
def test_readme_curl_example(server, shell):
    script = readme_curl()
    assert "127.0.0.1:8000" in script  # make serve's default port; here the test server's
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run([shell, "-c", script.replace("127.0.0.1:8000", server.http_url)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    (output,) = json.loads(done.stdout)["outputs"]
    assert output["name"] == "PROBABILITIES" and output["data"][0].split(":")[1:] == [str(ESPRESSO), "espresso"]
