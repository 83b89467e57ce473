"""Run a real Prometheus on loopback that scrapes the server `make serve` started (`make monitor`).

    python -m serving.monitor start [--port 9090]
    python -m serving.monitor stop
    python -m serving.monitor status
    python -m serving.monitor k8s-rule     # make k8s-rule: deploy/k8s/base/prometheusrule.yaml from the rule files

The scrape config, rules and dashboard are committed in deploy/monitoring/ and used as they are. This
writes only the scrape targets, .run/monitoring/targets.json and supervisor-targets.json, from the metrics and
supervisor URLs `make serve` recorded (Prometheus re-reads those files, so `make monitor` after a new
`make serve` follows the new ports), and keeps the Prometheus process in .run/prometheus.json. The rules and
the dashboard name the default ensemble (common.contract.ENSEMBLE): `start` warns when the served repository's
spec names another. See docs/operations.md.
"""
from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import yaml

from common.contract import ENSEMBLE
from common.files import write_whole
from serving.health import port_number, positive
from serving.server import EXITED, RUN_DIR, find_served, left_alone, not_ours, start_time, terminate, terminate_pid
from serving.triton_admin import built_spec

MONITORING = Path(__file__).resolve().parent.parent / "deploy" / "monitoring"
CONFIG = MONITORING / "prometheus.yml"
RULE_FILES = (MONITORING / "rules" / "recording.yml", MONITORING / "rules" / "alerts.yml")
K8S_RULE = MONITORING.parent / "k8s" / "base" / "prometheusrule.yaml"
TARGETS = RUN_DIR / "monitoring" / "targets.json"  # the paths CONFIG's file_sd_configs name: job triton's
SUPERVISOR_TARGETS = RUN_DIR / "monitoring" / "supervisor-targets.json"  # and job triton-supervisor's
DEFAULT_TARGET = "127.0.0.1:8002"  # Triton's default metrics port


class MonitorError(RuntimeError):
    pass


def scrape_target(info: dict | None) -> str:
    """host:port of the metrics endpoint in what `make serve` recorded; Triton's default without one."""
    if not info:
        return DEFAULT_TARGET
    return urllib.parse.urlsplit(info["metrics"]).netloc


def supervisor_targets(info: dict | None) -> list[str]:
    """host:port of the supervisor's /metrics in what `make serve` recorded; none without a supervisor."""
    supervisor = (info or {}).get("supervisor")
    return [urllib.parse.urlsplit(supervisor["status"]).netloc] if supervisor else []


def write_targets(path: Path, targets: list[str]) -> None:
    """A Prometheus file_sd file for a job (written whole, then renamed: Prometheus watches it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_whole(path, json.dumps([{"targets": targets, "labels": {}}], indent=2))


def renamed_ensemble_warning(info: dict | None) -> str | None:
    """One line when the repository `make serve` serves names an ensemble other than the one the rules and the
    dashboard select (its BUILD.json spec's ensemble_name); None otherwise."""
    name = built_spec(info.get("model_repository")).get("ensemble_name") if info else None
    if not isinstance(name, str) or name in ("", ENSEMBLE):
        return None
    return (f"warning: the served ensemble is {name!r}, but deploy/monitoring's rules and dashboard select "
            f"model=\"{ENSEMBLE}\": edit them (docs/operations.md, other model names)")


class _RuleDumper(yaml.SafeDumper):
    pass


_RuleDumper.add_representer(str, lambda dumper, s: dumper.represent_scalar(
    "tag:yaml.org,2002:str", s, style="|" if "\n" in s else None))


def k8s_rule() -> str:
    """The PrometheusRule deploy/k8s/base ships: the groups of RULE_FILES, in order, as they are."""
    groups = [g for path in RULE_FILES for g in yaml.safe_load(path.read_text())["groups"]]
    rule = {"apiVersion": "monitoring.coreos.com/v1", "kind": "PrometheusRule", "metadata": {"name": "triton"},
            "spec": {"groups": groups}}
    return ("# Written by `make k8s-rule` from deploy/monitoring/rules/recording.yml and alerts.yml (promtool\n"
            "# unit-tested there): edit those and run it again; tests/deploy/test_kubernetes.py checks it is current.\n"
            + yaml.dump(rule, Dumper=_RuleDumper, sort_keys=False, width=4096, allow_unicode=True))


class Prometheus:
    """One `prometheus` process on 127.0.0.1:<port>. A context manager."""

    def __init__(self, config: Path, data_dir: Path, port: int = 9090, log_file: Path | None = None):
        self.config, self.data_dir, self.port, self.log_file = Path(config), Path(data_dir), port, log_file
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        binary = shutil.which("prometheus")
        if binary is None:
            raise MonitorError("no `prometheus` on PATH: make prometheus-setup (as root), "
                               "or sudo apt-get install prometheus")
        return [binary, f"--config.file={self.config.resolve()}", f"--storage.tsdb.path={self.data_dir.resolve()}",
                f"--web.listen-address=127.0.0.1:{self.port}"]

    def start(self, timeout: float = 60.0, detach: bool = False) -> "Prometheus":
        command = self.command()
        with socket.socket() as s:  # another Prometheus there would answer the readiness probe for this one
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", self.port))
            except OSError:
                raise MonitorError(f"port {self.port} on 127.0.0.1 already in use (Debian's prometheus service? "
                                   "systemctl disable --now prometheus): or make monitor PROMETHEUS_PORT=...") from None
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_file, "ab") if self.log_file else subprocess.DEVNULL
        try:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=detach)
        finally:
            if self.log_file:
                log.close()
        try:
            self.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise MonitorError(f"prometheus exited with code {self.process.returncode} while starting"
                                   + (f"; see {self.log_file}" if self.log_file else ""))
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.25)
        raise MonitorError(f"prometheus not ready at {self.url} after {timeout:.0f} s")

    def query(self, expr: str) -> list[dict]:
        """The result of an instant query through the HTTP API (/api/v1/query)."""
        url = f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        with urllib.request.urlopen(url, timeout=10) as r:
            answer = json.load(r)
        if answer.get("status") != "success":
            raise MonitorError(f"query {expr!r} failed: {answer}")
        return answer["data"]["result"]

    def stop(self, timeout: float = 30.0) -> None:
        terminate(self.process, timeout)

    def __enter__(self) -> "Prometheus":
        return self.start() if self.process is None else self

    def __exit__(self, *exc) -> None:
        self.stop()


