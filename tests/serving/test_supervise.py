"""serving.supervise, the container's entrypoint: a real tritonserver under it, its stubs and the server
itself killed with SIGKILL, and SIGTERM under load."""
from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest

from serving.server import SERVE_EXTRA_ARGS, Ports, TritonServer, free_port
from serving.stubs import STUB, serving_stubs
from serving import access
from serving.supervise import http_url, missing_restrictions, restrict, restrict_inference
from tests.serving.test_self_healing import Load, get, repository  # noqa: F401 (repository: a fixture)

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


class Supervised:
    """`python -m serving.supervise ... -- tritonserver ...` as the container runs it, on free loopback ports,
    serving a copy of `repository` in the log's folder (so that its stubs are told apart by their path)."""

    def __init__(self, repository: Path, log: Path, restarts: int, options: tuple[str, ...] = ()):
        self.repository = log.parent / "repo"
        shutil.copytree(repository, self.repository)
        self.ports, self.port = Ports.free(), free_port()
        server = TritonServer(self.repository, self.ports, extra_args=[*SERVE_EXTRA_ARGS, "--exit-timeout-secs=10"])
        self.command = [sys.executable, "-m", "serving.supervise", "--port", str(self.port), "--restarts",
                        str(restarts), *options, "--", *server.command()]
        self.log = log
        self.url = f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "Supervised":
        with open(self.log, "ab") as out:
            self.process = subprocess.Popen(self.command, stdout=out, stderr=subprocess.STDOUT, cwd=self.log.parent,
                                            env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert self.wait_ready(), self.log.read_text(errors="replace")[-3000:]
        return self

    def __exit__(self, *exc) -> None:
        """Kill the supervisor if the test left it running, then its server (a SIGKILL is not passed on: the
        server would outlive the test) and every stub of this repository."""
        if self.process.poll() is None:
            try:
                server = self.server_pid()
            except (OSError, ValueError, KeyError):
                server = None
            self.process.kill()
            self.process.wait(30)
            if server:
                with contextlib.suppress(psutil.NoSuchProcess, psutil.TimeoutExpired):  # a zombie nobody reaps
                    process = psutil.Process(server)
                    if str(self.repository) in " ".join(process.cmdline()):
                        process.kill()
                        process.wait(10)
        for stub in self.stubs():
            stub.kill()

    def ready(self) -> int:
        try:
            return get(self.url + "/ready")[0]
        except OSError:
            return 0

    def wait_ready(self, timeout: float = 120) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.process.poll() is None:
            if self.ready() == 200:
                return True
            time.sleep(0.1)
        return False

    def server_pid(self) -> int:
        return get(self.url + "/status")[1]["server_pid"]

    def stubs(self) -> list[psutil.Process]:
        """Every live stub serving this repository, whoever its parent is now."""
        found = []
        for p in psutil.process_iter(["cmdline"]):
            cmdline = p.info["cmdline"] or []
            if cmdline and Path(cmdline[0]).name == STUB and str(self.repository) in " ".join(cmdline[1:2]) \
                    and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p)
        return found


def test_http_url_follows_the_servers_flags():
    assert http_url(["tritonserver", "--model-repository=/models"]) == "127.0.0.1:8000"
    assert http_url(["tritonserver", "--http-port=8080", "--http-address=0.0.0.0"]) == "127.0.0.1:8080"
    assert http_url(["tritonserver", "--http-port", "9000", "--http-address", "10.1.2.3"]) == "10.1.2.3:9000"
    # IPv6, as serving.tritonserver.address_flags spells it for Triton: bracketed, a wildcard reached on loopback
    assert http_url(["tritonserver", "--http-port=8080", "--http-address=ipv6:::1"]) == "[::1]:8080"
    assert http_url(["tritonserver", "--http-address=ipv6:::"]) == "[::1]:8000"
    assert http_url(["tritonserver", "--http-address=ipv6:fd00::5"]) == "[fd00::5]:8000"


def ready_codes_until_healed(supervised, polls: int = 1200) -> list[int]:
    """/ready's answers every 50 ms until it has said 503 and then 200 again (a killed stub seen, then healed)."""
    codes = []
    for _ in range(polls):
        codes.append(supervised.ready())
        if 503 in codes and codes[-1] == 200:
            break
        time.sleep(0.05)
    return codes


