"""CPU and memory of a serving process and everything it started (psutil).

    with ProcessTreeMonitor(server.process.pid) as monitor:
        ...load...
    print(monitor.cpu_percent, monitor.peak_rss_mb)

The tree is walked every `interval_s` (tritonserver's python-backend stubs are its children; a
uvicorn service is one process). CPU% is CPU seconds of the whole tree per wall second x 100
(200% = both cores of a 2-core machine); peak RSS is the largest sum of resident memory seen.
`cpu_seconds_by_role` splits the CPU time by what each process is: the server itself (frontends,
scheduling, ensemble steps) and each python-backend model's stub processes, named after the model.
"""
from __future__ import annotations

import collections
import threading
import time
from pathlib import Path

import psutil

STUB = "triton_python_backend_stub"
CORE = "server"


def role_of(cmdline: list[str], is_root: bool) -> str:
    """What a process of a serving tree is: the model whose python-backend stub it is (the stub's
    first argument is `<repository>/<model>/<version>/model.py`), CORE for the root process, else
    its program name."""
    if cmdline and Path(cmdline[0]).name == STUB and len(cmdline) > 1:
        parts = Path(cmdline[1]).parts
        return parts[-3] if len(parts) >= 3 else STUB
    if is_root:
        return CORE
    return Path(cmdline[0]).name if cmdline else "?"


def tree_roles(root_pid: int) -> dict[int, str]:
    """{pid: role_of} of a serving process tree as it is now (the root and all its descendants)."""
    root = psutil.Process(root_pid)
    roles = {}
    for proc in [root, *root.children(recursive=True)]:
        try:
            roles[proc.pid] = role_of(proc.cmdline(), proc.pid == root_pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return roles


def machine_cpu_times(stat: str = "/proc/stat") -> dict[str, int] | None:
    """The machine's CPU time counters (clock ticks, all cores) from /proc/stat; None where absent."""
    try:
        with open(stat) as f:
            fields = f.readline().split()
    except OSError:
        return None
    names = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")
    if not fields or fields[0] != "cpu" or len(fields) < 1 + len(names):
        return None
    return dict(zip(names, map(int, fields[1 : 1 + len(names)])))


def steal_fraction(before: dict[str, int] | None, after: dict[str, int] | None) -> float | None:
    """Of the cores' time between two machine_cpu_times(), the share a hypervisor gave to other
    guests ("steal"): load this machine cannot see, and a cause of run-to-run noise."""
    if not before or not after:
        return None
    total = sum(after.values()) - sum(before.values())
    return (after["steal"] - before["steal"]) / total if total > 0 else None


class ProcessTreeMonitor:
    def __init__(self, pid: int, interval_s: float = 0.25):
        self.root = psutil.Process(pid)
        self.interval_s = interval_s
        self.cpu_percent = 0.0
        self.peak_rss_mb = 0.0
        self.wall_s = 0.0
        self._cpu_start: dict[int, float] = {}
        self._cpu_last: dict[int, float] = {}
        self._roles: dict[int, str] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._t0 = 0.0

    def processes(self) -> list[psutil.Process]:
        try:
            return [self.root, *self.root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def _sample(self) -> None:
        rss = 0
        for proc in self.processes():
            try:
                with proc.oneshot():
                    times = proc.cpu_times()
                    rss += proc.memory_info().rss
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            cpu = times.user + times.system
            if proc.pid not in self._roles:
                try:
                    self._roles[proc.pid] = role_of(proc.cmdline(), proc.pid == self.root.pid)
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    self._roles[proc.pid] = "?"
            self._cpu_start.setdefault(proc.pid, cpu)
            self._cpu_last[proc.pid] = cpu
        self.peak_rss_mb = max(self.peak_rss_mb, rss / 2**20)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def start(self) -> "ProcessTreeMonitor":
        self._t0 = time.monotonic()
        self._sample()
        self._thread = threading.Thread(target=self._run, name="proc-monitor", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample()
        self.wall_s = time.monotonic() - self._t0
        used = sum(self._cpu_last[p] - self._cpu_start[p] for p in self._cpu_last)
        self.cpu_percent = 100.0 * used / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def cpu_seconds_by_role(self) -> dict[str, float]:
        """{role: CPU seconds used while monitored} (see role_of), all of a model's instances together."""
        used: dict[str, float] = collections.defaultdict(float)
        for pid, last in self._cpu_last.items():
            used[self._roles.get(pid, "?")] += last - self._cpu_start[pid]
        return dict(used)

    @property
    def processes_by_role(self) -> dict[str, int]:
        return dict(collections.Counter(self._roles[p] for p in self._cpu_last))

    def __enter__(self) -> "ProcessTreeMonitor":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
