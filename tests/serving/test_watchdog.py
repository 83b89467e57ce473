"""`python -m serving.watchdog` run alone, as a real process: a sleeping process in tritonserver's place
(it has no stubs; only its life matters)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
SERVER = [sys.executable, "-c", "import signal, sys; signal.signal(signal.SIGTERM, lambda *_: sys.exit(3)); "
          "print('up', flush=True); signal.pause()"]  # in tritonserver's place: exits 3 on SIGTERM
WATCH = ["-m", "serving.watchdog", "--http", "127.0.0.1:1", "--port", "0", "--interval", "0.05"]
# the watchdog as the server's parent, as `tritonserver ... & exec python -m serving.watchdog --server-pid $!`
AS_PARENT = """
import os, subprocess, sys
server = subprocess.Popen(sys.argv[1:], stdout=subprocess.PIPE, text=True)
assert server.stdout.readline() == "up\\n"
print(server.pid, flush=True)
os.execv(sys.executable, [sys.executable, *%r, "--server-pid", str(server.pid)])
""" % (WATCH,)


def wait_for_line(process: subprocess.Popen, text: str) -> list[str]:
    """The lines of `process`'s stderr up to the first that holds `text` (AssertionError if it ends first)."""
    lines = []
    for line in process.stderr:
        lines.append(line)
        if text in line:
            return lines
    raise AssertionError(f"no {text!r} in:\n{''.join(lines)}")


def finish(process: subprocess.Popen, timeout: float = 30) -> tuple[int, str]:
    """(exit code, the rest of stderr); the process killed if it runs `timeout` s more."""
    try:
        _, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        _, err = process.communicate()
        raise AssertionError(f"still running {timeout} s after its server exited:\n{err}") from None
    return process.returncode, err


@pytest.mark.parametrize("reaped", [True, False], ids=["reaped", "zombie"])
def test_run_alone_it_exits_non_zero_once_the_server_has(reaped):
    """Whoever restarts the watchdog (a container runtime, systemd) must see it fail when its server is gone:
    gone for good, or a zombie its parent has not reaped yet (a zombie has no stubs to watch)."""
    server = subprocess.Popen(SERVER, stdout=subprocess.PIPE, text=True)
    watchdog = None
    try:
        assert server.stdout.readline() == "up\n"
        watchdog = subprocess.Popen([sys.executable, *WATCH, "--server-pid", str(server.pid)], cwd=ROOT, env=ENV,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        wait_for_line(watchdog, f"watching tritonserver pid {server.pid}")
        server.kill()
        if reaped:
            server.wait()
        code, err = finish(watchdog)
    finally:
        if watchdog is not None and watchdog.poll() is None:
            watchdog.kill()
        server.kill()
        server.wait()
    assert code == 1, err
    assert f"tritonserver (pid {server.pid}) is gone: the watchdog exits with code 1" in err


@pytest.mark.parametrize("how, expected", [(signal.SIGKILL, 128 + signal.SIGKILL), (signal.SIGTERM, 3)],
                         ids=["killed", "exited-3"])
def test_as_the_servers_parent_it_exits_with_the_servers_code(how, expected):
    """As serving.supervise: 128 + N for a server killed by signal N, else the server's own exit code."""
    watchdog = subprocess.Popen([sys.executable, "-c", AS_PARENT, *SERVER], cwd=ROOT, env=ENV,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    server_pid = None
    try:
        server_pid = int(watchdog.stdout.readline())
        wait_for_line(watchdog, f"watching tritonserver pid {server_pid}")
        os.kill(server_pid, how)
        code, err = finish(watchdog)
    finally:
        if watchdog.poll() is None:
            watchdog.kill()
            if server_pid is not None:
                os.kill(server_pid, signal.SIGKILL)
    assert code == expected, err
    assert f"tritonserver (pid {server_pid}) is gone: the watchdog exits with code {expected}" in err
