"""`make bench`: Triton, its members, FastAPI and the in-process bound, side by side in one run.

    python -m benchmarks.bench                 # concurrency 1 2 4 8, 3 rounds
    python -m benchmarks.bench --quick         # concurrency 2 8, short windows, 1 round
    python -m benchmarks.bench --skip fastapi --concurrency 8

In order, on the same cores, one system at a time:
  1. in-process bound (benchmarks.inprocess): preprocessing + ONNX Runtime in this process, both cores
     busy, the best of three thread layouts at each batch size;
  2. the two-model ensemble (preprocess -> classifier) in one tritonserver: perf_analyzer (gRPC) on the
     ensemble with real photos, on `preprocess` alone (real photos) and `classifier` alone (synthetic
     tensors), the ensemble over HTTP; then Locust gRPC and HTTP users (benchmarks/locustfile.py);
  3. the fused pipeline (preprocessing + ONNX Runtime in one python model, same ensemble API):
     perf_analyzer gRPC on the ensemble and on the fused model alone, Locust HTTP;
  4. the FastAPI + ONNX Runtime service (benchmarks/fastapi_service.py), same Locust script;
  5. paired rounds (benchmarks.rounds, --rounds): the systems the goals compare (the bound at its best
     batch and layout, each pipeline and its members at the sweep's highest concurrency) again, back to
     back in each round, so each goal ratio is taken between measurements seconds apart; the median
     and spread over the rounds.
Both pipelines come from the repository's spec: the one `make engines` built is served as it is, the
other is rebuilt from the same spec with the other "pipeline". The in-process bound and FastAPI run
the classifier's own ONNX file (BUILD.json: the INT8 variant after `make engines PRECISION=int8`), so
every system runs the same model; the summary names it. Every served model gets a short,
unreported warm-up before its first point (perf_analyzer's, or a Locust run where perf_analyzer
did not run: FastAPI, `--skip perf`).
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
import os
import resource
import time
from pathlib import Path

from benchmarks import procstats, report, rounds
from benchmarks.procstats import CORE, ProcessTreeMonitor
from benchmarks.workload import ENCODINGS, load_photos
from common import cpu
from common.contract import ENSEMBLE, MODEL_ONNX, PREPROCESS_JSON
from serving.health import number

STEPS = ("inprocess", "perf", "locust", "fused", "fastapi", "rounds")
WARM_UP_S = 3  # a Locust warm-up run, where no perf_analyzer run has warmed the service up
FULL = dict(concurrency=[1, 2, 4, 8], measurement_ms=2000, locust_run_time=12, inprocess_batch=[1, 2, 4, 8],
            inprocess_images=600, rounds=3)
QUICK = dict(concurrency=[2, 8], measurement_ms=1000, locust_run_time=6, inprocess_batch=[1, 2], inprocess_images=200,
             rounds=1)


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


@contextlib.contextmanager
def measured(server_pid: int, point_fields: dict, by_role: dict | None = None):
    """Fill server CPU%/peak RSS (process tree of server_pid) and client CPU% (finished children of
    this process: perf_analyzer, locust) into `point_fields` for the block's duration; with `by_role`,
    also the CPU seconds of each kind of serving process (procstats.role_of) and their counts."""
    client0, t0 = _children_cpu_s(), time.monotonic()
    with ProcessTreeMonitor(server_pid) as monitor:
        yield point_fields
    wall = time.monotonic() - t0
    point_fields.update(server_cpu_percent=monitor.cpu_percent, server_peak_rss_mb=monitor.peak_rss_mb,
                        client_cpu_percent=100 * (_children_cpu_s() - client0) / wall if wall > 0 else None)
    if by_role is not None:
        by_role.update(cpu_s=monitor.cpu_seconds_by_role, processes=monitor.processes_by_role)


def cpu_split(by_role: dict, images: int) -> dict | None:
    """{images, ms_per_image: {role: CPU ms per image}, processes: {role: count}}, roles ordered
    server first, then by cost; None without images."""
    if images <= 0 or not by_role.get("cpu_s"):
        return None
    cost = {role: 1000.0 * s / images for role, s in by_role["cpu_s"].items()}
    order = sorted(cost, key=lambda r: (r != CORE, -cost[r]))
    return {"images": images, "ms_per_image": {r: cost[r] for r in order}, "processes": by_role["processes"]}


def cpu_split_line(split: dict) -> str:
    """'server 1.0 ms + classifier 6.6 ms (2 processes) + ... = 11.0 ms of CPU per image'."""
    parts = []
    for role, ms in split["ms_per_image"].items():
        n = split["processes"].get(role, 1)
        parts.append(f"{role} {ms:.2f} ms" + (f" ({n} processes)" if n > 1 else ""))
    return " + ".join(parts) + f" = {sum(split['ms_per_image'].values()):.2f} ms of CPU per image"


# (strategy, decode threads or workers, ONNX Runtime threads) tried for the in-process bound
INPROCESS_LAYOUTS = (("pipelined", 2, 2), ("pipelined", 1, 1), ("parallel", 2, 1))


def bench_inprocess(artifacts: Path, photos: list[bytes], batches: list[int], images: int,
                    layouts: tuple = INPROCESS_LAYOUTS, model: Path | None = None,
                    chosen: dict | None = None) -> list[report.Point]:
    """The in-process bound at each batch size: the best of `layouts`, so that the bound is not
    held back by one thread layout. `model`: the ONNX file to run (default: the artifacts' model.onnx).
    `chosen` gets {batch: the layout that won}."""
    from benchmarks import inprocess
    from common.preprocessing import PreprocessConfig

    config = PreprocessConfig.load(artifacts / PREPROCESS_JSON)
    model = model or artifacts / MODEL_ONNX
    sessions = {ort: inprocess.session_from_onnx(model, ort) for _, _, ort in layouts}
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
        if chosen is not None:
            chosen[batch] = layouts[[name for name, _ in tried].index(layout)]
        points.append(point)
        print(f"  {report.INPROCESS}, batch {batch}: {point.throughput:.1f} img/s, p99 {point.p99_ms:.1f} ms, "
              f"{layout} (" + ", ".join(f"{name} {p.throughput:.1f}" for name, p in tried) + " img/s)", flush=True)
    return points


def bench_perf(server, tool, runs: list[tuple[str, str, str, Path | None]], concurrency: list[int],
               measurement_ms: int, out: Path, stages: dict, cpu: dict | None = None) -> list[report.Point]:
    """perf_analyzer rows: `runs` is (system, model, protocol, --input-data file or None for synthetic
    tensors). Each model is warmed up once, unreported, before its first measured point. Fills
    `stages` (system -> concurrency -> the statistics extension's rows) and `cpu` (system ->
    concurrency -> cpu_split: the serving CPU per image of each process kind)."""
    from benchmarks import perf, serverstats

    points = []
    for system, model, protocol, inputs in runs:
        url = server.grpc_url if protocol == "grpc" else server.http_url
        try:
            tool.warm_up(model, url, protocol, max(concurrency), out / f"{model}_{protocol}_warmup.csv", inputs)
        except perf.PerfAnalyzerError as exc:
            print(f"  {system}: warm-up failed, {str(exc).splitlines()[0]}", flush=True)
        for c in concurrency:
            fields, by_role = {}, {}
            before, t0 = serverstats.snapshot(server.grpc_url), time.monotonic()
            try:
                with measured(server.process.pid, fields, by_role):
                    r = tool.measure(model, url, protocol, c, out / f"{model}_{protocol}_c{c}.csv", inputs,
                                     measurement_ms)
            except perf.PerfAnalyzerError as exc:  # e.g. no stable window on a busy machine: keep going
                print(f"  {system}, c={c}: skipped, {str(exc).splitlines()[0]}", flush=True)
                continue
            rows = serverstats.stage_table(before, serverstats.snapshot(server.grpc_url), time.monotonic() - t0)
            stages.setdefault(system, {})[str(c)] = [dataclasses.asdict(s) for s in rows]
            images = sum(s.inferences for s in rows if s.model == model)
            split = cpu_split(by_role, images)
            if cpu is not None and split:
                cpu.setdefault(system, {})[str(c)] = split
            points.append(report.Point(system, c, r.throughput, r.p50_ms, r.p90_ms, r.p99_ms, **fields))
            print(f"  {system}, c={c}: {r.throughput:.1f} img/s, p99 {r.p99_ms:.1f} ms", flush=True)
    return points


def bench_locust(pid: int, user_class: str, system: str, host: str, concurrency: list[int], run_time: int,
                 photos: str, out: Path, triton_model: str = ENSEMBLE, tag: str = "",
                 warm_up: bool = False) -> list[report.Point]:
    """Locust rows; each run's files are `out`/`tag`<user class>_u<users>* (the tag keeps the two
    pipelines' HTTP runs apart). With `warm_up`, a short unreported run at the highest user count
    comes first (into `out`/warmup), for a service nothing has warmed up yet."""
    from benchmarks import locust_run

    if warm_up:
        try:
            locust_run.run(user_class, host, max(concurrency), WARM_UP_S, out / "warmup", photos,
                           triton_model=triton_model, tag=tag)
        except locust_run.LocustError as exc:
            print(f"  {system}: warm-up failed, {str(exc).splitlines()[0]}", flush=True)
    points = []
    for users in concurrency:
        try:
            r, usage = locust_run.run(user_class, host, users, run_time, out, photos, server_pid=pid,
                                      triton_model=triton_model, tag=tag)
        except locust_run.LocustError as exc:
            print(f"  {system}, users={users}: skipped, {str(exc).splitlines()[0]}", flush=True)
            continue
        points.append(report.Point(system, users, r.throughput, r.p50_ms, r.p90_ms, r.p99_ms, r.requests,
                                   r.failures, **dataclasses.asdict(usage)))
        print(f"  {system}, users={users}: {r.throughput:.1f} req/s, p99 {r.p99_ms:.0f} ms, "
              f"{r.failures} failures", flush=True)
    return points


def comparison_model(build: dict, artifacts: Path, artifacts_given: bool = False) -> tuple[Path, str]:
    """The ONNX file the in-process bound and FastAPI run, and a line saying so: the file the
    repository's classifier serves (FP32, or the variant `make engines PRECISION=...` deployed), so
    that every system runs the same model; the artifacts' model.onnx where the classifier is not an
    ONNX file (a TensorRT plan) or where --artifacts names another model."""
    served = Path(build["classifier_model"]["source"])
    variant = build.get("variant") or build.get("precision") or "fp32"
    if not artifacts_given and served.suffix == ".onnx" and served.is_file():
        return served, (f"Model: the classifier serves {served} ({variant}); the in-process bound and FastAPI "
                        f"run the same file.")
    model = artifacts / MODEL_ONNX
    return model, (f"Model: the classifier serves {served} ({variant}); the in-process bound and FastAPI run "
                   f"{model} on the CPU, so their ratios compare different models.")


def pipeline_repositories(repo: Path, build: dict, out: Path) -> dict[str, Path]:
    """{"ensemble": path, "fused": path}: the repository as built, plus its spec rebuilt with the other
    pipeline (into `out`), so both are measured whichever one `make engines` built. "fused" is left
    out where it does not apply (a classifier backend other than python-onnxruntime)."""
    from build.repository.writer import write_repository
    from build.repository.spec import DeploymentSpec

    spec = DeploymentSpec.from_dict(build["spec"])
    built = spec.pipeline
    repos = {built: repo}
    other = "ensemble" if built == "fused" else "fused"
    if other == "fused" and build["backend"] != "python-onnxruntime":
        return repos
    repos[other] = out / f"{other}_repository"
    write_repository(spec.replace(pipeline=other), build["backend"], repos[other], "benchmarks.bench",
                     model_file=Path(build["classifier_model"]["source"]),
                     extra={k: build[k] for k in ("variant", "precision") if k in build})
    return repos


def drift_line(start: float, end: float, start_batch: int, end_batch: int, steal: float | None = None) -> str:
    """How far the in-process bound's best moved between the start and the end of the run (the same
    sweep both times): the noise floor under every ratio of that run (a shared VM's speed moves
    within a run: see docs/benchmarks.md); with `steal`, the share of the cores' time the
    hypervisor gave to other guests during the run."""
    spread = abs(end - start) / max(start, end) if max(start, end) > 0 else 0.0
    stolen = "" if steal is None else (f" During the run the hypervisor gave {100 * steal:.1f} % of these cores' "
                                       f"time to other guests (steal).")
    return (f"Drift check: the in-process bound's best measured {start:.1f} img/s (batch {start_batch}) at the start "
            f"of the run and {end:.1f} img/s (batch {end_batch}) at the end, the same sweep both times, "
            f"{100 * spread:.0f} % apart; ratios closer to a goal than that are within this run's noise.{stolen}")


def limiting_stage_text(stages: dict, system: str, instances: dict[str, int], cpu: dict | None = None) -> str:
    from benchmarks.serverstats import StageStats, limiting_stage

    runs = stages.get(system, {})
    if not runs:
        return ""
    top = max(runs, key=int)
    rows = [StageStats(**s) for s in runs[top]]
    lines = [f"Triton stages, {system} at concurrency {top} (statistics extension):"]
    lines += ["  " + r.line(with_busy=r.model in instances) for r in rows]
    limit = limiting_stage(rows, instances)
    if limit:
        lines.append(f"  limiting stage: {limit.model} (busy {limit.busy:.2f} of {instances[limit.model]} "
                     f"instance(s), queue {limit.queue_ms:.1f} ms vs compute {limit.compute_ms:.1f} ms per request)")
    split = (cpu or {}).get(system, {}).get(top)
    if split:
        lines.append(f"  CPU by process: {cpu_split_line(split)}")
    return "\n".join(lines) + "\n"


def hop_cost_text(cpu: dict, ensemble: str, fused: str) -> str:
    """What splitting the work into two models costs: the two-model ensemble's CPU per image over the
    fused pipeline's (the same work in one model), at the highest concurrency both were measured at."""
    common = set(cpu.get(ensemble, {})) & set(cpu.get(fused, {}))
    if not common:
        return ""
    top = max(common, key=int)
    a, b = cpu[ensemble][top]["ms_per_image"], cpu[fused][top]["ms_per_image"]
    total_a, total_b = sum(a.values()), sum(b.values())
    core = a.get(CORE, 0.0) - b.get(CORE, 0.0)
    return (f"Two models instead of one, at concurrency {top}: the ensemble spent {total_a:.2f} ms of CPU per image, "
            f"the fused pipeline {total_b:.2f}, {total_a - total_b:+.2f} ms ({core:+.2f} ms in the server, "
            f"{total_a - total_b - core:+.2f} ms in the model processes).\n")


