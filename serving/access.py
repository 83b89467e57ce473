"""The keys that guard Triton's restricted APIs on a server started by `make serve`.

`make serve` writes a fresh admin key to .run/admin.key (mode 0600) and starts tritonserver with the
restricted-API flags; `make stop` removes it. The project's own tools send it with `admin_headers()`.
Without it, the restricted APIs answer HTTP 403 / gRPC UNAVAILABLE ("This API is restricted, expecting
header ..."); health, metadata and inference need no key, and the metrics port has no restriction.
`make serve INFERENCE_KEY=1` puts inference behind a second key of its own (.run/inference.key, header
triton-inference-key): a client that may classify holds no key to model control, and the reverse.
"""
from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Callable

KEY_HEADER = "triton-admin-key"
# Triton 2.51 looks for a gRPC restricted-protocol key under this prefix (its error message names it).
GRPC_KEY_PREFIX = "triton-grpc-protocol-"
KEY_FILE = Path(".run") / "admin.key"
# The environment variable that gives a key to the supervisor and the clients (deploy/k8s sets it from a Secret).
KEY_ENV = "TRITON_ADMIN_KEY"
# Everything but health, metadata and inference: model control, configuration, shared memory,
# statistics, trace and logging.
RESTRICTED = ("model-repository", "model-config", "shared-memory", "statistics", "trace", "logging")
PROTOCOLS = ("http", "grpc")
# The inference key (`make serve INFERENCE_KEY=1`): Triton's `inference` API group (HTTP infer, generate and
# generate_stream, gRPC ModelInfer and ModelStreamInfer) behind a header of its own.
INFERENCE_KEY_HEADER = "triton-inference-key"
INFERENCE_KEY_FILE = Path(".run") / "inference.key"
INFERENCE_KEY_ENV = "TRITON_INFERENCE_KEY"
INFERENCE = ("inference",)


def write_key(path: Path = KEY_FILE) -> str:
    """A new random key in `path`, readable by its owner only: written to a new 0600 file beside it, which
    then replaces `path` (an older file, whatever its mode, never holds the new key)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    key = secrets.token_urlsafe(32)
    staging = path.with_name(f".{path.name}.tmp")
    staging.unlink(missing_ok=True)
    fd = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key + "\n")
    os.replace(staging, path)
    return key


def read_key(path: Path = KEY_FILE) -> str | None:
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def remove_key(path: Path = KEY_FILE) -> bool:
    """Delete the key file; whether there was one."""
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    return True


def key_headers(key: str | None, protocol: str | None = None, header: str = KEY_HEADER) -> dict[str, str]:
    """The header(s) carrying `key` under `header` for `protocol` ("http", "grpc"; None: both, each ignores
    the other's)."""
    if not key:
        return {}
    names = {"http": header, "grpc": GRPC_KEY_PREFIX + header}
    if protocol is not None and protocol not in names:
        raise ValueError(f"protocol {protocol!r} is not one of {PROTOCOLS}")
    return {name: key for p, name in names.items() if protocol in (None, p)}


def admin_headers(path: Path = KEY_FILE, protocol: str | None = None) -> dict[str, str]:
    """The headers a restricted API call needs ({} when no key was made: an unrestricted server)."""
    return key_headers(read_key(path), protocol)


def key_file_headers(key_file: str | Path) -> Callable[[], dict[str, str]]:
    """HTTP headers with the admin key `key_file` holds, read again at each call (a re-generated key is
    picked up); a file that holds no key is refused at once: on a restricted server every call would fail."""
    path = Path(key_file)
    if read_key(path) is None:
        raise ValueError(f"no admin key in {key_file}")
    return lambda: admin_headers(path, "http")


def restricted_args(key: str, apis: tuple[str, ...] = RESTRICTED, header: str = KEY_HEADER) -> list[str]:
    """tritonserver flags that put `apis` (the admin's: RESTRICTED) behind `key` in `header` on HTTP and gRPC;
    each group of APIs given its own flags keeps its own key."""
    restriction = f"{','.join(apis)}:{header}={key}"
    return [f"--http-restricted-api={restriction}", f"--grpc-restricted-protocol={restriction}"]


def inference_restricted_args(key: str) -> list[str]:
    """tritonserver flags that put inference behind `key` (header INFERENCE_KEY_HEADER) on HTTP and gRPC."""
    return restricted_args(key, INFERENCE, INFERENCE_KEY_HEADER)


def is_restricted_error(message: str) -> bool:
    """Whether a server's error says a restricted API was called without (the right) key."""
    return "is restricted, expecting header" in message


def missing_key(message: str) -> str:
    """Which key a restricted error asks for, in words, and where `make serve` writes it."""
    if INFERENCE_KEY_HEADER in message:
        return f"its inference key (`make serve INFERENCE_KEY=1` writes {INFERENCE_KEY_FILE})"
    return f"its admin key (`make serve` writes {KEY_FILE})"
