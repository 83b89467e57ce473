"""The `tritonserver` launcher, capability detection, and `make serve` / `make stop`."""
import glob
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from build.repository.capabilities import Capabilities, detect, resolve_backend
from serving.health import bound_address, host_port
from serving.server import Ports, ServerError, TritonServer, bind_address, free_port
from serving.tritonserver import (STUB_PYTHONS, address_flags, build_command, locate_server, prepare_backend_directory,
                                  python_problem, setup_problem)


def test_launcher_binds_loopback_and_finds_the_python_backend(tmp_path):
    install = locate_server()
    cmd, env = build_command(["--model-repository", "repo"], install)
    assert cmd[0] == str(install.binary)
    assert {"--http-address=127.0.0.1", "--grpc-address=127.0.0.1", "--metrics-address=127.0.0.1"} <= set(cmd)
    assert str(install.library_dir) in env["LD_LIBRARY_PATH"].split(":")
    backends = [a for a in cmd if a.startswith("--backend-directory=")]
    assert len(backends) == 1
    cmd, _ = build_command(["--http-address=0.0.0.0", f"--backend-directory={tmp_path}"], install)
    assert "--http-address=127.0.0.1" not in cmd and f"--backend-directory={tmp_path}" in cmd
    prepared = prepare_backend_directory(install, tmp_path / "backends")
    assert (prepared / "python" / "libtriton_python.so").is_file()
    assert (prepared / "python" / "triton_python_backend_stub").stat().st_mode & 0o111


def _other_python() -> str | None:
    """An interpreter of a Python whose stub garbles input (3.12, 3.13), where one is installed here."""
    for pattern in ("/usr/bin/python3.1[23]", "/usr/local/bin/python3.1[23]", str(Path.home() / ".pyenv/versions/3.1[23]*/bin/python")):
        for found in sorted(glob.glob(pattern)):
            run = subprocess.run([found, "-c", "import sys; print(sys.version_info[:2] >= (3, 12))"],
                                 capture_output=True, text=True)
            if run.stdout.strip() == "True":
                return found
    return None


