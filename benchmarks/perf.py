"""`make perf`: perf_analyzer against the ensemble (real photos) and each of its members.

    make perf-setup                                   # once: .venv-perf (tritonclient 2.51) + libb64-0d
    python -m benchmarks.perf                         # own server on model_repository/, every model in it
    python -m benchmarks.perf --models image_classifier --concurrency 8 --url 127.0.0.1:8001

perf_analyzer is Triton's C++ load generator: closed loop, `concurrency` requests in flight, one
image per request. The models default to those the repository's BUILD.json names (the spec's
ensemble, preprocess and classifier names; ensemble and classifier for the fused pipeline). Inputs,
chosen from each model's metadata on the server: a model whose input is the BYTES tensor IMAGE
(the ensemble, `preprocess`, the fused classifier) gets the real photos as `--input-data` JSON
(shape [1]; each element base64 of its serialized form, a 4-byte little-endian length then the
encoded image); any other (the two-model ensemble's `classifier`) gets synthetic tensors.
One perf_analyzer run per concurrency, CSV (`-f`) parsed into rows, latencies in milliseconds.
perf_analyzer reads the model config and statistics, which `make serve`'s server restricts: with --url,
the admin key in --admin-key-file (what `make serve` wrote) goes along as `-H` headers, and so does the
inference key of a server that restricts inference (what `make serve` wrote for it, else $TRITON_INFERENCE_KEY).
"""
from __future__ import annotations

import argparse
import base64
import csv
import dataclasses
import json
import math
import os
import struct
import subprocess
from pathlib import Path

from benchmarks import report
from benchmarks.workload import ENCODINGS, load_photos
from common import contract
from serving.access import INFERENCE_KEY_HEADER, KEY_FILE, admin_headers, key_headers
from serving.health import number

DEFAULT_VENV = ".venv-perf"
IMAGE_INPUT = contract.IMAGE  # the encoded-photo input of the ensemble, preprocess and the fused classifier


UNSTABLE = "Failed to obtain stable measurement"  # perf_analyzer, when no window was stable


class PerfAnalyzerError(RuntimeError):
    pass


@dataclasses.dataclass(frozen=True)
class PerfResult:
    model: str
    protocol: str
    concurrency: int
    throughput: float  # inferences (images) per second
    p50_ms: float
    p90_ms: float
    p99_ms: float
    avg_ms: float
    server_queue_ms: float
    server_compute_ms: float


@dataclasses.dataclass(frozen=True)
class RateResult:
    model: str
    protocol: str
    rate: float  # requests per second offered (Poisson arrivals, open loop)
    throughput: float  # inferences (images) per second answered
    p50_ms: float
    p90_ms: float
    p99_ms: float
    server_queue_ms: float
    server_compute_ms: float


# ---- input data -------------------------------------------------------------------------------

def serialize_bytes_element(data: bytes) -> bytes:
    """Triton's raw form of one BYTES element: uint32 little-endian length, then the bytes."""
    return struct.pack("<I", len(data)) + bytes(data)


def input_data_json(images: list[bytes], input_name: str = IMAGE_INPUT) -> dict:
    """perf_analyzer `--input-data` document: one step per image, each a [1] BYTES tensor."""
    if not images:
        raise ValueError("no images for perf_analyzer input data")
    encode = lambda data: base64.b64encode(serialize_bytes_element(data)).decode("ascii")  # noqa: E731
    return {"data": [{input_name: {"content": {"b64": encode(image)}, "shape": [1]}} for image in images]}


def decode_input_data(doc: dict, input_name: str = IMAGE_INPUT) -> list[bytes]:
    """The images inside an `input_data_json` document (the inverse, for checks)."""
    images = []
    for step in doc["data"]:
        raw = base64.b64decode(step[input_name]["content"]["b64"])
        (length,) = struct.unpack("<I", raw[:4])
        if length != len(raw) - 4:
            raise ValueError(f"element length {length} != {len(raw) - 4} bytes present")
        images.append(raw[4:])
    return images


