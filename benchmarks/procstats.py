"""CPU and memory of a serving process and everything it started (psutil).

    with ProcessTreeMonitor(server.process.pid) as monitor:
        ...load...
    print(monitor.cpu_percent, monitor.peak_rss_mb)

The tree is walked every `interval_s` (tritonserver's python-backend stubs are its children; a
uvicorn service is one process). CPU% is CPU seconds of the whole tree per wall second x 100
(200% = both cores of a 2-core machine); peak RSS is the largest sum of resident memory seen.
"""
from __future__ import annotations

import threading
import time

import psutil


class ProcessTreeMonitor:
    def __init__(self, pid: int, interval_s: float = 0.25):
        self.root = psutil.Process(pid)
        self.interval_s = interval_s
        self.cpu_percent = 0.0
        self.peak_rss_mb = 0.0
        self._cpu_start: dict[int, float] = {}
        self._cpu_last: dict[int, float] = {}
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
        wall = time.monotonic() - self._t0
        used = sum(self._cpu_last[p] - self._cpu_start[p] for p in self._cpu_last)
        self.cpu_percent = 100.0 * used / wall if wall > 0 else 0.0

    def __enter__(self) -> "ProcessTreeMonitor":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