def scraped(url: str) -> dict[tuple[str, tuple], float]:
    """The samples of a Prometheus /metrics page, parsed by prometheus_client: {(name, labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=10) as answer:
        assert answer.headers["Content-Type"].startswith("text/plain; version=")
        text = answer.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_a_dead_stub_is_reloaded_a_dead_server_restarted_and_sigterm_drains(repository, tmp_path, photos):
    """--restarts 1: a killed stub makes /ready 503 until its model is reloaded; a killed tritonserver is
    started again (its old stubs gone) and serves; SIGTERM under load drains and exits 0. /metrics counts the
    crash and the restart, the crash of the server before included."""
    from clients.client import ImageClassifierClient

    with Supervised(repository, tmp_path / "supervise.log", restarts=1) as supervised:
        first = supervised.server_pid()
        before = scraped(supervised.url + "/metrics")
        served = {dict(labels)["model"] for name, labels in before if name == "triton_supervisor_stub_crashes_total"}
        assert "classifier" in served and len(served) > 1, before
        assert {k: v for k, v in before.items() if k[0].endswith("_total")} == {
            ("triton_supervisor_server_starts_total", ()): 1, ("triton_supervisor_server_exits_total", ()): 0,
            ("triton_supervisor_stub_reloads_total", ()): 0,
            **{("triton_supervisor_stub_crashes_total", (("model", m),)): 0 for m in served}}
        assert before[("triton_supervisor_ready", ())] == 1 and before[("triton_supervisor_restarts_left", ())] == 1
        victim = serving_stubs(first, "classifier", 1)[0]
        os.kill(victim.pid, signal.SIGKILL)
        codes = ready_codes_until_healed(supervised)
        assert 503 in codes and codes[-1] == 200, get(supervised.url + "/status")

        old_stubs = {p.pid for p in supervised.stubs()}
        os.kill(first, signal.SIGKILL)
        status = {}
        for _ in range(600):
            code, status = get(supervised.url + "/status")
            if status.get("starts") == 2 and status["ready"]:
                break
            time.sleep(0.1)
        assert status["starts"] == 2 and status["server_exits"] == [-signal.SIGKILL] and status["ready"], status
        assert status["server_pid"] != first and not old_stubs & {p.pid for p in supervised.stubs()}
        after = scraped(supervised.url + "/metrics")
        assert after[("triton_supervisor_server_starts_total", ())] == 2, after
        assert after[("triton_supervisor_server_exits_total", ())] == 1
        assert after[("triton_supervisor_restarts_left", ())] == 0
        assert after[("triton_supervisor_stub_reloads_total", ())] >= 1
        assert after[("triton_supervisor_stubs_down", ())] == 0 and after[("triton_supervisor_ready", ())] == 1
        assert {dict(k[1])["model"]: v for k, v in after.items() if k[0] == "triton_supervisor_stub_crashes_total"} \
            == {m: int(m == "classifier") for m in served}
        with ImageClassifierClient(f"127.0.0.1:{supervised.ports.http}", protocol="http") as client:
            assert len(client.classify([photos["coffee"]] * 2, top_k=1)) == 2

        with Load(f"127.0.0.1:{supervised.ports.grpc}", "grpc", photos["coffee"], threads=6) as load:
            time.sleep(2.0)
            signalled = time.monotonic()
            supervised.process.send_signal(signal.SIGTERM)
            code = supervised.process.wait(90)
            exited = time.monotonic()
        log = supervised.log.read_text(errors="replace")
        print(f"\nSIGTERM to the supervisor under load: exit code {code} after {exited - signalled:.1f} s; "
              f"{load.count(0, signalled)} requests before it, {len(load.failed(0, signalled))} failed")
        assert code == 0, log[-3000:]
        assert "drained image_classifier" in log
        assert load.count(0, signalled) > 0 and load.failed(0, signalled - 0.5) == []
        assert [e for *_, e in load.results if e and e.startswith("in ensemble")] == []
        assert supervised.stubs() == []


def test_sigterm_turns_ready_503_and_keeps_serving_for_the_unready_wait(repository, tmp_path, photos):
    """--unready-wait 20: from the SIGTERM on /ready answers 503 while the ensemble still classifies (time for the
    endpoints to drop the pod), then the supervisor drains and exits 0. (Three requests in 20 s: no machine is
    that slow; the test measures no time.)"""
    from clients.client import ImageClassifierClient

    with Supervised(repository, tmp_path / "supervise.log", restarts=0, options=("--unready-wait", "20")) as supervised:
        with ImageClassifierClient(f"127.0.0.1:{supervised.ports.http}", protocol="http") as client:
            supervised.process.send_signal(signal.SIGTERM)
            for _ in range(500):
                if supervised.ready() == 503:
                    break
                time.sleep(0.02)
            codes, answers = [], []
            for _ in range(3):
                answers.append(len(client.classify([photos["coffee"]], top_k=1)))
                codes.append(supervised.ready())
        code = supervised.process.wait(120)
    log = supervised.log.read_text(errors="replace")
    assert codes and set(codes) == {503} and set(answers) == {1}, (codes, answers)
    assert code == 0 and "drained image_classifier" in log, log[-3000:]


def test_sigterm_to_a_hung_server_is_passed_on_within_the_bounds(repository, tmp_path):
    """tritonserver stopped (SIGSTOP) while the watchdog reloads a killed stub's model, every admin call hanging:
    the supervisor waits WATCHDOG_STOP_S for the watchdog and --drain-timeout for the drain, not their 120 s
    HTTP timeouts, so that a pod's grace period is not spent before tritonserver gets its SIGTERM."""
    from serving.supervise import WATCHDOG_STOP_S

    with Supervised(repository, tmp_path / "supervise.log", restarts=0, options=("--drain-timeout", "1")) as supervised:
        server = supervised.server_pid()
        victim = serving_stubs(server, "classifier", 1)[0]
        os.kill(server, signal.SIGSTOP)
        try:
            os.kill(victim.pid, signal.SIGKILL)
            reason = ""
            for _ in range(100):
                reason = get(supervised.url + "/ready")[1]["reason"]
                if "stub died" in reason:
                    break
                time.sleep(0.1)
            assert "stub died" in reason, reason
            time.sleep(0.5)  # the watchdog is inside its first call to the stopped server
            supervised.process.send_signal(signal.SIGTERM)
            log = ""
            for _ in range(600):  # unbounded, the watchdog's call and the drain's would each wait out 120 s
                if "drain failed" in log:
                    break
                time.sleep(0.1)
                log = supervised.log.read_text(errors="replace")
        finally:
            os.kill(server, signal.SIGCONT)
            supervised.process.send_signal(signal.SIGTERM)
            try:
                supervised.process.wait(150)
            except subprocess.TimeoutExpired:
                os.kill(server, signal.SIGKILL)
                raise
    assert "drain failed" in log, log[-3000:]
    assert f"the stub watchdog is still inside a model-control call after {WATCHDOG_STOP_S:g} s" in log, log[-3000:]


