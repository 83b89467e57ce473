"""Versioned rollout on a real server under load (serving.rollout): a gated candidate becomes the
classifier's next version, a failing one is refused, rollback brings the previous one back, A/B serves
a candidate beside it; no request through the ensemble fails at any switch."""
import contextlib
import dataclasses
import json
import re
import shutil
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from build.repository.spec import DeploymentSpec
from build.repository.writer import write_repository
from clients.client import ClassificationError, ImageClassifierClient
from serving import access, rollout
from serving.server import TritonServer
from tests.tiny_model import save_with_external_weights

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
EXPLICIT = ["--model-control-mode=explicit", "--load-model=*"]


def _candidate(source, target, scale):
    """The tiny model with its classifier weights multiplied by `scale` (per class)."""
    shutil.copytree(source, target)
    model = onnx.load(target / "model.onnx")
    weight = next(t for t in model.graph.initializer if t.name == "W")
    weight.CopyFrom(numpy_helper.from_array((numpy_helper.to_array(weight) * np.float32(scale)).astype(np.float32), "W"))
    onnx.save(model, target / "model.onnx")
    return rollout.Candidate(target / "model.onnx", target)


def _external_weights(source, target):
    """The tiny model, rescaled, with its weights in a file beside it (as models over 2 GB must be saved)."""
    return rollout.Candidate(save_with_external_weights(source, target, scale=1.05), target)


@contextlib.contextmanager
def torn_copies():
    """A fault of the disk under the served repository: each version folder rollout writes meanwhile gets half
    of its model file (what a full disk or an interrupted copy leaves). The candidate itself is whole and
    passes the gate; the server then fails to load what was written."""
    write_version = rollout.write_version

    def torn(repo, *args, **kwargs):
        target = write_version(repo, *args, **kwargs)
        model = target / repo.model_filename
        model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])
        return target

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(rollout, "write_version", torn)
        yield


class Load:
    """Threads classifying through the ensemble until stopped; every outcome counted."""

    def __init__(self, url, photo, threads=3):
        self.url, self.photo, self.ok, self.failed, self.stopping = url, photo, 0, [], threading.Event()
        self.threads = [threading.Thread(target=self._run) for _ in range(threads)]

    def _run(self):
        client = ImageClassifierClient(self.url, protocol="http")
        while not self.stopping.is_set():
            try:
                client.classify([self.photo], top_k=1)
                self.ok += 1
            except ClassificationError as exc:
                self.failed.append(str(exc))

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stopping.set()
        for t in self.threads:
            t.join()


def _classifier_successes(server, version):
    text = urllib.request.urlopen(server.metrics_url).read().decode()
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith("nv_inference_request_success{") and 'model="classifier"' in line
               and f'version="{version}"' in line)


@pytest.fixture
def repository(tiny_artifacts, tmp_path):
    """No queue timeout: a loaded machine starving the server past the derived 1 s while a version loads failed a
    request for its slowness, not the switch's (queue timeouts: test_overload.py)."""
    path = tmp_path / "model_repository"
    spec = DeploymentSpec(artifacts=str(tiny_artifacts))
    spec = dataclasses.replace(spec, preprocess=dataclasses.replace(spec.preprocess, queue_timeout_us=0),
                               classifier=dataclasses.replace(spec.classifier, queue_timeout_us=0))
    write_repository(spec, "python-onnxruntime", path, "tests")
    return rollout.Repository.open(path)


@pytest.fixture
def served(repository, tmp_path):
    with TritonServer(repository.path, log_file=tmp_path / "tritonserver.log", extra_args=EXPLICIT) as server:
        yield repository, rollout.Server(server.http_url), server
    assert server.process.returncode == 0


