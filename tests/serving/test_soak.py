"""`make soak`, bounded: good and bad images against a real server; no server error, every bad image a 4xx."""
from __future__ import annotations

import argparse
import json
import threading
import time

import psutil
import pytest

from benchmarks import soak

pytestmark = pytest.mark.slow


def _environment_of_a_stub(name: str, timeout_s: float = 60.0) -> str | None:
    """`name` in the environment of the first python-backend stub that has it (this test's server's)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for proc in psutil.process_iter(["name"]):
            try:
                if proc.info["name"] == "triton_python_backend_stub" and name in proc.environ():
                    return proc.environ()[name]
            except psutil.Error:
                continue
        time.sleep(0.2)
    return None


def test_parse_duration():
    assert [soak.parse_duration(t) for t in ("45", "30s", "10m", "1h")] == [45, 30, 600, 3600]
    with pytest.raises(ValueError, match="10m"):
        soak.parse_duration("ten minutes")
    assert soak.env_setting("MALLOC_ARENA_MAX=2") == ("MALLOC_ARENA_MAX", "2")
    with pytest.raises(argparse.ArgumentTypeError, match="NAME=VALUE"):
        soak.env_setting("no value")


def test_a_short_soak_has_no_server_error_and_answers_bad_images_with_4xx(tiny_artifacts, tmp_path):
    from build.repository.spec import DeploymentSpec
    from build.repository.writer import write_repository

    repo = tmp_path / "model_repository"
    write_repository(DeploymentSpec(artifacts=str(tiny_artifacts)), "python-onnxruntime", repo, "tests")
    out = tmp_path / "soak"
    args = soak.get_args_parser().parse_args(["--model-repository", str(repo), "--duration", "24", "--bucket", "6",
                                              "--users", "4", "--bad-share", "0.25", "--out", str(out),
                                              "--server-env", "SOAK_SERVER_MARK=stubs-too"])
    seen = []
    watcher = threading.Thread(target=lambda: seen.append(_environment_of_a_stub("SOAK_SERVER_MARK")), daemon=True)
    watcher.start()
    summary = soak.main(args)
    watcher.join(60)
    assert seen == ["stubs-too"]  # --server-env reaches the server's stubs
    assert "server environment SOAK_SERVER_MARK=stubs-too" in (out / "soak.md").read_text()
    assert summary["server_errors"] == 0, summary["outcomes"]
    assert summary["good"] > 0 and summary["good_failed"] == 0, summary["outcomes"]
    assert summary["bad"] > 0 and summary["bad_client_error"] == summary["bad"], summary["outcomes"]
    # every kind of bad image was sent, and each got INVALID_ARGUMENT (HTTP 400)
    names = {row[2] for row in soak.read_log(out / "requests.csv") if row[1] == "bad"}
    assert names == {"not_an_image", "truncated_jpeg", "too_small", "empty"}
    report = json.loads((out / "soak.json").read_text())
    assert len(report["buckets"]) == 4 and all(b["rss_mb"] for b in report["buckets"])
    assert summary["rss_growth_percent"] is not None and summary["p99_drift_ratio"] is not None
    # PSS counts the pages the server and its stubs share once: less than their summed RSS, split by process
    last = report["buckets"][-1]
    assert 0 < last["pss_mb"] < last["rss_mb"] and summary["pss_growth_percent"] is not None
    assert {"server", "preprocess", "classifier"} <= set(last["pss_by_role"])
    assert abs(sum(last["pss_by_role"].values()) - last["pss_mb"]) < 1.0 + 0.05 * last["pss_mb"]
    assert (out / "soak.md").read_text().count("\n|") >= 4 + 13 and (out / "soak.png").stat().st_size > 0


def test_a_soak_that_kills_each_stub_reports_each_recovery(tiny_artifacts, tmp_path):
    """--kill-stubs: each python-backend stub killed in turn under the soak's load, the watchdog reloading
    its model; every kill is followed by readiness back and no failure among the requests after it."""
    from build.repository.spec import DeploymentSpec
    from build.repository.writer import write_repository

    repo = tmp_path / "model_repository"
    write_repository(DeploymentSpec(artifacts=str(tiny_artifacts)), "python-onnxruntime", repo, "tests")
    out = tmp_path / "soak"
    args = soak.get_args_parser().parse_args(["--model-repository", str(repo), "--duration", "30", "--bucket", "10",
                                              "--users", "4", "--kill-stubs", "--out", str(out)])
    summary = soak.main(args)
    kills = summary["stub_kills"]
    if summary["server_exited"] or any(k["seconds_until_ready"] is None for k in kills):
        from tests.serving.test_self_healing import xfail_if_triton_aborted

        xfail_if_triton_aborted(out / "tritonserver.log")
    assert not summary["server_exited"], (out / "tritonserver.log").read_text(errors="replace")[-3000:]
    assert sorted((k["model"], k["instance"]) for k in kills) == [("classifier", 0), ("preprocess", 0),
                                                                  ("preprocess", 1)]
    for kill in kills:
        assert kill["seconds_until_ready"] is not None, kill
        assert kill["requests_after"] > 0 and kill["failed_after"] == 0, kill
    assert summary["server_errors_outside_kills"] == 0, summary["outcomes"]
    assert "Stubs killed" in (out / "soak.md").read_text()
