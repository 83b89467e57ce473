"""Where a client connects, and what answers there when a request fails.

`split_url` accepts what people paste: `127.0.0.1:8000`, `http://127.0.0.1:8000`,
`grpc://127.0.0.1:8001`, the model URL `make serve` prints, or the TLS forms `https://host` and
`grpcs://host:8001` (`url_tls` tells them apart; no port: 443). `what_answers` tells a Triton HTTP
port, a gRPC port, Triton's metrics port, a TLS port, another server, a port that accepts and answers
nothing, nothing at all and a host name that does not resolve apart (one or two plain requests, over
TLS when given an ssl.SSLContext), and `wrong_endpoint` turns that into one line that names what
answered and what to use instead; `diagnose` does both, and over TLS names a certificate that does not
verify, a client certificate asked for or refused, and a server without TLS. Triton's own defaults:
HTTP 8000, gRPC 8001, metrics 8002.
"""
from __future__ import annotations

import socket
import ssl
from urllib.parse import urlsplit

PROTOCOLS = ("http", "grpc")
DEFAULT_URLS = {"http": "127.0.0.1:8000", "grpc": "127.0.0.1:8001"}
DEFAULT_PORTS = {"http": 8000, "grpc": 8001}
NAMES = {"http": "HTTP", "grpc": "gRPC"}
# A URL's scheme -> (protocol, TLS). The TLS schemes' default port is where TLS endpoints (an ingress, a load
# balancer) listen; Triton's own gRPC SSL listens on its gRPC port: grpcs://host:8001.
SCHEMES = {"http": ("http", False), "grpc": ("grpc", False), "https": ("http", True), "grpcs": ("grpc", True)}
TLS_SCHEMES = {"http": "https", "grpc": "grpcs"}
TLS_PORT = 443

UNRESOLVED, NOTHING, SILENT, TRITON_HTTP, GRPC, METRICS, OTHER_HTTP, OTHER, TLS = (
    "unresolved", "nothing", "silent", "Triton HTTP", "gRPC", "Triton metrics", "other HTTP", "other", "TLS")
# OpenSSL's verification errors that --tls-ca cures (an unknown or self-signed issuer), those of a certificate that is
# not for the host name or address connected to, and the alerts of a server that refuses the client's certificate.
UNKNOWN_ISSUER = frozenset({2, 18, 19, 20, 21})
NOT_FOR_HOST = frozenset({62, 63, 64})
CERTIFICATE_REFUSED = frozenset({"TLSV1_ALERT_UNKNOWN_CA", "SSLV3_ALERT_BAD_CERTIFICATE",
                                 "SSLV3_ALERT_CERTIFICATE_UNKNOWN", "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE",
                                 "SSLV3_ALERT_CERTIFICATE_EXPIRED", "SSLV3_ALERT_CERTIFICATE_REVOKED"})
PLAIN = {TRITON_HTTP: "a Triton HTTP port", GRPC: "a gRPC port", METRICS: "Triton's metrics port",
         OTHER_HTTP: "an HTTP server"}


def split_url(url: str, protocol: str | None = None) -> tuple[str, str]:
    """(protocol, host:port) from a URL with or without a scheme; the scheme, if any, must agree with
    `protocol`. A missing port is the protocol's default (443 for https:// and grpcs://); a path
    (`/v2/models/...`) is dropped."""
    parts = urlsplit(url if "://" in url else f"//{url}")
    if parts.scheme and parts.scheme not in SCHEMES:
        raise ValueError(f"URL {url!r}: scheme {parts.scheme!r} is not supported; use host:port, http://host:port, "
                         "https://host:port, grpc://host:port or grpcs://host:port")
    scheme, tls = SCHEMES.get(parts.scheme, (None, False))
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
    if port is None:
        port = TLS_PORT if tls else DEFAULT_PORTS[protocol]
    return protocol, f"{host}:{port}"


def url_tls(url: str) -> bool | None:
    """True for an https:// or grpcs:// URL, False for http:// or grpc://, None for one without a scheme."""
    return SCHEMES.get(urlsplit(url).scheme, (None, None))[1] if "://" in url else None