def test_a_server_that_stops_answering_is_restarted_then_exited_with(repository, tmp_path, photos):
    """tritonserver frozen (SIGSTOP: to its clients a deadlock looks the same): the supervisor ends it once it has
    not been live for --unlive-restart seconds (SIGTERM cannot reach it: SIGKILL) and starts it again, which
    serves; the frozen server's stubs are gone. Frozen again with no restart left, the supervisor exits with it,
    for the container runtime to restart."""
    from clients.client import ImageClassifierClient

    with Supervised(repository, tmp_path / "supervise.log", restarts=1, options=("--unlive-restart", "3")) as supervised:
        first = supervised.server_pid()
        old_stubs = {p.pid for p in supervised.stubs()}
        os.kill(first, signal.SIGSTOP)
        try:
            status = {}
            for _ in range(900):
                try:
                    status = get(supervised.url + "/status")[1]
                except OSError:
                    continue
                if status.get("starts") == 2 and status["ready"]:
                    break
                time.sleep(0.1)
        finally:
            if psutil.pid_exists(first):
                os.kill(first, signal.SIGKILL)
        log = supervised.log.read_text(errors="replace")
        assert status.get("starts") == 2 and status["ready"], (status, log[-3000:])
        assert status["server_exits"] == [-signal.SIGKILL] and status["server_pid"] != first, status
        assert "tritonserver was not live for" in log and "does not answer /v2/health/live" in log, log[-3000:]
        assert not old_stubs & {p.pid for p in supervised.stubs()}
        with ImageClassifierClient(f"127.0.0.1:{supervised.ports.http}", protocol="http") as client:
            assert len(client.classify([photos["coffee"]] * 2, top_k=1)) == 2

        second = status["server_pid"]
        os.kill(second, signal.SIGSTOP)
        try:
            code = supervised.process.wait(120)
        finally:
            if psutil.pid_exists(second):
                os.kill(second, signal.SIGKILL)
        log = supervised.log.read_text(errors="replace")
        assert code == 128 + signal.SIGKILL and "no restart left" in log, log[-3000:]
        deadline = time.monotonic() + 10
        while supervised.stubs() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert supervised.stubs() == []


