"""Benchmarks given something that is not there say so in one line, and leave nothing running or behind."""
from __future__ import annotations

import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[2]


def bench(module: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", f"benchmarks.{module}", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=180, env={"PYTHONPATH": str(ROOT), "PATH": str(Path(sys.executable).parent)})


@pytest.mark.parametrize("module, args, message", [
    ("stall", ["--model-repository", "{tmp}/nope", "--seconds", "1"], "BUILD.json not found"),
    ("precision", ["--artifacts", "{tmp}/nope", "--no-resnet50", "--no-compression"], "nope"),
    ("rollout_bench", ["--artifacts", "{tmp}/nope"], "lacks model.onnx"),
    ("soak", ["--model-repository", "{tmp}/nope", "--duration", "5"], "nope"),
])
def test_missing_inputs_are_one_line_errors(module, args, message, tmp_path):
    done = bench(module, *[a.format(tmp=tmp_path) for a in args], "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"benchmarks.{module}: ") and message in last, done.stderr


def test_rollout_bench_leaves_no_temporary_repository(tmp_path):
    before = set(Path(tempfile.gettempdir()).glob("bench-rollout-*"))
    done = bench("rollout_bench", "--artifacts", str(tmp_path / "nope"), "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert done.returncode == 1
    assert set(Path(tempfile.gettempdir()).glob("bench-rollout-*")) == before


def test_soak_refuses_a_server_pid_that_is_gone(tmp_path):
    gone = subprocess.Popen(["true"])
    gone.wait()
    done = bench("soak", "--url", "127.0.0.1:9", "--server-pid", str(gone.pid), "--duration", "5",
                 "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip() == f"benchmarks.soak: --server-pid {gone.pid}: no such process (`make serve` " \
                                  "records its server's in .run/tritonserver.json)"


def test_soak_stops_locust_when_the_server_goes(tmp_path):
    """The measured server exits mid-soak: the soak says so, and its Locust does not run on unwatched."""
    server = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    out = tmp_path / "out"

    def exit_once_locust_runs():  # mid-soak whatever the machine's speed; reaped, as a supervisor would
        for _ in range(1200):
            if any(any(Path(a).name == "locust" for a in cmdline[:2]) and str(out) in " ".join(cmdline)
                   for cmdline in (p.info["cmdline"] or [] for p in psutil.process_iter(["cmdline"]))):
                break
            time.sleep(0.1)
        server.kill()
        server.wait()

    threading.Thread(target=exit_once_locust_runs).start()
    done = bench("soak", "--url", "127.0.0.1:9", "--server-pid", str(server.pid), "--duration", "60",
                 "--out", str(out), cwd=tmp_path)
    server.wait()
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip().splitlines()[-1] == f"benchmarks.soak: the server (pid {server.pid}) exited during the soak"
    left = [p.info["pid"] for p in psutil.process_iter(["pid", "cmdline"])
            if any(str(out) in arg for arg in (p.info["cmdline"] or []))]
    assert left == []
