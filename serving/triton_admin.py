"""The few Triton HTTP calls the watchdog, `make stop` and the supervisor make: health, repository index,
model configuration, load (with a changed configuration), unload, and the drain before a SIGTERM; and the
repository's model-control lock, which the watchdog and serving.rollout take so that one of them at a
time changes what the server loads."""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import fcntl
import json
import logging
import os
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable, Iterator

import psutil

RELOAD_PARAMETER = "watchdog_reload"
LOCK_FILE = ".model-control.lock"  # in the model repository's folder
MANIFEST = "BUILD.json"  # what build.engines writes beside the models (build.repository.writer)
DEADLINE_FLOOR_S = 1.0  # what a call made at or past a deadline may still wait (TritonAdmin.until)
_held: dict[Path, int] = {}  # locks this process holds, and how deep (the lock is re-entrant in a process)


def built_spec(repository: str | Path | None) -> dict:
    """The deployment spec the repository's BUILD.json records; {} where there is none or it cannot be read."""
    try:
        spec = json.loads((Path(repository) / MANIFEST).read_text())["spec"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    return spec if isinstance(spec, dict) else {}


class LockTimeout(RuntimeError):
    pass


@contextlib.contextmanager
def control_lock(repository: Path | None, timeout_s: float = 600.0,
                 cancel: threading.Event | None = None) -> Iterator[None]:
    """Hold `<repository>/.model-control.lock` (flock) while changing the repository or loading models: a
    watchdog reload that overlaps a rollback's move of the version it reloads makes Triton 2.51's load
    wait for ever for stubs that cannot start. No lock where the repository is not a local, writable
    folder (S3, a read-only image): nothing else changes it there. LockTimeout also once `cancel` is set."""
    if repository is None or not Path(repository).is_dir():
        yield
        return
    path = (Path(repository) / LOCK_FILE).resolve()
    if path in _held:
        _held[path] += 1
        try:
            yield
        finally:
            _held[path] -= 1
        return
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError:
        yield
        return
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise LockTimeout(f"{path} held by another process for {timeout_s:.0f} s") from None
                if cancel is not None and cancel.is_set():
                    raise LockTimeout(f"{path} held by another process; stopped waiting for it") from None
                time.sleep(0.1)
        _held[path] = 1
        try:
            yield
        finally:
            del _held[path]
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def repository_of(server_pid: int) -> Path | None:
    """The local model repository a tritonserver process serves (its --model-repository), or None."""
    try:
        args = psutil.Process(server_pid).cmdline()
    except psutil.Error:
        return None
    for i, arg in enumerate(args):
        value = arg.split("=", 1)[1] if arg.startswith("--model-repository=") else (
            args[i + 1] if arg == "--model-repository" and i + 1 < len(args) else None)
        if value and "://" not in value and Path(value).is_dir():
            return Path(value)
    return None


class AdminError(RuntimeError):
    """A call the server answered with an error: what was asked, the HTTP status and the server's answer."""

    def __init__(self, what: str, status: int, body: bytes):
        self.status, self.answer = status, body.decode(errors="replace").strip()
        super().__init__(f"{what}: HTTP {status}: {self.answer[:300]}")


class TritonAdmin:
    """The few HTTP calls the watchdog, the supervisor and rollout make, with the admin key's header on each
    (none without a key). A refusal raises AdminError; a server that does not answer, OSError."""

    def __init__(self, http_url: str, headers: Callable[[], dict[str, str]], timeout: float = 120.0):
        self.base = http_url if "://" in http_url else f"http://{http_url}"
        self.headers, self.timeout = headers, timeout
        self.deadline: float | None = None  # time.monotonic() after which each call waits DEADLINE_FLOOR_S at most

    def until(self, deadline: float) -> "TritonAdmin":
        """A copy whose calls end by `deadline` (time.monotonic()), or DEADLINE_FLOOR_S after it."""
        bounded = copy.copy(self)
        bounded.deadline = deadline
        return bounded

    def _call(self, path: str, body: dict | None = None, method: str | None = None,
              timeout: float | None = None) -> tuple[int, bytes]:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.base + path, data=data, method=method or ("POST" if data else "GET"),
                                         headers={"Content-Type": "application/json", **self.headers()})
        timeout = timeout or self.timeout
        if self.deadline is not None:
            timeout = min(timeout, max(DEADLINE_FLOOR_S, self.deadline - time.monotonic()))
        try:
            with urllib.request.urlopen(request, timeout=timeout) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def ready(self) -> bool:
        try:
            return self._call("/v2/health/ready", timeout=2)[0] == 200
        except OSError:
            return False

    def model_ready(self, model: str) -> bool:
        """Whether `model` is loaded and ready (no key needed); False when the server does not answer."""
        try:
            return self._call(f"/v2/models/{model}/ready", timeout=2)[0] == 200
        except OSError:
            return False

    def live(self) -> bool:
        try:
            return self._call("/v2/health/live", timeout=2)[0] == 200
        except OSError:
            return False

    def _entries(self) -> list[dict]:
        """The repository index: one entry per model version Triton knows (name, version, state, reason)."""
        status, body = self._call("/v2/repository/index", {})
        if status != 200:
            raise AdminError("repository index", status, body)
        return json.loads(body)

    def index(self) -> dict[str, str]:
        """{model: state} of the repository ("READY", "UNAVAILABLE", ...), the newest version's state per model."""
        states: dict[str, str] = {}
        for entry in self._entries():
            if states.get(entry["name"]) != "READY":
                states[entry["name"]] = entry.get("state", "")
        return states

    def ready_versions(self) -> dict[str, set[str]]:
        """{model: its versions in state READY}, from the repository index (version strings, as Triton's)."""
        ready: dict[str, set[str]] = {}
        for entry in self._entries():
            if entry.get("state") == "READY":
                ready.setdefault(entry["name"], set()).add(str(entry.get("version", "")))
        return ready

    def config(self, model: str) -> dict:
        status, body = self._call(f"/v2/models/{model}/config")
        if status != 200:
            raise AdminError(f"config of {model}", status, body)
        return json.loads(body)

    def reload(self, model: str) -> None:
        """Load `model` again with its current configuration, marked so that Triton does load it."""
        config = self.config(model)
        config.setdefault("parameters", {})[RELOAD_PARAMETER] = {"string_value": f"{time.time():.3f}"}
        self.load(model, config)

    def instances(self, model: str) -> int:
        """How many instances the model's configuration asks for (its stubs, for a python-backend model)."""
        return sum(group.get("count", 1) for group in self.config(model).get("instance_group", []))

    def platform(self, model: str) -> str:
        config = self.config(model)
        return config.get("platform") or config.get("backend", "")

    def unload(self, model: str) -> None:
        status, answer = self._call(f"/v2/repository/models/{model}/unload", {}, method="POST")
        if status != 200:
            raise AdminError(f"unload {model}", status, answer)

    def load(self, model: str, config: dict | None = None) -> None:
        body = {"parameters": {"config": json.dumps(config)}} if config is not None else {}
        status, answer = self._call(f"/v2/repository/models/{model}/load", body, method="POST")
        if status != 200:
            raise AdminError(f"load {model}", status, answer)