def write_input_data(images: list[bytes], path: str | Path, input_name: str = IMAGE_INPUT) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(input_data_json(images, input_name)))
    return path


# ---- the tool ---------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class PerfAnalyzer:
    binary: Path
    env: dict
    headers: tuple[tuple[str, str], ...] = ()  # sent with every request (-H), e.g. the admin key
    options: tuple[str, ...] = ()  # more perf_analyzer flags for every run, e.g. --input-tensor-format=json

    @classmethod
    def locate(cls, venv: str | Path = DEFAULT_VENV) -> "PerfAnalyzer":
        """perf_analyzer from the tool environment, with libcudart.so.12 on LD_LIBRARY_PATH. Raises
        PerfAnalyzerError (saying to run `make perf-setup`) if it is missing or does not start."""
        venv = Path(venv).resolve()
        binary = venv / "bin" / "perf_analyzer"
        cudart = sorted(venv.glob("lib/python3*/site-packages/nvidia/cuda_runtime/lib"))
        if not binary.is_file() or not cudart:
            raise PerfAnalyzerError(f"perf_analyzer is not set up in {venv}: run `make perf-setup`")
        env = dict(os.environ)
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (str(cudart[0]), env.get("LD_LIBRARY_PATH")) if p)
        tool = cls(binary, env)
        done = subprocess.run([str(binary), "--version"], env=env, capture_output=True, text=True, timeout=30)
        if done.returncode != 0:
            raise PerfAnalyzerError(f"{binary} does not start (libb64-0d missing? run `make perf-setup`): "
                                    f"{(done.stderr or done.stdout).strip()[-300:]}")
        return tool

    def command(self, model: str, url: str, protocol: str, concurrency: int, csv_path: Path,
                input_data: Path | None, measurement_ms: int, max_trials: int, stability: int) -> list[str]:
        return self._command(model, url, protocol, ["--concurrency-range", str(concurrency)], csv_path, input_data,
                             measurement_ms, max_trials, stability)

    def _command(self, model: str, url: str, protocol: str, load: list[str], csv_path: Path, input_data: Path | None,
                 measurement_ms: int, max_trials: int, stability: int) -> list[str]:
        """perf_analyzer's command line for one run of the `load` flags (a concurrency, or request gaps)."""
        return [str(self.binary), "-m", model, "-u", url, "-i", protocol, *load, "-p", str(measurement_ms),
                "--max-trials", str(max_trials), "--stability-percentage", str(stability),
                "--input-data", str(input_data) if input_data else "random", "-f", str(csv_path),
                *[arg for name, value in self.headers for arg in ("-H", f"{name}:{value}")], *self.options]

    def _run(self, cmd: list[str], csv_path: Path, timeout: float) -> subprocess.CompletedProcess:
        """Run `cmd`, which writes `csv_path`, after removing a CSV left there by an earlier run (it is not this
        run's result). Raises PerfAnalyzerError when it runs past `timeout` seconds."""
        csv_path.unlink(missing_ok=True)
        try:
            return subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise PerfAnalyzerError(f"perf_analyzer ran past {timeout:.0f} s: {' '.join(cmd)}") from None

    def measure(self, model: str, url: str, protocol: str, concurrency: int, csv_path: str | Path,
                input_data: Path | None = None, measurement_ms: int = 2000, max_trials: int = 6,
                stability: int = 100) -> PerfResult:
        """One perf_analyzer run at one concurrency; a failed run is tried once more with windows twice as
        long and twice as many (no stable window on a noisy machine; or exit 3, a window in which no request
        completed: a stall of the machine or the server longer than a window). Raises PerfAnalyzerError whose
        first line says why, in perf_analyzer's words, and whose other lines hold its output."""
        csv_path = Path(csv_path)
        csv_path.parent.mkdir(parents=True, exist_ok=True)
        tries = ((measurement_ms, max_trials), (2 * measurement_ms, 2 * max_trials))
        for window_ms, trials in tries:
            cmd = self.command(model, url, protocol, concurrency, csv_path, input_data, window_ms, trials, stability)
            done = self._run(cmd, csv_path, 60 + 3 * trials * window_ms / 1000)
            if done.returncode == 0 and csv_path.exists():
                break
        else:
            output = (done.stdout + done.stderr).strip()
            raise PerfAnalyzerError(f"perf_analyzer failed (exit {done.returncode}: {failure_reason(output)}) on "
                                    f"{model} at concurrency {concurrency}, also with {tries[-1][0]} ms windows:"
                                    f"\n{output[-1500:]}")
        rows = parse_csv(csv_path, model, protocol)
        if not rows:
            raise PerfAnalyzerError(f"{csv_path}: no measurement rows")
        return rows[0]

    def measure_rate(self, model: str, url: str, protocol: str, rate: float, csv_path: str | Path,
                     input_data: Path | None = None, measurement_ms: int = 4000, windows: int = 3,
                     seed: int = 0) -> RateResult:
        """One perf_analyzer run open loop: requests sent asynchronously, answered or not, with exponential
        gaps (Poisson arrivals) of mean 1 / `rate` over the run's `windows` windows, whose requests perf_analyzer
        merges into one result. The gaps are drawn here (`seed`) and scaled so that the run offers exactly
        `rate`: perf_analyzer's own `--request-distribution poisson` replays one fixed draw at any rate, so a
        short run offers that draw's mean instead (docs/benchmarks.md). The windows need not agree closely (a
        Poisson load's p99 moves between short windows: `--stability-percentage 1000`); a load whose latency
        keeps growing past that (a queue without end) does not settle. Raises PerfAnalyzerError whose first
        line says why, in perf_analyzer's words: a request the server refused (perf_analyzer stops at the
        first), no settled measurement, no CSV."""
        import numpy as np

        csv_path = Path(csv_path)
        csv_path.parent.mkdir(parents=True, exist_ok=True)
        gaps = np.random.default_rng(seed).exponential(1.0, max(1, math.ceil(windows * measurement_ms / 1000 * rate)))
        intervals = csv_path.with_suffix(".intervals.txt")
        intervals.write_text("".join(f"{round(g)}\n" for g in gaps * (1e6 / rate / gaps.mean())))
        cmd = self._command(model, url, protocol, ["--async", "--request-intervals", str(intervals)], csv_path,
                            input_data, measurement_ms, windows, 1000)
        done = self._run(cmd, csv_path, 60 + 3 * windows * measurement_ms / 1000)
        output = (done.stdout + done.stderr).strip()
        if done.returncode != 0 or not csv_path.exists():
            raise PerfAnalyzerError(f"perf_analyzer failed (exit {done.returncode}: {failure_reason(output)}) on "
                                    f"{model} at {rate:g} requests/s:\n{output[-1500:]}")
        rows = parse_rate_csv(csv_path, model, protocol, rate)
        if not rows:
            raise PerfAnalyzerError(f"{csv_path}: no measurement rows")
        return rows[0]

    def warm_up(self, model: str, url: str, protocol: str, concurrency: int, csv_path: str | Path,
                input_data: Path | None = None) -> None:
        """A short unreported run: the first requests after loading (ONNX Runtime's first runs at each
        batch shape, memory arenas growing) are slower and would bias the first measured point."""
        self.measure(model, url, protocol, concurrency, csv_path, input_data, measurement_ms=500, max_trials=3,
                     stability=1000)


