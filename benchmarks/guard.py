"""`make bench-guard`: what the supervisor's HTTP guard (serving.http_guard) costs, against Triton's HTTP port.

    python -m benchmarks.guard                                   # the repository make engines built
    python -m benchmarks.guard --concurrency 1 8 --rounds 3 --measurement-ms 4000

    python -m benchmarks.guard --tensor-format json             # JSON tensors to the classifier

One tritonserver on --model-repository under serving.supervise with `--http-guard` (as `make serve
GUARD_PORT=...` and the KServe runtime run it: the guard in the supervisor's process). perf_analyzer (HTTP,
binary tensors, the bundled photos) on the ensemble, or with `--tensor-format json` JSON tensors in and out
on the classifier the ensemble calls (the photos preprocessed as the repository's preprocess step does, each a
JSON list of floats: a body the guard parses whole), at each concurrency, alternately on Triton's own port
(`direct`) and on the guard's (`guarded`), --rounds times, the order swapped every round so that a drift of
the machine falls on both. Per path and concurrency: the median over rounds of img/s, p50/p99 and the
supervisor's CPU use (the guard's work: reading, checking and forwarding each request, beside the watchdog's
few checks a second, which is all it does on the direct path); then guarded / direct ratios and the
supervisor's CPU time per request its guard forwarded (its /status counts them), and the supervisor's RSS after
the warm-up and at the end. Writes guard.md (the machine first),
guard.csv and guard.json to --out.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
import urllib.request
from pathlib import Path

import psutil

from benchmarks.report import write_csv, write_json, write_markdown
from serving.health import number

PATHS = ("direct", "guarded")
TENSOR_FORMATS = ("binary", "json")


@dataclasses.dataclass(frozen=True)
class Row:
    path: str
    concurrency: int
    rounds: int
    img_s: float
    p50_ms: float
    p99_ms: float
    supervisor_cpu_pct: float  # of one core, over the perf_analyzer run (its trials and windows)
    cpu_ms_per_forwarded: float | None  # the supervisor's CPU time per request its guard forwarded (guarded)


def median_row(path: str, concurrency: int, runs: list[tuple]) -> Row:
    """The median of each figure over the rounds' (PerfResult, supervisor CPU %, CPU ms per forwarded) runs."""
    per_request = [ms for *_, ms in runs if ms is not None]
    return Row(path, concurrency, len(runs), statistics.median(r.throughput for r, *_ in runs),
               statistics.median(r.p50_ms for r, *_ in runs), statistics.median(r.p99_ms for r, *_ in runs),
               statistics.median(pct for _, pct, _ in runs), statistics.median(per_request) if per_request else None)


def guard_forwarded(health_port: int) -> int:
    """Requests the supervisor's guard has forwarded so far (its /status)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{health_port}/status", timeout=10) as answer:
        return json.load(answer)["http_guard"]["forwarded"]


def ratio_table(rows: list[Row]) -> str:
    """Markdown: per concurrency, guarded / direct for img/s, p50, p99, and the guard's CPU ms per request."""
    lines = ["| concurrency | img/s guarded/direct | p50 guarded/direct | p99 guarded/direct "
             "| supervisor CPU ms per forwarded request |", "|---:|---:|---:|---:|---:|"]
    by = {(r.path, r.concurrency): r for r in rows}
    for c in sorted({r.concurrency for r in rows}):
        d, g = by[("direct", c)], by[("guarded", c)]
        lines.append(f"| {c} | {g.img_s / d.img_s:.3f} | {g.p50_ms / d.p50_ms:.3f} | {g.p99_ms / d.p99_ms:.3f} "
                     f"| {g.cpu_ms_per_forwarded:.2f} |")
    return "\n".join(lines)


def rows_table(rows: list[Row]) -> str:
    lines = ["| path | concurrency | rounds | img/s | p50 ms | p99 ms | supervisor CPU % |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r.path} | {r.concurrency} | {r.rounds} | {r.img_s:.1f} | {r.p50_ms:.1f} | {r.p99_ms:.1f} "
              f"| {r.supervisor_cpu_pct:.1f} |" for r in rows]
    return "\n".join(lines)


def tensor_inputs(repository: str | Path, url: str, model: str, photos: list[bytes], folder: Path) -> Path:
    """The --input-data file that feeds `photos` to `model`'s one input as float tensors, preprocessed by the
    repository's preprocess.json (the defaults without one): folder/tensors.input.json."""
    import tritonclient.http as httpclient

    from build.repository.writer import read_manifest
    from common.contract import PREPROCESS_JSON
    from common.preprocessing import PreprocessConfig, load_batch

    client = httpclient.InferenceServerClient(url)
    try:
        inputs = client.get_model_metadata(model)["inputs"]
    finally:
        client.close()
    if len(inputs) != 1:
        raise ValueError(f"--tensor-format json feeds a model of one input; {model} has {len(inputs)}")
    (tensor,) = inputs
    preprocess = read_manifest(repository)["spec"].get("preprocess_name", "")
    config_file = Path(repository) / preprocess / "1" / PREPROCESS_JSON
    batch = load_batch(photos, PreprocessConfig.load(config_file) if config_file.is_file() else PreprocessConfig())
    if tensor["datatype"] != "FP32" or list(batch.shape[1:]) != tensor["shape"][1:]:
        raise ValueError(f"{model}'s input {tensor['name']} is {tensor['datatype']} {tensor['shape']}, not the "
                         f"FP32 {list(batch.shape[1:])} that its preprocessing gives")
    path = folder / "tensors.input.json"
    path.write_text(json.dumps({"data": [{tensor["name"]: {"content": image.ravel().tolist(),
                                                            "shape": list(image.shape)}} for image in batch]}))
    return path