@dataclasses.dataclass
class Drained:
    """What a drain did: the ensembles it unloaded that are gone, and those still loaded at the timeout with
    their state (UNLOADING: Triton waits for their in-flight requests), which a SIGTERM now would fail."""

    drained: list[str]
    busy: dict[str, str]
    timeout_s: float

    def log(self, logger: logging.Logger) -> None:
        """One line: INFO when every ensemble is gone, WARNING naming the busy ones when the drain timed out."""
        drained = ", ".join(self.drained) or "nothing"
        if not self.busy:
            logger.info("drained %s", drained)
            return
        busy = ", ".join(f"{model} ({state})" for model, state in self.busy.items())
        logger.warning("drain timed out after %g s with requests in flight: %s still loaded; drained: %s",
                       self.timeout_s, busy, drained)


def drain(admin: TritonAdmin, timeout_s: float = 30.0) -> Drained:
    """Unload the ensembles (the models clients call) so that their in-flight requests finish while the
    models they chain stay loaded, and wait up to `timeout_s` until they are gone; a SIGTERM after a drain
    that left nothing busy finds nothing in flight. Its calls share that budget: a server that does not
    answer raises OSError by then (DEADLINE_FLOOR_S for a call begun at the deadline)."""
    deadline = time.monotonic() + timeout_s
    admin = admin.until(deadline)
    ensembles = [m for m, state in admin.index().items() if state == "READY" and admin.platform(m) == "ensemble"]
    for model in ensembles:
        admin.unload(model)
    while True:
        states = admin.index()
        busy = {m: states[m] for m in ensembles if states.get(m) in ("READY", "UNLOADING")}
        if not busy or time.monotonic() >= deadline:
            return Drained([m for m in ensembles if m not in busy], busy, timeout_s)
        time.sleep(0.05)
