"""TLS in the clients, with throwaway certificates (tests/pki.py): a real tritonserver with gRPC SSL, plain and
mutual, and a real TLS-terminating proxy standing for the ingress in front of a real server's HTTP port (Triton's
HTTP endpoint has no TLS of its own). Classified over both, sync, async and by the command line; and each failure
in one line: a certificate file that cannot be read, a server certificate that does not verify or is for another
name, a client certificate asked for or refused, a plain client at a TLS port and a TLS client at a plain one."""
from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import re
import ssl
import subprocess
import sys
from pathlib import Path

import pytest

from clients import endpoint
from clients.client import AsyncImageClassifierClient, ImageClassifierClient, ServerUnavailable
from common.samples import ESPRESSO, sample_photos
from serving.server import TritonServer, free_port
from tests.clients.proxies import TlsTerminator
from tests.pki import Pki, write_pki

ROOT = Path(__file__).resolve().parents[2]
MODES = {"sync": [], "batch": ["--batch"], "async": ["--async"]}


def tls(ca: str | None = None, cert: str | None = None, key: str | None = None):
    """clients.tls.TLS(ca, cert, key)."""
    from clients.tls import TLS

    return TLS(ca, cert, key)


def classify(*args: str) -> subprocess.CompletedProcess:
    coffee = str(sample_photos(["coffee"])["coffee"])
    return subprocess.run([sys.executable, "-m", "clients.classify", coffee, coffee, "--json", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def make_classify(*variables: str) -> subprocess.CompletedProcess:
    """`make classify` with this environment's Python and no setup step."""
    command = ["make", "--no-print-directory", "-C", str(ROOT), f"VENV={Path(sys.executable).parent.parent}", "STAMP=",
               "classify", *variables]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def answered(done: subprocess.CompletedProcess) -> bool:
    """Both photos classified as espresso, exit 0."""
    tops = [json.loads(line).get("top", [{}])[0].get("index") for line in done.stdout.splitlines()]
    return done.returncode == 0 and tops == [ESPRESSO, ESPRESSO]


def one_line(done: subprocess.CompletedProcess) -> str:
    """The run's one error line (exit 1, no traceback, nothing classified)."""
    assert done.returncode == 1 and done.stdout == "" and done.stderr.count("\n") == 1, (done.stdout, done.stderr)
    assert done.stderr.startswith("clients.classify: "), done.stderr
    return done.stderr.removeprefix("clients.classify: ").strip()


def library_failures(url: str, protocol: str, **options) -> list[BaseException]:
    """What a sync and an async client of `url` raise when they classify."""
    coffee = sample_photos(["coffee"])["coffee"].read_bytes()

    async def classify_async():
        async with AsyncImageClassifierClient(url, protocol, **options) as client:
            await client.classify([coffee])

    raised = []
    for call in (lambda: ImageClassifierClient(url, protocol, **options).classify([coffee]),
                 lambda: asyncio.run(classify_async())):
        with pytest.raises(ServerUnavailable) as failure:
            call()
        raised.append(failure.value)
    return raised


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    return write_pki(tmp_path_factory.mktemp("pki"))


def test_tls_url_forms():
    assert endpoint.split_url("https://triton.example/v2/models/image_classifier") == ("http", "triton.example:443")
    assert endpoint.split_url("grpcs://127.0.0.1:8001") == ("grpc", "127.0.0.1:8001")
    assert endpoint.split_url("grpcs://[::1]") == ("grpc", "[::1]:443")
    assert [endpoint.url_tls(u) for u in ("https://h", "grpcs://h", "http://h", "grpc://h", "h:8000")] == [
        True, True, False, False, None]
    with pytest.raises(ValueError, match="says grpc but the protocol is http"):
        endpoint.split_url("grpcs://h", "http")


def test_unreadable_or_unusable_tls_files_are_one_line(pki, tmp_path):
    """Checked before anything is sent: no server is needed."""
    url = f"127.0.0.1:{free_port()}"
    not_pem = tmp_path / "not.pem"
    not_pem.write_text("not a certificate\n")
    missing = str(tmp_path / "missing.pem")
    cases = {
        ("--tls-ca", missing): f"--tls-ca {missing}: cannot read it (No such file or directory)",
        ("--tls-ca", str(tmp_path)): f"--tls-ca {tmp_path}: cannot read it (Is a directory)",
        ("--tls-ca", str(not_pem)): f"--tls-ca {not_pem}: no PEM CA certificate there",
        ("--tls-cert", pki.client_cert): "a client certificate needs both --tls-cert FILE and --tls-key FILE",
        ("--tls-cert", pki.client_cert, "--tls-key", missing): f"--tls-key {missing}: cannot read it",
        ("--tls-cert", pki.client_cert, "--tls-key", pki.stranger_key):
            f"--tls-cert {pki.client_cert} --tls-key {pki.stranger_key}: not a PEM certificate and its private key",
    }
    ways = itertools.cycle([("http", []), ("grpc", ["--async"]), ("grpc", []), ("http", ["--async"])])
    for (args, message), (protocol, mode) in zip(cases.items(), ways):
        line = one_line(classify("--url", url, "--protocol", protocol, *args, *mode))
        assert line.startswith(message), (args, protocol, mode, line)
    with pytest.raises(ValueError, match=r"--tls-ca .*missing\.pem: cannot read it"):
        ImageClassifierClient(url, "grpc", tls=tls(missing))


def test_tls_asked_of_a_plain_url_is_one_line(pki):
    for url in (f"http://127.0.0.1:{free_port()}", f"grpc://127.0.0.1:{free_port()}"):
        for args in (["--tls"], ["--tls-ca", pki.ca]):
            line = one_line(classify("--url", url, *args))
            assert line == f"URL {url!r} says no TLS, but TLS was asked for (--tls, --tls-ca, --tls-cert): use the " \
                           "URL's https:// or grpcs:// form", line


def server_context(cert: str, key: str, client_ca: str | None = None) -> ssl.SSLContext:
    """A TLS server's context; with `client_ca`, it asks for a client certificate that CA signed (mutual TLS)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    if client_ca:
        context.load_verify_locations(client_ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


@contextlib.contextmanager
def terminator(upstream: str, context: ssl.SSLContext):
    proxy = TlsTerminator(upstream, context)
    try:
        yield proxy.url
    finally:
        proxy.close()


@pytest.fixture(scope="module")
def https(server, pki):
    """host:port of TLS (the loopback certificate) in front of the session server's HTTP port."""
    with terminator(server.http_url, server_context(pki.server_cert, pki.server_key)) as url:
        yield url


@contextlib.contextmanager
def grpc_ssl_server(repository: Path, pki: Pki, folder: Path, mutual: bool):
    """A real tritonserver whose gRPC endpoint speaks TLS, with a client certificate its CA signed when `mutual` (its
    HTTP endpoint, which the readiness probe reads, stays plain)."""
    flags = ["--grpc-use-ssl=true", f"--grpc-server-cert={pki.server_cert}", f"--grpc-server-key={pki.server_key}",
             f"--grpc-root-cert={pki.ca}", f"--grpc-use-ssl-mutual={str(mutual).lower()}"]
    log = folder / "tritonserver.log"
    with TritonServer(repository, log_file=log, extra_args=flags) as running:
        yield running
    assert running.process.returncode == 0, f"tritonserver did not shut down cleanly; see {log}"


@pytest.fixture(scope="module")
def grpc_tls(lite0_repository, pki, tmp_path_factory):
    with grpc_ssl_server(lite0_repository, pki, tmp_path_factory.mktemp("grpc_tls"), mutual=False) as running:
        yield running


@pytest.fixture(scope="module")
def grpc_mutual_tls(lite0_repository, pki, tmp_path_factory):
    with grpc_ssl_server(lite0_repository, pki, tmp_path_factory.mktemp("grpc_mutual_tls"), mutual=True) as running:
        yield running


def classified_by_the_library(url: str, protocol: str, **options) -> list[int]:
    """The top class of the coffee photo from a sync and an async client of `url`."""
    coffee = sample_photos(["coffee"])["coffee"].read_bytes()

    async def classify_async():
        async with AsyncImageClassifierClient(url, protocol, **options) as client:
            return (await client.classify([coffee], 1))[0][0].index

    with ImageClassifierClient(url, protocol, **options) as client:
        return [client.classify([coffee], 1)[0][0].index, asyncio.run(classify_async())]


@pytest.mark.slow
def test_grpc_over_tls(grpc_tls, pki):
    address = grpc_tls.grpc_url
    assert classified_by_the_library(f"grpcs://{address}", None, tls=tls(pki.ca)) == [ESPRESSO, ESPRESSO]
    assert classified_by_the_library(address, "grpc", tls=tls(pki.ca)) == [ESPRESSO, ESPRESSO]
    for mode in MODES.values():
        for args in (["--url", f"grpcs://{address}", "--tls-ca", pki.ca],
                     ["--url", address, "--protocol", "grpc", "--tls", "--tls-ca", pki.ca]):
            done = classify(*args, *mode)
            assert answered(done), (args, mode, done.stderr)
        # asked over HTTP (Triton's HTTP has no TLS), its gRPC over TLS is named for what it is
        line = one_line(classify("--url", f"https://{address}", "--tls-ca", pki.ca, *mode))
        assert line.startswith(f"{address} is a gRPC port, not HTTP: use --protocol grpc"), line


@pytest.mark.slow
def test_grpc_over_mutual_tls(grpc_mutual_tls, pki):
    address = grpc_mutual_tls.grpc_url
    mine = tls(pki.ca, pki.client_cert, pki.client_key)
    assert classified_by_the_library(f"grpcs://{address}", None, tls=mine) == [ESPRESSO, ESPRESSO]
    for mode in MODES.values():
        done = classify("--url", f"grpcs://{address}", "--tls-ca", pki.ca, "--tls-cert", pki.client_cert,
                        "--tls-key", pki.client_key, *mode)
        assert answered(done), (mode, done.stderr)
        # Triton sends no alert: a connection without a certificate it trusts just ends after the handshake
        expected = (f"{address} ends TLS connections unanswered after the handshake, as a server that wants a client "
                    "certificate (mutual TLS) does when it gets none or one its CA did not sign: pass --tls-cert FILE "
                    "--tls-key FILE of one it trusts")
        assert one_line(classify("--url", f"grpcs://{address}", "--tls-ca", pki.ca, *mode)) == expected, mode
        stranger = ["--tls-cert", pki.stranger_cert, "--tls-key", pki.stranger_key]
        assert one_line(classify("--url", f"grpcs://{address}", "--tls-ca", pki.ca, *stranger, *mode)) == expected
    # make classify passes the same files on
    coffee = str(sample_photos(["coffee"])["coffee"])
    files = [f"TLS_CA={pki.ca}", f"TLS_CERT={pki.client_cert}", f"TLS_KEY={pki.client_key}"]
    done = make_classify(f"IMAGES={coffee}", f"URL=grpcs://{address}", *files)
    assert done.returncode == 0 and "espresso" in done.stdout, done.stderr
    done = make_classify(f"IMAGES={coffee}", f"URL=grpcs://{address}", *files[:1])
    assert done.returncode != 0 and "--tls-cert" in done.stderr, done.stderr


@pytest.mark.slow
def test_https_through_a_tls_terminating_proxy(server, https, pki):
    assert classified_by_the_library(f"https://{https}", None, tls=tls(pki.ca)) == [ESPRESSO, ESPRESSO]
    for mode in MODES.values():
        for args in (["--url", f"https://{https}/v2/models/image_classifier", "--tls-ca", pki.ca],
                     ["--url", https, "--tls-ca", pki.ca]):
            done = classify(*args, *mode)
            assert answered(done), (args, mode, done.stderr)
    mutual = server_context(pki.server_cert, pki.server_key, client_ca=pki.ca)
    with terminator(server.http_url, mutual) as url:
        mine = tls(pki.ca, pki.client_cert, pki.client_key)
        assert classified_by_the_library(f"https://{url}", None, tls=mine) == [ESPRESSO, ESPRESSO]
        done = classify("--url", f"https://{url}", "--tls-ca", pki.ca, "--tls-cert", pki.client_cert,
                        "--tls-key", pki.client_key)
        assert answered(done), done.stderr
        # the proxy's alert, when it comes before the connection ends, is named; else the end after the handshake
        for args in ([], ["--tls-cert", pki.stranger_cert, "--tls-key", pki.stranger_key, "--async"]):
            line = one_line(classify("--url", f"https://{url}", "--tls-ca", pki.ca, *args))
            assert line.startswith(url) and "client certificate" in line and "--tls-cert" in line, (args, line)


@pytest.mark.slow
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_a_server_certificate_that_does_not_verify_is_one_line(grpc_tls, https, pki, protocol):
    """Signed by a CA the client was not given (another CA, or the system's CAs): the host is named and --tls-ca."""
    address = https if protocol == "http" else grpc_tls.grpc_url
    url = f"{'https' if protocol == 'http' else 'grpcs'}://{address}"
    expected = rf"the TLS certificate of {address} does not verify \(.+\): pass --tls-ca FILE, the CA that signed it"
    for ca in (["--tls-ca", pki.other_ca], []):
        for mode in MODES.values():
            line = one_line(classify("--url", url, *ca, *mode))
            assert re.fullmatch(expected, line), (ca, mode, line)
    for error in library_failures(url, None, tls=tls(pki.other_ca)):
        assert re.fullmatch(expected, str(error)), error


@pytest.mark.slow
def test_a_server_certificate_for_another_name_is_one_line(server, pki):
    with terminator(server.http_url, server_context(pki.elsewhere_cert, pki.elsewhere_key)) as address:
        expected = (rf"the TLS certificate of {address} is not for 127\.0\.0\.1 \(.+\): connect by a host name or "
                    "address the certificate lists")
        for mode in MODES.values():
            line = one_line(classify("--url", f"https://{address}", "--tls-ca", pki.ca, *mode))
            assert re.fullmatch(expected, line), (mode, line)


@pytest.mark.slow
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_a_plain_client_at_a_tls_port_is_one_line(grpc_tls, https, protocol):
    address = https if protocol == "http" else grpc_tls.grpc_url
    scheme = "https" if protocol == "http" else "grpcs"
    expected = (f"{address} speaks TLS: use {scheme}://{address} (or --tls), with --tls-ca FILE where a private CA "
                "signed its certificate")
    for mode in MODES.values():
        assert one_line(classify("--url", address, "--protocol", protocol, *mode)) == expected, mode
    assert [str(e) for e in library_failures(address, protocol)] == [expected, expected]


@pytest.mark.slow
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_a_tls_client_at_a_plain_port_is_one_line(server, pki, protocol):
    address = server.http_url if protocol == "http" else server.grpc_url
    scheme = "https" if protocol == "http" else "grpcs"
    port = "a Triton HTTP port" if protocol == "http" else "a gRPC port"
    expected = (f"{address} answers without TLS ({port}): use {protocol}://{address} without --tls and the --tls-* "
                "files, or the server's TLS port")
    for mode in MODES.values():
        assert one_line(classify("--url", f"{scheme}://{address}", "--tls-ca", pki.ca, *mode)) == expected, mode
    assert [str(e) for e in library_failures(address, protocol, tls=tls(pki.ca))] == [expected, expected]