def _connect(address: str, timeout: float, context: ssl.SSLContext | None = None) -> socket.socket:
    """A connection to `address`, TLS with `context` (its handshake done) when given."""
    host, _, port = address.rpartition(":")
    sock = socket.create_connection((host.strip("[]"), int(port)), timeout=timeout)
    if context is None:
        return sock
    try:
        return context.wrap_socket(sock, server_hostname=host.strip("[]"))
    except BaseException:
        sock.close()
        raise


def _get(address: str, path: str, timeout: float, context: ssl.SSLContext | None = None) -> bytes | None:
    """The first bytes answered to an HTTP/1.1 GET of `path`, over TLS with `context`; None if nothing accepts
    the connection. A host name that does not resolve raises socket.gaierror, and a TLS failure ssl.SSLError."""
    try:
        with _connect(address, timeout, context) as s:
            s.sendall(f"GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n".encode())
            reply = b""
            while len(reply) < 4096 and (chunk := s.recv(4096)):
                reply += chunk
            return reply
    except ssl.SSLEOFError:  # the connection ended without TLS's own close: as a reset
        return b""
    except (socket.gaierror, ssl.SSLError):
        raise
    except ConnectionRefusedError:
        return None
    except OSError:  # reset, timeout: something is there
        return b""


def _is_http2(reply: bytes) -> bool:
    """An HTTP/2 server (gRPC) opens with a SETTINGS frame (type 4) on stream 0, whatever it was sent."""
    return len(reply) >= 9 and reply[3] == 4 and reply[5:9] == b"\0\0\0\0"


def _looking() -> ssl.SSLContext:
    """A TLS context only to tell what answers: it checks no certificate, so nothing but a probe goes through it.
    It offers both protocols (Triton's gRPC over TLS ends a connection that does not ask for h2)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    context.set_alpn_protocols(["h2", "http/1.1"])
    return context


def speaks_tls(address: str, timeout: float = 3.0) -> bool:
    """Whether a TLS handshake with `address` gets a TLS server's answer (nothing is sent past it)."""
    try:
        with _connect(address, timeout, _looking()):
            return True
    except ssl.SSLError as exc:  # an alert is a TLS server's answer (one that wants a client certificate, say)
        return "ALERT" in (exc.reason or "")
    except OSError:
        return False


def _answer(address: str, reply: bytes, timeout: float, context: ssl.SSLContext | None) -> str:
    """SILENT, GRPC, OTHER, METRICS, TRITON_HTTP or OTHER_HTTP, from the first `reply` of `address`."""
    if not reply:  # accepted, then closed, reset or timed out without a byte
        return SILENT
    if _is_http2(reply):
        return GRPC
    if not reply.startswith(b"HTTP/"):
        return OTHER
    if reply.split(b"\r\n", 1)[0].split()[1:2] == [b"200"] and b"nv_" in reply:
        return METRICS  # Triton's metrics port answers any path with Prometheus text
    server = _get(address, "/v2", timeout, context) or b""
    return TRITON_HTTP if b'"name":"triton"' in server.replace(b" ", b"") else OTHER_HTTP


def what_answers(address: str, timeout: float = 3.0, context: ssl.SSLContext | None = None) -> str:
    """UNRESOLVED, NOTHING, SILENT, TRITON_HTTP, GRPC, METRICS, OTHER_HTTP, OTHER or TLS, from what `address`
    answers; over TLS with `context` (whose failures raise ssl.SSLError)."""
    try:
        reply = _get(address, "/metrics", timeout, context)
    except socket.gaierror:
        return UNRESOLVED
    if reply is None:
        return NOTHING
    answer = _answer(address, reply, timeout, context)
    if answer in (SILENT, OTHER, OTHER_HTTP) and context is None and speaks_tls(address, timeout):
        return TLS  # a TLS port closes on a plain request, or refuses it (nginx: "400 ... sent to HTTPS port")
    return answer


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
    if answer == TLS:
        return (f"{address} speaks TLS: use {TLS_SCHEMES[protocol]}://{address} (or --tls), with --tls-ca FILE "
                "where a private CA signed its certificate")
    if answer in (GRPC, TRITON_HTTP):
        return (f"{address} is a {answer} port, not {NAMES[protocol]}: use --protocol {other} with this URL, "
                f"or {ports}")
    if answer == METRICS:
        return (f"{address} is Triton's metrics port (Prometheus /metrics only): use the HTTP port "
                f"(default {DEFAULT_PORTS['http']}) or the gRPC port (default {DEFAULT_PORTS['grpc']}) of that server")
    kind = ("an HTTP server that is not Triton" if answer == OTHER_HTTP
            else "something that speaks neither HTTP nor gRPC")
    return f"{address} is {kind}: use {ports}"