def test_without_restarts_it_exits_with_the_server_and_leaves_no_stub(repository, tmp_path):
    with Supervised(repository, tmp_path / "supervise.log", restarts=0) as supervised:
        os.kill(supervised.server_pid(), signal.SIGKILL)
        code = supervised.process.wait(60)
        assert code != 0 and "no restart left" in supervised.log.read_text(errors="replace")
        deadline = time.monotonic() + 10
        while supervised.stubs() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert supervised.stubs() == []


def test_a_server_that_fails_to_start_is_not_restarted(tmp_path):
    """A repository that does not load is not healed by restarts: the supervisor exits with the server's code at
    once, whatever --restarts says."""
    missing = tmp_path / "no-such-repository"
    server = TritonServer(missing, Ports.free(), extra_args=SERVE_EXTRA_ARGS)
    command = [sys.executable, "-m", "serving.supervise", "--port", str(free_port()), "--restarts", "3", "--",
               *server.command()]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode != 0
    assert "before it answered; not restarting" in done.stderr and "starting it again" not in done.stderr


def test_make_stop_stops_the_server_of_a_supervisor_that_was_killed(repository, tmp_path):
    """`make serve`'s supervisor killed with SIGKILL (the out-of-memory killer, a kill -9) leaves its tritonserver
    serving on the ports: `make stop` stops that server and its stubs too, rather than forgetting them, also
    when the supervisor had restarted the server since `make serve` recorded its pid."""
    from tests.serving.test_self_healing import wait_dead

    ports, cli = Ports.free(), [sys.executable, "-m", "serving.server"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    start = subprocess.run([*cli, "start", "--model-repository", str(repository), "--http-port", str(ports.http),
                            "--grpc-port", str(ports.grpc), "--metrics-port", str(ports.metrics), "--watchdog-port",
                            str(free_port())], cwd=tmp_path, capture_output=True, text=True, timeout=200, env=env)
    assert start.returncode == 0, start.stderr
    state = json.loads((tmp_path / ".run" / "tritonserver.json").read_text())
    first = psutil.Process(state["server_pid"])
    family = [first, *first.children(recursive=True)]
    try:
        first.kill()  # the supervisor starts another server, which the state file does not name
        status: dict = {}
        for _ in range(900):
            status = get(state["supervisor"]["status"])[1]
            if status.get("ready") and status.get("server_pid") not in (None, first.pid):
                break
            time.sleep(0.1)
        assert status.get("ready") and status["server_pid"] != first.pid, status
        server = psutil.Process(status["server_pid"])
        family += [server, *server.children(recursive=True)]
        os.kill(state["pid"], signal.SIGKILL)
        stop = subprocess.run([*cli, "stop"], cwd=tmp_path, capture_output=True, text=True, timeout=120, env=env)
        assert stop.returncode == 0, stop.stderr
        for process in family:
            wait_dead(process)
        assert f"stopped tritonserver (pid {server.pid})" in stop.stdout
        assert not (tmp_path / ".run" / "tritonserver.json").exists()
    finally:
        for process in family:
            try:
                process.kill()
            except psutil.Error:
                pass


def test_restrictions_are_added_to_a_tritonserver_command_that_lacks_them():
    key, apis = "k", ",".join(access.RESTRICTED)
    http, grpc = access.restricted_args(key)
    assert restrict(["tritonserver", "--model-repository=/models"], key) == ["tritonserver", "--model-repository=/models",
                                                                          http, grpc]
    launcher = [sys.executable, "-m", "serving.tritonserver"]
    assert restrict(launcher, key) == [*launcher, http, grpc]
    own = f"--grpc-restricted-protocol={apis}:triton-admin-key=$(TRITON_ADMIN_KEY)"
    assert restrict(["/opt/tritonserver/bin/tritonserver", own], key) == ["/opt/tritonserver/bin/tritonserver", own,
                                                                          http]
    assert missing_restrictions(["tritonserver", "--http-restricted-api", "model-repository:h=v", own]) == []
    assert missing_restrictions(["sh", "-c", "tritonserver"]) == []  # not tritonserver itself: left alone
    # inference behind a key of its own leaves model control open: the admin's flags are still added
    inference = access.inference_restricted_args("i")
    assert restrict(["tritonserver", *inference], key) == ["tritonserver", *inference, http, grpc]


def test_inference_restriction_is_added_where_the_command_lacks_it():
    inference = http, grpc = access.inference_restricted_args("i")
    admin = access.restricted_args("k")
    assert restrict_inference(["tritonserver", *admin], "i") == ["tritonserver", *admin, http, grpc]
    own = "--http-restricted-api=inference,model-config:h=v"
    assert restrict_inference(["tritonserver", own], "i") == ["tritonserver", own, grpc]
    assert restrict_inference(["tritonserver", *inference], "other") == ["tritonserver", *inference]
    assert restrict_inference(["sh", "-c", "tritonserver"], "i") == ["sh", "-c", "tritonserver"]


def post(url: str, body: dict, headers: dict | None = None) -> int:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST", headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=60) as answer:
            return answer.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_a_server_started_without_restricted_flags_gets_them_under_a_generated_key(repository, tmp_path):
    """The images' and KServe's command line has no restricted-API flags: the supervisor adds them with a key it
    makes (0600, named in its log), so an unauthenticated load of a python model (its code would run in the
    server) and an unload are refused, while its own reload of a killed stub's model still heals it."""
    key_file, marker = tmp_path / "admin.key", tmp_path / "ran"
    code = base64.b64encode(f"open({str(marker)!r}, 'w').close()\nclass TritonPythonModel:\n    pass\n".encode())
    exploit = {"parameters": {"config": json.dumps({"backend": "python", "max_batch_size": 0}),
                              "file:1/model.py": code.decode()}}
    with Supervised(repository, tmp_path / "supervise.log", restarts=0,
                    options=("--new-key-file", str(key_file))) as supervised:
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        assert f"admin key for model control, config, statistics, trace, logging, shared memory: {key_file}" \
            in supervised.log.read_text(errors="replace")
        models = f"http://127.0.0.1:{supervised.ports.http}/v2/repository/models"
        assert post(f"{models}/x/load", exploit) == 403
        assert post(f"{models}/image_classifier/unload", {}) == 403
        assert post(f"{models}/x/load", exploit, {access.KEY_HEADER: "wrong"}) == 403
        with urllib.request.urlopen(f"http://127.0.0.1:{supervised.ports.http}/v2/models/image_classifier/ready") as r:
            assert r.status == 200  # still loaded
        assert post(f"{models}/image_classifier/load", {}, access.admin_headers(key_file, "http")) == 200

        os.kill(serving_stubs(supervised.server_pid(), "classifier", 1)[0].pid, signal.SIGKILL)
        codes = ready_codes_until_healed(supervised)
        assert 503 in codes and codes[-1] == 200, supervised.log.read_text(errors="replace")[-3000:]
        supervised.process.send_signal(signal.SIGTERM)
        assert supervised.process.wait(90) == 0
    assert not marker.exists() and not key_file.exists()  # the key is of no use once its server is gone


def test_an_inference_key_in_the_environment_puts_inference_behind_it(repository, tmp_path, monkeypatch):
    """TRITON_INFERENCE_KEY (deploy/k8s: the optional Secret triton-inference-key) restricts inference on both
    protocols, model control staying behind the admin key; the watchdog still reloads a killed stub's model (with
    the admin key) and its readiness says so, and the reloaded model classifies with the inference key."""
    from clients.client import ClassificationError, ImageClassifierClient
    from common.samples import sample_photos

    monkeypatch.setenv(access.INFERENCE_KEY_ENV, "inference-key")
    photo = next(iter(sample_photos().values())).read_bytes()
    with Supervised(repository, tmp_path / "supervise.log", restarts=0,
                    options=("--new-key-file", str(tmp_path / "admin.key"))) as supervised:
        assert f"inference behind the key in ${access.INFERENCE_KEY_ENV}" in supervised.log.read_text(errors="replace")
        for protocol, port in (("http", supervised.ports.http), ("grpc", supervised.ports.grpc)):
            with ImageClassifierClient(f"127.0.0.1:{port}", protocol) as client:
                with pytest.raises(ClassificationError, match="inference key"):
                    client.classify([photo])
            with ImageClassifierClient(f"127.0.0.1:{port}", protocol, inference_key="inference-key") as client:
                assert len(client.classify([photo], top_k=1)[0]) == 1
                with pytest.raises(ClassificationError, match="admin key"):
                    client.max_batch_size()
        os.kill(serving_stubs(supervised.server_pid(), "classifier", 1)[0].pid, signal.SIGKILL)
        codes = ready_codes_until_healed(supervised)
        assert codes[-1] == 200, supervised.log.read_text(errors="replace")[-3000:]
        with ImageClassifierClient(f"127.0.0.1:{supervised.ports.http}", "http", inference_key="inference-key") as c:
            assert len(c.classify([photo], top_k=1)[0]) == 1
        supervised.process.send_signal(signal.SIGTERM)
        assert supervised.process.wait(90) == 0
