"""Bring a crashed python-backend stub's model back, and say "not ready" while it is down.

    python -m serving.watchdog --server-pid 1234 --http 127.0.0.1:8000 [--port 8003]   # make serve starts it
    python -m serving.watchdog --drain --http 127.0.0.1:8000                           # make stop runs it

Triton 2.51 never restarts a python-backend stub that died (kill -9, a crash in a native library, an
out-of-memory kill): the requests routed to its instance fail with `Stub process ... is not healthy`
for as long as the server runs, while `/v2/health/ready` and the model's readiness keep answering 200.
The dead stub stays a zombie child of tritonserver (Triton does not reap it), which is how this
watchdog sees it. It then reloads that model through the model-control API (explicit mode, the admin
key from serving.access), with the model's own configuration plus a `watchdog_reload` parameter,
because 2.51 takes a load of an unchanged model as a no-op; and it loads again any model that was
ready before and is not after (an ensemble: Triton issue #4828). Its own HTTP endpoint is the
readiness to probe (Triton's cannot be made false from outside):

    GET /ready    200 when Triton is ready and no model has a dead stub; 503 with the reason otherwise
    GET /live     200 unless a reload failed `--max-failed-reloads` times in a row (then restart the server)
    GET /status   the whole state as JSON: crashes, reloads, degraded models, leaked versions

A model version whose stub died inside a request is never freed by Triton 2.51; the watchdog kills its
surviving stubs (`retire_after_s` after the reload, once the new instances run) to free their memory.

`--drain` unloads the ensembles and waits until they are gone: a SIGTERM straight into Triton 2.51 fails
ensemble requests that are between two steps ("Server is stopping"); after a drain none is in flight.

See docs/operations.md ("Self-healing, SIGTERM and soak").
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import signal
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable

import psutil

from serving.access import admin_headers

STUB = "triton_python_backend_stub"
RELOAD_PARAMETER = "watchdog_reload"
log = logging.getLogger("watchdog")


@dataclasses.dataclass(frozen=True)
class Stub:
    pid: int
    model: str | None  # None: a zombie first seen dead (its command line is gone)
    version: str | None
    dead: bool


def _model_of(cmdline: list[str]) -> tuple[str, str] | None:
    """(model, version) of a python-backend stub: its first argument is <repository>/<model>/<version>/model.py."""
    if not cmdline or Path(cmdline[0]).name != STUB or len(cmdline) < 2:
        return None
    parts = Path(cmdline[1]).parts
    return (parts[-3], parts[-2]) if len(parts) >= 3 else None


class StubTracker:
    """The stub children of one tritonserver. A stub's model is learnt while it lives; a dead stub
    stays a zombie, whose command line is empty, so it is named by what was learnt before."""

    def __init__(self, server_pid: int):
        self.server = psutil.Process(server_pid)
        self.known: dict[int, tuple[str, str]] = {}

    def scan(self) -> list[Stub]:
        stubs = []
        for child in self.server.children():
            try:
                dead = child.status() in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)
                if not dead and child.pid not in self.known:
                    named = _model_of(child.cmdline())
                    if named is None:
                        continue
                    self.known[child.pid] = named
            except psutil.ZombieProcess:
                dead = True
            except psutil.NoSuchProcess:
                continue
            if child.pid in self.known or dead:
                model, version = self.known.get(child.pid, (None, None))
                stubs.append(Stub(child.pid, model, version, dead))
        return stubs


def serving_stubs(server_pid: int, model: str, instances: int) -> list[psutil.Process]:
    """The live stubs serving `model` now: its `instances` newest (a reload after a crash leaves the old
    version's surviving stubs behind, see docs/operations.md)."""
    stubs = []
    for child in psutil.Process(server_pid).children():
        try:
            named = _model_of(child.cmdline())
        except psutil.Error:
            continue
        if named and named[0] == model:
            stubs.append(child)
    return sorted(stubs, key=lambda p: p.create_time())[-instances:]


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


@dataclasses.dataclass
class Crash:
    pid: int
    model: str | None
    version: str | None
    seen_at: float  # time.time()
    recovered_at: float | None = None


class Watchdog:
    """Polls the stubs of one server; reloads a model whose stub died; keeps the state /ready reports."""

    def __init__(self, server_pid: int, admin: TritonAdmin, interval_s: float = 0.2, max_failed_reloads: int = 3,
                 retire_after_s: float = 10.0):
        self.tracker = StubTracker(server_pid)
        self.server_pid = server_pid
        self.admin, self.interval_s, self.max_failed_reloads = admin, interval_s, max_failed_reloads
        self.crashes: list[Crash] = []
        self.reloads = 0
        self.failed_reloads = 0
        self.last_error = ""
        self.retire_after_s = retire_after_s
        self.reload_timeout_s = 60.0
        self._reloading_since: float | None = None
        self.retired: list[int] = []
        self._retire: list[tuple[float, str, set[int]]] = []  # (when, model, stubs of its replaced instances)
        self._handled: set[int] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- state ---------------------------------------------------------------------------------
    def degraded(self) -> list[str]:
        with self._lock:
            return sorted({c.model or "?" for c in self.crashes if c.recovered_at is None})

    def live(self) -> bool:
        """False once restarting the server is the way out: it exited or does not answer, a reload has hung
        for `reload_timeout_s`, or `max_failed_reloads` reloads failed in a row."""
        hung = self._reloading_since is not None and time.monotonic() - self._reloading_since > self.reload_timeout_s
        return (self.failed_reloads < self.max_failed_reloads and not hung and psutil.pid_exists(self.server_pid)
                and self.admin.live())

    def readiness(self) -> tuple[bool, str]:
        degraded = self.degraded()
        if degraded:
            return False, f"a python-backend stub died: {', '.join(degraded)} reloading"
        if not self.admin.ready():
            return False, "tritonserver is not ready"
        return True, "ready"

    def status(self) -> dict:
        ready, reason = self.readiness()
        with self._lock:
            crashes = [dataclasses.asdict(c) for c in self.crashes]
        return {"ready": ready, "reason": reason, "live": self.live(), "server_pid": self.server_pid,
                "crashes": crashes, "reloads": self.reloads, "failed_reloads": self.failed_reloads,
                "last_error": self.last_error, "retired_stubs": list(self.retired),
                # every crash leaves its model's old version loaded for good (see docs/operations.md)
                "leaked_versions": sum(1 for c in crashes if c["recovered_at"] is not None)}

    # -- the loop ------------------------------------------------------------------------------
    def retire(self, stubs: list[Stub]) -> None:
        """Kill the stubs a reload replaced that are still alive `retire_after_s` later: Triton keeps a model
        version whose stub died inside a request loaded for good, with its other stubs, which serve nothing
        but hold their memory. Only once the model has its full count of newer stubs."""
        due = [r for r in self._retire if r[0] <= time.monotonic()]
        for entry in due:
            self._retire.remove(entry)
            _, model, replaced = entry
            alive = {s.pid for s in stubs if not s.dead and s.model == model}
            leftover = alive & replaced
            if not leftover or len(alive - replaced) < self.admin.instances(model):
                continue
            for pid in sorted(leftover):
                self._handled.add(pid)
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    continue
                self.retired.append(pid)
            log.warning("retired %d stub(s) of %s's replaced instances: %s", len(leftover), model, sorted(leftover))

    def check(self) -> None:
        """One pass: note newly dead stubs, reload their models, re-load what the reload unloaded."""
        stubs = self.tracker.scan()
        if self._retire:
            try:
                self.retire(stubs)
            except (RuntimeError, OSError, ValueError) as exc:
                log.error("retiring replaced stubs failed: %s", exc)
        new = [s for s in stubs if s.dead and s.pid not in self._handled]
        for stub in new:
            self._handled.add(stub.pid)
            log.warning("stub %d of %s (version %s) died", stub.pid, stub.model or "an unknown model", stub.version)
            with self._lock:
                self.crashes.append(Crash(stub.pid, stub.model, stub.version, time.time()))
        with self._lock:
            unrecovered = [c for c in self.crashes if c.recovered_at is None]
        pending = {c.model for c in unrecovered if c.model}
        if any(c.model is None for c in unrecovered):  # seen dead only: reload every python-backend model
            pending |= {model for model, _ in self.tracker.known.values()}
        if not unrecovered:
            return
        replaced = {m: {s.pid for s in stubs if not s.dead and s.model == m} for m in pending}
        self._reloading_since = time.monotonic()
        try:
            before = self.admin.index()
            for model in sorted(pending):
                self.admin.reload(model)
                self.reloads += 1
                log.warning("reloaded %s", model)
            after = self.admin.index()
            for model, state in before.items():
                if state == "READY" and after.get(model) != "READY":
                    self.admin.load(model)
                    log.warning("loaded %s again (it was ready before the reload)", model)
        except (RuntimeError, OSError, ValueError) as exc:
            self.failed_reloads += 1
            self.last_error = str(exc)
            log.error("reload failed (%d in a row): %s", self.failed_reloads, exc)
            self._stop.wait(min(30.0, 2.0 ** self.failed_reloads))  # back off before the next try
            return
        finally:
            self._reloading_since = None
        self.failed_reloads = 0
        self._retire += [(time.monotonic() + self.retire_after_s, m, pids) for m, pids in replaced.items() if pids]
        now = time.time()
        with self._lock:
            for crash in self.crashes:
                if crash.recovered_at is None and crash.model in pending | {None}:
                    crash.recovered_at = now

    def run(self) -> None:
        while not self._stop.is_set():
            try:
                self.check()
            except psutil.NoSuchProcess:
                log.warning("tritonserver (pid %d) has exited", self.server_pid)
                return
            self._stop.wait(self.interval_s)

    def start(self) -> "Watchdog":
        self.tracker.scan()  # learn the stubs alive now
        self._thread = threading.Thread(target=self.run, name="watchdog", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def __enter__(self) -> "Watchdog":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def endpoint(watchdog: Watchdog, host: str, port: int) -> ThreadingHTTPServer:
    """/ready, /live, /status of `watchdog` on host:port (serve_forever() it)."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            if self.path == "/ready":
                ok, reason = watchdog.readiness()
                self._send(200 if ok else 503, {"ready": ok, "reason": reason})
            elif self.path == "/live":
                ok = watchdog.live()
                self._send(200 if ok else 503, {"live": ok, "last_error": watchdog.last_error})
            elif self.path == "/status":
                self._send(200, watchdog.status())
            else:
                self._send(404, {"error": f"no {self.path}: /ready, /live, /status"})

        def _send(self, code: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args) -> None:
            pass

    return ThreadingHTTPServer((host, port), Handler)


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


def spawn(server_pid: int, http_url: str, port: int, log_file: Path, address: str = "127.0.0.1") -> dict:
    """Start `python -m serving.watchdog` detached for `make serve`; {"pid", "ready"} (its readiness URL)."""
    import subprocess

    project_root = str(Path(__file__).resolve().parent.parent)
    with open(log_file, "ab") as out:
        process = subprocess.Popen([sys.executable, "-m", "serving.watchdog", "--server-pid", str(server_pid),
                                    "--http", http_url, "--address", address, "--port", str(port)],
                                   stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd=Path.cwd(),
                                   env={**os.environ, "PYTHONPATH": project_root})
    url = f"http://{address}:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and process.poll() is None:
        try:
            with urllib.request.urlopen(url + "/live", timeout=1):
                return {"pid": process.pid, "ready": url + "/ready", "log": str(log_file)}
        except (urllib.error.URLError, OSError):
            time.sleep(0.1)
    process.kill()
    raise RuntimeError(f"the watchdog did not answer on {url} (exit {process.poll()}); see {log_file}")


def is_watchdog(pid: int) -> bool:
    try:
        return "serving.watchdog" in " ".join(psutil.Process(pid).cmdline())
    except psutil.Error:
        return False


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--server-pid", type=int, help="the tritonserver process to watch")
    p.add_argument("--http", required=True, help="its HTTP host:port")
    p.add_argument("--address", default="127.0.0.1", help="address of /ready, /live, /status (default: %(default)s)")
    p.add_argument("--port", type=int, default=8003, help="port of /ready, /live, /status (default: %(default)s)")
    p.add_argument("--key-file", default=None, help="admin key file (default: serving.access's, .run/admin.key)")
    p.add_argument("--interval", type=float, default=0.2, help="seconds between checks (default: %(default)s)")
    p.add_argument("--max-failed-reloads", type=int, default=3,
                   help="failed reloads in a row after which /live answers 503 (default: %(default)s)")
    p.add_argument("--retire-after", type=float, default=10.0,
                   help="seconds after a reload before the replaced instances' surviving stubs are killed "
                        "(default: %(default)s)")
    p.add_argument("--drain", action="store_true",
                   help="instead of watching: unload the ensembles, wait for their in-flight requests, exit "
                        "(before a SIGTERM: `make stop` does it; a Kubernetes preStop hook can)")
    return p


def main(args: argparse.Namespace) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    headers = (lambda: admin_headers(Path(args.key_file), "http")) if args.key_file else (
        lambda: admin_headers(protocol="http"))
    if args.drain:
        log.info("drained %s", ", ".join(drain(TritonAdmin(args.http, headers))) or "nothing")
        return
    if args.server_pid is None:
        raise ValueError("--server-pid is needed to watch a server")
    watchdog = Watchdog(args.server_pid, TritonAdmin(args.http, headers), args.interval, args.max_failed_reloads,
                        args.retire_after)
    http = endpoint(watchdog, args.address, args.port)
    log.info("watching tritonserver pid %d; readiness on http://%s:%d/ready", args.server_pid, args.address, args.port)
    watchdog.start()
    threading.Thread(target=http.serve_forever, daemon=True).start()
    try:
        while watchdog._thread.is_alive():
            watchdog._thread.join(1.0)
    except KeyboardInterrupt:
        pass
    finally:
        watchdog.stop()
        http.shutdown()


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        main(get_args_parser().parse_args())
    except (OSError, RuntimeError, ValueError, psutil.Error) as exc:
        sys.exit(f"serving.watchdog: {exc}")
