"""The few Triton HTTP calls the watchdog, `make stop` and the supervisor make: health, repository index,
model configuration, load (with a changed configuration), unload, and the drain before a SIGTERM."""
from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from typing import Callable

RELOAD_PARAMETER = "watchdog_reload"


class TritonAdmin:
    """The few HTTP calls the watchdog makes, with the admin key's header on each (none without a key)."""

    def __init__(self, http_url: str, headers: Callable[[], dict[str, str]], timeout: float = 120.0):
        self.base = http_url if "://" in http_url else f"http://{http_url}"
        self.headers, self.timeout = headers, timeout

    def _call(self, path: str, body: dict | None = None, method: str | None = None,
              timeout: float | None = None) -> tuple[int, bytes]:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.base + path, data=data, method=method or ("POST" if data else "GET"),
                                         headers={"Content-Type": "application/json", **self.headers()})
        try:
            with urllib.request.urlopen(request, timeout=timeout or self.timeout) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def ready(self) -> bool:
        try:
            return self._call("/v2/health/ready", timeout=2)[0] == 200
        except OSError:
            return False

    def live(self) -> bool:
        try:
            return self._call("/v2/health/live", timeout=2)[0] == 200
        except OSError:
            return False

    def index(self) -> dict[str, str]:
        """{model: state} of the repository ("READY", "UNAVAILABLE", ...), the newest version's state per model."""
        status, body = self._call("/v2/repository/index", {})
        if status != 200:
            raise RuntimeError(f"repository index: HTTP {status}: {body[:300]!r}")
        states: dict[str, str] = {}
        for entry in json.loads(body):
            if states.get(entry["name"]) != "READY":
                states[entry["name"]] = entry.get("state", "")
        return states

    def ready_versions(self) -> dict[str, set[str]]:
        """{model: its versions in state READY}, from the repository index."""
        status, body = self._call("/v2/repository/index", {})
        if status != 200:
            raise RuntimeError(f"repository index: HTTP {status}: {body[:300]!r}")
        ready: dict[str, set[str]] = {}
        for entry in json.loads(body):
            if entry.get("state") == "READY":
                ready.setdefault(entry["name"], set()).add(str(entry.get("version", "")))
        return ready

    def reload(self, model: str) -> None:
        """Load `model` again with its current configuration, marked so that Triton does load it."""
        status, body = self._call(f"/v2/models/{model}/config")
        if status != 200:
            raise RuntimeError(f"config of {model}: HTTP {status}: {body[:300]!r}")
        config = json.loads(body)
        config.setdefault("parameters", {})[RELOAD_PARAMETER] = {"string_value": f"{time.time():.3f}"}
        self.load(model, config)

    def instances(self, model: str) -> int:
        """How many instances the model's configuration asks for (its stubs, for a python-backend model)."""
        status, body = self._call(f"/v2/models/{model}/config")
        if status != 200:
            raise RuntimeError(f"config of {model}: HTTP {status}: {body[:300]!r}")
        return sum(group.get("count", 1) for group in json.loads(body).get("instance_group", []))

    def platform(self, model: str) -> str:
        status, body = self._call(f"/v2/models/{model}/config")
        if status != 200:
            raise RuntimeError(f"config of {model}: HTTP {status}: {body[:300]!r}")
        config = json.loads(body)
        return config.get("platform") or config.get("backend", "")

    def unload(self, model: str) -> None:
        status, answer = self._call(f"/v2/repository/models/{model}/unload", {}, method="POST")
        if status != 200:
            raise RuntimeError(f"unload {model}: HTTP {status}: {answer[:300]!r}")

    def load(self, model: str, config: dict | None = None) -> None:
        body = {"parameters": {"config": json.dumps(config)}} if config is not None else {}
        status, answer = self._call(f"/v2/repository/models/{model}/load", body, method="POST")
        if status != 200:
            raise RuntimeError(f"load {model}: HTTP {status}: {answer[:300]!r}")


def drain(admin: TritonAdmin, timeout_s: float = 30.0) -> list[str]:
    """Unload the ensembles (the models clients call) so that their in-flight requests finish while the
    models they chain stay loaded; a SIGTERM after this finds nothing in flight. The ensembles unloaded."""
    ensembles = [m for m, state in admin.index().items() if state == "READY" and admin.platform(m) == "ensemble"]
    for model in ensembles:
        admin.unload(model)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and any(admin.index().get(m) in ("READY", "UNLOADING") for m in ensembles):
        time.sleep(0.05)
    return ensembles
