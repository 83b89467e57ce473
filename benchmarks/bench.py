"""`make bench`: Triton, its members, FastAPI and the in-process bound, side by side in one run.

    python -m benchmarks.bench                 # about 6 minutes on 2 cores: concurrency 1 2 4 8
    python -m benchmarks.bench --quick         # about 1.5 minutes: concurrency 2 8, short windows
    python -m benchmarks.bench --skip fastapi --concurrency 8

In order, on the same cores, one system at a time:
  1. in-process bound (benchmarks.inprocess): preprocessing + ONNX Runtime pipelined in this process;
  2. one tritonserver on --model-repository: perf_analyzer (gRPC) on the ensemble with real photos,
     on `preprocess` alone (real photos) and `classifier` alone (synthetic tensors), the ensemble over
     HTTP; then Locust gRPC and HTTP users (benchmarks/locustfile.py);
  3. the fused pipeline (preprocessing + ONNX Runtime in one python model, same ensemble API): the same
     spec rebuilt with "pipeline": "fused", perf_analyzer gRPC and Locust HTTP;
  4. the FastAPI + ONNX Runtime service (benchmarks/fastapi_service.py), same Locust script.
Each point records throughput, p50/p90/p99, CPU% and peak RSS of the serving process tree and the
load generator's CPU%; the ensemble's points also record Triton's per-model queue/compute times.
Writes bench.{md,csv,json,png} to --out and prints the table, the ratios against the goals and, for
the ensemble at its highest concurrency, which stage limits it.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import os
import resource
import time
from pathlib import Path

from benchmarks import report
from benchmarks.procstats import ProcessTreeMonitor
from benchmarks.workload import ENCODINGS, load_photos

STEPS = ("inprocess", "perf", "locust", "fused", "fastapi")
FULL = dict(concurrency=[1, 2, 4, 8], measurement_ms=2000, locust_run_time=12, inprocess_batch=[1, 4, 8, 16],
            inprocess_images=300)
QUICK = dict(concurrency=[2, 8], measurement_ms=1000, locust_run_time=6, inprocess_batch=[1, 8], inprocess_images=120)


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


@contextlib.contextmanager
def measured(server_pid: int, point_fields: dict):
    """Fill server CPU%/peak RSS (process tree of server_pid) and client CPU% (finished children of
    this process: perf_analyzer, locust) into `point_fields` for the block's duration."""
    client0, t0 = _children_cpu_s(), time.monotonic()
    with ProcessTreeMonitor(server_pid) as monitor:
        yield point_fields
    wall = time.monotonic() - t0
    point_fields.update(server_cpu_percent=monitor.cpu_percent, server_peak_rss_mb=monitor.peak_rss_mb,
                        client_cpu_percent=100 * (_children_cpu_s() - client0) / wall if wall > 0 else None)


# (strategy, decode threads or workers, ONNX Runtime threads) tried for the in-process bound
INPROCESS_LAYOUTS = (("pipelined", 2, 2), ("pipelined", 1, 1), ("parallel", 2, 1))


def bench_inprocess(artifacts: Path, photos: list[bytes], batches: list[int], images: int,
                    layouts: tuple = INPROCESS_LAYOUTS) -> list[report.Point]:
    """The in-process bound at each batch size: the best of `layouts`, so that the bound is not
    held back by one thread layout."""
    from benchmarks import inprocess
    from common.preprocessing import PreprocessConfig

    config = PreprocessConfig.load(artifacts / "preprocess.json")
    sessions = {ort: inprocess.session_from_onnx(artifacts / "model.onnx", ort) for _, _, ort in layouts}
    points = []
    for batch in batches:
        tried = []
        for strategy, threads, ort in layouts:
            run = inprocess.run_pipelined if strategy == "pipelined" else inprocess.run_parallel
            fields: dict = {}
            with measured(os.getpid(), fields):
                r = run(sessions[ort], config, photos, batch, max(images, batch), threads)
            fields["client_cpu_percent"] = None
            tried.append((f"{strategy} {threads}x{ort}", report.Point(
                report.INPROCESS, batch, r.throughput, r.p50_ms, r.p90_ms, r.p99_ms, requests=r.images, **fields)))
        layout, point = max(tried, key=lambda t: t[1].throughput)
        points.append(point)
        print(f"  {report.INPROCESS}, batch {batch}: {point.throughput:.1f} img/s, p99 {point.p99_ms:.1f} ms, "
              f"{layout} (" + ", ".join(f"{name} {p.throughput:.1f}" for name, p in tried) + " img/s)", flush=True)
    return points