def test_rollout_and_rollback_under_load_drop_nothing(served, tiny_artifacts, tmp_path, photos):
    repo, api, server = served
    thresholds = {"agreement": 0.99, "accuracy_drop": 0.01}
    good = _candidate(tiny_artifacts, tmp_path / "good", 1.05)  # same answers, other bytes
    bad = _candidate(tiny_artifacts, tmp_path / "bad", [[1.0, -1.0, 1.0]])
    with Load(server.http_url, photos["chelsea"]) as load:
        assert rollout.add(repo, api, good, None, thresholds) == 2
        assert api.ready_versions("classifier") == [2]
        with pytest.raises(rollout.RolloutError, match="failed the gate against version 2"):
            rollout.add(repo, api, bad, None, thresholds)
        assert repo.versions() == [1, 2] and api.ready_versions("classifier") == [2]
        ImageClassifierClient(server.http_url, protocol="http").classify([photos["coffee"]])
        served_by_2 = _classifier_successes(server, 2)
        assert rollout.rollback(repo, api) == 1
        assert api.ready_versions("classifier") == [1]
    assert served_by_2 > 0
    assert load.failed == [] and load.ok > 0
    assert repo.versions() == [1] and rollout.retired_versions(repo) == [2]
    history = [h["action"] for h in json.loads((repo.path / rollout.STATE).read_text())["history"]]
    assert history == ["rollout", "rollback"]
    # The next version is numbered past the retired one.
    assert rollout.add(repo, api, good, None, thresholds) == 3


def test_a_version_that_fails_to_load_is_rolled_back(served, tiny_artifacts, tmp_path):
    repo, api, _ = served
    thresholds = {"agreement": 0.99, "accuracy_drop": 0.01}
    good = _candidate(tiny_artifacts, tmp_path / "good", 1.05)
    with torn_copies(), pytest.raises(rollout.RolloutError, match="version 2 was rolled back: load classifier: "):
        rollout.add(repo, api, good, None, thresholds)
    assert repo.versions() == [1] and rollout.retired_versions(repo) == [2]
    assert api.ready_versions("classifier") == [1]
    assert [(h["action"], h["retired"]) for h in repo.state()["history"]] == [("rollback", 2)]
    assert rollout.add(repo, api, good, None, thresholds) == 3


def test_a_candidate_with_its_weights_beside_it_rolls_out(served, tiny_artifacts, tmp_path, photos):
    repo, api, server = served
    thresholds = {"agreement": 0.99, "accuracy_drop": 0.01}
    external = _external_weights(tiny_artifacts, tmp_path / "external")
    with Load(server.http_url, photos["chelsea"]) as load:
        assert rollout.add(repo, api, external, None, thresholds) == 2
        assert api.ready_versions("classifier") == [2]
        assert sorted(p.name for p in repo.version_dir(2).iterdir() if p.suffix in (".onnx", ".bin")) == [
            "model.onnx", "weights.bin"]
        # The next version, self-contained, does not inherit the weights file of the one it replaces.
        assert rollout.add(repo, api, _candidate(tiny_artifacts, tmp_path / "good", 1.1), None, thresholds) == 3
        assert not (repo.version_dir(3) / "weights.bin").exists()
        assert rollout.rollback(repo, api) == 2  # version 2 serves again, from its own weights
    assert load.failed == [] and load.ok > 0
    # Version 2 was unloaded for 3 and loaded again, which restarts its counters: the load may have stopped before
    # reaching it, so one request of our own.
    ImageClassifierClient(server.http_url, protocol="http").classify([photos["coffee"]])
    assert _classifier_successes(server, 2) > 0


def test_ab_serves_a_candidate_beside_the_version_in_service(served, tiny_artifacts, tmp_path, photos):
    repo, api, server = served
    good = _candidate(tiny_artifacts, tmp_path / "good", 1.05)
    (tmp_path / "elsewhere").mkdir()  # MODEL_FILE outside ARTIFACTS
    good.model_file = Path(shutil.copy2(good.model_file, tmp_path / "elsewhere" / "model.onnx"))
    with Load(server.http_url, photos["chelsea"]) as load:
        assert rollout.ab_start(repo, api, good, None) == 2
        assert api.ready_versions("classifier_candidate") == [2] and api.ready_versions("classifier") == [1]
        assert rollout.ab_candidate(repo).artifacts == good.artifacts  # what ab promote gates with
        report = rollout.ab_run(repo, api, split=0.5, duration=3)
        rollout.ab_stop(repo, api)
    assert load.failed == []
    arms = report["image_classifier"], report["image_classifier_candidate"]
    assert all(arm["requests"] > 0 and arm["failed"] == 0 for arm in arms)
    assert arms[0]["answers"].keys() == arms[1]["answers"].keys()  # same answers: the candidate only rescales
    assert not (repo.path / "classifier_candidate").exists()
    assert api.ready_versions("classifier_candidate") == []


