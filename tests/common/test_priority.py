"""common/priority.py, in a child process (what it changes cannot be undone without privileges)."""
import json
import subprocess
import sys

import pytest

from common.priority import lower

CHILD = """
import json, os, threading
from common.priority import lower

def nice_of_threads():
    return sorted(os.getpriority(os.PRIO_PROCESS, int(t)) for t in os.listdir("/proc/self/task"))

stop = threading.Event()
before = threading.Thread(target=stop.wait); before.start()  # a thread that exists when lower() runs
base = os.getpriority(os.PRIO_PROCESS, 0)
unchanged = lower(0)
at = lower({increment})
after = threading.Thread(target=stop.wait); after.start()  # one started later inherits
seen = nice_of_threads()
stop.set(); before.join(); after.join()
print(json.dumps({{"base": base, "unchanged": unchanged, "at": at, "seen": seen}}))
"""


def run_child(increment: int) -> dict:
    done = subprocess.run([sys.executable, "-c", CHILD.format(increment=increment)], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_every_thread_of_the_process_is_lowered_and_new_ones_inherit_it():
    got = run_child(5)
    assert got["unchanged"] == got["base"]
    assert got["at"] == min(19, got["base"] + 5)
    assert got["seen"] == [got["at"]] * 3  # the main thread, the one before, the one after


def test_the_nice_value_stops_at_19():
    got = run_child(19)
    assert got["at"] == 19 and set(got["seen"]) == {19}


def test_an_increment_outside_0_to_19_is_refused():
    for bad in (-1, 20):
        with pytest.raises(ValueError, match="within 0..19"):
            lower(bad)
