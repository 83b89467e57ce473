"""Run this process below the priority of the server that started it.

The python-backend stubs do the models' work (decode, inference); tritonserver's own threads parse
requests, batch them and answer, a "busy" for a full queue included. On a saturated CPU, with both at
the same priority, that answer waits for a core behind the stubs. A stub that adds to its nice value
leaves the server's threads first in line; the stubs still get every cycle the server does not use.
What it gains and costs, measured: docs/operations.md (bounded queues).

Linux keeps a nice value per thread, and a thread starts with its creator's: every thread of the
process now is lowered, and those it starts later (ONNX Runtime's pool, the decode pool) inherit it.
Only lowering is possible without privileges, and only lowering is done. Standard library only: the
build copies this file next to each python model's model.py.
"""
from __future__ import annotations

import os

MAX_NICE = 19
TASKS = "/proc/self/task"


def lower(increment: int) -> int:
    """Add `increment` (0..19) to the nice value this thread inherited, for every thread of the process;
    the nice value they run at afterwards (at most 19). 0 changes nothing."""
    if not 0 <= increment <= MAX_NICE:
        raise ValueError(f"nice increment must be within 0..{MAX_NICE}, got {increment}")
    now = os.getpriority(os.PRIO_PROCESS, 0)  # on Linux: this thread's
    target = min(MAX_NICE, now + increment)
    if target == now:
        return now
    try:
        threads = [int(tid) for tid in os.listdir(TASKS)]
    except OSError:  # not Linux: the process has one nice value
        threads = [0]
    for tid in threads:
        try:
            if os.getpriority(os.PRIO_PROCESS, tid) < target:
                os.setpriority(os.PRIO_PROCESS, tid, target)
        except ProcessLookupError:  # a thread that ended meanwhile
            continue
    return target
