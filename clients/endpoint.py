"""Where a client connects, and what answers there when a request fails.

`split_url` accepts what people paste: `127.0.0.1:8000`, `http://127.0.0.1:8000`,
`grpc://127.0.0.1:8001` or the model URL `make serve` prints. `what_answers` tells a Triton HTTP
port, a gRPC port, Triton's metrics port, another server, a port that accepts and answers nothing,
nothing at all and a host name that does not resolve apart (one or two plain requests), and
`wrong_endpoint` turns that into one line that names what answered and what to use instead. Triton's own
defaults: HTTP 8000, gRPC 8001, metrics 8002.
"""
from __future__ import annotations

import socket
from urllib.parse import urlsplit

PROTOCOLS = ("http", "grpc")
DEFAULT_URLS = {"http": "127.0.0.1:8000", "grpc": "127.0.0.1:8001"}
DEFAULT_PORTS = {"http": 8000, "grpc": 8001}
NAMES = {"http": "HTTP", "grpc": "gRPC"}

UNRESOLVED, NOTHING, SILENT, TRITON_HTTP, GRPC, METRICS, OTHER_HTTP, OTHER = (
    "unresolved", "nothing", "silent", "Triton HTTP", "gRPC", "Triton metrics", "other HTTP", "other")


def split_url(url: str, protocol: str | None = None) -> tuple[str, str]:
    """(protocol, host:port) from a URL with or without a scheme; the scheme, if any, must agree with
    `protocol`. A missing port is the protocol's default; a path (`/v2/models/...`) is dropped."""
    parts = urlsplit(url if "://" in url else f"//{url}")
    scheme = parts.scheme or None
    if scheme not in (None, *PROTOCOLS):
        raise ValueError(f"URL {url!r}: scheme {scheme!r} is not supported; use host:port, http://host:port "
                         "or grpc://host:port (no TLS)")
    if scheme and protocol and scheme != protocol:
        raise ValueError(f"URL {url!r} says {scheme} but the protocol is {protocol}: drop the scheme or the protocol")
    protocol = scheme or protocol or "http"
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol {protocol!r} is not one of {PROTOCOLS}")
    if not parts.hostname:
        raise ValueError(f"URL {url!r} names no host; expected host:port, e.g. {DEFAULT_URLS[protocol]}")
    try:
        port = parts.port
    except ValueError as exc:  # a port that is not a number
        raise ValueError(f"URL {url!r}: {exc}") from None
    if port == 0:
        raise ValueError(f"URL {url!r}: port 0 is no server's port; expected host:port, e.g. {DEFAULT_URLS[protocol]}")
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return protocol, f"{host}:{DEFAULT_PORTS[protocol] if port is None else port}"


def _get(address: str, path: str, timeout: float) -> bytes | None:
    """The first bytes answered to a plain HTTP/1.1 GET of `path`; None if nothing accepts the connection.
    A host name that does not resolve raises socket.gaierror."""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout) as s:
            s.sendall(f"GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n".encode())
            reply = b""
            while len(reply) < 4096 and (chunk := s.recv(4096)):
                reply += chunk
            return reply
    except socket.gaierror:
        raise
    except ConnectionRefusedError:
        return None
    except OSError:  # reset, timeout: something is there
        return b""


def _is_http2(reply: bytes) -> bool:
    """An HTTP/2 server (gRPC) opens with a SETTINGS frame (type 4) on stream 0, whatever it was sent."""
    return len(reply) >= 9 and reply[3] == 4 and reply[5:9] == b"\0\0\0\0"


def what_answers(address: str, timeout: float = 3.0) -> str:
    """UNRESOLVED, NOTHING, SILENT, TRITON_HTTP, GRPC, METRICS, OTHER_HTTP or OTHER, from what `address` answers."""
    try:
        reply = _get(address, "/metrics", timeout)
    except socket.gaierror:
        return UNRESOLVED
    if reply is None:
        return NOTHING
    if not reply:  # accepted, then closed, reset or timed out without a byte
        return SILENT
    if _is_http2(reply):
        return GRPC
    if not reply.startswith(b"HTTP/"):
        return OTHER
    if reply.split(b"\r\n", 1)[0].split()[1:2] == [b"200"] and b"nv_" in reply:
        return METRICS  # Triton's metrics port answers any path with Prometheus text
    server = _get(address, "/v2", timeout) or b""
    return TRITON_HTTP if b'"name":"triton"' in server.replace(b" ", b"") else OTHER_HTTP


def wrong_endpoint(address: str, protocol: str, answer: str) -> str | None:
    """One line naming what answers at `address` and what to use instead; None if it is the right endpoint."""
    other = "grpc" if protocol == "http" else "http"
    ports = f"the server's {NAMES[protocol]} port (Triton's default: {DEFAULT_PORTS[protocol]})"
    if answer == UNRESOLVED:
        return f"the host name of {address} does not resolve: check the host in --url host:port"
    if answer == NOTHING:
        return (f"nothing listens at {address} ({NAMES[protocol]}): start the server (make serve) "
                "or pass --url host:port of a running one")
    if answer == SILENT:
        return (f"{address} accepts connections but answers nothing: a server that is stopping or hung, or the "
                "python stubs of a killed tritonserver still holding its port (look for triton_python_backend_stub "
                "processes)")
    if answer == (GRPC if protocol == "grpc" else TRITON_HTTP):
        return None
    if answer in (GRPC, TRITON_HTTP):
        return (f"{address} is a {answer} port, not {NAMES[protocol]}: use --protocol {other} with this URL, "
                f"or {ports}")
    if answer == METRICS:
        return (f"{address} is Triton's metrics port (Prometheus /metrics only): use the HTTP port "
                f"(default {DEFAULT_PORTS['http']}) or the gRPC port (default {DEFAULT_PORTS['grpc']}) of that server")
    kind = ("an HTTP server that is not Triton" if answer == OTHER_HTTP
            else "something that speaks neither HTTP nor gRPC")
    return f"{address} is {kind}: use {ports}"
