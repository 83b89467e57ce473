"""`make bench-stall`: does Triton's dynamic batcher leave a model idle? One model's queue policy, varied.

    python -m benchmarks.stall                          # the repository make engines built, 60 s per variant
    python -m benchmarks.stall --seconds 20 --clients 4 --variants one-none,one-both

The served repository's spec is written once per variant, changing only the classifier's instances and
queue policy (Triton's default_queue_policy: max_queue_size, default_timeout_microseconds); batching stays
the spec's. Each variant's server gets --clients closed-loop gRPC clients that call the classifier alone with
one random tensor each, back to back: a light load, far below capacity, where no request should wait long.
A request slower than --stall-ms is a stall; stalls that end within STALL_GROUP_S of each other are one
stall event (the clients that were waiting together). Triton's batcher sleeps 500 ms when its queue is
empty and counts on an arrival (or a finished batch) to wake it: a stall of ~500 ms is that wake-up lost.

Reported per variant: requests, p50 / p99 / max, stalls and stall events (and per minute); a PNG of every
request's latency over time. Writes stall.md, stall.json and stall.png to --out.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import threading
import time
from pathlib import Path

import numpy as np

from serving.health import number

STALL_GROUP_S = 0.05
# name: (instances, max_queue_size, queue timeout us) of the classifier
VARIANTS = {"one-none": (1, 0, 0), "one-size": (1, 64, 0), "one-timeout": (1, 0, 1_000_000),
            "one-both": (1, 64, 1_000_000), "two-both": (2, 64, 1_000_000)}


@dataclasses.dataclass(frozen=True)
class Row:
    variant: str
    instances: int
    max_queue_size: int
    timeout_us: int
    seconds: float
    requests: int
    p50_ms: float
    p99_ms: float
    max_ms: float
    stalls: int  # requests slower than the threshold
    events: int  # stalls grouped by the time they ended

    @property
    def events_per_minute(self) -> float:
        return 60.0 * self.events / self.seconds if self.seconds else 0.0


def stall_events(samples: list[tuple[float, float]], stall_s: float, group_s: float = STALL_GROUP_S) -> int:
    """How many stall events among (start time, latency) samples: stalls (latency > stall_s) whose ends lie
    within group_s of the previous one's belong to the same event."""
    ends = sorted(t + latency for t, latency in samples if latency > stall_s)
    return sum(1 for i, end in enumerate(ends) if i == 0 or end - ends[i - 1] > group_s)


def summarize(variant: str, policy: tuple[int, int, int], samples: list[tuple[float, float]], seconds: float,
              stall_ms: float) -> Row:
    latencies = np.array([latency for _, latency in samples]) * 1000.0
    if latencies.size == 0:
        raise RuntimeError(f"{variant}: no request completed in {seconds:.0f} s")
    return Row(variant, *policy, seconds, int(latencies.size), float(np.percentile(latencies, 50)),
               float(np.percentile(latencies, 99)), float(latencies.max()), int((latencies > stall_ms).sum()),
               stall_events(samples, stall_ms / 1000.0))


def variant_spec(spec, instances: int, size: int, timeout_us: int):
    """`spec` with only the classifier's instances and queue policy changed."""
    return spec.replace(classifier=dataclasses.replace(spec.classifier, instances=instances, max_queue_size=size,
                                                       queue_timeout_us=timeout_us))


def drive(grpc_url: str, model: str, clients: int, seconds: float, progress=None) -> list[tuple[float, float]]:
    """(start, latency s) of every request that `clients` closed-loop gRPC clients sent `model` (one random
    tensor of its input's shape, batch 1) for `seconds`. A failed request raises."""
    import tritonclient.grpc as grpcclient

    with grpcclient.InferenceServerClient(grpc_url) as client:
        meta = client.get_model_metadata(model)
    spec = meta.inputs[0]
    shape = [1, *[int(d) for d in spec.shape[1:]]]
    data = np.random.default_rng(0).random(shape, dtype=np.float32)
    samples: list[tuple[float, float]] = []
    errors: list[BaseException] = []
    lock = threading.Lock()
    end = time.monotonic() + seconds

    def worker():
        with grpcclient.InferenceServerClient(grpc_url) as c:
            tensor = grpcclient.InferInput(spec.name, shape, spec.datatype)
            tensor.set_data_from_numpy(data)
            mine = []
            try:
                while (t0 := time.monotonic()) < end:
                    c.infer(model, [tensor])
                    mine.append((t0, time.monotonic() - t0))
            except Exception as exc:  # noqa: BLE001 - reported below, with the variant
                errors.append(exc)
            with lock:
                samples.extend(mine)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        time.sleep(1.0)
        if progress is not None:
            progress.update(1)
    if errors:
        raise RuntimeError(f"{len(errors)} client(s) failed: {errors[0]}")
    return sorted(samples)


