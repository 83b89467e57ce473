"""Bring a crashed python-backend stub's model back, and say "not ready" while it is down.

    python -m serving.watchdog --server-pid 1234 --http 127.0.0.1:8000 [--port 8003]   # by hand (make serve: serving.supervise)
    python -m serving.watchdog --drain --http 127.0.0.1:8000                           # make drain

Triton 2.51 never restarts a python-backend stub that died (kill -9, a crash in a native library, an
out-of-memory kill): the requests routed to its instance fail with `Stub process ... is not healthy`
for as long as the server runs, while `/v2/health/ready` and the model's readiness keep answering 200.
The dead stub stays a zombie child of tritonserver (Triton does not reap it), which is how this
watchdog sees it. It then reloads that model through the model-control API (explicit mode, the admin
key from serving.access), with the model's own configuration plus a `watchdog_reload` parameter,
because 2.51 takes a load of an unchanged model as a no-op; and it loads again any model that was
ready before and is not after (an ensemble: Triton issue #4828). Its own HTTP endpoint is the
readiness to probe (Triton's cannot be made false from outside):

    GET /ready    200 when the ensemble BUILD.json names is ready (else Triton's own readiness) and no model
                  has a dead stub; 503 with the reason otherwise (after a drain too)
    GET /live     200 unless a reload (or the repository index before it: a wrong key) failed
                  `--max-failed-reloads` times in a row (then restart the server)
    GET /status   the whole state as JSON: crashes, reloads, degraded models, leaked versions
    GET /metrics  the same for Prometheus: crashes per model, reloads, readiness (serving/probe_metrics.py)

A model version whose stub died inside a request is never freed by Triton 2.51; the watchdog kills its
surviving stubs (`retire_after_s` after the reload, once the new instances run) to free their memory.

Run alone, it exits once the server has, never with 0, so that a container runtime or systemd restarts
both: as serving.supervise, 128 + N for a server killed by signal N, else the server's code (1 for 0) where
the watchdog is the server's parent; 1 where it is not (only a parent can read a process's exit code).

`--drain` unloads the ensembles and waits until they are gone: a SIGTERM straight into Triton 2.51 fails
ensemble requests that are between two steps ("Server is stopping"); after a drain none is in flight. A
drain that times out (`--drain-timeout`) says so as a warning, naming the ensembles still loaded.

See docs/operations.md ("Self-healing, SIGTERM and soak").
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

import psutil

from serving.access import KEY_FILE, admin_headers, key_file_headers
from serving.health import endpoint, number, port_number, positive
from serving.stubs import Stub, StubTracker, serving_stubs  # noqa: F401 (serving_stubs: the tests' and soak's)
from serving.triton_admin import AdminError, LockTimeout, TritonAdmin, built_spec, control_lock, drain, repository_of

log = logging.getLogger("watchdog")


@dataclasses.dataclass
class Crash:
    pid: int
    model: str | None
    version: str | None
    seen_at: float  # time.time()
    recovered_at: float | None = None
    unloaded: bool = False  # its version was unloaded on purpose: not a crash after all


def crash_counts(crashes: list[dict], models: list[str] = ()) -> dict[str, int]:
    """Crashes by model from a status() crash list (a version unloaded on purpose is no crash; a stub that died
    before its model was known counts as "unknown"); 0 for the `models` without one."""
    counts = dict.fromkeys(models, 0)
    for crash in crashes:
        if not crash["unloaded"]:
            model = crash["model"] or "unknown"
            counts[model] = counts.get(model, 0) + 1
    return counts


FAILED_CHECKS_BLIND = 3  # passes in a row that raised, after which readiness stops vouching for the stubs


def served_models(repository: Path | None) -> list[str]:
    """The model clients call (the ensemble the repository's BUILD.json names); [] where that is unknown. /ready
    asks for it by name: Triton's own readiness is 200 with it unloaded (a drain) and 503 while a rollout loads."""
    name = built_spec(repository).get("ensemble_name")
    return [name] if isinstance(name, str) and name else []


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
        self.failed_checks = 0  # passes in a row that raised
        self.retire_after_s = retire_after_s
        self.reload_timeout_s = 60.0
        self._reloading_since: float | None = None
        self.retired: list[int] = []
        self._retire: list[tuple[float, str, set[int]]] = []  # (when, model, stubs of its replaced instances)
        self._handled: set[int] = set()
        self.repository = repository_of(server_pid)  # whose model-control lock reloads take
        self.served = served_models(self.repository)  # what /ready also requires to be loaded
        self.lock_timeout_s = 600.0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.server_exited = False  # the watch ended because the server did

    # -- state ---------------------------------------------------------------------------------
    def _unrecovered(self) -> list[Crash]:
        with self._lock:
            return [c for c in self.crashes if c.recovered_at is None]

    def degraded(self) -> list[str]:
        return sorted({c.model or "?" for c in self._unrecovered()})

    def live(self) -> bool:
        """False once restarting the server is the way out: it exited or does not answer, a reload has hung
        for `reload_timeout_s`, or `max_failed_reloads` reloads failed in a row."""
        return not self.not_live()

    def not_live(self) -> str:
        """Why the server should be restarted (see `live`); empty while it need not be."""
        hung = self._reloading_since is not None and time.monotonic() - self._reloading_since > self.reload_timeout_s
        if self.failed_reloads >= self.max_failed_reloads:
            return f"{self.failed_reloads} reloads failed in a row: {self.last_error}"
        if hung:
            return f"a reload has hung for more than {self.reload_timeout_s:g} s"
        if not psutil.pid_exists(self.server_pid):
            return "tritonserver has exited"
        if not self.admin.live():
            return "tritonserver does not answer /v2/health/live"
        return ""

    def stub_models(self) -> list[str]:
        """The python-backend models whose stubs it has seen."""
        return sorted({model for model, _ in list(self.tracker.known.values())})

    def readiness(self) -> tuple[bool, str]:
        if self._thread is not None and not self._thread.is_alive() and not self._stop.is_set():
            return False, "the stub watchdog has stopped: a dead stub would go unseen"
        if self.failed_checks >= FAILED_CHECKS_BLIND:
            return False, f"the stub watchdog cannot check the stubs ({self.failed_checks} passes): {self.last_error}"
        degraded = self.degraded()
        if degraded:
            return False, f"a python-backend stub died: {', '.join(degraded)} reloading"
        if not self.served:
            return (True, "ready") if self.admin.ready() else (False, "tritonserver is not ready")
        # not Triton's own readiness: it is false while any version loads, a rollout's too
        missing = [m for m in self.served if not self.admin.model_ready(m)]
        if missing:
            return False, f"{', '.join(missing)} is not ready (unloaded, drained, or the server does not answer)"
        return True, "ready"

    def status(self) -> dict:
        ready, reason = self.readiness()
        with self._lock:
            crashes = [dataclasses.asdict(c) for c in self.crashes]
        return {"ready": ready, "reason": reason, "live": self.live(), "server_pid": self.server_pid,
                "crashes": crashes, "crash_counts": crash_counts(crashes, self.stub_models()),
                "reloads": self.reloads, "reloads_total": self.reloads, "failed_reloads": self.failed_reloads,
                "failed_checks": self.failed_checks,
                "last_error": self.last_error, "retired_stubs": list(self.retired),
                # every crash leaves its model's old version loaded for good (see docs/operations.md)
                "leaked_versions": sum(1 for c in crashes if c["recovered_at"] is not None and not c["unloaded"])}

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

    def _forget_unloaded(self, crashes: list[Crash], ready: dict[str, set[str]]) -> None:
        """A stub whose model version is not loaded any more ended with an unload (a rollout, `make ab-stop`,
        a model-control call), not a crash: there is nothing to bring back, and reloading a model that is
        gone would fail for ever."""
        now = time.time()
        with self._lock:
            for crash in crashes:
                if crash.model is not None and crash.version not in ready.get(crash.model, set()):
                    crash.recovered_at = now
                    crash.unloaded = True
                    log.info("stub %d of %s version %s ended with its version's unload: nothing to reload",
                             crash.pid, crash.model, crash.version)

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
        if not self._unrecovered():
            return
        try:
            # no rollout changes the repository meanwhile; a stop() does not wait for the lock
            with control_lock(self.repository, self.lock_timeout_s, self._stop):
                failed = not self._heal(stubs)
        except LockTimeout as exc:
            log.warning("not reloading yet: %s", exc)
            return
        if failed:
            self._stop.wait(min(30.0, 2.0 ** self.failed_reloads))  # back off, the lock released, before a new try

    def _heal(self, stubs: list[Stub]) -> bool:
        """Reload the models of the unrecovered crashes whose version is still loaded; False if a reload failed."""
        try:
            ready = self.admin.ready_versions()
        except (RuntimeError, OSError, ValueError) as exc:  # a wrong key: no reload can happen, so it failed
            self.failed_reloads += 1
            self.last_error = f"repository index failed: {exc}"
            log.error("reload failed (%d in a row): %s", self.failed_reloads, self.last_error)
            return False
        self._forget_unloaded(self._unrecovered(), ready)
        unrecovered = self._unrecovered()
        pending = {c.model for c in unrecovered if c.model}
        if any(c.model is None for c in unrecovered):  # seen dead only: reload every python-backend model loaded
            pending |= {model for model, _ in self.tracker.known.values() if model in ready}
        if not unrecovered:
            return True
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
            return False
        finally:
            self._reloading_since = None
        self.failed_reloads = 0
        self._retire += [(time.monotonic() + self.retire_after_s, m, pids) for m, pids in replaced.items() if pids]
        # learn the new stubs before /ready says 200: one that dies at once (a model that crashes on every
        # request) is then named, and only its model reloaded, not every python model as for an unknown stub
        self.tracker.scan()
        now = time.time()
        with self._lock:
            for crash in self.crashes:
                if crash.recovered_at is None and crash.model in pending | {None}:
                    crash.recovered_at = now
        return True

    def run(self) -> None:
        while not self._stop.is_set():
            try:
                self.check()
                self.failed_checks = 0
            except psutil.NoSuchProcess:  # a zombie too (serving.stubs)
                self.server_exited = True
                log.warning("tritonserver (pid %d) has exited", self.server_pid)
                return
            except Exception as exc:  # a torn answer, a process it may not read: the next pass tries again
                self.failed_checks += 1
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.exception("stub check failed (%d in a row)", self.failed_checks)
            self._stop.wait(self.interval_s)

    def start(self) -> "Watchdog":
        self.tracker.scan()  # learn the stubs alive now
        self._thread = threading.Thread(target=self.run, name="watchdog", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout_s: float | None = None) -> bool:
        """End the checks; False if the thread is still inside a call `timeout_s` later (it is a daemon)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            return not self._thread.is_alive()
        return True

    def __enter__(self) -> "Watchdog":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--server-pid", type=positive(int), help="the tritonserver process to watch")
    p.add_argument("--http", required=True, help="its HTTP host:port")
    p.add_argument("--address", default="127.0.0.1", help="address of /ready, /live, /status, /metrics (default: %(default)s)")
    p.add_argument("--port", type=port_number, default=8003, help="port of /ready, /live, /status, /metrics (default: %(default)s)")
    p.add_argument("--key-file", default=None, help="admin key file (default: serving.access's, .run/admin.key)")
    p.add_argument("--interval", type=positive(float), default=0.2, help="seconds between checks (default: %(default)s)")
    p.add_argument("--max-failed-reloads", type=positive(int), default=3,
                   help="failed reloads in a row after which /live answers 503 (default: %(default)s)")
    p.add_argument("--retire-after", type=number(float, 0), default=10.0,
                   help="seconds after a reload before the replaced instances' surviving stubs are killed "
                        "(default: %(default)s)")
    p.add_argument("--drain", action="store_true",
                   help="instead of watching: unload the ensembles, wait for their in-flight requests, exit "
                        "(before a SIGTERM: `make stop` does it; a Kubernetes preStop hook can)")
    p.add_argument("--drain-timeout", type=positive(float), default=30.0,
                   help="--drain: seconds to wait for the in-flight requests; a drain that times out says which "
                        "ensembles were still loaded, as a warning (default: %(default)s)")
    return p


def shell_exit_code(returncode: int) -> int:
    """A child's returncode as shells and container runtimes report it: 128 + N for one killed by signal N
    (Python's -N; sys.exit(-N) would give 256 - N), else its own code."""
    return 128 - returncode if returncode < 0 else returncode


def server_exit_code(pid: int) -> int:
    """What the watchdog run alone exits with once its server has exited, as serving.supervise does: 128 + N
    for a server killed by signal N, else the server's own code (1 for 0: it should not have stopped). Only
    the server's parent can read that (`tritonserver ... & exec python -m serving.watchdog --server-pid $!`);
    any other watchdog exits with 1."""
    try:
        reaped, status = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:  # not our child
        return 1
    if reaped != pid:
        return 1
    return shell_exit_code(os.waitstatus_to_exitcode(status)) or 1


def main(args: argparse.Namespace) -> int:
    """0 once stopped (SIGTERM, Ctrl-C) or drained (1 when the drain timed out); non-zero once the server it
    watches has exited, so that whatever runs the watchdog (a container runtime, systemd) restarts it and its
    server."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    headers = key_file_headers(args.key_file) if args.key_file else (lambda: admin_headers(protocol="http"))
    if args.drain:  # 1 when it timed out: a SIGTERM now would fail the requests still in flight
        try:
            drained = drain(TritonAdmin(args.http, headers), args.drain_timeout)
        except AdminError as exc:
            if exc.status not in (401, 403):
                raise
            key_file = args.key_file or KEY_FILE
            raise ValueError(f"{exc} (the admin key in {key_file} is not this server's: give --key-file the "
                             "admin.key in the .run/ folder where `make serve` ran)") from None
        drained.log(log)
        return 1 if drained.busy else 0
    if args.server_pid is None:
        raise ValueError("--server-pid is needed to watch a server")
    watchdog = Watchdog(args.server_pid, TritonAdmin(args.http, headers), args.interval, args.max_failed_reloads,
                        args.retire_after)
    http = endpoint(watchdog, args.address, args.port)
    watchdog.start()
    log.info("watching tritonserver pid %d; readiness on http://%s:%d/ready", args.server_pid, args.address,
             http.server_address[1])
    threading.Thread(target=http.serve_forever, daemon=True).start()
    try:
        while watchdog._thread.is_alive():
            watchdog._thread.join(1.0)
    except KeyboardInterrupt:
        pass
    finally:
        watchdog.stop()
        http.shutdown()
    if not watchdog.server_exited:
        return 0
    code = server_exit_code(args.server_pid)
    log.error("tritonserver (pid %d) is gone: the watchdog exits with code %d", args.server_pid, code)
    return code


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        sys.exit(main(get_args_parser().parse_args()))
    except (OSError, RuntimeError, ValueError, psutil.Error) as exc:
        sys.exit(f"serving.watchdog: {exc}")
