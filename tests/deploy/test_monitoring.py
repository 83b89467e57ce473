"""deploy/monitoring/: promtool checks the config and runs the rules' unit tests; a real Prometheus that
scrapes a real tritonserver under load answers every recording rule and every dashboard query."""
from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from common.contract import ENSEMBLE
from serving.monitor import (CONFIG, MONITORING, SUPERVISOR_TARGETS, TARGETS, Prometheus, scrape_target,
                             supervisor_targets, write_targets)
from serving.server import free_port
from tests.serving.test_self_healing import repository as healing_repository  # noqa: F401 (a fixture)

ROOT = MONITORING.parent.parent
RULES = MONITORING / "rules"
UNIT_TESTS = sorted((RULES / "tests").glob("*.yml"))
DASHBOARD = MONITORING / "dashboard.json"


@pytest.fixture(scope="session")
def promtool() -> str:
    """promtool, installed with `make prometheus-setup` (as root) where missing."""
    if shutil.which("promtool") is None or shutil.which("prometheus") is None:
        subprocess.run(["make", "--no-print-directory", "prometheus-setup"], cwd=ROOT, capture_output=True)
    found = shutil.which("promtool")
    if found is None or shutil.which("prometheus") is None:
        pytest.skip("no prometheus/promtool and `make prometheus-setup` could not install them "
                    "(needs root: sudo apt-get install prometheus)")
    return found


def run_promtool(promtool: str, *args: str) -> str:
    done = subprocess.run([promtool, *args], cwd=MONITORING, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"promtool {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def rules(name: str) -> list[dict]:
    return [r for g in yaml.safe_load((RULES / name).read_text())["groups"] for r in g["rules"]]


def dashboard_queries() -> list[str]:
    """Every panel query, and every variable's label_values() selector, as PromQL for all servers and models."""
    board = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in board["panels"] for t in p["targets"]]
    exprs += [re.fullmatch(r"label_values\((.*), \w+\)", v["query"]["query"]).group(1)
              for v in board["templating"]["list"] if v["type"] == "query"]
    return [e.replace("$instance", ".*").replace("$model", ".*") for e in exprs]


# ---- promtool ------------------------------------------------------------------------------------

def test_promtool_checks_the_config_and_the_rules(promtool):
    out = run_promtool(promtool, "check", "config", "prometheus.yml")
    assert "SUCCESS: 2 rule files found" in out
    run_promtool(promtool, "check", "rules", "rules/recording.yml", "rules/alerts.yml")


def test_promtool_rule_unit_tests_pass(promtool):
    run_promtool(promtool, "test", "rules", *(str(p.relative_to(MONITORING)) for p in UNIT_TESTS))


def test_every_alert_has_a_firing_and_a_not_firing_unit_test():
    cases = [case for path in UNIT_TESTS for test in yaml.safe_load(path.read_text())["tests"]
             for case in test.get("alert_rule_test", [])]
    for alert in (r["alert"] for r in rules("alerts.yml")):
        mine = [c for c in cases if c["alertname"] == alert]
        assert any(c["exp_alerts"] for c in mine), f"{alert}: no unit test where it fires"
        assert any(not c["exp_alerts"] for c in mine), f"{alert}: no unit test where it does not fire"


def test_every_recording_rule_has_a_unit_test():
    tested = {case["expr"] for path in UNIT_TESTS for test in yaml.safe_load(path.read_text())["tests"]
              for case in test.get("promql_expr_test", [])}
    assert {r["record"] for r in rules("recording.yml")} <= tested


def test_the_alerts_name_the_served_ensemble():
    named = {r["alert"] for r in rules("alerts.yml") if f'model="{ENSEMBLE}"' in r["expr"]}
    assert named == {"TritonModelNotReady", "TritonP99LatencyOverBudget", "ModelQualityMetricsMissing"}


# ---- the dashboard and the scrape target ---------------------------------------------------------

def test_dashboard_panels_use_the_datasource_variable():
    board = json.loads(DASHBOARD.read_text())
    assert any(v["name"] == "datasource" and v["type"] == "datasource" for v in board["templating"]["list"])
    for panel in board["panels"]:
        for source in [panel["datasource"], *(t["datasource"] for t in panel["targets"])]:
            assert source == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
    titles = " ".join(p["title"] for p in board["panels"]).lower()
    for wanted in ("throughput", "p50 / p99", "queue vs compute", "batch size", "failures by reason", "cpu", "memory",
                   "predicted classes vs reference", "prediction drift", "low-confidence share", "top-1 confidence"):
        assert wanted in titles


