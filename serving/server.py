"""Start, wait for and stop a real `tritonserver` process (used by `make serve`, the demo, tests).

    python -m serving.server start --model-repository model_repository [--http-port 8000 ...]
    python -m serving.server status
    python -m serving.server stop
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import ipaddress
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from common.files import write_whole
from serving import access
from serving.cache import cache_args, repository_cache_mb
from serving.health import (address_family, bound_address, free_port, host_port, number, port_number, positive,
                            reachable)
from serving.tritonserver import LOOPBACK, address_flags

RUN_DIR = Path(".run")  # where `make serve` keeps its state: the folder it runs in (the checkout, for make)
# The .run/ of the checkout this code was imported from: where the tools look when the current folder has none.
CHECKOUT_RUN_DIR = Path(__file__).resolve().parent.parent / RUN_DIR
# A .run/ folder the tools read `make serve`'s server and key from instead (its state, not ./.run's or the checkout's).
RUN_DIR_ENV = "TRITON_RUN_DIR"
STATE_FILE = "tritonserver.json"
START_LOCK = "serve.lock"  # held by `make serve` while it starts a server (start_lock)
log = logging.getLogger("serving.server")


class ServerError(RuntimeError):
    pass


@dataclasses.dataclass
class Ports:
    http: int = 8000
    grpc: int = 8001
    metrics: int = 8002

    @classmethod
    def free(cls, host: str = "127.0.0.1") -> "Ports":
        """Three distinct free ports (all three held open while they are chosen, so none repeats)."""
        sockets = [socket.socket() for _ in range(3)]
        try:
            for s in sockets:
                s.bind((host, 0))
            return cls(*(s.getsockname()[1] for s in sockets))
        finally:
            for s in sockets:
                s.close()

    def in_use(self, host: str) -> list[str]:
        """'<name> port <n>' for each port something on `host` is already bound to."""
        return [f"{name} port {port}" for name, port in dataclasses.asdict(self).items() if _port_taken(host, port)]


def terminate(process: subprocess.Popen | None, timeout: float = 30.0) -> None:
    """SIGTERM a child we started, wait up to `timeout`, then SIGKILL; nothing if it has exited."""
    if process is None or process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def terminate_pid(pid: int, timeout: float = 30.0) -> None:
    """The same for a detached process known by pid (`make stop`, `make monitor-stop`)."""
    try:
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while _pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if _pid_alive(pid):
            os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:  # it exited between the check and the signal
        pass
    except PermissionError:
        log.warning("pid %d belongs to another user now: not ours, left it alone", pid)


def stop_tree(pid: int, timeout: float = 30.0, child: subprocess.Popen | None = None) -> None:
    """SIGTERM `pid` (a supervisor drains and stops its server), wait, SIGKILL it; then SIGKILL whatever it
    started that is left (a supervisor killed in the middle would leave tritonserver and its stubs). `child`:
    its Popen where this process started it, waited on (a polled child stays a zombie, alive to kill -0)."""
    import psutil

    try:
        family = psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        family = []
    if child is not None:
        terminate(child, timeout)
    else:
        terminate_pid(pid, timeout)
    for process in family:
        try:
            process.kill()
        except psutil.Error:
            continue


def bind_address(address: str) -> str:
    """`address` (an IPv6 one as `::1`, `[::1]` or Triton's `ipv6:::1`, returned bare and compressed) if this
    machine can bind it; else why not, as a ValueError."""
    bare = bound_address(address)
    if ":" not in bare:
        return bare
    try:
        bare = str(ipaddress.IPv6Address(bare))
    except ValueError:
        raise ValueError(f"address {address}: neither an IPv4 address or host name nor an IPv6 address") from None
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind((bare, 0))
    except OSError as exc:
        raise ValueError(f"address {address}: this machine cannot bind it ({exc.strerror or exc})") from None
    return bare


class TritonServer:
    """One tritonserver process on loopback (or `address`, IPv4 or IPv6). A context manager."""

    def __init__(self, model_repository: str | Path, ports: Ports | None = None, address: str = LOOPBACK,
                 log_file: str | Path | None = None, extra_args: list[str] | None = None,
                 supervisor: list[str] | None = None, env: dict[str, str] | None = None):
        self.model_repository = Path(model_repository)
        self.env = env or {}  # added to this process's environment for the server (and its stubs)
        self.supervisor = supervisor or []  # a command that runs the server (after its `--`): serving.supervise
        self.ports = ports or Ports.free()
        try:
            self.address = bind_address(address)
        except ValueError as exc:
            raise ServerError(str(exc)) from None
        self.log_file = Path(log_file) if log_file else None
        self.extra_args = extra_args or []
        self.process: subprocess.Popen | None = None
        self._log_start = 0  # where this start's lines begin in log_file (it is appended to)

    @property
    def http_url(self) -> str:
        return host_port(self.address, self.ports.http)

    @property
    def grpc_url(self) -> str:
        return host_port(self.address, self.ports.grpc)

    @property
    def metrics_url(self) -> str:
        return f"http://{host_port(self.address, self.ports.metrics)}/metrics"

    def command(self) -> list[str]:
        """The `tritonserver` launcher as a user types it (the console script in this environment)."""
        script = Path(sys.executable).parent / "tritonserver"
        launcher = [str(script)] if script.exists() else [sys.executable, "-m", "serving.tritonserver"]
        # The launcher binds to loopback by default; pass addresses only to bind elsewhere.
        addresses = [] if self.address == LOOPBACK else address_flags(self.address)
        return [
            *launcher,
            f"--model-repository={self.model_repository.resolve()}",
            f"--http-port={self.ports.http}", f"--grpc-port={self.ports.grpc}", f"--metrics-port={self.ports.metrics}",
            *addresses,
            *self.extra_args,
        ]

    def check(self) -> None:
        """ServerError for what would stop the start: no repository, or a port taken (another server there
        would answer the readiness probe for this one)."""
        if not self.model_repository.is_dir():
            raise ServerError(f"no model repository at {self.model_repository}: run `make engines` first")
        taken = self.ports.in_use(self.address)
        if taken:
            raise ServerError(f"{', '.join(taken)} on {self.address} already in use (another server?): stop it, or "
                              "choose other ports (make serve HTTP_PORT=... GRPC_PORT=... METRICS_PORT=...; "
                              "python -m clients.demo --http-port ...)")

    def launch(self, detach: bool = False) -> subprocess.Popen:
        """check(), then start the process without waiting for it (start() waits until it is ready)."""
        self.check()
        project_root = str(Path(__file__).resolve().parent.parent)
        env = {**os.environ, **self.env}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (project_root, env.get("PYTHONPATH")) if p)
        command = [*self.supervisor, *self.command()]
        with contextlib.ExitStack() as stack:
            output = subprocess.DEVNULL
            if self.log_file:
                self._log_start = self.log_file.stat().st_size if self.log_file.exists() else 0
                output = stack.enter_context(open(self.log_file, "ab"))  # the child keeps its own descriptor
            self.process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=env,
                                            start_new_session=detach)
        return self.process

    def start(self, timeout: float = 120.0, detach: bool = False) -> "TritonServer":
        self.launch(detach)
        try:
            self.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def is_ready(self, url: str | None = None) -> bool:
        """Whether `url` (default: the server's /v2/health/ready) answers 200."""
        try:
            with urllib.request.urlopen(url or f"http://{self.http_url}/v2/health/ready", timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def wait_ready(self, timeout: float, url: str | None = None) -> None:
        """Until is_ready(url); ServerError if the process exits first or `timeout` passes."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise ServerError(f"tritonserver exited with code {self.process.returncode} while starting"
                                  + self._log_hint())
            if self.is_ready(url):
                return
            time.sleep(0.25)
        raise ServerError(f"{url or 'tritonserver'} not ready after {timeout:.0f} s" + self._log_hint())

    def _log_hint(self) -> str:
        if not self.log_file or not self.log_file.exists():
            return ""
        with open(self.log_file, "rb") as f:
            f.seek(self._log_start)  # this start's lines only
            lines = f.read().decode(errors="replace").splitlines()
        errors = [ln for ln in lines if " E" in ln[:12] or "error" in ln.lower()][-8:]
        return f"; see {self.log_file}:\n" + "\n".join(errors or lines[-8:])

    def stop(self, timeout: float = 30.0) -> None:
        if self.supervisor and self.process is not None:
            stop_tree(self.process.pid, timeout, self.process)
        else:
            terminate(self.process, timeout)

    def __enter__(self) -> "TritonServer":
        return self.start() if self.process is None else self

    def __exit__(self, *exc) -> None:
        self.stop()


# ---- `make serve` / `make stop`: a detached server remembered in .run/ -------------------------

def _state_file(run_dir: Path = RUN_DIR) -> Path:
    return run_dir / STATE_FILE


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


EXITED = "exited"
START_SLACK_S = 1.0  # psutil adds the kernel's boot time, whole seconds that can move by one


def recorded_pid(info: dict) -> int:
    """The pid a state file records; ValueError, KeyError or TypeError if it records none."""
    pid = int(info["pid"])
    if pid <= 0:
        raise ValueError(f"pid {pid}")
    return pid


def start_time(pid: int) -> float:
    """When `pid` started (seconds since the epoch), as recorded beside it in a state file."""
    import psutil

    return psutil.Process(pid).create_time()


def not_ours(info: dict, program: str, state: Path) -> str | None:
    """None while the pid in `info` (read from `state`) is still the process that was recorded: its start time
    is `info["started"]`, or, in a state from before start times were recorded, `program` is in its command
    line and it is older than `state`. Otherwise EXITED, or who has the pid now."""
    import psutil

    pid = recorded_pid(info)
    try:
        process = psutil.Process(pid)
        started = process.create_time()
        os.kill(pid, 0)
        if process.status() == psutil.STATUS_ZOMBIE:  # killed, its parent has not reaped it yet
            return EXITED
        recorded = info.get("started")
        if isinstance(recorded, (int, float)) and not isinstance(recorded, bool):
            if abs(started - recorded) <= START_SLACK_S:
                return None
        elif program in " ".join(process.cmdline()) and started <= state.stat().st_mtime + START_SLACK_S:
            return None
    except (psutil.NoSuchProcess, ProcessLookupError, FileNotFoundError):
        return EXITED
    except (psutil.AccessDenied, PermissionError):
        return "another user's process has it now"
    return f"another process has it now, started {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(started))}"


def left_alone(pid: int, program: str, make_target: str, gone: str) -> str:
    """What `make stop` and `make monitor-stop` say of a recorded pid that another process has now."""
    return f"pid {pid} is not the {program} `make {make_target}` started ({gone}): not ours, left it alone; forgot it"


# relative to where `make serve` ran
RECORDED_PATHS = ("log", "model_repository", "admin_key_file", "inference_key_file")


def served(run_dir: Path = RUN_DIR) -> dict | None:
    """What `make serve` recorded in `run_dir` (pid, http and grpc host:port, metrics URL, log, admin key file,
    the inference key file when it made one)
    while that server runs or starts, its paths made absolute (they were recorded relative to the folder
    `make serve` ran in); None if there is none. The clients default to its ports."""
    state = _state_file(run_dir)
    try:
        info = json.loads(state.read_text())
        if not_ours(info, "tritonserver", state) is not None:
            return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    base = run_dir.resolve().parent
    info.setdefault("admin_key_file", str(run_dir.resolve() / access.KEY_FILE.name))  # where make serve writes it
    for key in RECORDED_PATHS:
        if isinstance(info.get(key), str):
            info[key] = str(base / info[key])  # an absolute path stays as it is
    return info


def run_dirs(environ: dict | None = None) -> list[Path]:
    """Where the tools look for `make serve`'s state, in order: $TRITON_RUN_DIR alone when set; else ./.run,
    then the .run/ of the checkout this code was imported from (a tool run from another folder)."""
    environ = os.environ if environ is None else environ
    if environ.get(RUN_DIR_ENV):
        return [Path(environ[RUN_DIR_ENV])]
    here = RUN_DIR.resolve()
    return [RUN_DIR] if here == CHECKOUT_RUN_DIR else [RUN_DIR, CHECKOUT_RUN_DIR]


def servers_found(environ: dict | None = None) -> list[dict]:
    """served() of each of run_dirs() that records a running server, in that order: the first is the tools'
    default; each carries its own admin key file, for that server's URLs only."""
    return [info for info in map(served, run_dirs(environ)) if info is not None]


def find_served(environ: dict | None = None) -> dict | None:
    """The server the tools use by default: the first of servers_found(); None if none runs."""
    return next(iter(servers_found(environ)), None)


def _addresses(host_port: str) -> set[str]:
    """The IP addresses `host:port`'s host resolves to (none if it does not)."""
    host, _, port = host_port.rpartition(":")
    try:
        return {info[4][0] for info in socket.getaddrinfo(host.strip("[]"), int(port), type=socket.SOCK_STREAM)}
    except (OSError, ValueError):
        return set()


def is_served(url: str, running: dict | None) -> bool:
    """Whether `url` reaches the server `make serve` started (its HTTP, gRPC or guard port), however its host is
    spelt (localhost, 127.0.0.1)."""
    if not running:
        return False
    ports = (running.get("http"), running.get("grpc"), running.get("guard"))  # a hand-written state may lack one
    for recorded in filter(None, ports):
        if url == recorded or (url.rpartition(":")[2] == recorded.rpartition(":")[2]
                               and _addresses(url) & _addresses(recorded)):
            return True
    return False


def recorded_for(url: str, found: list[dict]) -> dict | None:
    """The first of `found` (servers_found()) that `url` reaches: whose admin key may be sent to `url`."""
    return next((info for info in found if is_served(url, info)), None)


def key_file_for(url: str) -> Path:
    """The admin key file `make serve` wrote for the server `url` reaches, found from any folder; else
    access.KEY_FILE (./.run/admin.key)."""
    recorded = recorded_for(url, servers_found())
    return Path(recorded["admin_key_file"]) if recorded else access.KEY_FILE


def inference_key_for(url: str, found: list[dict] | None = None) -> str | None:
    """The inference key `make serve INFERENCE_KEY=1` wrote for the server `url` reaches (`found`: servers_found()),
    else $TRITON_INFERENCE_KEY (the key a supervisor given it restricts inference with), else None."""
    recorded = recorded_for(url, servers_found() if found is None else found)
    path = (recorded or {}).get("inference_key_file")
    return (access.read_key(Path(path)) if path else None) or os.environ.get(access.INFERENCE_KEY_ENV) or None


# `make serve` exports p50/p99 latency summaries, which `make monitor`'s rules and dashboard read
# (deploy/monitoring, docs/operations.md).
# Explicit model control (all models loaded at start) lets serving/watchdog.py reload a model whose
# python-backend stub died; a 15 s exit timeout bounds SIGTERM (docs/operations.md, self-healing).
SERVE_EXTRA_ARGS = ["--metrics-config=summary_latencies=true", "--model-control-mode=explicit", "--load-model=*",
                    "--exit-timeout-secs=15"]


def supervisor_command(address: str, port: int, restarts: int, key_file: Path, guard_port: int = 0) -> list[str]:
    """serving.supervise as `make serve` runs it: the stub watchdog's /ready /live /status on `port`, the
    server restarted up to `restarts` times when it exits by itself, serving.http_guard on `guard_port` (0:
    none); the server's command follows."""
    guard = ["--http-guard", host_port(address, guard_port)] if guard_port else []
    return [sys.executable, "-m", "serving.supervise", "--address", address, "--port", str(port),
            "--restarts", str(restarts), "--key-file", str(Path(key_file).resolve()), *guard, "--"]


def server_pid(info: dict) -> int:
    """The pid of the tritonserver a `make serve` state names now (under a supervisor, its current child)."""
    if not info.get("supervisor"):
        return int(info["pid"])
    import psutil

    for child in psutil.Process(int(info["pid"])).children():
        try:
            if child.name() == "tritonserver" or "tritonserver" in " ".join(child.cmdline()[:2]):
                return child.pid
        except psutil.Error:
            continue
    raise ServerError(f"the supervisor (pid {info['pid']}) runs no tritonserver now (restarting?)")


# The flags that tell the server `make serve` started from any other: its repository, its HTTP port (and address).
SERVER_IDENTITY = ("--model-repository=", "--http-port=", "--http-address=")


def supervised_orphans(recorded: dict, state: Path) -> list[int]:
    """The tritonservers a killed supervisor left running: any process named tritonserver whose command line
    holds the recorded `server_args` (the supervisor may have restarted it since `make serve` wrote its pid)."""
    import psutil

    wanted = recorded.get("server_args")
    if not wanted:  # a state written before server_args: the first server's pid is all there is
        pid = recorded.get("server_pid")
        alive = isinstance(pid, int) and pid > 0 and not_ours({"pid": pid}, "tritonserver", state) is None
        return [pid] if alive else []
    found = []
    for process in psutil.process_iter(["cmdline"]):
        cmdline = process.info["cmdline"] or []
        if cmdline and Path(cmdline[0]).name == "tritonserver" and all(a in cmdline for a in wanted):
            found.append(process.pid)
    return found


def _port_taken(host: str, port: int) -> bool:
    with socket.socket(address_family(host)) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a closed server's TIME_WAIT is no owner
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


@contextlib.contextmanager
def start_lock(run_dir: Path):
    """Hold `<run_dir>/serve.lock` (flock, with the holder's pid in it) for a whole `make serve` start: a second
    start meanwhile is refused, naming the first, before it touches the log or the admin key."""
    import fcntl

    run_dir.mkdir(exist_ok=True)
    path = run_dir / START_LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise ServerError(f"another `make serve` (pid {holder}) is starting a server in {run_dir}: wait for it, "
                              "or `make stop` once it is up") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)  # `timeout`, a cancelled CI job, a closed terminal


@contextlib.contextmanager
def stop_signals(handler):
    """Within: `handler` for those STOP_SIGNALS that would end the process (one ignored already, as under
    nohup, stays ignored); nothing outside the main thread, where Python cannot handle signals."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, handler) for s in STOP_SIGNALS if signal.getsignal(s) == signal.SIG_DFL}
    try:
        yield
    finally:
        for s, action in previous.items():
            signal.signal(s, action)


def _interrupted(signum, frame):
    """A stop signal while `make serve` starts a server: raised, so that the start's cleanup stops that server."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)
    raise ServerError(f"{signal.Signals(signum).name} while starting: stopped the server it had started")


def serve(args: argparse.Namespace) -> dict:
    with start_lock(RUN_DIR):
        return _serve(args)


def _serve(args: argparse.Namespace) -> dict:
    """Refusals first: a start refused touches none of the files of the server it found."""
    state = _state_file()
    if served() is not None:
        raise ServerError(f"a server started by `make serve` is already running ({state}); `make stop` first")
    watchdog_port, restarts = getattr(args, "watchdog_port", 0), getattr(args, "restarts", 0)
    guard_port = getattr(args, "guard_port", 0)
    if guard_port and not watchdog_port:
        raise ServerError("the HTTP guard runs in the supervisor: --guard-port needs a --watchdog-port")
    supervisor = (supervisor_command(args.address, watchdog_port, restarts, access.KEY_FILE, guard_port)
                  if watchdog_port else None)
    log_file = RUN_DIR / "tritonserver.log"
    server = TritonServer(args.model_repository, Ports(args.http_port, args.grpc_port, args.metrics_port),
                          address=args.address, log_file=log_file, supervisor=supervisor)
    server.check()
    if watchdog_port and _port_taken(args.address, watchdog_port):
        raise ServerError(f"watchdog port {watchdog_port} on {args.address} already in use: make serve "
                          "WATCHDOG_PORT=..., or --watchdog-port 0 for a bare tritonserver")
    if guard_port and _port_taken(args.address, guard_port):
        raise ServerError(f"guard port {guard_port} on {args.address} already in use: make serve GUARD_PORT=...")
    log_file.write_bytes(b"")
    # A fresh admin key per start guards model control, config, statistics, ... (serving/access.py); with
    # --inference-key a second one guards inference.
    key = access.write_key(access.KEY_FILE)
    inference = []
    if getattr(args, "inference_key", False):
        inference = access.inference_restricted_args(access.write_key(access.INFERENCE_KEY_FILE))
    else:
        access.remove_key(access.INFERENCE_KEY_FILE)  # one left by an earlier start guards nothing now
    server.extra_args = [*SERVE_EXTRA_ARGS, *access.restricted_args(key), *inference,
                         *cache_args(repository_cache_mb(args.model_repository))]
    ready = f"http://{host_port(reachable(args.address), watchdog_port)}/ready"
    try:
        with stop_signals(_interrupted):
            server.launch(detach=True)
            # Recorded at once, so that `make stop` finds a server whose start was killed before it was ready.
            info = {"pid": server.process.pid, "started": start_time(server.process.pid), "starting": True,
                    "http": server.http_url, "grpc": server.grpc_url, "metrics": server.metrics_url,
                    "log": str(log_file), "model_repository": str(args.model_repository),
                    "admin_key_file": str(access.KEY_FILE)}
            if inference:
                info["inference_key_file"] = str(access.INFERENCE_KEY_FILE)
            if supervisor:
                info["supervisor"] = {"ready": ready, "status": ready[: -len("ready")] + "status",
                                      "restarts": restarts}
                if guard_port:
                    info["guard"] = host_port(reachable(args.address), guard_port)
                info["server_args"] = [a for a in server.command() if a.startswith(SERVER_IDENTITY)]
            write_whole(state, json.dumps(info, indent=2))
            server.wait_ready(args.timeout)
            if supervisor:  # its watchdog knows the stubs once this answers 200
                server.wait_ready(30, ready)
                info["server_pid"] = server_pid(info)  # the first; a restarted server is found by server_args
            del info["starting"]
            write_whole(state, json.dumps(info, indent=2))
    except BaseException:
        with stop_signals(signal.SIG_IGN):  # a second signal does not cut the cleanup short
            server.stop()
            state.unlink(missing_ok=True)
            access.remove_key(access.KEY_FILE)
            access.remove_key(access.INFERENCE_KEY_FILE)
        raise
    return info


def stop_served(timeout: float = 30.0) -> tuple[int, str | None] | None:
    """Stop the server `make serve` started: (its pid, None), or (the pid, EXITED or who has it now) when that
    server no longer runs; None if none is known."""
    state = _state_file()
    if not state.exists():
        return None
    try:
        recorded = json.loads(state.read_text())
        pid = recorded_pid(recorded)
    except (ValueError, KeyError, TypeError):
        raise ServerError(f"{state} names no server pid (not written by `make serve`?): remove it, and stop "
                          "the server it was for by hand") from None
    gone = not_ours(recorded, "tritonserver", state)
    running = gone is None
    orphans = supervised_orphans(recorded, state) if recorded.get("supervisor") and not running else []
    if orphans:  # its supervisor was killed (kill -9, out of memory): the server still runs
        for orphan in orphans:
            stop_tree(orphan, timeout)
        pid, running, gone = orphans[0], True, None
    elif running and recorded.get("supervisor"):
        stop_tree(pid, 2 * timeout + 15)  # it drains (15 s at most), then waits out tritonserver's exit
    elif running:
        from serving import watchdog

        try:  # unload the ensembles first: their in-flight requests finish (serving/watchdog.py)
            watchdog.drain(watchdog.TritonAdmin(recorded["http"], lambda: access.admin_headers(protocol="http"),
                                                timeout=10), timeout_s=timeout).log(log)
        except (OSError, RuntimeError, ValueError) as exc:
            log.warning("drain failed (%s); stopping anyway", exc)  # a server that cannot be drained is stopped
        terminate_pid(pid, timeout)
    state.unlink()
    access.remove_key(access.KEY_FILE)
    access.remove_key(access.INFERENCE_KEY_FILE)
    return pid, gone


def _address_arg(text: str) -> str:
    try:
        return bind_address(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Start/stop a background tritonserver (make serve / make stop).")
    p.add_argument("action", choices=("start", "stop", "status"))
    p.add_argument("--model-repository", default="model_repository", help="(default: %(default)s)")
    p.add_argument("--address", default="127.0.0.1", type=_address_arg,
                   help="address to bind, IPv4 or IPv6 (::1); 0.0.0.0 or :: exposes the server to the network "
                        "(default: %(default)s)")
    p.add_argument("--http-port", type=port_number, default=8000, help="(default: %(default)s)")
    p.add_argument("--grpc-port", type=port_number, default=8001, help="(default: %(default)s)")
    p.add_argument("--metrics-port", type=port_number, default=8002, help="(default: %(default)s)")
    p.add_argument("--timeout", type=positive(float), default=180.0, help="seconds to wait for readiness (default: %(default)s)")
    p.add_argument("--watchdog-port", type=port_number, default=8003,
                   help="port of the supervisor's /ready, /live, /status, /metrics (serving.supervise: the stub watchdog, "
                        "server restarts); 0: a bare tritonserver (default: %(default)s)")
    p.add_argument("--restarts", type=number(int, 0), default=3,
                   help="times the supervisor starts tritonserver again after it exits by itself "
                        "(default: %(default)s)")
    p.add_argument("--guard-port", type=port_number, default=0,
                   help="port of the supervisor's HTTP guard (serving.http_guard: malformed bodies answered 400 "
                        "before Triton parses them); 0: none (default: %(default)s)")
    p.add_argument("--inference-key", action="store_true",
                   help=f"put inference behind a key of its own too: a fresh one in {access.INFERENCE_KEY_FILE} "
                        f"(header {access.INFERENCE_KEY_HEADER}), which the project's clients send to this server")
    return p


def main(args: argparse.Namespace) -> None:
    if args.action == "start":
        info = serve(args)
        print(f"tritonserver ready (pid {info['pid']}, log {info['log']})")
        print(f"  HTTP     http://{info['http']}/v2/models/image_classifier")
        print(f"  gRPC     {info['grpc']}")
        print(f"  metrics  {info['metrics']}")
        if info.get("guard"):
            print(f"  guarded  http://{info['guard']}/v2/models/image_classifier (malformed bodies answered 400 "
                  "before Triton; docs/operations.md)")
        if info.get("supervisor"):
            print(f"  ready    {info['supervisor']['ready']} (false while a crashed model is reloaded or the "
                  f"server restarts; up to {info['supervisor']['restarts']} restarts)")
        print(f"  admin key for model control, config, statistics: {info['admin_key_file']} "
              f"(header {access.KEY_HEADER}; docs/operations.md)")
        if info.get("inference_key_file"):
            print(f"  inference key: {info['inference_key_file']} (header {access.INFERENCE_KEY_HEADER}; "
                  "requests without it answer 403 / gRPC UNAVAILABLE)")
    elif args.action == "stop":
        stopped = stop_served()
        if stopped is None:
            print("no server started by `make serve` is known")
        else:
            pid, gone = stopped
            if gone is None:
                print(f"stopped tritonserver (pid {pid})")
            elif gone == EXITED:
                print(f"tritonserver (pid {pid}) had already exited; forgot it")
            else:
                print(left_alone(pid, "tritonserver", "serve", gone))
    else:
        info = served()
        print(json.dumps(info, indent=2) if info else "not running")


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        main(get_args_parser().parse_args())
    except ServerError as exc:
        sys.exit(f"serving.server: {exc}")
