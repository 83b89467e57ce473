"""`make locust`: headless Locust runs (bounded users and time), CSV + HTML report per run.

    python -m benchmarks.locust_run                               # own server; gRPC and HTTP users, 8 users
    python -m benchmarks.locust_run --users 1 4 8 --run-time 20 --user-class TritonHttpUser
    python -m benchmarks.locust_run --user-class FastAPIUser --host http://127.0.0.1:8080

One `locust --headless` process per (user class, user count): all users spawn at once, statistics
are reset after spawning, the run stops after --run-time seconds. The LocustResult comes from what the
locustfile writes at quit, once the users have stopped: requests and failures as Locust counts them
(failures included) and req/s over the same window, from the reset to the last request
(`_totals.json`; Locust's `_stats.csv` is not rewritten at quit and misses the last second's
requests); p50/p90/p99 and the mean in ms are numpy's over the successful requests' latencies
(`_latencies.txt`), not Locust's, which are rounded to its buckets (two significant digits above
100 ms) and count the failures' latencies too; `<user class>_u<users>_stats.csv`,
`_failures.csv` and the `.html` report stay in --out, and locust.json lists every run's LocustResult
with the machine they ran on. Triton users call the ensemble the repository's BUILD.json names (or
--triton-model).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks import report
from benchmarks.workload import ENCODINGS
from clients.client import DEFAULT_MODEL
from serving.health import SEEDS, number

LOCUSTFILE = Path(__file__).with_name("locustfile.py")
USER_CLASSES = ("TritonGrpcUser", "TritonHttpUser", "FastAPIUser")


class LocustError(RuntimeError):
    pass


@dataclasses.dataclass(frozen=True)
class LocustResult:
    user_class: str
    users: int
    requests: int
    failures: int
    throughput: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    avg_ms: float


def locust_command(user_class: str, host: str, users: int, run_time_s: int, prefix: Path, photos: str,
                   triton_model: str = DEFAULT_MODEL, seed: int = 0) -> list[str]:
    binary = shutil.which("locust", path=str(Path(sys.executable).parent)) or "locust"
    return [binary, "-f", str(LOCUSTFILE), "--headless", "--host", host, "-u", str(users), "-r", str(users),
            "-t", f"{run_time_s}s", "--stop-timeout", "10", "--reset-stats", "--only-summary",
            "--csv", str(prefix), "--html", f"{prefix}.html", "--photos", photos, "--triton-model", triton_model,
            "--latencies-file", f"{prefix}_latencies.txt", "--totals-file", f"{prefix}_totals.json",
            "--seed", str(seed), "--loglevel", "WARNING", user_class]


def with_success_latencies(result: LocustResult, latencies_ms) -> LocustResult:
    """`result` with p50/p90/p99 and the mean from the successful requests' latencies (ms) rather than
    Locust's bucket-rounded figures over every request; 0 where no request succeeded."""
    ms = np.asarray(latencies_ms, dtype=float)
    if not ms.size:
        return dataclasses.replace(result, p50_ms=0.0, p90_ms=0.0, p99_ms=0.0, avg_ms=0.0)
    p50, p90, p99 = (float(v) for v in np.percentile(ms, [50, 90, 99]))
    return dataclasses.replace(result, p50_ms=p50, p90_ms=p90, p99_ms=p99, avg_ms=float(ms.mean()))


def parse_totals(path: str | Path, user_class: str, users: int) -> LocustResult:
    """The locustfile's `<prefix>_totals.json` -> a LocustResult: requests, failures and req/s over the
    window from the statistics' reset to the last request; the latencies are left 0 (with_success_latencies)."""
    totals = json.loads(Path(path).read_text())
    start, end = totals["start"], totals["end"]
    throughput = totals["requests"] / (end - start) if end is not None and end > start else 0.0
    return LocustResult(user_class, users, totals["requests"], totals["failures"], throughput, 0.0, 0.0, 0.0, 0.0)


@dataclasses.dataclass(frozen=True)
class Usage:
    """CPU and memory while the users were running (after spawning, before stopping)."""

    server_cpu_percent: float | None = None
    server_peak_rss_mb: float | None = None
    client_cpu_percent: float | None = None


SPAWN_ALLOWANCE_S = 2.0  # from Locust opening its CSV files to all users running: photos loaded, users spawned


