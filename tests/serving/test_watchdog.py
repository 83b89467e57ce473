"""`python -m serving.watchdog` run alone, and the drain log of the watchdog and the supervisor, as real
processes: a sleeping process in tritonserver's place where only its life matters (it has no stubs), and
tests.serving.triton_standin where Triton's HTTP API is asked."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from serving.server import free_port
from tests.serving.triton_standin import TritonStandIn

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


@pytest.mark.parametrize("unload_leaves", ["UNAVAILABLE", "UNLOADING"])
def test_drain_says_which_ensembles_drained_and_which_were_still_busy(unload_leaves):
    triton = TritonStandIn(unload_leaves=unload_leaves)
    threading.Thread(target=triton.serve_forever, daemon=True).start()
    try:
        run = subprocess.run([sys.executable, "-m", "serving.watchdog", "--drain", "--http", triton.http_url,
                              "--drain-timeout", "0.5"], cwd=ROOT, env=ENV, capture_output=True, text=True,
                             timeout=60)
    finally:
        triton.shutdown()
    assert run.returncode == (0 if unload_leaves == "UNAVAILABLE" else 1), run.stderr  # 1: a SIGTERM now fails some
    assert triton.states["image_classifier"] == unload_leaves and triton.states["classifier"] == "READY"
    [line] = run.stderr.splitlines()
    if unload_leaves == "UNAVAILABLE":
        assert line.endswith("watchdog INFO drained image_classifier"), line
    else:
        assert line.endswith("watchdog WARNING drain timed out after 0.5 s with requests in flight: "
                             "image_classifier (UNLOADING) still loaded; drained: nothing"), line


def test_the_supervisor_says_when_its_drain_timed_out():
    """SIGTERM to serving.supervise drains, then stops the server: a drain that timed out is a warning that
    names the ensemble still loaded, not "drained"."""
    port = free_port()
    supervisor = subprocess.Popen([sys.executable, "-m", "serving.supervise", "--port", "0", "--drain-timeout", "0.5",
                                   "--", sys.executable, "-m", "tests.serving.triton_standin", "--http-port", str(port),
                                   "--unload-leaves", "UNLOADING"],
                                  cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_line(supervisor, "watching tritonserver pid")
        supervisor.send_signal(signal.SIGTERM)
        code, err = finish(supervisor)
    finally:
        if supervisor.poll() is None:
            supervisor.kill()
    assert code == 0, err  # the stand-in exits 0 on the SIGTERM that follows the drain
    assert "supervise WARNING drain timed out after 0.5 s with requests in flight: image_classifier (UNLOADING) " \
           "still loaded; drained: nothing" in err, err
    assert "drained image_classifier" not in err


class _Probe:
    """What serving.health.endpoint asks of a watchdog or supervisor: one /status, here as written."""

    last_error = ""

    def __init__(self, status: dict):
        self._status = status

    def readiness(self) -> tuple[bool, str]:
        return self._status["ready"], "tritonserver is restarting"

    def live(self) -> bool:
        return self._status["live"]

    def status(self) -> dict:
        return self._status


def test_the_endpoint_serves_the_status_as_metrics_and_drops_a_connection_that_sends_nothing():
    """/metrics is /status in Prometheus' text format (read back by prometheus_client's parser): counters for
    starts, exits, crashes by model (zeros included) and reloads, gauges for readiness and the stubs down. A
    connection that sends nothing is closed by the endpoint, and others are answered meanwhile."""
    import socket
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    from serving.health import endpoint

    crash = {"pid": 7, "model": "classifier", "version": "1", "seen_at": 0.0, "recovered_at": None, "unloaded": False}
    probe = _Probe({"ready": False, "live": True, "starts": 2, "server_exits": [-11], "restarts_left": 0,
                    "crashes": [crash, {**crash, "model": "preprocess", "unloaded": True}],
                    "crash_counts": {"classifier": 3, "preprocess": 0}, "reloads": 0, "reloads_total": 2})
    http = endpoint(probe, "127.0.0.1", 0)
    threading.Thread(target=http.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{http.server_address[1]}"
    try:
        with socket.create_connection(http.server_address[:2], timeout=60) as idle:
            with urllib.request.urlopen(url + "/metrics", timeout=10) as answer:
                families = {f.name: f for f in text_string_to_metric_families(answer.read().decode())}
            samples = {(s.name, tuple(s.labels.values())): s.value for f in families.values() for s in f.samples}
            assert samples == {
                ("triton_supervisor_ready", ()): 0, ("triton_supervisor_live", ()): 1,
                ("triton_supervisor_server_starts_total", ()): 2, ("triton_supervisor_server_exits_total", ()): 1,
                ("triton_supervisor_restarts_left", ()): 0,
                ("triton_supervisor_stub_crashes_total", ("classifier",)): 3,
                ("triton_supervisor_stub_crashes_total", ("preprocess",)): 0,
                ("triton_supervisor_stub_reloads_total", ()): 2, ("triton_supervisor_stubs_down", ()): 1}
            assert {f.name: f.type for f in families.values()}["triton_supervisor_stub_crashes"] == "counter"
            assert idle.recv(1) == b""  # closed by the endpoint (HTTP handler timeout), before this socket's 60 s
    finally:
        http.shutdown()
        http.server_close()
