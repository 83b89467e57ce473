"""`make bench-rollout`: versioned rollout and rollback under Locust load, every request counted.

    python -m benchmarks.rollout_bench [--artifacts artifacts/efficientnet_lite0] [--candidate F] [--cycles 2]

Builds a repository for the model (python-onnxruntime, ensemble), starts its own tritonserver with
explicit model control (as `make serve` does), runs Locust's HTTP users through the ensemble, and
meanwhile rolls a candidate out and back `--cycles` times with serving.rollout (gate, next version,
load, wait until it serves alone, check through the ensemble). Reports Locust's requests and
failures over the whole run, each switch's time and whether it ended within Locust's run time (a
slow switch can outlast the load: it is then marked, not claimed as under load), and per classifier
version the requests Triton counted while it served. The candidate is by default the model's own file (a re-deploy: the gate
passes and the answers are the same); pass another ONNX with --candidate.
Writes benchmarks/results/rollout.json and rollout.md.
"""
from __future__ import annotations

import argparse
import csv
import json
import shutil
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from benchmarks import locust_run
from build.repository.spec import DeploymentSpec
from build.repository.writer import write_repository
from common import cpu
from common.contract import MODEL_ONNX
from serving import rollout
from serving.health import number
from serving.server import TritonServer

EXPLICIT = ["--model-control-mode=explicit", "--load-model=*"]


def classifier_requests(metrics_url: str, model: str) -> dict[str, float]:
    text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    counts = {}
    for line in text.splitlines():
        if line.startswith("nv_inference_request_success{") and f'model="{model}"' in line:
            version = line.split('version="')[1].split('"')[0]
            counts[version] = float(line.split()[-1])
    return counts


def run(artifacts: Path, candidate: rollout.Candidate, cycles: int, users: int, settle_s: float, out: Path,
        log=print) -> dict:
    work = Path(tempfile.mkdtemp(prefix="bench-rollout-"))
    try:
        return _run(work, artifacts, candidate, cycles, users, settle_s, out, log)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _run(work: Path, artifacts: Path, candidate: rollout.Candidate, cycles: int, users: int, settle_s: float,
         out: Path, log) -> dict:
    repo_path = work / "model_repository"
    write_repository(DeploymentSpec(artifacts=str(artifacts)), "python-onnxruntime", repo_path, "benchmarks.rollout_bench")
    switches, seen = [], {}
    thresholds = {"agreement": 0.99, "accuracy_drop": 0.01}
    run_time = int(settle_s * (2 * cycles + 1) + 60 * cycles) + 10
    with TritonServer(repo_path, log_file=work / "tritonserver.log", extra_args=EXPLICIT) as server:
        repo, api = rollout.Repository.open(repo_path), rollout.Server(server.http_url)
        result = {}

        def load() -> None:
            result["started"] = time.monotonic()
            result["locust"] = locust_run.run("TritonHttpUser", server.http_url, users, run_time, out / "rollout_locust",
                                              triton_model=repo.ensemble)[0]

        thread = threading.Thread(target=load)
        thread.start()
        try:
            time.sleep(settle_s + locust_run.SPAWN_ALLOWANCE_S)
            for _ in range(cycles):
                for action in ("rollout", "rollback"):
                    started = time.monotonic()
                    version = (rollout.add(repo, api, candidate, None, thresholds, log=log) if action == "rollout"
                               else rollout.rollback(repo, api, log=log))
                    seen.update({f"v{k}": v for k, v in classifier_requests(server.metrics_url, repo.classifier).items()})
                    switches.append({"action": action, "version": version, "seconds": time.monotonic() - started,
                                     "ended_s": time.monotonic() - result["started"]})
                    time.sleep(settle_s)
                    seen.update({f"v{k}": v for k, v in classifier_requests(server.metrics_url, repo.classifier).items()})
        finally:
            thread.join()
    locust = result["locust"]
    failures = {}
    with open(out / "rollout_locust" / f"TritonHttpUser_u{users}_failures.csv", newline="") as f:
        for row in csv.DictReader(f):
            failures[row["Error"]] = failures.get(row["Error"], 0) + int(row["Occurrences"])
    report = {"cpu": cpu.describe(), "artifacts": str(artifacts), "candidate": str(candidate.model_file),
              "users": users, "locust_requests": locust.requests, "locust_failures": locust.failures,
              "failures_by_error": failures,
              "p50_ms": locust.p50_ms, "p99_ms": locust.p99_ms, "load_s": run_time,
              "switches": mark_under_load(switches, run_time),
              "classifier_requests_by_version": seen}
    return report


def mark_under_load(switches: list[dict], load_s: float) -> list[dict]:
    """Each switch with `under_load`: whether it ended (`ended_s`, seconds after Locust was started)
    within Locust's run time `load_s`. Locust starts its clock after it is started, so a switch marked
    under load ended before the load stopped; one not marked may have run, or ended, with no load."""
    return [{**s, "under_load": s["ended_s"] <= load_s} for s in switches]


def markdown(report: dict) -> str:
    late = [i + 1 for i, s in enumerate(report["switches"]) if not s["under_load"]]
    covered = ("switches included" if not late else
               f"switch{'es' if len(late) > 1 else ''} {', '.join(map(str, late))} ended after Locust's "
               f"{report['load_s']} s: not under load, their failures not counted")
    lines = [f"# Rollout under load ({report['cpu']})", "",
             f"Locust, {report['users']} HTTP users through the ensemble: **{report['locust_requests']} requests, "
             f"{report['locust_failures']} failed** (p50 {report['p50_ms']:.0f} ms, p99 {report['p99_ms']:.0f} ms over "
             f"the whole run, {covered})."]
    lines += [f"- {count} x {error}" for error, count in report["failures_by_error"].items()]
    lines += ["", "| # | action | version now serving | seconds | ended (s after Locust started) |",
              "|---|---|---|---:|---:|"]
    lines += [f"| {i + 1} | {s['action']} | {s['version']} | {s['seconds']:.1f} | {s['ended_s']:.1f}"
              f"{'' if s['under_load'] else ' (after the load)'} |" for i, s in enumerate(report["switches"])]
    lines += ["", "Classifier requests Triton counted per version while it was loaded: "
              + ", ".join(f"{k} {v:.0f}" for k, v in sorted(report["classifier_requests_by_version"].items()))]
    return "\n".join(lines) + "\n"


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifacts", default="artifacts/efficientnet_lite0", help="(default: %(default)s)")
    p.add_argument("--candidate", default=None, help="ONNX to roll out (default: <artifacts>/model.onnx)")
    p.add_argument("--cycles", type=number(int, 1), default=2, help="rollout + rollback pairs (default: %(default)s)")
    p.add_argument("--users", type=number(int, 1), default=2, help="Locust users (default: %(default)s)")
    p.add_argument("--settle", type=number(float, 0, above_low=True), default=5.0,
                   help="seconds between switches (default: %(default)s)")
    p.add_argument("--out", default="benchmarks/results", help="(default: %(default)s)")
    return p


def main(args: argparse.Namespace) -> dict:
    artifacts = Path(args.artifacts)
    candidate = rollout.Candidate(Path(args.candidate or artifacts / MODEL_ONNX), artifacts)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = run(artifacts, candidate, args.cycles, args.users, args.settle, out)
    (out / "rollout.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "rollout.md").write_text(markdown(report))
    print(markdown(report))
    return report


if __name__ == "__main__":
    try:
        main(get_args_parser().parse_args())
    except (RuntimeError, OSError, ValueError) as exc:  # a missing repository or artifacts, a server that fails
        sys.exit(f"benchmarks.rollout_bench: {exc}")