def failure_reason(output: str) -> str:
    """perf_analyzer's own word on why it failed: the last line of its output that reports a failure or an
    error, else its last line."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    for line in reversed(lines):
        if any(word in line.lower() for word in ("fail", "error", "no valid", "unable", "expired")):
            return line
    return lines[-1] if lines else "no output"


CSV_COLUMNS = ("Concurrency", "Inferences/Second", "p50 latency", "p90 latency", "p99 latency")


def _measurements(path: str | Path, columns: tuple[str, ...]):
    """The measurement rows of perf_analyzer's `-f` CSV (latencies in microseconds), the first of `columns`
    being its load column, each as (row, a column's figure in ms, server compute ms). Raises PerfAnalyzerError
    when a column is missing (another perf_analyzer version)."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in columns if c not in (reader.fieldnames or [])]
        if missing:
            raise PerfAnalyzerError(f"{path}: perf_analyzer's CSV has no {', '.join(missing)} column(s) "
                                    f"(columns: {', '.join(reader.fieldnames or [])})")
        for row in reader:
            try:
                float(row[columns[0]])
            except (TypeError, ValueError):
                continue  # blank separator or a later section
            ms = lambda key, row=row: float(row.get(key) or 0) / 1000.0  # noqa: E731
            yield row, ms, sum(ms(k) for k in ("Server Compute Input", "Server Compute Infer", "Server Compute Output"))


def parse_csv(path: str | Path, model: str, protocol: str) -> list[PerfResult]:
    """perf_analyzer's `-f` CSV -> PerfResult rows."""
    return [PerfResult(model, protocol, int(row["Concurrency"]), float(row["Inferences/Second"]), ms("p50 latency"),
                       ms("p90 latency"), ms("p99 latency"), _avg_latency_ms(row), ms("Server Queue"), compute)
            for row, ms, compute in _measurements(path, CSV_COLUMNS)]


RATE_CSV_COLUMNS = ("Request Rate", *CSV_COLUMNS[1:])


def parse_rate_csv(path: str | Path, model: str, protocol: str, rate: float) -> list[RateResult]:
    """perf_analyzer's `-f` CSV of a `--request-intervals` run at `rate` -> RateResult rows (its own "Request
    Rate" column is a whole number derived from the gaps)."""
    return [RateResult(model, protocol, rate, float(row["Inferences/Second"]), ms("p50 latency"), ms("p90 latency"),
                       ms("p99 latency"), ms("Server Queue"), compute)
            for row, ms, compute in _measurements(path, RATE_CSV_COLUMNS)]


def _avg_latency_ms(row: dict) -> float:
    keys = ("Client Send", "Network+Server Send/Recv", "Server Queue", "Server Compute Input",
            "Server Compute Infer", "Server Compute Output", "Client Recv")
    return sum(float(row.get(k) or 0) for k in keys) / 1000.0


def photo_inputs(photos: list[bytes], folder: Path) -> Path:
    """The --input-data file that feeds the photos to the IMAGE input (folder/images.input.json)."""
    return write_input_data(photos, folder / "images.input.json", IMAGE_INPUT)


def takes_photos(url: str, protocol: str, model: str) -> bool:
    """Whether the served `model`'s input is the encoded-photo tensor (BYTES IMAGE), from its metadata."""
    if protocol == "grpc":
        import tritonclient.grpc as module
    else:
        import tritonclient.http as module
    from tritonclient.utils import InferenceServerException

    client = module.InferenceServerClient(url=url)
    try:  # the HTTP client returns JSON already; as_json gives gRPC's the same form
        metadata = client.get_model_metadata(model, as_json=True) if protocol == "grpc" \
            else client.get_model_metadata(model)
    except InferenceServerException as exc:
        raise PerfAnalyzerError(f"no metadata for model {model!r} at {url}: {exc.message()}") from None
    finally:
        client.close()
    inputs = metadata.get("inputs", [])
    return any(i["name"] == IMAGE_INPUT and i["datatype"] == "BYTES" for i in inputs)


def repository_models(repository: str | Path) -> list[str]:
    """The models a built repository serves, from its BUILD.json: the ensemble, then its members."""
    from build.repository.writer import read_manifest

    try:
        spec = read_manifest(repository)["spec"]
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"{exc}, or name the models with --models") from None
    members = ["preprocess_name", "classifier_name"] if spec.get("pipeline", "ensemble") == "ensemble" \
        else ["classifier_name"]
    return [spec["ensemble_name"]] + [spec[m] for m in members]


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=None,
                   help="models to measure (default: those the repository's BUILD.json names)")
    p.add_argument("--concurrency", nargs="+", type=number(int, 1), default=[1, 2, 4, 8],
                   help="concurrency sweep (default: %(default)s)")
    p.add_argument("--protocol", default="grpc", choices=("grpc", "http"), help="(default: %(default)s)")
    p.add_argument("--url", default=None, help="a running server (host:port for --protocol); default: start one")
    p.add_argument("--admin-key-file", default=None,
                   help="with --url: the server's admin key, if it restricts config and statistics (default: the "
                        f"one `make serve` wrote for the server at --url, else {KEY_FILE})")
    p.add_argument("--model-repository", default="model_repository", help="served when no --url (default: %(default)s)")
    p.add_argument("--photos", default="jpeg", choices=ENCODINGS, help="photo encoding (default: %(default)s)")
    p.add_argument("--measurement-ms", type=number(int, 1), default=2000,
                   help="perf_analyzer window (default: %(default)s)")
    p.add_argument("--perf-venv", default=DEFAULT_VENV, help="tool environment (default: %(default)s)")
    p.add_argument("--out", default="benchmarks/results/perf", help="CSV and input JSON folder (default: %(default)s)")
    return p


