"""The python-backend stub processes of one tritonserver, and which model each one serves.

A stub's first argument is <repository>/<model>/<version>/model.py; a stub that died stays a zombie child
of tritonserver (Triton 2.51 does not reap it), its command line gone, so it is named by what was learnt
while it lived. serving.watchdog acts on what this sees.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import psutil

STUB = "triton_python_backend_stub"


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
        """The stubs alive or dead now; psutil.NoSuchProcess once the server has exited (gone, or a zombie
        that its parent has not reaped yet: a zombie has no children to scan)."""
        if self.server.status() == psutil.STATUS_ZOMBIE:
            raise psutil.ZombieProcess(self.server.pid)
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
