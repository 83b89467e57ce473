"""The probe endpoint of the stub watchdog and of the supervisor: GET /ready, /live, /status as JSON, /metrics.

    /ready    200, or 503 with the reason (a dead stub's model is being reloaded, the server is not ready,
              starting, restarting or stopping)
    /live     200, or 503 when restarting the server is the way out
    /status   the whole state
    /metrics  the same state for Prometheus (serving/probe_metrics.py)

Also what the commands share and the image's copy of serving/ needs without the rest of the project: the
argparse types of numbers, ports and seeds, and how an address (IPv4 or IPv6) is spelt in a URL.
"""
from __future__ import annotations

import argparse
import json
import math
import socket
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Protocol


class Probe(Protocol):
    """What the endpoint asks: serving.watchdog.Watchdog and serving.supervise.Supervisor answer it."""

    last_error: str

    def readiness(self) -> tuple[bool, str]: ...

    def live(self) -> bool: ...

    def status(self) -> dict: ...


def has_flag(args: list[str], flag: str) -> bool:
    """Whether a command line gives `flag`, as `--flag value` or `--flag=value`."""
    return any(a == flag or a.startswith(flag + "=") for a in args)


def port_number(text: str) -> int:
    """An argparse type: a TCP port (0-65535), refused in one line otherwise."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid port {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port {port} is not in 0-65535")
    return port


def host_port(host: str, port: int | str) -> str:
    """host:port as URLs spell it: an IPv6 address in brackets ([::1]:8000)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def bound_address(flag_value: str) -> str:
    """The address one of tritonserver's address flags binds (`ipv6:::1`, `[::1]` -> `::1`; serving.tritonserver
    writes them so)."""
    value = flag_value.removeprefix("ipv6:")
    return value[1:-1] if value.startswith("[") and value.endswith("]") else value


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on at `host` now (the OS's choice)."""
    with socket.socket(address_family(host)) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def address_family(host: str) -> socket.AddressFamily:
    """The socket family that binds `host`: IPv6 for an address with a colon."""
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def reachable(host: str) -> str:
    """The address that reaches a server bound to `host` on this machine: loopback for a wildcard."""
    return {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)


def number(kind: type, low: float, high: float | None = None, below_high: bool = False, above_low: bool = False):
    """An argparse type: a finite int or float from `low` up to `high` (`above_low`, `below_high`: that bound
    itself excluded), refused in one line otherwise (`argument --lr: must be above 0, got 0`). The serving and
    training commands share it (serving/ imports nothing of the project's other packages)."""
    def parse(text: str):
        value = kind(text)
        if math.isinf(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        if not ((low < value if above_low else low <= value)
                and (high is None or (value < high if below_high else value <= high))):  # NaN too
            if high is None:
                bound = f"above {low}" if above_low else f"at least {low}"
            else:
                bound = f"in {'(' if above_low else '['}{low}, {high}{')' if below_high else ']'}"
            raise argparse.ArgumentTypeError(f"must be {bound}, got {text}")
        return value
    parse.__name__ = kind.__name__  # argparse names it in "invalid int value: 'x'"
    return parse


# a --seed, in every command that takes one: a 64-bit signed integer (what torch.manual_seed takes, with room
# for training's + rank and + epoch; random.Random, which the benchmarks seed, takes any integer)
SEEDS = (-2**63, 2**63 - 1)


def positive(kind: type) -> Callable[[str], int | float]:
    """An argparse type: a finite int or float above 0."""
    return number(kind, 0, above_low=True)


class JsonHandler(BaseHTTPRequestHandler):
    """Answers in JSON (`_send`), logs nothing per request."""

    def _send(self, code: int, body: dict | list) -> None:
        self._send_bytes(code, json.dumps(body).encode(), "application/json")

    def _send_bytes(self, code: int, data: bytes, content_type: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args) -> None:
        pass


def endpoint(watchdog: Probe, host: str, port: int) -> ThreadingHTTPServer:
    """/ready, /live, /status, /metrics of `watchdog` on host:port (serve_forever() it)."""
    from serving.probe_metrics import metrics_page

    page = metrics_page(watchdog)

    class Handler(JsonHandler):
        timeout = 10.0  # a connection that sends nothing holds one thread this long, not for ever

        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            if self.path == "/ready":
                ok, reason = watchdog.readiness()
                self._send(200 if ok else 503, {"ready": ok, "reason": reason})
            elif self.path == "/live":
                ok = watchdog.live()
                self._send(200 if ok else 503, {"live": ok, "last_error": watchdog.last_error})
            elif self.path == "/status":
                self._send(200, watchdog.status())
            elif self.path == "/metrics":
                self._send_bytes(200, *page())
            else:
                self._send(404, {"error": f"no {self.path}: /ready, /live, /status, /metrics"})

    family = address_family(host)

    class Server(ThreadingHTTPServer):
        address_family = family

    return Server((host, port), Handler)