def report_text(rows: list[Row], clients: int, stall_ms: float, cpu: str, spec) -> str:
    c = spec.classifier
    lines = [f"{cpu}; {clients} closed-loop gRPC clients calling the classifier alone (batch 1, a random tensor); "
             f"a stall: a request slower than {stall_ms:g} ms; one event: stalls that ended within "
             f"{STALL_GROUP_S * 1000:.0f} ms of each other. Classifier batching as served: preferred "
             f"{c.preferred_batch_sizes}, max_queue_delay_us {c.max_queue_delay_us}, {c.threads} thread(s).", "",
             "| variant | instances | max_queue_size | timeout us | requests | p50 ms | p99 ms | max ms | stalls | "
             "events | events/min |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r.variant} | {r.instances} | {r.max_queue_size} | {r.timeout_us} | {r.requests} | {r.p50_ms:.1f} | "
              f"{r.p99_ms:.1f} | {r.max_ms:.1f} | {r.stalls} | {r.events} | {r.events_per_minute:.1f} |" for r in rows]
    return "\n".join(lines) + "\n"


def plot(samples: dict[str, list[tuple[float, float]]], stall_ms: float, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(samples), 1, figsize=(10, 1.8 * len(samples) + 0.6), sharex=True, squeeze=False)
    for ax, (variant, points) in zip(axes[:, 0], samples.items()):
        t0 = points[0][0] if points else 0.0
        ax.scatter([t - t0 for t, _ in points], [max(latency * 1000.0, 0.1) for _, latency in points], s=2)
        ax.axhline(stall_ms, color="red", linestyle="--", linewidth=0.8)
        ax.set_yscale("log")
        ax.set_ylabel("ms")
        ax.set_title(variant, fontsize=9, loc="left")
    axes[-1, 0].set_xlabel("seconds into the run")
    fig.suptitle("classifier request latency over time (dashed: stall threshold)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_repositories(repository: Path, out: Path, names: list[str]) -> tuple[dict[str, Path], object]:
    """{variant: path} written from the served repository's spec and backend, and that spec."""
    from build.repository.spec import DeploymentSpec
    from build.repository.writer import read_manifest, write_variants

    build = read_manifest(repository)
    spec = DeploymentSpec.from_dict(build["spec"])
    if spec.pipeline != "ensemble":
        raise ValueError(f"{repository}: a {spec.pipeline} pipeline; the stall benchmark varies the ensemble's "
                         "classifier")
    variants = {name: variant_spec(spec, *VARIANTS[name]) for name in names}
    return write_variants(build, variants, out, "benchmarks.stall"), spec


def main(args: argparse.Namespace) -> list[Row]:
    from tqdm import tqdm

    from common.cpu import describe
    from serving.server import TritonServer

    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown or not names:
        raise SystemExit(f"--variants: unknown {unknown or names}; choose from {', '.join(VARIANTS)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    repos, spec = write_repositories(Path(args.model_repository), out, names)
    rows, samples = [], {}
    with tqdm(total=int(len(names) * args.seconds), unit="s", desc="stall") as progress:
        for name in names:
            with TritonServer(repos[name], log_file=out / f"{name}_tritonserver.log") as server:
                drive(server.grpc_url, spec.classifier_name, args.clients, 2.0)  # warm-up, not measured
                samples[name] = drive(server.grpc_url, spec.classifier_name, args.clients, args.seconds, progress)
            rows.append(summarize(name, VARIANTS[name], samples[name], args.seconds, args.stall_ms))
            r = rows[-1]
            progress.write(f"{name:12s} {r.requests:7d} requests  p99 {r.p99_ms:6.1f}  max {r.max_ms:6.1f} ms  "
                           f"stalls {r.stalls} in {r.events} event(s)")
    text = report_text(rows, args.clients, args.stall_ms, describe(), spec)
    (out / "stall.md").write_text(text)
    (out / "stall.json").write_text(json.dumps({"cpu": describe(), "clients": args.clients, "stall_ms": args.stall_ms,
                                                "rows": [dataclasses.asdict(r) for r in rows]}, indent=2))
    plot(samples, args.stall_ms, out / "stall.png")
    print(text + f"\nwrote {out / 'stall.md'}, stall.json, stall.png", flush=True)
    return rows


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-repository", default="model_repository")
    p.add_argument("--out", default="benchmarks/results/stall")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    p.add_argument("--seconds", type=number(float, 0, above_low=True), default=60.0,
                   help="measured seconds per variant")
    p.add_argument("--clients", type=number(int, 1), default=2)
    p.add_argument("--stall-ms", type=number(float, 0, above_low=True), default=250.0)
    return p


if __name__ == "__main__":
    try:
        main(get_args_parser().parse_args())
    except (RuntimeError, OSError, ValueError) as exc:  # a missing repository or artifacts, a server that fails
        sys.exit(f"benchmarks.stall: {exc}")