def bench_rounds(n: int, points: list[report.Point], repos: dict[str, Path], tool, perf_runs: dict,
                 bound: tuple[Path, Path, list[bytes], int, tuple] | None, measurement_ms: int,
                 out: Path) -> tuple[list, list]:
    """`n` paired rounds (benchmarks.rounds) of the systems the goals compare: the in-process bound at
    its best sweep point (`bound`: model, preprocess.json, photos, images, the layout that won at its
    best batch) and the perf_analyzer systems of each pipeline at the highest concurrency their sweep
    served without failures (where a server is saturated: its capacity, not a point that one noisy
    sweep happened to favour), with one server per pipeline up for all the rounds (each model warmed
    up first). Returns (measures, rounds)."""
    from benchmarks import inprocess, perf
    from common.preprocessing import PreprocessConfig
    from serving.server import Ports, TritonServer

    measures = []
    top = report.best(points, report.INPROCESS)
    if bound and top:
        model, config_path, photos, images, (strategy, threads, ort) = bound
        session, config = inprocess.session_from_onnx(model, ort), PreprocessConfig.load(config_path)
        run = inprocess.run_pipelined if strategy == "pipelined" else inprocess.run_parallel

        def run_bound(batch=top.concurrency):
            fields: dict = {}
            with measured(os.getpid(), fields):
                r = run(session, config, photos, batch, max(images, batch), threads)
            return report.Point(report.INPROCESS, batch, r.throughput, r.p50_ms, r.p90_ms, r.p99_ms,
                                requests=r.images, **dict(fields, client_cpu_percent=None))
        measures.append(rounds.Measure(report.INPROCESS, top.concurrency, run_bound))
    def highest(system):
        return max((p.concurrency for p in points if p.system == system and p.failures == 0 and p.throughput > 0),
                   default=None)

    wanted = {pipeline: [(system, model, protocol, inputs, highest(system))
                         for system, model, protocol, inputs in perf_runs[pipeline]
                         if system in rounds.SYSTEMS and highest(system)]
              for pipeline in repos}
    if not tool or not measures or not any(wanted.values()):
        return measures, []
    with contextlib.ExitStack() as stack:
        servers = {p: stack.enter_context(TritonServer(repos[p], Ports.free(),
                                                       log_file=out / f"tritonserver-{p}-rounds.log"))
                   for p in repos if wanted[p]}
        for pipeline, server in servers.items():
            for system, model, protocol, inputs, c in wanted[pipeline]:
                url = server.grpc_url if protocol == "grpc" else server.http_url
                csv = out / "perf" / "rounds" / f"{pipeline}_{model}_{protocol}_c{c}.csv"
                try:
                    tool.warm_up(model, url, protocol, c, csv, inputs)
                except perf.PerfAnalyzerError as exc:
                    print(f"  {system}: warm-up failed, {str(exc).splitlines()[0]}", flush=True)

                def run_perf(system=system, model=model, protocol=protocol, url=url, c=c, inputs=inputs, csv=csv,
                             pid=server.process.pid):
                    fields: dict = {}
                    with measured(pid, fields):
                        r = tool.measure(model, url, protocol, c, csv, inputs, measurement_ms)
                    return report.Point(system, c, r.throughput, r.p50_ms, r.p90_ms, r.p99_ms, **fields)
                measures.append(rounds.Measure(system, c, run_perf))
        results = rounds.run_rounds(measures, n, failures=(perf.PerfAnalyzerError,),
                                    log=lambda line: print(line, flush=True))
    return measures, results


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help=f"short run: {QUICK}")
    p.add_argument("--concurrency", nargs="+", type=number(int, 1), default=None,
                   help=f"requests in flight / Locust users (default: {FULL['concurrency']})")
    p.add_argument("--measurement-ms", type=number(int, 1), default=None,
                   help=f"perf_analyzer window (default: {FULL['measurement_ms']}, --quick {QUICK['measurement_ms']})")
    p.add_argument("--locust-run-time", type=number(int, 1), default=None,
                   help=f"seconds per Locust run (default: {FULL['locust_run_time']}, "
                        f"--quick {QUICK['locust_run_time']})")
    p.add_argument("--rounds", type=number(int, 0), default=None,
                   help=f"paired rounds after the sweeps: the goal ratios measured again, every system once "
                        f"in each round (default: {FULL['rounds']}, --quick {QUICK['rounds']}; 0: none)")
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
    from build.repository.writer import read_manifest
    from serving.server import Ports, TritonServer, free_port

    plan = dict(QUICK if args.quick else FULL)
    plan.update({k: v for k, v in (("concurrency", args.concurrency), ("measurement_ms", args.measurement_ms),
                                   ("locust_run_time", args.locust_run_time), ("rounds", args.rounds)) if v is not None})
    repo, out = Path(args.model_repository), Path(args.out)
    build = read_manifest(repo)
    spec = build["spec"]
    artifacts = Path(args.artifacts or spec["artifacts"])
    model, model_text = comparison_model(build, artifacts, args.artifacts is not None)
    photos = list(load_photos(args.photos).values())
    out.mkdir(parents=True, exist_ok=True)
    started, load, machine0 = time.monotonic(), os.getloadavg()[0], procstats.machine_cpu_times()
    print(f"bench: {report.machine_line(cpu.machine())}", flush=True)
    print(f"bench: {model_text}", flush=True)
    print(f"bench: {plan}; load average {load:.2f} on {os.cpu_count()} cores"
          + (" (busy machine: numbers will be noisy)" if load > 0.5 else ""), flush=True)

    tool, why_no_perf = None, ""
    if "perf" not in args.skip:
        try:
            tool = PerfAnalyzer.locate(args.perf_venv)
        except PerfAnalyzerError as exc:
            why_no_perf = str(exc)
            print(f"bench: skipping perf_analyzer rows: {exc}")

    repos = pipeline_repositories(repo, build, out)
    if "fused" in args.skip:
        repos.pop("fused", None)
    ensemble, classifier = spec["ensemble_name"], spec["classifier_name"]
    image_inputs = perf.photo_inputs(photos, out / "perf")  # IMAGE: the real photos
    perf_runs = {
        "ensemble": [(report.ENSEMBLE_GRPC, ensemble, "grpc", image_inputs),
                     (report.PREPROCESS, spec["preprocess_name"], "grpc", image_inputs),
                     (report.CLASSIFIER, classifier, "grpc", None),  # synthetic float tensors
                     (report.ENSEMBLE_HTTP, ensemble, "http", image_inputs)],
        "fused": [(report.FUSED_GRPC, ensemble, "grpc", image_inputs),
                  (report.FUSED_ALONE, classifier, "grpc", image_inputs)],
    }
    locust_runs = {"ensemble": [("TritonGrpcUser", report.LOCUST_GRPC, "grpc"),
                                ("TritonHttpUser", report.LOCUST_HTTP, "http")],
                   "fused": [("TritonHttpUser", report.FUSED_HTTP, "http")]}
    instances = {"ensemble": {spec["preprocess_name"]: spec["preprocess"]["instances"],
                              classifier: spec["classifier"]["instances"]},
                 "fused": {classifier: spec["fused"]["instances"]}}

    points, stages, cpu, layouts = [], {}, {}, {}
    if "inprocess" not in args.skip:
        points += bench_inprocess(artifacts, photos, plan["inprocess_batch"], plan["inprocess_images"], model=model,
                                  chosen=layouts)
    for pipeline, path in repos.items():
        if not tool and "locust" in args.skip:
            break
        print(f"bench: {pipeline} pipeline ({path})", flush=True)
        with TritonServer(path, Ports.free(), log_file=out / f"tritonserver-{pipeline}.log") as server:
            if tool:
                points += bench_perf(server, tool, perf_runs[pipeline], plan["concurrency"], plan["measurement_ms"],
                                     out / "perf" / pipeline, stages, cpu)
            if "locust" not in args.skip:
                for i, (user_class, system, protocol) in enumerate(locust_runs[pipeline]):
                    host = server.grpc_url if protocol == "grpc" else server.http_url
                    points += bench_locust(server.process.pid, user_class, system, host, plan["concurrency"],
                                           plan["locust_run_time"], args.photos, out / "locust", ensemble,
                                           tag=f"{pipeline}_", warm_up=not tool and i == 0)
    if "fastapi" not in args.skip:
        with FastAPIService(artifacts, free_port(), log_file=out / "fastapi.log", model=model) as service:
            points += bench_locust(service.process.pid, "FastAPIUser", report.FASTAPI, service.url,
                                   plan["concurrency"], plan["locust_run_time"], args.photos, out / "locust",
                                   warm_up=True)

    paired, round_text = [], ""
    if plan["rounds"] > 0 and "rounds" not in args.skip:
        top = report.best(points, report.INPROCESS)
        bound = (model, artifacts / PREPROCESS_JSON, photos, plan["inprocess_images"],
                 layouts[top.concurrency]) if top else None
        print(f"bench: {plan['rounds']} paired round(s) of the systems the goals compare", flush=True)
        measures, paired = bench_rounds(plan["rounds"], points, repos, tool, perf_runs, bound, plan["measurement_ms"],
                                        out)
        round_text = rounds.rounds_text(paired, measures)
        if not paired:
            print("bench: no paired rounds: they need the in-process bound and perf_analyzer rows", flush=True)

    drift_text, steal = "", procstats.steal_fraction(machine0, procstats.machine_cpu_times())
    bound_points = [p for p in points if p.system == report.INPROCESS]
    if bound_points:  # the same measurement again: how much the machine itself moved during the run
        # the whole sweep, best against best: the start's best was picked as the maximum of the sweep,
        # and a single batch size measured again would drift down towards the mean by that choice alone
        print("bench: the in-process bound again, the whole sweep (drift check)", flush=True)
        again = bench_inprocess(artifacts, photos, [p.concurrency for p in bound_points], plan["inprocess_images"],
                                model=model)
        first, last = (max(ps, key=lambda p: p.throughput) for ps in (bound_points, again))
        steal = procstats.steal_fraction(machine0, procstats.machine_cpu_times())
        drift_text = drift_line(first.throughput, last.throughput, first.concurrency, last.concurrency, steal) + "\n"
    stage_text = "".join(limiting_stage_text(stages, system, instances[pipeline], cpu)
                         for system, pipeline in ((report.ENSEMBLE_GRPC, "ensemble"), (report.FUSED_GRPC, "fused")))
    stage_text += hop_cost_text(cpu, report.ENSEMBLE_GRPC, report.FUSED_GRPC)
    extra = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
             "plan": plan, "photos": args.photos, "load_average_at_start": load, "cpu_count": os.cpu_count(),
             "model_repository": str(repo), "repositories": {k: str(v) for k, v in repos.items()},
             "spec": spec, "stages": stages, "cpu_by_process": cpu, "drift": drift_text.strip(),
             "steal_fraction": steal, "comparison_model": str(model), "variant": build.get("variant", "fp32"),
             "perf_analyzer": "used" if tool else why_no_perf or "skipped", "paired_rounds": rounds.to_json(paired),
             "seconds": round(time.monotonic() - started, 1)}
    files = report.write(points, out, extra, cores=os.cpu_count() or 1)
    rounds_png = rounds.plot(paired, out / "bench_rounds.png")
    if rounds_png:
        files["rounds_png"] = rounds_png
    with open(files["md"], "a") as f:
        f.write("\n" + model_text + "\n" + drift_text + stage_text + ("\n" + round_text if round_text else ""))
    ratio_text = report.ratio_lines(report.ratios(points, os.cpu_count() or 1))
    print("\n" + report.table(points) + "\n" + ratio_text + "\n" + model_text + "\n" + drift_text + stage_text
          + ("\n" + round_text if round_text else ""))
    print(f"bench: {extra['seconds']:.0f} s; wrote " + ", ".join(str(p) for p in files.values()))
    return {"points": points, "files": files, **extra}


if __name__ == "__main__":
    import sys

    try:
        main(get_args_parser().parse_args())
    except (OSError, RuntimeError, ValueError) as exc:
        sys.exit(f"benchmarks.bench: {exc}")