def main(args: argparse.Namespace) -> list[PerfResult]:
    from contextlib import nullcontext

    from serving.server import TritonServer, inference_key_for, key_file_for

    tool = PerfAnalyzer.locate(args.perf_venv)
    if args.url:
        keys = {**admin_headers(Path(args.admin_key_file or key_file_for(args.url)), args.protocol),
                **key_headers(inference_key_for(args.url), args.protocol, INFERENCE_KEY_HEADER)}
        tool = dataclasses.replace(tool, headers=tuple(keys.items()))
    out = Path(args.out)
    models = args.models or repository_models(args.model_repository)
    photos = list(load_photos(args.photos).values())
    server = None if args.url else TritonServer(args.model_repository, log_file=out / "tritonserver.log")
    out.mkdir(parents=True, exist_ok=True)
    results = []
    with server or nullcontext():
        url = args.url or (server.grpc_url if args.protocol == "grpc" else server.http_url)
        for model in models:
            inputs = photo_inputs(photos, out) if takes_photos(url, args.protocol, model) else None
            for c in args.concurrency:
                r = tool.measure(model, url, args.protocol, c, out / f"{model}_{args.protocol}_c{c}.csv",
                                 inputs, args.measurement_ms)
                results.append(r)
                print(f"{model:18s} {args.protocol:4s} c={c:<3d} {r.throughput:7.1f} img/s  p50 {r.p50_ms:6.1f}  "
                      f"p90 {r.p90_ms:6.1f}  p99 {r.p99_ms:6.1f} ms  (server queue {r.server_queue_ms:5.1f}, "
                      f"compute {r.server_compute_ms:5.1f} ms)", flush=True)
    print("wrote " + ", ".join(map(str, write_summary(results, out, args.protocol))))
    return results


def write_summary(results: list[PerfResult], out: Path, protocol: str) -> list[Path]:
    """perf_<protocol>.csv, one row per run, and perf_<protocol>.json: the same rows and the machine."""
    rows = [dataclasses.asdict(r) for r in results]
    summary = report.write_csv(out / f"perf_{protocol}.csv", [x.name for x in dataclasses.fields(PerfResult)], rows)
    return [summary, report.write_json(out / f"perf_{protocol}.json", {"protocol": protocol, "results": rows})]


if __name__ == "__main__":
    import sys

    try:
        main(get_args_parser().parse_args())
    except (PerfAnalyzerError, OSError, RuntimeError, ValueError) as exc:
        sys.exit(f"benchmarks.perf: {exc}")