def test_the_scrape_targets_follow_make_serve(tmp_path):
    assert scrape_target(None) == "127.0.0.1:8002"
    assert scrape_target({"metrics": "http://127.0.0.1:18002/metrics"}) == "127.0.0.1:18002"
    assert supervisor_targets(None) == [] == supervisor_targets({"metrics": "http://127.0.0.1:18002/metrics"})
    assert supervisor_targets({"supervisor": {"ready": "http://[::1]:18003/ready",
                                              "status": "http://[::1]:18003/status"}}) == ["[::1]:18003"]
    config = yaml.safe_load(CONFIG.read_text())
    files = {job["job_name"]: [(CONFIG.parent / f).resolve() for sd in job["file_sd_configs"] for f in sd["files"]]
             for job in config["scrape_configs"]}
    assert files == {"triton": [(ROOT / TARGETS).resolve()],
                     "triton-supervisor": [(ROOT / SUPERVISOR_TARGETS).resolve()]}
    write_targets(tmp_path / "targets.json", ["127.0.0.1:1"])
    assert json.loads((tmp_path / "targets.json").read_text()) == [{"targets": ["127.0.0.1:1"], "labels": {}}]


def test_make_monitor_stop_leaves_a_process_that_reused_the_pid_alone(tmp_path):
    """A .run/prometheus.json whose pid another process has now, even one whose command line names prometheus (a
    system Prometheus after a reboot): status says not running, stop signals nothing, says so, forgets the file."""
    import psutil

    from tests.serving.test_launcher import assert_stop_leaves_it_alone

    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", "prometheus"])
    cli = [sys.executable, "-m", "serving.monitor"]
    try:
        state = tmp_path / ".run" / "prometheus.json"
        state.parent.mkdir()
        state.write_text(json.dumps({"pid": other.pid, "started": psutil.Process(other.pid).create_time() - 3600}))
        assert_stop_leaves_it_alone(cli, tmp_path, other.pid, "prometheus", "monitor")
        assert other.poll() is None and not state.exists()
    finally:
        other.kill()
        other.wait()


def test_make_monitor_warns_when_the_served_ensemble_is_not_the_one_the_rules_select(tiny_artifacts, tmp_path):
    """The rules and the dashboard select model="image_classifier": `make monitor` says so in one line when the
    repository `make serve` serves was built from a spec that names its ensemble otherwise."""
    from build.repository.spec import DeploymentSpec
    from build.repository.writer import write_repository
    from serving.monitor import renamed_ensemble_warning

    assert renamed_ensemble_warning(None) is None  # no server from `make serve`
    assert renamed_ensemble_warning({"model_repository": str(tmp_path / "none")}) is None  # no BUILD.json
    for name in (ENSEMBLE, "flowers"):
        repo = tmp_path / name
        write_repository(DeploymentSpec(artifacts=str(tiny_artifacts), ensemble_name=name), "onnxruntime", repo, "tests")
        warning = renamed_ensemble_warning({"model_repository": str(repo)})
        if name == ENSEMBLE:
            assert warning is None
        else:
            assert warning.startswith("warning: the served ensemble is 'flowers'") and "\n" not in warning
            assert f'model="{ENSEMBLE}"' in warning and "docs/operations.md" in warning


# ---- a real Prometheus scraping a real server ------------------------------------------------------