def run(user_class: str, host: str, users: int, run_time_s: int, out: str | Path, photos: str = "jpeg",
        server_pid: int | None = None, triton_model: str = DEFAULT_MODEL, tag: str = "",
        seed: int = 0) -> tuple[LocustResult, Usage]:
    """One bounded headless run; its files are `out`/`tag``user_class`_u`users`*. With `server_pid`,
    the serving process tree and Locust itself are watched while the users run: from
    SPAWN_ALLOWANCE_S after Locust opens its CSV files (before it loads the photos and starts the
    users, all at once) to 1 s before the run time ends. Raises LocustError if Locust fails or
    records nothing."""
    from benchmarks.procstats import ProcessTreeMonitor

    if user_class not in USER_CLASSES:
        raise ValueError(f"user class {user_class!r} is not one of {USER_CLASSES}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    prefix = out / f"{tag}{user_class}_u{users}"
    history, log_path = Path(f"{prefix}_stats_history.csv"), Path(f"{prefix}.log")
    history.unlink(missing_ok=True)
    Path(f"{prefix}_latencies.txt").unlink(missing_ok=True)
    Path(f"{prefix}_totals.json").unlink(missing_ok=True)
    cmd = locust_command(user_class, host, users, run_time_s, prefix, photos, triton_model, seed)
    deadline = time.monotonic() + run_time_s + 90
    usage = Usage()
    with open(log_path, "w") as log:
        process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        try:
            while not history.exists() and process.poll() is None and time.monotonic() < deadline:
                time.sleep(0.1)
            if server_pid is not None and process.poll() is None:
                time.sleep(SPAWN_ALLOWANCE_S)
            if server_pid is not None and process.poll() is None:
                server, client = ProcessTreeMonitor(server_pid).start(), ProcessTreeMonitor(process.pid).start()
                try:
                    process.wait(max(1.0, run_time_s - SPAWN_ALLOWANCE_S - 1.0))
                except subprocess.TimeoutExpired:
                    pass
                server.stop()
                client.stop()
                usage = Usage(server.cpu_percent, server.peak_rss_mb, client.cpu_percent)
            process.wait(max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            raise LocustError(f"locust ran past {run_time_s + 90} s: {' '.join(cmd)}") from None
    output = log_path.read_text(errors="replace")
    totals, latencies = Path(f"{prefix}_totals.json"), Path(f"{prefix}_latencies.txt")
    for written in (totals, latencies):
        if not written.exists():
            raise LocustError(f"locust wrote no {written.name} (exit {process.returncode}):\n{output[-1500:]}")
    result = parse_totals(totals, user_class, users)
    if result.requests == 0:
        raise LocustError(f"locust recorded no requests (exit {process.returncode}):\n{output[-1500:]}")
    return with_success_latencies(result, [float(x) for x in latencies.read_text().split()]), usage


def ensemble_name(repository: str | Path) -> str:
    """The ensemble a built repository serves (its BUILD.json's spec), else the default name."""
    from build.repository.writer import read_manifest

    try:
        return read_manifest(repository)["spec"]["ensemble_name"]
    except FileNotFoundError:
        return DEFAULT_MODEL


def describe(r: LocustResult) -> str:
    return (f"{r.user_class:15s} users={r.users:<3d} {r.throughput:7.1f} req/s  p50 {r.p50_ms:6.1f}  "
            f"p90 {r.p90_ms:6.1f}  p99 {r.p99_ms:6.1f} ms  {r.requests} requests, {r.failures} failures")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--user-class", nargs="+", default=["TritonGrpcUser", "TritonHttpUser"], choices=USER_CLASSES,
                   help="user classes to run, one after the other (default: %(default)s)")
    p.add_argument("--users", nargs="+", type=number(int, 1), default=[8],
                   help="user counts (concurrency) (default: %(default)s)")
    p.add_argument("--run-time", type=number(int, 1), default=20, help="seconds per run (default: %(default)s)")
    p.add_argument("--host", default=None,
                   help="target, for one user class (default: start a server; FastAPIUser starts the service)")
    p.add_argument("--triton-model", default=None,
                   help="the ensemble Triton users call (default: the one the repository's BUILD.json names, "
                        f"else {DEFAULT_MODEL})")
    p.add_argument("--model-repository", default="model_repository",
                   help="served when no --host (default: %(default)s)")
    p.add_argument("--artifacts", default="artifacts/efficientnet_lite0",
                   help="model for the FastAPI service when no --host (default: %(default)s)")
    p.add_argument("--model", default=None,
                   help="ONNX file the FastAPI service runs, e.g. the repository's INT8 variant "
                        "(default: <artifacts>/model.onnx)")
    p.add_argument("--photos", default="jpeg", choices=ENCODINGS, help="photo encoding (default: %(default)s)")
    p.add_argument("--seed", type=number(int, *SEEDS), default=0,
                   help="seed of each user's random photo order: the same seed, the same order (default: %(default)s)")
    p.add_argument("--out", default="benchmarks/results/locust", help="reports folder (default: %(default)s)")
    return p


def main(args: argparse.Namespace) -> list[LocustResult]:
    from contextlib import ExitStack

    from benchmarks.fastapi_service import FastAPIService
    from serving.server import Ports, TritonServer, free_port

    if args.host and len(args.user_class) > 1:
        raise ValueError(f"--host {args.host} is one server port, and gRPC, HTTP and FastAPI users each need their "
                         f"own: name one --user-class (got {' '.join(args.user_class)})")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    triton_model = args.triton_model or ensemble_name(args.model_repository)
    results = []
    with ExitStack() as stack:
        hosts = {}
        if args.host is None and any(c.startswith("Triton") for c in args.user_class):
            server = stack.enter_context(TritonServer(args.model_repository, Ports.free(),
                                                      log_file=out / "tritonserver.log"))
            hosts.update(TritonGrpcUser=server.grpc_url, TritonHttpUser=server.http_url)
        if args.host is None and "FastAPIUser" in args.user_class:
            service = stack.enter_context(FastAPIService(args.artifacts, free_port(), log_file=out / "fastapi.log",
                                                              model=args.model))
            hosts["FastAPIUser"] = service.url
        for user_class in args.user_class:
            for users in args.users:
                result, _ = run(user_class, args.host or hosts[user_class], users, args.run_time, out, args.photos,
                                triton_model=triton_model, seed=args.seed)
                results.append(result)
                print(describe(result), flush=True)
    print(f"reports in {out}/ (*.html, *_stats.csv, {write_summary(results, out).name})")
    return results


def write_summary(results: list[LocustResult], out: Path) -> Path:
    """locust.json: every run's LocustResult and the machine."""
    return report.write_json(out / "locust.json", {"results": [dataclasses.asdict(r) for r in results]})


if __name__ == "__main__":
    try:
        main(get_args_parser().parse_args())
    except (LocustError, OSError, RuntimeError, ValueError) as exc:
        sys.exit(f"benchmarks.locust_run: {exc}")