def get_args_parser() -> argparse.ArgumentParser:
    from benchmarks.perf import DEFAULT_VENV
    from benchmarks.workload import ENCODINGS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-repository", default="model_repository", help="(default: %(default)s)")
    p.add_argument("--concurrency", nargs="+", type=number(int, 1), default=[1, 4, 8],
                   help="perf_analyzer concurrencies (default: %(default)s)")
    p.add_argument("--rounds", type=number(int, 1), default=3, help="paired rounds (default: %(default)s)")
    p.add_argument("--measurement-ms", type=number(int, 1), default=3000,
                   help="perf_analyzer window (default: %(default)s)")
    p.add_argument("--photos", default="jpeg", choices=ENCODINGS, help="(default: %(default)s)")
    p.add_argument("--tensor-format", default="binary", choices=TENSOR_FORMATS,
                   help="binary: the photos to the ensemble; json: JSON tensors to its classifier (default: "
                        "%(default)s)")
    p.add_argument("--perf-venv", default=DEFAULT_VENV, help="tool environment (default: %(default)s)")
    p.add_argument("--out", default="benchmarks/results/guard", help="(default: %(default)s)")
    return p


def main(args: argparse.Namespace) -> list[Row]:
    from benchmarks.locust_run import ensemble_name
    from benchmarks.perf import PerfAnalyzer, photo_inputs, repository_models, takes_photos
    from benchmarks.workload import load_photos
    from serving import access
    from serving.server import SERVE_EXTRA_ARGS, TritonServer, free_port, supervisor_command

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    key_file, health, guard_port = out / "admin.key", free_port(), free_port()
    key = access.write_key(key_file)
    tool = PerfAnalyzer.locate(args.perf_venv)
    json_tensors = args.tensor_format == "json"
    tool = dataclasses.replace(tool, headers=tuple(access.key_headers(key, "http").items()),
                               options=("--input-tensor-format=json", "--output-tensor-format=json") if json_tensors
                               else ())
    # JSON tensors go to the classifier (the last model of the repository's pipeline)
    model = repository_models(args.model_repository)[-1] if json_tensors else ensemble_name(args.model_repository)
    photos = list(load_photos(args.photos).values())
    runs: dict[tuple[str, int], list[tuple]] = {}
    server = TritonServer(args.model_repository, log_file=out / "tritonserver.log",
                          extra_args=[*SERVE_EXTRA_ARGS, *access.restricted_args(key)],
                          supervisor=supervisor_command("127.0.0.1", health, 0, key_file, guard_port))
    with server:
        server.wait_ready(60, f"http://127.0.0.1:{health}/ready")
        supervisor = psutil.Process(server.process.pid)
        urls = {"direct": server.http_url, "guarded": f"127.0.0.1:{guard_port}"}
        if json_tensors and takes_photos(urls["direct"], "http", model):
            raise ValueError(f"--tensor-format json needs a model with a tensor input; {model} takes encoded photos")
        inputs = tensor_inputs(args.model_repository, urls["direct"], model, photos, out) if json_tensors \
            else photo_inputs(photos, out)
        tool.warm_up(model, urls["guarded"], "http", max(args.concurrency), out / "warm_up.csv", inputs)
        rss_mb = [supervisor.memory_info().rss / 2**20]
        for n in range(args.rounds):
            for c in args.concurrency:
                for path in (PATHS if n % 2 == 0 else PATHS[::-1]):
                    before, forwarded, start = supervisor.cpu_times(), guard_forwarded(health), time.monotonic()
                    result = tool.measure(model, urls[path], "http", c, out / f"{path}_c{c}_r{n}.csv", inputs,
                                          args.measurement_ms)
                    after, wall_s = supervisor.cpu_times(), time.monotonic() - start
                    cpu_s = (after.user + after.system) - (before.user + before.system)
                    requests = guard_forwarded(health) - forwarded
                    runs.setdefault((path, c), []).append(
                        (result, 100 * cpu_s / wall_s, 1000 * cpu_s / requests if requests else None))
                    print(f"round {n + 1} c={c:<2d} {path:8s} {result.throughput:7.1f} img/s  p50 {result.p50_ms:6.1f}"
                          f"  p99 {result.p99_ms:6.1f} ms  supervisor CPU {100 * cpu_s / wall_s:5.1f} %", flush=True)
        rss_mb.append(supervisor.memory_info().rss / 2**20)
        forwarded = guard_forwarded(health)
    rows = [median_row(path, c, runs[(path, c)]) for c in args.concurrency for path in PATHS]
    tensors = "JSON tensors (the photos preprocessed)" if json_tensors else "binary tensors"
    text = (f"# HTTP guard overhead: {model}, perf_analyzer over HTTP with {tensors}, {args.rounds} paired rounds "
            f"of {args.measurement_ms} ms windows (medians)\n\n{rows_table(rows)}\n\n{ratio_table(rows)}\n\n"
            f"Supervisor RSS after the warm-up {rss_mb[0]:.1f} MB, after the last run {rss_mb[1]:.1f} MB "
            f"({forwarded} requests forwarded by its guard in all).\n")
    write_markdown(out / "guard.md", text)
    write_csv(out / "guard.csv", [f.name for f in dataclasses.fields(Row)], [dataclasses.asdict(r) for r in rows])
    write_json(out / "guard.json", {"model": model, "tensor_format": args.tensor_format,
                                    "rows": [dataclasses.asdict(r) for r in rows],
                                    "supervisor_rss_mb": {"after_warm_up": rss_mb[0], "at_end": rss_mb[1]},
                                    "forwarded": forwarded})
    print(text)
    return rows


if __name__ == "__main__":
    try:
        main(get_args_parser().parse_args())
    except (OSError, ValueError, RuntimeError) as exc:
        sys.exit(f"benchmarks.guard: {exc}")