def test_rollout_and_ab_classify_with_the_inference_key(repository, tiny_artifacts, tmp_path):
    """A server with inference behind a key (`make serve INFERENCE_KEY=1`): without the key the rollout's served
    check cannot classify and the version is rolled back, saying so; with it the rollout and A/B arms classify."""
    key, thresholds = "rollout-inference-key", {"agreement": 0.99, "accuracy_drop": 0.01}
    good = _candidate(tiny_artifacts, tmp_path / "good", 1.05)
    with TritonServer(repository.path, log_file=tmp_path / "tritonserver.log",
                      extra_args=[*EXPLICIT, *access.inference_restricted_args(key)]) as server:
        with pytest.raises(rollout.RolloutError, match="version 2 was rolled back: .*inference key"):
            rollout.add(repository, rollout.Server(server.http_url), good, None, thresholds)
        api = rollout.Server(server.http_url, inference_key=key)
        assert rollout.add(repository, api, good, None, thresholds) == 3
        rollout.ab_start(repository, api, _candidate(tiny_artifacts, tmp_path / "other", 1.1), None)
        report = rollout.ab_run(repository, api, split=0.5, duration=2)
        rollout.ab_stop(repository, api)
    assert len(report) == 2 and all(arm["requests"] > 0 and arm["failed"] == 0 for arm in report.values())


