"""The tools find the server `make serve` started, and its admin key, from any folder: ./.run first, then the
.run/ of the checkout the code was imported from, or $TRITON_RUN_DIR alone; a key goes only to the server whose
state it sits beside. Real servers on loopback, and states of this very process (alive) for the order."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from clients.classify import admin_key_for
from common.samples import sample_photos
from serving import access
from serving import server as launcher  # (the conftest's `server` is a fixture)
from serving.server import Ports, start_time

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("build", "clients", "common", "serving", "training")  # what the server, classify and rollout import


@pytest.fixture(scope="module")
def tiny_repository(tiny_artifacts, tmp_path_factory) -> Path:
    from build.repository.spec import DeploymentSpec
    from build.repository.writer import write_repository

    repo = tmp_path_factory.mktemp("elsewhere") / "model_repository"
    write_repository(DeploymentSpec(artifacts=str(tiny_artifacts)), "python-onnxruntime", repo, "tests")
    return repo


def checkout_copy(root: Path) -> Path:
    """A copy of the project's packages: code imported from there has its own checkout .run/ (the real one's is
    left alone, whatever a developer's `make serve` keeps there)."""
    for package in PACKAGES:
        shutil.copytree(ROOT / package, root / package, ignore=shutil.ignore_patterns("__pycache__"))
    return root


def run(module: str, *args: str, cwd: Path, code: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python -m module` in `cwd` with the project imported from `code`; no run folder or key from this shell."""
    own = {k: v for k, v in os.environ.items() if k not in (launcher.RUN_DIR_ENV, access.KEY_ENV)}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={**own, "PYTHONPATH": str(code), **(env or {})})


@pytest.mark.slow
def test_classify_and_rollout_find_the_checkouts_server_and_key_from_another_folder(tiny_repository, tmp_path):
    """Before, both read ./.run only: from another folder classify tried Triton's default port and rollout found
    no server; $TRITON_RUN_DIR did not exist."""
    checkout, elsewhere = checkout_copy(tmp_path / "checkout"), tmp_path / "elsewhere"
    elsewhere.mkdir()
    ports = Ports.free()
    start = run("serving.server", "start", "--model-repository", str(tiny_repository), "--http-port", str(ports.http),
                "--grpc-port", str(ports.grpc), "--metrics-port", str(ports.metrics), "--watchdog-port", "0",
                cwd=checkout, code=checkout)
    assert start.returncode == 0, start.stderr
    coffee = str(sample_photos(["coffee"])["coffee"])
    try:
        for protocol in ("http", "grpc"):  # the recorded ports
            done = run("clients.classify", coffee, "--json", "--protocol", protocol, cwd=elsewhere, code=checkout)
            assert done.returncode == 0 and json.loads(done.stdout)["top"], done.stderr
        # model control is restricted: the versions served come back only with the key beside the state
        status = run("serving.rollout", "status", cwd=elsewhere, code=checkout)
        assert status.returncode == 0, status.stderr
        answer = json.loads(status.stdout)
        assert answer["serving"] == [1] and "server" not in answer and answer["repository"] == str(tiny_repository)
        # this checkout's code, told where the state is
        named = run("clients.classify", coffee, "--json", cwd=elsewhere, code=ROOT,
                    env={launcher.RUN_DIR_ENV: str(checkout / ".run")})
        assert named.returncode == 0 and json.loads(named.stdout)["top"], named.stderr
        assert not (elsewhere / ".run").exists()
        # the drain is told its server; without the key beside that server's state it says where the key is
        http = f"127.0.0.1:{ports.http}"
        keyless = run("serving.watchdog", "--drain", "--http", http, cwd=elsewhere, code=checkout)
        assert keyless.returncode != 0 and len(keyless.stderr.strip().splitlines()) == 1, keyless.stderr
        assert "HTTP 403" in keyless.stderr and "--key-file" in keyless.stderr and "make serve" in keyless.stderr
        drained = run("serving.watchdog", "--drain", "--http", http, "--key-file", str(checkout / ".run" / "admin.key"),
                      cwd=elsewhere, code=checkout)
        assert drained.returncode == 0, drained.stderr
    finally:
        stop = run("serving.server", "stop", cwd=checkout, code=checkout)
    assert stop.returncode == 0, stop.stderr


def fake_state(root: Path, http: str, grpc: str) -> str:
    """A state `make serve` would write in `root`/.run, for this very process (alive, its start time recorded),
    and its admin key."""
    run_dir = root / ".run"
    key = access.write_key(run_dir / "admin.key")
    info = {"pid": os.getpid(), "started": start_time(os.getpid()), "http": http, "grpc": grpc,
            "model_repository": "model_repository", "log": ".run/tritonserver.log", "admin_key_file": ".run/admin.key"}
    (run_dir / launcher.STATE_FILE).write_text(json.dumps(info))
    return key


def test_the_current_folders_server_comes_first_and_each_key_goes_to_its_own_server(tmp_path, monkeypatch):
    checkout, here = tmp_path / "checkout", tmp_path / "here"
    checkout_key = fake_state(checkout, "127.0.0.1:18000", "127.0.0.1:18001")
    here_key = fake_state(here, "127.0.0.1:28000", "127.0.0.1:28001")
    monkeypatch.setattr(launcher, "CHECKOUT_RUN_DIR", checkout / ".run")
    monkeypatch.delenv(access.KEY_ENV, raising=False)
    monkeypatch.chdir(here)
    found = launcher.servers_found({})
    assert [info["http"] for info in found] == ["127.0.0.1:28000", "127.0.0.1:18000"]
    assert found[1]["model_repository"] == str(checkout / "model_repository")  # where make serve ran, not here
    assert admin_key_for("localhost:18001", found) == checkout_key
    assert admin_key_for("127.0.0.1:28000", found) == here_key
    assert admin_key_for("127.0.0.1:38000", found) is None  # no recorded server there: no key at all
    assert launcher.servers_found({launcher.RUN_DIR_ENV: str(checkout / ".run")}) == [found[1]]
    # a state here whose server is gone: the checkout's server is the default, with its own key only
    (here / ".run" / launcher.STATE_FILE).write_text(json.dumps({"pid": os.getpid(), "started": 1.0}))
    found = launcher.servers_found({})
    assert [info["http"] for info in found] == ["127.0.0.1:18000"]
    assert admin_key_for("127.0.0.1:28000", found) is None
    # the lifecycle commands keep to ./.run: make serve, stop and status act on this folder's server only
    assert launcher.served() is None