def tls_failure(address: str, protocol: str, exc: ssl.SSLError, timeout: float = 3.0) -> str:
    """One line for a TLS connection to `address` that failed with `exc`: a certificate that does not verify, a
    client certificate asked for or refused, or a server that answers without TLS."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        reason = exc.verify_message or exc.reason
        if exc.verify_code in NOT_FOR_HOST:
            return (f"the TLS certificate of {address} is not for {address.rpartition(':')[0]} ({reason}): connect "
                    "by a host name or address the certificate lists")
        cure = ": pass --tls-ca FILE, the CA that signed it" if exc.verify_code in UNKNOWN_ISSUER else ""
        return f"the TLS certificate of {address} does not verify ({reason}){cure}"
    reason = exc.reason or str(exc)
    if reason == "TLSV13_ALERT_CERTIFICATE_REQUIRED":
        return f"{address} asks for a client certificate (mutual TLS): pass --tls-cert FILE --tls-key FILE"
    if reason in CERTIFICATE_REFUSED:
        return (f"{address} refused the client certificate ({reason}): pass --tls-cert and --tls-key of one signed "
                "by a CA the server trusts")
    if "ALERT" in reason:
        return f"{address} refused the TLS handshake ({reason})"
    plain = _without_tls(address, protocol, what_answers(address, timeout))
    return plain or f"no TLS handshake with {address}: {reason}"


def _without_tls(address: str, protocol: str, plain: str) -> str | None:
    """The line for a server that answers without TLS (`plain`: what answers a plain request), if it does."""
    if plain not in PLAIN:
        return None
    return (f"{address} answers without TLS ({PLAIN[plain]}): use {protocol}://{address} without --tls and the "
            "--tls-* files, or the server's TLS port")


def diagnose(address: str, protocol: str, context: ssl.SSLContext | None = None, timeout: float = 3.0) -> str | None:
    """One line naming what is wrong with `address` as a Triton `protocol` endpoint, over TLS with `context`: what
    answers there instead, or why TLS fails; None when the right server answers."""
    if context is None:
        return wrong_endpoint(address, protocol, what_answers(address, timeout))
    try:
        answer = what_answers(address, timeout, context)
    except ssl.SSLError as exc:
        return tls_failure(address, protocol, exc, timeout)
    if answer == SILENT:  # the handshake was reset (a plain server?), or the connection ended unanswered after it
        return _unanswered(address, protocol, timeout)
    return wrong_endpoint(address, protocol, answer)


def _unanswered(address: str, protocol: str, timeout: float) -> str | None:
    """The line for a TLS client whose connection to `address` ended without a byte of answer."""
    plain = what_answers(address, timeout)
    if plain != TLS:
        return _without_tls(address, protocol, plain) or wrong_endpoint(address, protocol, plain)
    try:  # a TLS server: does it answer a probe (that offers both protocols and no client certificate)?
        seen = what_answers(address, timeout, _looking())
    except ssl.SSLError as exc:
        return tls_failure(address, protocol, exc, timeout)
    if seen == SILENT:  # Triton's gRPC: no alert, the connection just ends
        return (f"{address} ends TLS connections unanswered after the handshake, as a server that wants a client "
                "certificate (mutual TLS) does when it gets none or one its CA did not sign: pass --tls-cert FILE "
                "--tls-key FILE of one it trusts")
    return wrong_endpoint(address, protocol, seen)  # gRPC over TLS, asked over HTTP
