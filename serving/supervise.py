"""Run tritonserver under the stub watchdog: the container's entrypoint, or by hand.

    python -m serving.supervise [--address 0.0.0.0] [--port 8003] [--restarts 0] -- tritonserver --model-repository=/models ...

It starts the command after `--` (tritonserver and its flags) as its child and, once the server answers,
watches it with serving.watchdog: a python-backend stub that dies is reloaded, and its `/ready` says 503
meanwhile; `/live`, `/status` and `/metrics` as the watchdog's, with the server's starts and exits added (the
counts since the supervisor started). The probes of deploy/k8s point at this endpoint, its PodMonitor too.

- SIGTERM or SIGINT: `/ready` answers 503 at once; after `--unready-wait` seconds (the server still serving,
  for the load balancers to drop it) it drains (unload the ensembles, so that their in-flight requests
  finish), then SIGTERM to tritonserver; it exits with the server's exit code. No preStop hook is needed.
  Each step is bounded (the watchdog's thread: WATCHDOG_STOP_S; the drain and its calls: --drain-timeout).
- tritonserver exits by itself (Triton 2.51's python backend aborts the server on about 1 in 50 stub
  kills, docs/operations.md): the stubs it left are killed; with `--restarts N` the server is started
  again (at most N times, 1 s, 2 s, 4 s ... apart; `/ready` 503 meanwhile), else the supervisor exits with
  the server's code (1 if it was 0), and the container runtime or Kubernetes restarts the container.
  A first start that exits before the server answers (a repository or a flag that fails) is not retried.
- A running tritonserver that stays not live (`/live` 503: it stopped answering, a reload hung or kept
  failing) for `--unlive-restart` seconds is stopped (SIGTERM, SIGKILL 10 s later) and then counts as
  exited by itself: started again with a restart left, else the supervisor exits, for the container
  runtime to restart it (the kubelet's liveness probe, on the same 30 s, would restart the container too).
- As PID 1 it reaps the processes orphaned to it.

Model control is never left open: a tritonserver command without the restricted-API flags (either protocol)
gets them, for the APIs `make serve` restricts (serving.access.RESTRICTED), else anyone who reaches the port
could load a python model, i.e. run code. The key is TRITON_ADMIN_KEY's (as deploy/k8s passes it), else
`--key-file`'s, else a new one written to `--new-key-file` (0600, named in the log, removed on exit). A command
that has its own flags is left as it is; the supervisor then sends TRITON_ADMIN_KEY or `--key-file`'s key.
With TRITON_INFERENCE_KEY set (deploy/k8s: from the optional Secret triton-inference-key), inference goes behind
that key too (header triton-inference-key), unless the command's own flags restrict it already.

`--http-guard host:port` also listens there for HTTP and hands Triton only the requests serving.http_guard
finds well-formed (malformed bodies answered 400, never reaching Triton's parser; one kills Triton 2.51).
`--guard-http` puts the guard where the server's own HTTP endpoint would be (its `--http-address` and
`--http-port`, else Triton's 0.0.0.0:8000) and moves that endpoint to a free port on 127.0.0.1 behind it: the
images' default, so that a container started with tritonserver's flags alone is guarded on the port they name.

A repository built with `response_cache_mb` (BUILD.json) gets Triton's response cache of that size, unless
the command names its own `--cache-config`; a repository it cannot read (s3://) gets none unless given one.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Callable

import psutil

from serving.access import (INFERENCE, INFERENCE_KEY_ENV, KEY_ENV, RESTRICTED, inference_restricted_args,
                            key_file_headers, key_headers, read_key, restricted_args, write_key)
from serving.cache import cache_args, repository_cache_mb
from serving.stubs import STUB
from serving.triton_admin import TritonAdmin, drain
from serving.health import (bound_address, endpoint, free_port, has_flag, host_port, number, port_number, positive,
                            reachable)
from serving.watchdog import Watchdog, shell_exit_code

log = logging.getLogger("supervise")
RESTRICTED_FLAGS = ("--http-restricted-api", "--grpc-restricted-protocol")  # restricted_args' order
DRAIN_TIMEOUT_S = 15.0  # --drain-timeout's default
WATCHDOG_STOP_S = 5.0  # on SIGTERM, the longest wait for the watchdog's thread (it may be inside a reload)
UNLIVE_RESTART_S = 30.0  # --unlive-restart's default: the Deployment's liveness probe (3 failures 10 s apart)
UNLIVE_CHECK_S = 1.0  # seconds between the liveness checks of the running server
UNLIVE_KILL_S = 10.0  # a server ended for not being live gets SIGKILL this long after its SIGTERM


def flag_values(command: list[str]) -> dict[str, list[str]]:
    """Each `--flag=value` or `--flag value` of `command`, by flag name (no dashes), in order."""
    flags: dict[str, list[str]] = {}
    for i, arg in enumerate(command):
        if arg.startswith("--") and "=" in arg:
            name, value = arg[2:].split("=", 1)
            flags.setdefault(name, []).append(value)
        elif arg.startswith("--") and i + 1 < len(command) and not command[i + 1].startswith("--"):
            flags.setdefault(arg[2:], []).append(command[i + 1])
    return flags


def http_place(command: list[str]) -> tuple[str, str]:
    """The address tritonserver's HTTP endpoint binds and its port, from its flags (Triton's 0.0.0.0:8000 without)."""
    flags = {name: values[-1] for name, values in flag_values(command).items()}
    return bound_address(flags.get("http-address", "0.0.0.0")), flags.get("http-port", "8000")


def http_url(command: list[str]) -> str:
    """Where tritonserver's HTTP endpoint answers on this host, from its flags (Triton's default port 8000)."""
    host, port = http_place(command)
    return host_port(reachable(host), port)


def without_flags(command: list[str], names: tuple[str, ...]) -> list[str]:
    """`command` less each `--name=value` or `--name value` of `names` (no dashes), read as flag_values reads them."""
    kept, i = [], 0
    while i < len(command):
        arg = command[i]
        if arg.startswith("--") and arg[2:].split("=", 1)[0] in names:
            has_value = "=" not in arg and i + 1 < len(command) and not command[i + 1].startswith("--")
            i += 2 if has_value else 1
        else:
            kept.append(arg)
            i += 1
    return kept


def guard_in_place(command: list[str]) -> tuple[list[str], tuple[str, int]]:
    """--guard-http: where the tritonserver `command` would serve HTTP (host, port), for the guard, and the
    command with its HTTP endpoint moved to a free port on 127.0.0.1."""
    if not is_tritonserver(command):
        raise ValueError("--guard-http needs a tritonserver command (its --http-address and --http-port)")
    if flag_values(command).get("allow-http", ["true"])[-1].lower() in ("false", "0", "off", "no"):
        raise ValueError("--guard-http: the server's HTTP endpoint is off (--allow-http=false), nothing to guard")
    host, port = http_place(command)
    try:
        place = host, port_number(port)
    except argparse.ArgumentTypeError as exc:
        raise ValueError(f"--guard-http: tritonserver's --http-port: {exc}") from None
    if place[1] == 0:
        raise ValueError("--guard-http: tritonserver's --http-port is 0; name the port the guard listens on")
    moved = [*without_flags(command, ("http-address", "http-port")), "--http-address=127.0.0.1",
             f"--http-port={free_port()}"]
    return moved, place


def with_cache(command: list[str]) -> tuple[list[str], int]:
    """`command` with the response cache its model repositories ask for (BUILD.json's response_cache_mb, the
    largest where several do) and that size in MiB; as it is where it names its own `--cache-config`, is no
    tritonserver, or serves a repository this process cannot read (s3://: pass --cache-config yourself)."""
    if not is_tritonserver(command) or has_flag(command, "--cache-config"):
        return command, 0
    size_mb = max((repository_cache_mb(r) for r in flag_values(command).get("model-repository", [])), default=0)
    return [*command, *cache_args(size_mb)], size_mb


def is_tritonserver(command: list[str]) -> bool:
    """Whether `command` starts tritonserver: the binary (any path) or the launcher, python -m serving.tritonserver."""
    return Path(command[0]).name == "tritonserver" or "serving.tritonserver" in command[1:3]


def restricted_groups(command: list[str], flag: str) -> set[str]:
    """The API groups that `command`'s `flag` (one of RESTRICTED_FLAGS, each given any number of times as
    `<api>,<api>:<header>=<key>`) puts behind a key."""
    values = flag_values(command).get(flag.lstrip("-"), [])
    return {api for value in values for api in value.split(":", 1)[0].split(",")}


def missing_restrictions(command: list[str]) -> list[str]:
    """The restricted-API flags (HTTP's, gRPC's) by which a tritonserver `command` restricts none of the APIs
    `make serve` does (one that restricts inference alone counts as missing); [] for any other command."""
    if not is_tritonserver(command):
        return []
    return [f for f in RESTRICTED_FLAGS if not restricted_groups(command, f) & set(RESTRICTED)]


def restrict(command: list[str], key: str) -> list[str]:
    """`command` with the restricted-API flags it lacks, all guarded by `key`."""
    missing = missing_restrictions(command)
    return [*command, *(a for a in restricted_args(key) if a.split("=", 1)[0] in missing)]


def restrict_inference(command: list[str], key: str) -> list[str]:
    """`command` with inference behind `key` (TRITON_INFERENCE_KEY) on each protocol whose flags do not put it
    behind a key already; as it is for any other command than tritonserver."""
    if not is_tritonserver(command):
        return command
    return [*command, *(a for a in inference_restricted_args(key)
                        if not set(INFERENCE) <= restricted_groups(command, a.split("=", 1)[0]))]


def default_key_file(command: list[str]) -> Path:
    """Where a generated key goes: the temporary folder (writable under a read-only root), one per HTTP port."""
    return Path(tempfile.gettempdir()) / f"triton-admin-{http_url(command).rsplit(':', 1)[1]}.key"


class Supervisor:
    """One tritonserver at a time, its watchdog, and what the endpoint reports for both."""

    def __init__(self, command: list[str], admin: TritonAdmin, restarts: int = 0,
                 drain_timeout_s: float = DRAIN_TIMEOUT_S, start_timeout_s: float = 600.0, unready_wait_s: float = 0.0,
                 unlive_restart_s: float = UNLIVE_RESTART_S, **watchdog_args):
        self.command, self.admin, self.restarts = command, admin, restarts
        self.drain_timeout_s, self.start_timeout_s = drain_timeout_s, start_timeout_s
        self.unready_wait_s, self.unlive_restart_s = unready_wait_s, unlive_restart_s
        self.watchdog_args = watchdog_args
        self.process: subprocess.Popen | None = None
        self.watchdog: Watchdog | None = None
        self.exits: list[int] = []  # exit codes of the servers that ended by themselves
        self.starts = 0
        self.past_crashes: Counter[str] = Counter()  # by model (0 for those served), the servers before this one
        self.past_reloads = 0
        self._counts = threading.Lock()  # the past counts and the watchdog change together (counters never dip)
        self.stopping = threading.Event()
        self._exit_error = ""
        self._not_live = ""  # why the running server is being restarted, when it did not exit by itself
        self.guard = None  # serving.http_guard.Guard in front of the server's HTTP port (--http-guard), if any

    @property
    def last_error(self) -> str:
        watchdog = self.watchdog
        return (watchdog.last_error if watchdog is not None else "") or self._exit_error

    # -- what the endpoint asks ----------------------------------------------------------------
    def readiness(self) -> tuple[bool, str]:
        if self.stopping.is_set():
            return False, "stopping"
        watchdog = self.watchdog
        if watchdog is None:
            return False, "tritonserver is restarting" if self.exits else "tritonserver is starting"
        return watchdog.readiness()

    def live(self) -> bool:
        """Starting, restarting and stopping count as live (the container's own restart is for when none of
        those ends); otherwise the watchdog's answer."""
        watchdog = self.watchdog
        return True if watchdog is None or self.stopping.is_set() else watchdog.live()

    def status(self) -> dict:
        ready, reason = self.readiness()
        with self._counts:
            watchdog, counts, past_reloads = self.watchdog, Counter(self.past_crashes), self.past_reloads
        state = watchdog.status() if watchdog is not None else {"live": self.live(), "crashes": [], "reloads": 0}
        # the counts since the supervisor started, the crashes before this server's too
        counts.update(state.get("crash_counts", {}))  # update(), not +: the served models' zeros stay
        return {**state, "ready": ready, "reason": reason, "starts": self.starts, "server_exits": list(self.exits),
                "restarts_left": self.restarts, "crash_counts": dict(sorted(counts.items())),
                "reloads_total": past_reloads + state["reloads"],
                **({"http_guard": self.guard.counts()} if self.guard is not None else {})}

    # -- the server's life ---------------------------------------------------------------------
    def _reap(self) -> int | None:
        """Reap every child that has ended (orphans too, as PID 1); tritonserver's exit code once it has."""
        code = None
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return code if code is not None else (self.process.returncode if self.process else 0)
            if pid == 0:
                return code
            if self.process is not None and pid == self.process.pid:
                code = self.process.returncode = os.waitstatus_to_exitcode(status)

    def _wait_answering(self) -> int | None:
        """Until tritonserver answers /v2/health/live (it opens its endpoints once the startup loads are done);
        its exit code if it ends first, None when it answers or a stop was asked."""
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline and not self.stopping.is_set():
            code = self._reap()
            if code is not None:
                return code
            if self.admin.live():
                return None
            time.sleep(0.2)
        return None

    def _wait_exit(self) -> int:
        """tritonserver's exit code once it ends or is stopped; a server that has not been live for
        `unlive_restart_s` is ended (what the kubelet's liveness probe does, where no kubelet watches)."""
        unlive_since, checked = None, 0.0
        while True:
            code = self._reap()
            if code is not None:
                return code
            if self.stopping.wait(0.2):
                return self._stop_server()
            if not self.unlive_restart_s or time.monotonic() - checked < UNLIVE_CHECK_S:
                continue
            why, checked = self.watchdog.not_live(), time.monotonic()
            if not why:
                unlive_since = None
            elif unlive_since is None:
                unlive_since = checked
                log.warning("tritonserver is not live (%s); ending it if it stays so for %g s", why,
                            self.unlive_restart_s)
            elif checked - unlive_since >= self.unlive_restart_s and not self.stopping.is_set():
                self._not_live = f"tritonserver was not live for {checked - unlive_since:.0f} s ({why})"
                return self._end_not_live()

    def _end_not_live(self) -> int:
        """SIGTERM to a server that is no longer live, SIGKILL if it has not ended UNLIVE_KILL_S later (a hung
        server may never act on SIGTERM); its exit code."""
        log.error("%s; stopping it", self._not_live)
        self.watchdog.stop(WATCHDOG_STOP_S)
        return self._terminate(UNLIVE_KILL_S)

    def _reaped_within(self, timeout_s: float) -> int | None:
        """tritonserver's exit code once it has ended, reaping meanwhile; None if it runs `timeout_s` later."""
        deadline = time.monotonic() + timeout_s
        while (code := self._reap()) is None and time.monotonic() < deadline:
            time.sleep(0.1)
        return code

    def _stop_server(self) -> int:
        if self.watchdog is not None:
            if self.unready_wait_s:
                log.info("stopping: /ready answers 503, draining in %g s", self.unready_wait_s)
                time.sleep(self.unready_wait_s)
            # first, so that it does not take the stopping server's stubs for crashed ones
            if not self.watchdog.stop(WATCHDOG_STOP_S):
                log.warning("the stub watchdog is still inside a model-control call after %g s; draining anyway",
                            WATCHDOG_STOP_S)
            try:
                drain(self.admin, self.drain_timeout_s).log(log)
            except (RuntimeError, OSError, ValueError) as exc:
                log.warning("drain failed (%s); stopping anyway", exc)
        return self._terminate(120)

    def _terminate(self, kill_after_s: float) -> int:
        """SIGTERM to tritonserver (unless it has ended), SIGKILL if it runs `kill_after_s` later; its exit code."""
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
        code = self._reaped_within(kill_after_s)
        if code is None:
            log.warning("tritonserver did not end %g s after SIGTERM; killing it", kill_after_s)
            self.process.kill()
            code = self._reaped_within(float("inf"))
        return code

    def _kill_leftover_stubs(self, known: list[int]) -> None:
        """The stubs of a server that died on its own would otherwise keep their memory (and /dev/shm)."""
        for pid in known:
            try:
                stub = psutil.Process(pid)
                if STUB in " ".join(stub.cmdline()):
                    stub.kill()
                    log.warning("killed stub %d left by the server that exited", pid)
            except psutil.Error:
                continue

    def run(self) -> int:
        """Serve until stopped (the server's exit code) or until the server exits with no restart left."""
        backoff = 1.0
        while True:
            self.process = subprocess.Popen(self.command)
            self.starts += 1
            log.info("started %s (pid %d)", " ".join(self.command[:1]), self.process.pid)
            code = self._wait_answering()
            if code is not None and self.starts == 1:  # a repository or flag that fails is not healed by restarts
                log.error("tritonserver exited with code %d before it answered; not restarting it", code)
                return code or 1
            if code is None and not self.stopping.is_set():
                self.watchdog = Watchdog(self.process.pid, self.admin, **self.watchdog_args).start()
                log.info("watching tritonserver pid %d", self.process.pid)
            if code is None:
                code = self._wait_exit()
            if self.stopping.is_set():
                log.info("tritonserver exited with code %d", code)
                return code
            known = list(self.watchdog.tracker.known) if self.watchdog is not None else []
            if self.watchdog is not None:
                self.watchdog.stop()
                ended = self.watchdog.status()
                with self._counts:
                    self.past_crashes.update(ended["crash_counts"])
                    self.past_reloads += ended["reloads"]
                    self.watchdog = None
            self.exits.append(code)
            self._exit_error = self._not_live or f"tritonserver exited by itself with code {code}"
            self._not_live = ""
            self._kill_leftover_stubs(known)
            if self.restarts <= 0:
                log.error("%s; no restart left", self._exit_error)
                return code or 1
            self.restarts -= 1
            log.error("%s; starting it again in %.0f s (%d restart(s) left)", self._exit_error, backoff,
                      self.restarts)
            if self.stopping.wait(backoff):
                return code or 1
            backoff = min(30.0, backoff * 2)


def admin_key(key_file: str | None) -> tuple[str | None, Callable[[], dict[str, str]]]:
    """The admin key given (TRITON_ADMIN_KEY, else `key_file`'s; None) and the HTTP headers that send it."""
    key = os.environ.get(KEY_ENV)
    if key:
        return key, lambda: key_headers(key, "http")
    if key_file:
        headers = key_file_headers(key_file)  # refuses a file without a key
        return read_key(Path(key_file)), headers
    return None, dict


def guard_address(text: str) -> tuple[str, int]:
    """--http-guard's argparse type: `host:port` or `[v6]:port` (serving.http_guard, imported only when given)."""
    from serving.http_guard import split_host_port

    return split_host_port(text)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--address", default="127.0.0.1", help="address of /ready, /live, /status, /metrics (default: %(default)s)")
    p.add_argument("--port", type=port_number, default=8003, help="port of /ready, /live, /status, /metrics (default: %(default)s)")
    p.add_argument("--restarts", type=number(int, 0), default=0,
                   help="times to start tritonserver again after it exits by itself; 0: exit with it, for a "
                        "container runtime or Kubernetes to restart (default: %(default)s)")
    p.add_argument("--unlive-restart", type=number(float, 0), default=UNLIVE_RESTART_S,
                   help="seconds a running tritonserver may stay not live (/live's 503: it does not answer, a reload "
                        "hung or kept failing) before it is stopped, then started again (--restarts) or the "
                        "supervisor exits; 0: never, /live is left to Kubernetes (default: %(default)s)")
    p.add_argument("--key-file", default=None, help=f"admin key file, when ${KEY_ENV} is not set")
    p.add_argument("--new-key-file", default=None,
                   help=f"where a generated admin key is written (0600) when the server's command lacks the "
                        f"restricted-API flags and neither ${KEY_ENV} nor --key-file gives one "
                        f"(default: {tempfile.gettempdir()}/triton-admin-<http port>.key)")
    p.add_argument("--drain-timeout", type=positive(float), default=DRAIN_TIMEOUT_S,
                   help="seconds to wait for the ensembles' in-flight requests on SIGTERM (default: %(default)s)")
    p.add_argument("--unready-wait", type=number(float, 0), default=0.0,
                   help="seconds between SIGTERM and the drain, /ready answering 503 and the server still serving, "
                        "for endpoints and load balancers to drop it (default: %(default)s; deploy/k8s: 5)")
    p.add_argument("--interval", type=positive(float), default=0.2, help="seconds between stub checks (default: %(default)s)")
    p.add_argument("--http-guard", default=None, metavar="HOST:PORT", type=guard_address,
                   help="also listen here for HTTP, forwarding to the server's HTTP port only the requests "
                        "serving.http_guard finds well-formed (default: none)")
    p.add_argument("--guard-http", action="store_true",
                   help="put the HTTP guard where the server's HTTP endpoint would be (its --http-address and "
                        "--http-port, else 0.0.0.0:8000) and move that endpoint to a free port on 127.0.0.1 behind it")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- tritonserver and its flags")
    return p


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        raise ValueError("no server command: python -m serving.supervise [options] -- tritonserver ...")
    if args.guard_http and args.http_guard:
        raise ValueError("--guard-http and --http-guard: give one (the guard listens in one place)")
    public = command  # as given: a generated key file is named after the HTTP port the clients use
    if args.guard_http:
        command, args.http_guard = guard_in_place(command)
    key, headers = admin_key(args.key_file)
    missing, generated = missing_restrictions(command), None
    if missing and not key:
        generated = Path(args.new_key_file) if args.new_key_file else default_key_file(public)
        key = write_key(generated)
        log.info("admin key for model control, config, statistics, trace, logging, shared memory: %s", generated)
        if RESTRICTED_FLAGS[0] in missing:
            headers = lambda: key_headers(key, "http")  # noqa: E731
    if missing:
        command = restrict(command, key)
    if os.environ.get(INFERENCE_KEY_ENV):
        keyed = restrict_inference(command, os.environ[INFERENCE_KEY_ENV])
        if keyed != command:
            log.info("inference behind the key in $%s", INFERENCE_KEY_ENV)
        command = keyed
    command, cache_mb = with_cache(command)
    if cache_mb:
        log.info("response cache: %d MiB, as the repository's BUILD.json asks (response_cache_mb)", cache_mb)
    try:
        return supervise(command, headers, args)
    finally:
        if generated is not None:
            generated.unlink(missing_ok=True)


def supervise(command: list[str], headers: Callable[[], dict[str, str]], args: argparse.Namespace) -> int:
    """Run `command` under a Supervisor whose model-control calls carry `headers()`, with its endpoint."""
    supervisor = Supervisor(command, TritonAdmin(http_url(command), headers), args.restarts, args.drain_timeout,
                            unready_wait_s=args.unready_wait, unlive_restart_s=args.unlive_restart,
                            interval_s=args.interval)
    # Set from another thread: the main thread may be inside the Event's own lock when the signal lands.
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: threading.Thread(target=supervisor.stopping.set).start())
    guard = None
    if args.http_guard:
        from serving.http_guard import Guard, GuardThread

        supervisor.guard = Guard(http_url(command))
        guard = GuardThread(supervisor.guard, *args.http_guard).start()
        log.info("http guard on http://%s, forwarding to http://%s", host_port(guard.host, guard.port),
                 supervisor.guard.upstream)
    http = endpoint(supervisor, args.address, args.port)
    threading.Thread(target=http.serve_forever, daemon=True).start()
    log.info("readiness on http://%s:%d/ready", args.address, args.port)
    try:
        code = supervisor.run()
    finally:
        http.shutdown()
        if guard is not None:
            guard.stop()
    return shell_exit_code(code)


if __name__ == "__main__":
    try:
        sys.exit(main(get_args_parser().parse_args()))
    except (OSError, ValueError) as exc:
        sys.exit(f"serving.supervise: {exc}")