def test_a_failed_ab_start_leaves_nothing_behind(served, tiny_artifacts, tmp_path):
    repo, api, _ = served
    good = _candidate(tiny_artifacts, tmp_path / "good", 1.05)
    with pytest.raises(rollout.RolloutError, match="--held-out .*missing is not a folder"):
        rollout.ab_start(repo, api, good, str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no images"):
        rollout.ab_start(repo, api, good, str(tmp_path / "empty"))
    with torn_copies(), pytest.raises(rollout.RolloutError, match="load classifier_candidate: "):
        rollout.ab_start(repo, api, good, None)
    assert [p.name for p in repo.path.iterdir() if p.name.endswith("_candidate")] == []
    assert api.ready_versions("classifier_candidate") == [] and api.ready_versions("classifier") == [1]
    assert rollout.ab_start(repo, api, good, None) == 2
    rollout.ab_stop(repo, api)


def test_refuses_what_the_ensemble_cannot_serve(served, tiny_artifacts, tmp_path):
    repo, api, _ = served
    other = _candidate(tiny_artifacts, tmp_path / "other", 1.0)
    (other.artifacts / "labels.txt").write_text("a\nb\nc\n")
    with pytest.raises(rollout.RolloutError, match="differs from the served labels"):
        rollout.add(repo, api, other, None, {"agreement": 0.99, "accuracy_drop": 0.01})
    assert repo.versions() == [1]


def test_history_is_replaced_whole_and_never_reset(repository):
    path = repository.path / rollout.STATE
    repository.record(action="rollout", version=2)
    with open(path) as before:
        repository.record(action="rollback", version=1)
        assert [h["action"] for h in json.load(before)["history"]] == ["rollout"]
    assert [h["action"] for h in repository.state()["history"]] == ["rollout", "rollback"]
    assert [p.name for p in repository.path.iterdir() if rollout.STATE in p.name] == [rollout.STATE]
    path.write_text('{"history": [{"action": "rollout"')
    for call in (repository.state, lambda: repository.record(action="rollback")):
        with pytest.raises(rollout.RolloutError, match=f"{path} is unreadable .*move it aside"):
            call()
    assert path.read_text() == '{"history": [{"action": "rollout"'


def test_a_rollback_with_no_server_answering_moves_nothing(repository):
    """A rollback while the server restarts would retire the version in service and load nothing: the one
    left on disk is not the one the operator asked for back once the rollback is run again."""
    from serving.server import free_port

    shutil.copytree(repository.version_dir(1), repository.path / repository.classifier / "2")
    with pytest.raises(rollout.RolloutError, match=r"no server answers at .*start one \(make serve\)"):
        rollout.rollback(repository, rollout.Server(f"127.0.0.1:{free_port()}"))
    assert repository.versions() == [1, 2] and rollout.retired_versions(repository) == []
    assert repository.state()["history"] == []


@pytest.mark.parametrize("breakage, says", [
    (lambda a: (a / "labels.txt").unlink(), "No such file or directory: '.*labels.txt'"),
    (lambda a: (a / "labels.txt").write_text("a\n\nb\n"), "labels.txt: expected one non-empty label per line"),
    (lambda a: (a / "preprocess.json").write_text("{"), "Expecting property name"),
], ids=["no labels.txt", "a blank label", "broken preprocess.json"])
def test_bad_artifacts_are_one_line_not_a_traceback(repository, tiny_artifacts, tmp_path, breakage, says):
    from serving.server import free_port

    artifacts = tmp_path / "artifacts"
    shutil.copytree(tiny_artifacts, artifacts)
    breakage(artifacts)
    command = [sys.executable, "-m", "serving.rollout", "--url", f"127.0.0.1:{free_port()}",
               "--repository", str(repository.path), "ab", "start", "--artifacts", str(artifacts)]
    run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 1 and re.fullmatch(f"serving.rollout: .*{says}.*\n", run.stderr), run.stderr


def test_model_control_errors_say_what_to_do(served):
    """The server's refusals and a missing server become RolloutErrors with the remedy (rollout.Server)."""
    from serving.server import free_port

    _, api, _ = served
    with pytest.raises(rollout.RolloutError, match=r"load no_such_model: HTTP 500: .*failed to load 'no_such_model'"):
        api.load("no_such_model")
    with pytest.raises(rollout.RolloutError, match=r"no server answers at .*start one \(make serve\)"):
        rollout.Server(f"127.0.0.1:{free_port()}").ready_versions("classifier")


def test_readiness_holds_through_a_rollout_and_says_when_the_ensemble_is_drained(served, tiny_artifacts, tmp_path):
    """The watchdog's /ready asks for the ensemble BUILD.json names, not Triton's own readiness (200 with it
    unloaded, 503 while any version loads): never 503 through a rollout, a rollback and an A/B test, which leave
    it loaded; 503 with the reason once a drain unloaded it, 200 once it is loaded again."""
    from serving.triton_admin import drain
    from serving.watchdog import Watchdog

    repo, api, server = served
    watchdog = Watchdog(server.process.pid, api.admin)
    assert watchdog.served == [repo.ensemble] and watchdog.readiness() == (True, "ready")
    not_ready, stop = [], threading.Event()

    def poll():
        while not stop.wait(0.02):
            ready, reason = watchdog.readiness()
            if not ready:
                not_ready.append(reason)

    poller = threading.Thread(target=poll)
    poller.start()
    try:
        good = _candidate(tiny_artifacts, tmp_path / "good", 1.05)
        assert rollout.add(repo, api, good, None, {"agreement": 0.99, "accuracy_drop": 0.01}) == 2
        assert rollout.rollback(repo, api) == 1
        rollout.ab_start(repo, api, _candidate(tiny_artifacts, tmp_path / "ab", 1.1), None)
        rollout.ab_stop(repo, api)
    finally:
        stop.set()
        poller.join()
    assert not_ready == []
    assert drain(api.admin).drained == [repo.ensemble]
    assert watchdog.readiness() == (False, f"{repo.ensemble} is not ready (unloaded, drained, or the server does "
                                           "not answer)")
    api.load(repo.ensemble)
    assert watchdog.readiness() == (True, "ready")


def test_a_url_other_than_make_serves_needs_its_repository(repository, tmp_path):
    """`--url` naming another server than the one `make serve` recorded does not borrow that one's repository
    (a rollback would move versions in the wrong one): it asks for --repository, in one line."""
    from serving.server import free_port

    run = tmp_path / "cwd"
    (run / ".run").mkdir(parents=True)
    # the recorded server: a process that passes for tritonserver, serving `repository` on another port
    recorded = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "tritonserver"])
    try:
        (run / ".run" / "tritonserver.json").write_text(json.dumps(
            {"pid": recorded.pid, "http": f"127.0.0.1:{free_port()}", "model_repository": str(repository.path)}))
        other = f"127.0.0.1:{free_port()}"
        cli = [sys.executable, "-m", "serving.rollout", "--url", other]
        env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
        refused = subprocess.run([*cli, "status"], cwd=run, env=env, capture_output=True, text=True, timeout=60)
        given = subprocess.run([*cli, "--repository", str(repository.path), "status"], cwd=run, env=env,
                               capture_output=True, text=True, timeout=60)
    finally:
        recorded.kill()
        recorded.wait()
    assert refused.returncode == 1 and refused.stdout == "" and refused.stderr.splitlines() == [
        "serving.rollout: which repository? pass --repository (the server at --url is not the one make serve "
        "started)"], (refused.stdout, refused.stderr)
    assert given.returncode == 0, given.stderr
    status = json.loads(given.stdout)
    assert status["repository"] == str(repository.path) and status["server"].startswith(f"no server answers at {other}")