# ---- `make monitor` / `make monitor-stop`: a detached Prometheus remembered in .run/ -------------

def _state_file() -> Path:
    return RUN_DIR / "prometheus.json"


def _recorded() -> tuple[dict | None, str | None]:
    """What `make monitor` recorded, and None while that Prometheus runs, else EXITED or who has its pid now."""
    state = _state_file()
    try:
        info = json.loads(state.read_text())
        return info, not_ours(info, "prometheus", state)
    except (OSError, ValueError, KeyError, TypeError):
        return None, EXITED


def running() -> dict | None:
    """What `make monitor` recorded while that Prometheus runs; None if there is none."""
    info, gone = _recorded()
    return info if gone is None else None


def start(port: int, timeout: float) -> tuple[dict, list[str], bool]:
    """Write the scrape targets and start Prometheus unless it runs: (its state, the targets: Triton's metrics,
    then the supervisor's if `make serve` started one, whether started)."""
    served = find_served()
    targets = [scrape_target(served), *supervisor_targets(served)]
    write_targets(TARGETS, targets[:1])
    write_targets(SUPERVISOR_TARGETS, targets[1:])
    info = running()
    if info is not None:
        return info, targets, False
    prometheus = Prometheus(CONFIG, RUN_DIR / "prometheus", port, RUN_DIR / "prometheus.log")
    prometheus.start(timeout, detach=True)
    info = {"pid": prometheus.process.pid, "started": start_time(prometheus.process.pid), "url": prometheus.url,
            "config": str(CONFIG), "log": str(prometheus.log_file)}
    write_whole(_state_file(), json.dumps(info, indent=2))
    return info, targets, True


def stop(timeout: float = 30.0) -> str:
    """Stop the Prometheus `make monitor` started (a process that has taken its pid since is left alone): what
    was done, in a line."""
    info, gone = _recorded()
    _state_file().unlink(missing_ok=True)
    if gone == EXITED:
        return "no prometheus started by `make monitor` runs"
    pid = int(info["pid"])
    if gone is not None:
        return left_alone(pid, "prometheus", "monitor", gone)
    terminate_pid(pid, timeout)
    return f"stopped prometheus (pid {pid})"


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Start/stop a background Prometheus on loopback (make monitor).")
    p.add_argument("action", choices=("start", "stop", "status", "k8s-rule"))
    p.add_argument("--port", type=port_number, default=9090,
                   help="loopback port of Prometheus' web UI and API (default: %(default)s)")
    p.add_argument("--timeout", type=positive(float), default=60.0, help="seconds to wait for readiness (default: %(default)s)")
    return p


def main(args: argparse.Namespace) -> None:
    if args.action == "start":
        info, targets, started = start(args.port, args.timeout)
        print(f"prometheus {'ready' if started else 'already running'} (pid {info['pid']}, log {info['log']})")
        print(f"  UI and API  {info['url']}  (alerts: {info['url']}/alerts)")
        recorded = find_served()
        print(f"  scraping    {targets[0]}{'' if recorded else ' (no server from `make serve` runs: Triton default)'}")
        if targets[1:]:
            print(f"              {targets[1]} (its supervisor)")
        warning = renamed_ensemble_warning(recorded)
        if warning:
            print(warning)
    elif args.action == "k8s-rule":
        K8S_RULE.write_text(k8s_rule())
        print(f"wrote {K8S_RULE.relative_to(MONITORING.parent.parent)}")
    elif args.action == "stop":
        print(stop())
    else:
        info = running()
        print(json.dumps(info, indent=2) if info else "not running")


if __name__ == "__main__":
    try:
        main(get_args_parser().parse_args())
    except MonitorError as exc:
        sys.exit(f"serving.monitor: {exc}")