def bench_perf(server, tool, photos: list[bytes], concurrency: list[int], measurement_ms: int, out: Path,
               stages: dict) -> list[report.Point]:
    from benchmarks import perf, serverstats

    runs = [(report.ENSEMBLE_GRPC, "image_classifier", "grpc"), (report.PREPROCESS, "preprocess", "grpc"),
            (report.CLASSIFIER, "classifier", "grpc"), (report.ENSEMBLE_HTTP, "image_classifier", "http")]
    points = []
    for system, model, protocol in runs:
        inputs = perf.model_inputs(model, photos, out)
        for c in concurrency:
            url = server.grpc_url if protocol == "grpc" else server.http_url
            fields: dict = {}
            before, t0 = serverstats.snapshot(server.grpc_url), time.monotonic()
            try:
                with measured(server.process.pid, fields):
                    r = tool.measure(model, url, protocol, c, out / f"{model}_{protocol}_c{c}.csv", inputs,
                                     measurement_ms)
            except perf.PerfAnalyzerError as exc:  # e.g. no stable window on a busy machine: keep going
                print(f"  {system}, c={c}: skipped, {str(exc).splitlines()[0]}", flush=True)
                continue
            rows = serverstats.stage_table(before, serverstats.snapshot(server.grpc_url), time.monotonic() - t0)
            stages.setdefault(system, {})[str(c)] = [dataclasses.asdict(s) for s in rows]
            points.append(report.Point(system, c, r.throughput, r.p50_ms, r.p90_ms, r.p99_ms, **fields))
            print(f"  {system}, c={c}: {r.throughput:.1f} img/s, p99 {r.p99_ms:.1f} ms", flush=True)
    return points


def bench_locust(pid: int, user_class: str, system: str, host: str, concurrency: list[int], run_time: int,
                 photos: str, out: Path) -> list[report.Point]:
    from benchmarks import locust_run

    points = []
    for users in concurrency:
        try:
            r, usage = locust_run.run(user_class, host, users, run_time, out, photos, server_pid=pid)
        except locust_run.LocustError as exc:
            print(f"  {system}, users={users}: skipped, {str(exc).splitlines()[0]}", flush=True)
            continue
        points.append(report.Point(system, users, r.throughput, r.p50_ms, r.p90_ms, r.p99_ms, r.requests,
                                   r.failures, **dataclasses.asdict(usage)))
        print(f"  {system}, users={users}: {r.throughput:.1f} req/s, p99 {r.p99_ms:.0f} ms, "
              f"{r.failures} failures", flush=True)
    return points


def fused_repository(build: dict, out: Path) -> Path | None:
    """The repository's spec rebuilt as the fused pipeline, or None where that does not apply."""
    from build.repository import write_repository
    from build.spec import DeploymentSpec

    spec = DeploymentSpec.from_dict(build["spec"])
    if spec.pipeline == "fused" or build["backend"] != "python-onnxruntime":
        return None
    write_repository(spec.replace(pipeline="fused"), "python-onnxruntime", out, "benchmarks.bench",
                     model_file=Path(build["classifier_model"]["source"]))
    return out


def limiting_stage_text(stages: dict, instances: dict[str, int]) -> str:
    from benchmarks.serverstats import StageStats, limiting_stage

    runs = stages.get(report.ENSEMBLE_GRPC, {})
    if not runs:
        return ""
    top = max(runs, key=int)
    rows = [StageStats(**s) for s in runs[top]]
    lines = [f"Triton stages, ensemble over gRPC at concurrency {top} (statistics extension):"]
    lines += ["  " + r.line(with_busy=r.model in instances) for r in rows]
    limit = limiting_stage(rows, instances)
    if limit:
        lines.append(f"  limiting stage: {limit.model} (busy {limit.busy:.2f} of {instances[limit.model]} "
                     f"instance(s), queue {limit.queue_ms:.1f} ms vs compute {limit.compute_ms:.1f} ms per request)")
    return "\n".join(lines) + "\n"


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help=f"short run: {QUICK}")
    p.add_argument("--concurrency", nargs="+", type=int, default=None,
                   help=f"requests in flight / Locust users (default: {FULL['concurrency']})")
    p.add_argument("--measurement-ms", type=int, default=None, help="perf_analyzer window (default: 2000)")
    p.add_argument("--locust-run-time", type=int, default=None, help="seconds per Locust run (default: 12)")
    p.add_argument("--skip", nargs="*", default=[], choices=STEPS, help="steps to leave out (default: none)")
    p.add_argument("--model-repository", default="model_repository", help="(default: %(default)s)")
    p.add_argument("--artifacts", default=None, help="model for the bound and FastAPI (default: the repository's)")
    p.add_argument("--photos", default="jpeg", choices=ENCODINGS, help="photo encoding (default: %(default)s)")
    p.add_argument("--perf-venv", default=".venv-perf", help="perf_analyzer environment (default: %(default)s)")
    p.add_argument("--out", default="benchmarks/results", help="results folder (default: %(default)s)")
    return p