def test_launcher_and_setup_refuse_a_python_whose_stub_garbles_input(tmp_path):
    """The wheel's 3.12 and 3.13 stubs hand the ensemble's first model garbage: refused in one line, before a
    venv is made or a server started."""
    assert sys.version_info[:2] in STUB_PYTHONS  # this suite's own environment
    for good in STUB_PYTHONS:
        assert python_problem(good) is None
    for bad in ((3, 12), (3, 13)):
        assert f"is Python {bad[0]}.{bad[1]}" in python_problem(bad) and "PYTHON=python3.11" in python_problem(bad)
    other = _other_python()
    if other is None:
        pytest.skip("no Python 3.12 or 3.13 interpreter here to start the launcher and `make setup` with")
    root = Path(__file__).resolve().parents[2]
    run = subprocess.run([other, "-m", "serving.tritonserver", f"--model-repository={tmp_path}"], cwd=root,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 1 and run.stderr.count("\n") == 1 and run.stderr.startswith("tritonserver: "), run.stderr
    assert "garbage input" in run.stderr and "PYTHON=python3.11" in run.stderr, run.stderr
    venv = tmp_path / "venv"
    run = subprocess.run(["make", "--no-print-directory", "setup", f"PYTHON={other}", f"VENV={venv}",
                          f"STAMP={venv}/.stamp"], cwd=root, capture_output=True, text=True, timeout=60)
    assert run.returncode != 0 and "make setup: " in run.stderr and "PYTHON=python3.11" in run.stderr, run.stderr
    assert not venv.exists()



def test_setup_refuses_a_python_the_pins_do_not_install_under(tmp_path):
    """requirements/main.txt was frozen under 3.11 and some pins need it: `make setup` under 3.10 (whose stub is
    fine) failed halfway through pip; now it is refused in one line, before a venv is made."""
    assert setup_problem((3, 11)) is None
    assert "pinned for Python 3.11" in setup_problem((3, 10)) and "PYTHON=python3.11" in setup_problem((3, 10))
    assert setup_problem((3, 12)) == python_problem((3, 12))
    found = sorted(glob.glob("/usr/bin/python3.10") + glob.glob(str(Path.home() / ".pyenv/versions/3.10*/bin/python")))
    if not found:
        pytest.skip("no Python 3.10 interpreter here to run `make setup` with")
    venv = tmp_path / "venv"
    run = subprocess.run(["make", "--no-print-directory", "setup", f"PYTHON={found[0]}", f"VENV={venv}",
                          f"STAMP={venv}/.stamp"], cwd=Path(__file__).resolve().parents[2], capture_output=True,
                         text=True, timeout=60)
    assert run.returncode != 0 and "make setup: requirements/main.txt is pinned for Python 3.11" in run.stderr, run.stderr
    assert not venv.exists()

def test_capabilities_are_detected_and_reported_in_one_line():
    caps = detect()
    assert "python" in caps.server_backends
    line = caps.line()
    assert "\n" not in line and "server backends: " in line
    if caps.tensorrt is None:
        assert "TensorRT: no (" in line  # says why
    assert resolve_backend("auto", caps)[0] in ("python-onnxruntime", "onnxruntime", "tensorrt")


def test_backend_resolution_prefers_the_fastest_available():
    trt = Capabilities(("onnxruntime", "python", "tensorrt"), "10.13", "ok", 1, "ok")
    assert resolve_backend("auto", trt)[0] == "tensorrt"
    no_gpu = Capabilities(("onnxruntime", "python", "tensorrt"), "10.13", "ok", 0, "no driver")
    assert resolve_backend("auto", no_gpu)[0] == "onnxruntime"
    pip_server = Capabilities(("python",), None, "no module", 0, "no driver")
    assert resolve_backend("auto", pip_server)[0] == "python-onnxruntime"
    assert resolve_backend("onnxruntime", pip_server)[0] == "onnxruntime"
    assert resolve_backend("auto", no_gpu, "fused")[0] == "python-onnxruntime"  # the fused model is a python one
    assert resolve_backend("auto", trt, "fused")[0] == "python-onnxruntime"
    with pytest.raises(RuntimeError, match="no classifier backend"):
        resolve_backend("auto", Capabilities((), None, "-", 0, "-"))


@pytest.mark.slow
def test_make_serve_and_stop(lite0_repository, tmp_path):
    """A bare tritonserver (no supervisor: tests/serving/test_self_healing.py runs `make serve`'s default):
    a second start is refused, and stop drains the ensembles first and says so."""
    ports = Ports.free()
    cli = [sys.executable, "-m", "serving.server"]
    start = subprocess.run([*cli, "start", "--model-repository", str(lite0_repository), "--http-port",
                            str(ports.http), "--grpc-port", str(ports.grpc), "--metrics-port", str(ports.metrics),
                            "--watchdog-port", "0"], cwd=tmp_path, capture_output=True, text=True, timeout=200)
    assert start.returncode == 0, start.stderr
    assert f"127.0.0.1:{ports.grpc}" in start.stdout
    state = json.loads((tmp_path / ".run" / "tritonserver.json").read_text())
    try:
        again = subprocess.run([*cli, "start", "--model-repository", str(lite0_repository)], cwd=tmp_path,
                               capture_output=True, text=True, timeout=60)
        assert again.returncode != 0 and "already running" in again.stderr
        # from another folder (no state file): the ports are taken, and it says so instead of taking
        # the running server's readiness for its own
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        clash = subprocess.run([*cli, "start", "--model-repository", str(lite0_repository), "--http-port",
                                str(ports.http), "--grpc-port", str(ports.grpc), "--metrics-port",
                                str(ports.metrics)], cwd=elsewhere, capture_output=True, text=True, timeout=60)
        assert clash.returncode != 0 and f"http port {ports.http}" in clash.stderr and "in use" in clash.stderr
        assert not (elsewhere / ".run" / "tritonserver.json").exists()
    finally:
        stop = subprocess.run([*cli, "stop"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert stop.returncode == 0 and f"pid {state['pid']}" in stop.stdout
    assert "drained image_classifier" in stop.stderr.splitlines(), stop.stderr
    assert subprocess.run(["kill", "-0", str(state["pid"])], capture_output=True).returncode != 0


def assert_stop_leaves_it_alone(cli: list[str], cwd: Path, pid: int, program: str, make_target: str) -> None:
    """`status` says not running; `stop` says in one line that `pid` is not ours (the caller checks it runs)."""
    status = subprocess.run([*cli, "status"], cwd=cwd, capture_output=True, text=True, timeout=60)
    assert status.stdout == "not running\n", status.stdout
    stop = subprocess.run([*cli, "stop"], cwd=cwd, capture_output=True, text=True, timeout=60)
    assert stop.returncode == 0 and stop.stdout.startswith(
        f"pid {pid} is not the {program} `make {make_target}` started (another process has it now, started "
    ), (stop.stdout, stop.stderr)
    assert stop.stdout.endswith("): not ours, left it alone; forgot it\n"), stop.stdout


@pytest.mark.parametrize("case", ["another start time", "no start time, started after the state", "not tritonserver"])
def test_make_stop_leaves_a_process_that_reused_the_pid_alone(tmp_path, case):
    """A state file whose pid another process has now (pids are reused after a reboot or a wrap), even one whose
    command line names tritonserver (`tail -f .run/tritonserver.log`, another checkout's server): status says not
    running, stop signals nothing, says so and forgets the file. A state from before start times were recorded
    is judged by the command line and by the process being older than the file."""
    import psutil

    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)",
                              "sleeper" if case == "not tritonserver" else "tritonserver"])
    cli = [sys.executable, "-m", "serving.server"]
    try:
        started = psutil.Process(other.pid).create_time()
        state = tmp_path / ".run" / "tritonserver.json"
        state.parent.mkdir()
        state.write_text(json.dumps({"pid": other.pid, "started": started - 3600} if case == "another start time"
                                    else {"pid": other.pid}))
        if case.startswith("no start time"):
            os.utime(state, (started - 3600, started - 3600))
        assert_stop_leaves_it_alone(cli, tmp_path, other.pid, "tritonserver", "serve")
        assert other.poll() is None and not state.exists()
        if case == "another start time":  # the start time it has is recognised
            state.write_text(json.dumps({"pid": other.pid, "started": started}))
            status = subprocess.run([*cli, "status"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
            assert json.loads(status.stdout)["pid"] == other.pid, status.stdout
    finally:
        other.kill()
        other.wait()


HELD_MODEL = """import os
import time


class TritonPythonModel:
    def initialize(self, args):  # loading lasts until the test releases it (10 minutes at most)
        deadline = time.monotonic() + 600
        while not os.path.exists(RELEASE) and time.monotonic() < deadline:
            time.sleep(0.1)

    def execute(self, requests):
        return []
"""


def held_repository(root: Path) -> tuple[Path, Path]:
    """A repository whose one python model does not finish loading until the file returned second exists."""
    repo, release = root / "held_repository", root / "release"
    (repo / "held" / "1").mkdir(parents=True)
    (repo / "held" / "1" / "model.py").write_text(f"RELEASE = {str(release)!r}\n{HELD_MODEL}")
    (repo / "held" / "config.pbtxt").write_text(
        'backend: "python"\nmax_batch_size: 0\n'
        'input [{ name: "IN", data_type: TYPE_FP32, dims: [1] }]\n'
        'output [{ name: "OUT", data_type: TYPE_FP32, dims: [1] }]\n')
    return repo, release


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP, signal.SIGKILL])
def test_a_start_killed_while_it_waits_leaves_no_server_behind(tmp_path, signum):
    """`make serve` signalled while its server loads (a cancelled CI job, `timeout`, a closed terminal): SIGTERM
    and SIGHUP stop what it started, in one line; after SIGKILL, which nothing catches, `make stop` finds the
    server in the state written at the start. No process of that server is left, and its ports are free."""
    import psutil

    repo, release = held_repository(tmp_path)
    ports, watchdog_port = Ports.free(), free_port()
    cli = [sys.executable, "-m", "serving.server"]
    start = subprocess.Popen([*cli, "start", "--model-repository", str(repo), "--http-port", str(ports.http),
                              "--grpc-port", str(ports.grpc), "--metrics-port", str(ports.metrics), "--watchdog-port",
                              str(watchdog_port)], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_DFL))

    def server_processes() -> list[psutil.Process]:
        """The supervisor, tritonserver and the model's stub: the processes besides `start` naming `repo`."""
        return [p for p in psutil.process_iter(["cmdline"])
                if p.pid != start.pid and str(repo) in " ".join(p.info["cmdline"] or [])]

    try:
        for _ in range(3000):  # until the model's stub loads it (then the start waits for it)
            assert start.poll() is None, start.communicate()
            if any("triton_python_backend_stub" in " ".join(p.info["cmdline"]) for p in server_processes()):
                break
            time.sleep(0.1)
        else:
            pytest.fail("the held model's stub never started")
        os.kill(start.pid, signum)
        out, err = start.communicate(timeout=300)
        state = tmp_path / ".run" / "tritonserver.json"
        if signum == signal.SIGKILL:
            assert state.exists() and json.loads(state.read_text())["starting"] is True
            stop = subprocess.run([*cli, "stop"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
            assert stop.returncode == 0 and "stopped tritonserver" in stop.stdout, (stop.stdout, stop.stderr)
        for _ in range(1200):
            if not server_processes():
                break
            time.sleep(0.1)
        assert not server_processes(), [p.info["cmdline"][:3] for p in server_processes()]
        assert not ports.in_use("127.0.0.1")
        if signum != signal.SIGKILL:
            assert start.returncode == 1 and err.splitlines()[-1] == (
                f"serving.server: {signal.Signals(signum).name} while starting: stopped the server it had started"
            ), err
            assert "Traceback" not in err and not state.exists() and not (tmp_path / ".run" / "admin.key").exists()
        stop = subprocess.run([*cli, "stop"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert stop.stdout == "no server started by `make serve` is known\n", stop.stdout
    finally:
        release.touch()
        if start.poll() is None:
            start.kill()
            start.wait()
        for process in server_processes():
            process.kill()


def test_an_ipv6_address_is_spelt_for_triton_and_for_urls(tmp_path):
    """Triton 2.51 binds IPv6 only as `ipv6:<address>` (HTTP, metrics) and `[<address>]` (gRPC); a bare `::1` it
    took for a broken IPv4 address, whose HTTP port answered nowhere. URLs bracket the address."""
    assert address_flags("10.0.0.1") == ["--http-address=10.0.0.1", "--grpc-address=10.0.0.1",
                                         "--metrics-address=10.0.0.1"]
    assert address_flags("::") == ["--http-address=ipv6:::", "--grpc-address=[::]", "--metrics-address=ipv6:::"]
    assert [bound_address(a.partition("=")[2]) for a in address_flags("fd00::1")] == ["fd00::1"] * 3
    server = TritonServer(tmp_path, Ports(18000, 18001, 18002), address="::")
    assert (server.http_url, server.grpc_url, server.metrics_url) == ("[::]:18000", "[::]:18001",
                                                                      "http://[::]:18002/metrics")
    assert server.command()[-3:] == address_flags("::")
    assert (host_port("127.0.0.1", 1), host_port("::1", 1)) == ("127.0.0.1:1", "[::1]:1")


@pytest.mark.parametrize("address, message", [
    ("::1x", "address ::1x: neither an IPv4 address or host name nor an IPv6 address"),
    ("2001:db8::1", "address 2001:db8::1: this machine cannot bind it (Cannot assign requested address)"),
])
def test_an_ipv6_address_this_machine_cannot_bind_is_refused_in_one_line(tmp_path, address, message):
    """Before anything starts (no admin key written), by the CLI and by TritonServer (2001:db8::/32 is the
    documentation prefix: no machine has it)."""
    done = subprocess.run([sys.executable, "-m", "serving.server", "start", "--address", address,
                           "--model-repository", str(tmp_path)], cwd=tmp_path, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.splitlines()[-1].endswith(f"argument --address: {message}")
    assert not (tmp_path / ".run").exists()
    with pytest.raises(ServerError, match=f"^{re.escape(message)}$"):
        TritonServer(tmp_path, address=address)
    assert bind_address("[0:0:0:0:0:0:0:1]") == "::1" and bind_address("localhost") == "localhost"


@pytest.mark.parametrize("tool, args", [
    ("serving.server", ["start", "--watchdog-port", "70000"]),
    ("serving.server", ["start", "--http-port", "-1"]),
    ("serving.supervise", ["--port", "70000", "--", "true"]),
    ("serving.watchdog", ["--port", "70000", "--http", "127.0.0.1:8000", "--server-pid", "1"]),
])
def test_a_port_out_of_range_is_refused_in_one_line(tmp_path, tool, args):
    """A port no socket can bind is refused by argparse before anything starts: no traceback, no admin key
    left in .run/ (the watchdog port was checked after the key was written)."""
    done = subprocess.run([sys.executable, "-m", tool, *args], cwd=tmp_path, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert "is not in 0-65535" in done.stderr.splitlines()[-1]
    assert not (tmp_path / ".run").exists()


@pytest.mark.parametrize("tool, args, message", [
    ("serving.server", ["start", "--restarts", "-1"], "argument --restarts: must be at least 0, got -1"),
    ("serving.server", ["start", "--timeout", "inf"], "argument --timeout: must be a finite number, got inf"),
    ("serving.supervise", ["--drain-timeout", "0", "--", "true"], "argument --drain-timeout: must be above 0, got 0"),
    ("serving.supervise", ["--restarts", "-2", "--", "true"], "argument --restarts: must be at least 0, got -2"),
    ("serving.watchdog", ["--http", "127.0.0.1:8000", "--retire-after", "nan"], "argument --retire-after: must be at least 0, got nan"),
    ("serving.monitor", ["start", "--port", "70000"], "argument --port: port 70000 is not in 0-65535"),
    ("serving.rollout", ["ab", "run", "--split", "1.5"], "argument --split: must be in [0, 1], got 1.5"),
    ("serving.rollout", ["add", "--artifacts", "a", "--min-agreement", "-0.1"], "--min-agreement: must be in [0, 1], got -0.1"),
    # --interval 0 made the watchdog check without pause, taking a core from the server; --max-failed-reloads 0
    # made /live 503 from the start, so that the kubelet would restart the pod for ever
    ("serving.supervise", ["--port", "0", "--interval", "0", "--", "touch", "started"], "--interval: must be above 0"),
    ("serving.watchdog", ["--http", "127.0.0.1:1", "--port", "0", "--server-pid", "1", "--interval", "-1"],
     "--interval: must be above 0, got -1"),
    ("serving.watchdog", ["--http", "127.0.0.1:1", "--port", "0", "--server-pid", "1", "--max-failed-reloads", "0"],
     "--max-failed-reloads: must be above 0, got 0"),
])
def test_a_number_out_of_range_is_refused_in_one_line(tmp_path, tool, args, message):
    """Counts, timeouts and shares that make no sense (a negative restart count, an infinite or zero timeout, a
    traffic split above 1) are refused by argparse before anything starts."""
    done = subprocess.run([sys.executable, "-m", tool, *args], cwd=tmp_path, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert message in done.stderr.splitlines()[-1]
    assert not (tmp_path / ".run").exists() and not (tmp_path / "started").exists()


@pytest.mark.parametrize("state", ["{not json", "{}", '{"pid": "x"}', "[1]", '{"pid": -1}'])
def test_make_stop_refuses_a_state_file_it_cannot_read_in_one_line(tmp_path, state):
    """A .run/tritonserver.json that names no pid (truncated, edited by hand, a pid no process has): one line saying
    so, no traceback."""
    (tmp_path / ".run").mkdir()
    (tmp_path / ".run" / "tritonserver.json").write_text(state)
    stop = subprocess.run([sys.executable, "-m", "serving.server", "stop"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=60)
    assert stop.returncode == 1 and "Traceback" not in stop.stderr, stop.stderr
    assert stop.stderr.strip().startswith("serving.server: ") and "names no server pid" in stop.stderr
    assert len(stop.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("tool, args", [
    ("serving.supervise", ["--port", "0", "--key-file", "no-such.key", "--", "touch", "started"]),
    ("serving.watchdog", ["--drain", "--http", "127.0.0.1:1", "--key-file", "no-such.key"]),
    ("serving.watchdog", ["--http", "127.0.0.1:1", "--port", "0", "--server-pid", "1", "--key-file", "no-such.key"]),
])
def test_a_missing_key_file_is_refused_in_one_line(tmp_path, tool, args):
    """A --key-file that holds no key would send no key: every reload and drain of a restricted server would then
    fail with HTTP 403, first seen at the first crash. Refused in one line before anything starts."""
    done = subprocess.run([sys.executable, "-m", tool, *args], cwd=tmp_path, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip().splitlines()[-1] == f"{tool}: no admin key in no-such.key"
    assert not (tmp_path / "started").exists()


def test_the_supervisor_exits_128_plus_the_signal_that_killed_the_server(tmp_path):
    """A server killed by a signal (SIGKILL by the out-of-memory killer, SIGABRT from the python backend) makes
    the supervisor exit with 128 + the signal, as shells and container runtimes report it: 137, not 247."""
    done = subprocess.run([sys.executable, "-m", "serving.supervise", "--port", "0", "--", "sh", "-c", "kill -9 $$"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 137, done.stderr