def loopback_config(tmp_path: Path, target: str, supervisor: str | None = None) -> Path:
    """The committed config with a 1 s scrape and evaluation, absolute rule paths and this test's targets: Triton's
    metrics, and the supervisor's where there is one."""
    config = yaml.safe_load(CONFIG.read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    config["rule_files"] = [str((CONFIG.parent / f).resolve()) for f in config["rule_files"]]
    targets = {"triton": [target], "triton-supervisor": [supervisor] if supervisor else []}
    for job in config["scrape_configs"]:
        path = tmp_path / f"{job['job_name']}-targets.json"
        write_targets(path, targets[job["job_name"]])
        for sd in job["file_sd_configs"]:
            sd["files"] = [str(path)]
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    return path


def finite(result: list[dict]) -> bool:
    return any(math.isfinite(float(series["value"][1])) for series in result)


@pytest.mark.slow
def test_live_prometheus_answers_every_rule_and_panel(promtool, tiny_artifacts, tmp_path, photos):
    from build.repository.spec import DeploymentSpec
    from build.repository.writer import write_repository
    from clients.client import ClassificationError, ImageClassifierClient
    from serving import access
    from serving.server import TritonServer, supervisor_command

    repo = tmp_path / "model_repository"
    write_repository(DeploymentSpec(artifacts=str(tiny_artifacts)), "python-onnxruntime", repo, "tests")
    images = list(photos.values())
    recorded = [r["record"] for r in rules("recording.yml")]
    queries = [r["expr"] for r in rules("recording.yml")] + recorded + dashboard_queries()
    # under its supervisor, as `make serve` runs it, with its HTTP guard (GUARD_PORT)
    key, supervisor, guard = tmp_path / "admin.key", free_port(), free_port()
    access.write_key(key)
    with TritonServer(repo, log_file=tmp_path / "tritonserver.log",
                      extra_args=["--metrics-config=summary_latencies=true"],
                      supervisor=supervisor_command("127.0.0.1", supervisor, 0, key, guard)) as server, \
            ImageClassifierClient(server.http_url, "http") as client:
        target = scrape_target({"metrics": server.metrics_url})
        malformed = urllib.request.Request(f"http://127.0.0.1:{guard}/v2/models/{ENSEMBLE}/infer", data=b"[" * 100)
        with pytest.raises(urllib.error.HTTPError, match="400"):
            urllib.request.urlopen(malformed, timeout=10)
        with Prometheus(loopback_config(tmp_path, target, f"127.0.0.1:{supervisor}"), tmp_path / "data", free_port(),
                        tmp_path / "prometheus.log") as prometheus:
            missing = queries
            for _ in range(120):  # bounded: a few requests, then ask again
                for i in range(4):
                    client.classify([images[i % len(images)]] * (1 + i % 3), top_k=1)
                with pytest.raises(ClassificationError):
                    client.classify([b"not an image"], top_k=1)
                missing = [q for q in missing if not finite(prometheus.query(q))]
                if not missing:
                    break
            assert not missing, f"no data from Prometheus for: {missing}; see {tmp_path}/prometheus.log"
            assert {s["metric"]["model"] for s in prometheus.query("triton:requests:rate1m")} >= {ENSEMBLE}
            assert prometheus.query('triton:request_failures:rate1m{model="%s"} > 0' % ENSEMBLE)
            # the python classifier's quality series, with its build-time reference, per version
            assert {(s["metric"]["model"], s["metric"]["version"])
                    for s in prometheus.query("quality:class_drift_tvd:ratio30m")} == {("classifier", "1")}
            # the supervisor's series: one crash counter per python model from the start, none crashed
            crashes = prometheus.query('triton_supervisor_stub_crashes_total{job="triton-supervisor"}')
            assert {s["metric"]["model"]: s["value"][1] for s in crashes} == {"classifier": "0", "preprocess": "0"}
            refused = prometheus.query('triton_supervisor_guard_refused_total{job="triton-supervisor"} > 0')
            assert {s["metric"]["reason"]: s["value"][1] for s in refused} == {"too_deep": "1"}
            # the server is up with its models and summaries: these alerts' conditions are false
            for rule in rules("alerts.yml"):
                if rule["alert"] in ("TritonServerDown", "TritonModelNotReady", "TritonLatencySummariesOff",
                                     "ModelQualityMetricsMissing", "TritonServerRestarted", "TritonStubsCrashing",
                                     "TritonNotReady", "TritonMalformedRequests"):
                    assert prometheus.query(rule["expr"]) == [], rule["alert"]
            with urllib.request.urlopen(f"{prometheus.url}/api/v1/rules", timeout=10) as answer:
                groups = json.load(answer)["data"]["groups"]
            unhealthy = [(r["name"], r.get("lastError")) for g in groups for r in g["rules"] if r["health"] != "ok"]
            assert not unhealthy


def active_alerts(prometheus_url: str) -> list[dict]:
    """The alerts pending or firing now, as Prometheus' /api/v1/alerts lists them (labels, state, ...)."""
    with urllib.request.urlopen(f"{prometheus_url}/api/v1/alerts", timeout=10) as answer:
        return json.load(answer)["data"]["alerts"]


def firing(prometheus: Prometheus) -> set[tuple[str, str]]:
    """(alert, model label or "") of the alerts firing now."""
    return {(a["labels"]["alertname"], a["labels"].get("model", ""))
            for a in active_alerts(prometheus.url) if a["state"] == "firing"}


@pytest.mark.slow
def test_killed_stubs_and_a_killed_server_fire_the_supervisor_alerts(promtool, healing_repository, tmp_path):
    """Under its supervisor (--restarts 2), three stubs of the classifier killed (each reloaded), then tritonserver
    itself: a real Prometheus scraping the supervisor's /metrics with the committed rules fires
    TritonStubsCrashing for the classifier alone and TritonServerRestarted, both quiet before."""
    import os
    import signal
    import time

    from serving.stubs import serving_stubs
    from tests.serving.test_supervise import Supervised, get, ready_codes_until_healed

    supervisor_alerts = {r["alert"] for g in yaml.safe_load((RULES / "alerts.yml").read_text())["groups"]
                         if g["name"] == "triton-supervisor-alerts" for r in g["rules"]}
    with Supervised(healing_repository, tmp_path / "supervise.log", restarts=2) as supervised:
        config = loopback_config(tmp_path, f"127.0.0.1:{supervised.ports.metrics}", f"127.0.0.1:{supervised.port}")
        with Prometheus(config, tmp_path / "data", free_port(), tmp_path / "prometheus.log") as prometheus:
            for _ in range(120):  # bounded: until the first scrapes are in
                if prometheus.query('triton_supervisor_stub_crashes_total{model="classifier"}'):
                    break
                time.sleep(0.5)
            assert not {a for a, _ in firing(prometheus)} & supervisor_alerts
            kills = [("start", time.time())]
            # three crashes of the classifier (a kill that aborts the whole server, as 2.51 does about once in 50,
            # is a restart the supervisor heals and one kill more)
            for _ in range(6):
                if get(supervised.url + "/status")[1]["crash_counts"]["classifier"] >= 3:
                    break
                os.kill(serving_stubs(supervised.server_pid(), "classifier", 1)[0].pid, signal.SIGKILL)
                kills.append(("stub", time.time()))
                codes = ready_codes_until_healed(supervised)
                assert 503 in codes and codes[-1] == 200, get(supervised.url + "/status")
            status = get(supervised.url + "/status")[1]
            # each stub was killed as soon as /ready said 200: the watchdog knew it by then, named its model and
            # reloaded only that one
            assert {c["model"] for c in status["crashes"]} == {"classifier"}, status["crashes"]
            os.kill(supervised.server_pid(), signal.SIGKILL)
            kills.append(("server", time.time()))
            assert supervised.wait_ready() and get(supervised.url + "/status")[1]["starts"] == status["starts"] + 1
            ready_again, seen, first = time.time(), set(), {}
            for _ in range(120):  # bounded: Prometheus scrapes and evaluates every second here
                seen = firing(prometheus)
                first.update({a: time.time() for a, _ in seen if a not in first})
                if {("TritonStubsCrashing", "classifier"), ("TritonServerRestarted", "")} <= seen:
                    break
                time.sleep(0.5)
            print(f"\n{len(kills) - 2} classifier stubs killed ({status['starts'] - 1} server restarts meanwhile), "
                  f"then tritonserver: ready again {ready_again - kills[-1][1]:.1f} s later; TritonServerRestarted "
                  f"firing {first['TritonServerRestarted'] - kills[-1][1]:.1f} s after that kill, TritonStubsCrashing "
                  f"firing {first['TritonStubsCrashing'] - kills[-2][1]:.1f} s after the last stub kill (at the latest)")
            assert {(a, m) for a, m in seen if a in supervisor_alerts} == {
                ("TritonStubsCrashing", "classifier"), ("TritonServerRestarted", "")}, tmp_path / "prometheus.log"
            if os.environ.get("SUPERVISOR_PLOT"):  # the figure of docs/results/2026-12-06-supervisor-alerts.md
                time.sleep(5)
                plot_supervisor(prometheus.url, kills, time.time(), Path(os.environ["SUPERVISOR_PLOT"]))


def plot_supervisor(prometheus_url: str, kills: list[tuple[str, float]], end: float, out: Path) -> None:
    """The supervisor's series, Triton's `up` and the supervisor alerts the live test saw, the kills marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tests.deploy.test_drift import query_range

    start = kills[0][1]
    panels = [
        ("the supervisor's counters", [
            ("stub crashes, classifier", 'triton_supervisor_stub_crashes_total{model="classifier"}'),
            ("stub reloads", "triton_supervisor_stub_reloads_total"),
            ("server exits", "triton_supervisor_server_exits_total")]),
        ("readiness", [("supervisor /ready", "triton_supervisor_ready"), ("Triton metrics scraped (up)",
                                                                         'up{job="triton"}')]),
        ("alerts firing", [(a, f'{1 - 0.1 * i} * ALERTS{{alertname="{a}", alertstate="firing"}}')
                           for i, a in enumerate(("TritonStubsCrashing", "TritonServerRestarted"))]),
    ]
    fig, axes = plt.subplots(len(panels), 1, figsize=(11, 7), sharex=True)
    for ax, (title, series) in zip(axes, panels):
        for label, expr in series:
            points = query_range(prometheus_url, expr, start, end)
            ax.step([t - start for t, _ in points], [v for _, v in points], where="post", label=label)
        for what, when in kills[1:]:
            ax.axvline(when - start, color="red" if what == "server" else "grey", linestyle=":", linewidth=1)
        ax.set_title(title, fontsize=10)
        if title != "the supervisor's counters":
            ax.set_ylim(-0.1, 1.1)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    axes[-1].set_xlabel("seconds (dotted: a classifier stub killed; red: tritonserver killed; 1 s scrapes)")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