def main(args: argparse.Namespace) -> dict:
    from benchmarks import perf
    from benchmarks.fastapi_service import FastAPIService
    from benchmarks.perf import PerfAnalyzer, PerfAnalyzerError
    from serving.server import Ports, TritonServer, free_port

    plan = dict(QUICK if args.quick else FULL)
    plan.update({k: v for k, v in (("concurrency", args.concurrency), ("measurement_ms", args.measurement_ms),
                                   ("locust_run_time", args.locust_run_time)) if v is not None})
    repo, out = Path(args.model_repository), Path(args.out)
    if not (repo / "BUILD.json").is_file():
        raise FileNotFoundError(f"{repo}/BUILD.json not found: build the repository first (make engines)")
    build = json.loads((repo / "BUILD.json").read_text())
    artifacts = Path(args.artifacts or build["spec"]["artifacts"])
    instances = {build["spec"][f"{s}_name"]: build["spec"][s]["instances"] for s in ("preprocess", "classifier")}
    photos = list(load_photos(args.photos).values())
    out.mkdir(parents=True, exist_ok=True)
    started, load = time.monotonic(), os.getloadavg()[0]
    print(f"bench: {plan}; load average {load:.2f} on {os.cpu_count()} cores"
          + (" (busy machine: numbers will be noisy)" if load > 0.5 else ""), flush=True)

    tool, why_no_perf = None, ""
    if "perf" not in args.skip:
        try:
            tool = PerfAnalyzer.locate(args.perf_venv)
        except PerfAnalyzerError as exc:
            why_no_perf = str(exc)
            print(f"bench: skipping perf_analyzer rows: {exc}")

    points, stages = [], {}
    if "inprocess" not in args.skip:
        points += bench_inprocess(artifacts, photos, plan["inprocess_batch"], plan["inprocess_images"])
    if tool or "locust" not in args.skip:
        with TritonServer(repo, Ports.free(), log_file=out / "tritonserver.log") as server:
            if tool:
                points += bench_perf(server, tool, photos, plan["concurrency"], plan["measurement_ms"],
                                     out / "perf", stages)
            if "locust" not in args.skip:
                for user_class, system, host in (("TritonGrpcUser", report.LOCUST_GRPC, server.grpc_url),
                                                 ("TritonHttpUser", report.LOCUST_HTTP, server.http_url)):
                    points += bench_locust(server.process.pid, user_class, system, host, plan["concurrency"],
                                           plan["locust_run_time"], args.photos, out / "locust")
    fused = fused_repository(build, out / "fused_repository") if "fused" not in args.skip else None
    if fused:
        with TritonServer(fused, Ports.free(), log_file=out / "tritonserver-fused.log") as server:
            if tool:
                inputs = perf.model_inputs("image_classifier", photos, out / "perf")
                for c in plan["concurrency"]:
                    fields: dict = {}
                    try:
                        with measured(server.process.pid, fields):
                            r = tool.measure("image_classifier", server.grpc_url, "grpc", c,
                                             out / "perf" / f"fused_grpc_c{c}.csv", inputs, plan["measurement_ms"])
                    except PerfAnalyzerError as exc:
                        print(f"  {report.FUSED_GRPC}, c={c}: skipped, {str(exc).splitlines()[0]}", flush=True)
                        continue
                    points.append(report.Point(report.FUSED_GRPC, c, r.throughput, r.p50_ms, r.p90_ms, r.p99_ms,
                                               **fields))
                    print(f"  {report.FUSED_GRPC}, c={c}: {r.throughput:.1f} img/s, p99 {r.p99_ms:.1f} ms", flush=True)
            if "locust" not in args.skip:
                points += bench_locust(server.process.pid, "TritonHttpUser", report.FUSED_HTTP, server.http_url,
                                       plan["concurrency"], plan["locust_run_time"], args.photos, out / "locust")
    if "fastapi" not in args.skip:
        with FastAPIService(artifacts, free_port(), log_file=out / "fastapi.log") as service:
            points += bench_locust(service.process.pid, "FastAPIUser", report.FASTAPI, service.url,
                                   plan["concurrency"], plan["locust_run_time"], args.photos, out / "locust")

    stage_text = limiting_stage_text(stages, instances)
    extra = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
             "plan": plan, "photos": args.photos, "load_average_at_start": load, "cpu_count": os.cpu_count(),
             "model_repository": str(repo), "spec": build["spec"], "stages": stages,
             "perf_analyzer": "used" if tool else why_no_perf or "skipped",
             "seconds": round(time.monotonic() - started, 1)}
    files = report.write(points, out, extra, cores=os.cpu_count() or 1)
    with open(files["md"], "a") as f:
        f.write("\n" + stage_text)
    ratio_text = report.ratio_lines(report.ratios(points, os.cpu_count() or 1))
    print("\n" + report.table(points) + "\n" + ratio_text + "\n" + stage_text)
    print(f"bench: {extra['seconds']:.0f} s; wrote " + ", ".join(str(p) for p in files.values()))
    return {"points": points, "files": files, **extra}


if __name__ == "__main__":
    import sys

    try:
        main(get_args_parser().parse_args())
    except (OSError, RuntimeError, ValueError) as exc:
        sys.exit(f"benchmarks.bench: {exc}")
