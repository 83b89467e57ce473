"""`make bench-cache`: Triton's response cache on a workload of repeated images, measured with Locust.

    python -m benchmarks.response_cache                    # the repository make engines built
    python -m benchmarks.response_cache --distinct 50 --users 8 --run-time 20 --cache-mb 64

The served repository's spec is written twice: `cached` (`response_cache_mb` = --cache-mb: the ensemble
answers an image it has answered before from memory, without preprocessing or inference; the server
starts with `--cache-config local,size=...`) and `uncached`. The workload is --distinct different
images (seeded random crops of the bundled photos, re-encoded as JPEG); each request carries one drawn
at random, so the share of repeats grows with the run. --users closed-loop Locust users (no wait) per
server, the same seed for both, over HTTP (benchmarks/overload.py's users). Reported per server:
requests/s, p50/p99, and for the cached one the hit rate from Triton's `nv_cache_num_hits_per_model` /
`nv_cache_num_misses_per_model` of the ensemble; then whether both servers answer every distinct image
with the same probabilities (top-1, largest difference). Writes response_cache.md (the machine first) and
response_cache.csv to --out.
"""
from __future__ import annotations

import argparse
import dataclasses
import io
import random
import re
import sys
import urllib.request
from pathlib import Path

import numpy as np
from PIL import Image

from benchmarks.report import write_csv, write_markdown
from serving.health import SEEDS, number

CONFIGS = ("uncached", "cached")


def distinct_images(photos: list[bytes], count: int, seed: int = 0, quality: int = 90) -> list[bytes]:
    """`count` different JPEGs: random crops (half to all of each side) of the photos, in turn."""
    rng, images = random.Random(seed), []
    decoded = []
    for data in photos:
        with Image.open(io.BytesIO(data)) as image:
            decoded.append(image.convert("RGB"))
    while len(images) < count:
        image = decoded[len(images) % len(decoded)]
        w, h = image.size
        cw, ch = rng.randint(w // 2, w), rng.randint(h // 2, h)
        x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
        buffer = io.BytesIO()
        image.crop((x, y, x + cw, y + ch)).save(buffer, format="JPEG", quality=quality)
        images.append(buffer.getvalue())
    if len(set(images)) != len(images):
        raise ValueError("two crops came out identical: choose another --seed")
    return images


def cache_counts(metrics_text: str, model: str) -> tuple[int, int]:
    """(hits, misses) of `model`'s response cache in Triton's metrics text (0, 0 when it has none)."""
    def value(name: str) -> int:
        found = re.findall(rf'^{name}{{model="{re.escape(model)}",[^}}]*}} (\S+)$', metrics_text, re.M)
        return int(sum(float(v) for v in found))

    return value("nv_cache_num_hits_per_model"), value("nv_cache_num_misses_per_model")


def metrics_text(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read().decode()


@dataclasses.dataclass(frozen=True)
class Row:
    config: str
    requests: int
    errors: int
    rps: float
    p50_ms: float
    p99_ms: float
    hits: int
    misses: int

    @property
    def hit_rate(self) -> float:
        return self.hits / (self.hits + self.misses) if self.hits + self.misses else 0.0


def write_repositories(repository: Path, out: Path, cache_mb: int) -> dict[str, Path]:
    from build.repository.spec import DeploymentSpec
    from build.repository.writer import read_manifest, write_variants

    build = read_manifest(repository)
    spec = DeploymentSpec.from_dict(build["spec"])
    variants = {name: spec.replace(response_cache_mb=size) for name, size in (("uncached", 0), ("cached", cache_mb))}
    return write_variants(build, variants, out, "benchmarks.response_cache")


def answers(url: str, images: list[bytes]) -> np.ndarray:
    """Probabilities of each image, one request each (gRPC)."""
    from clients.client import ImageClassifierClient

    with ImageClassifierClient(url, "grpc") as client:
        return np.concatenate([client.probabilities([image]) for image in images])


def get_args_parser() -> argparse.ArgumentParser:
    from benchmarks.workload import ENCODINGS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-repository", default="model_repository", help="(default: %(default)s)")
    p.add_argument("--distinct", type=number(int, 1), default=50,
                   help="different images in the workload (default: %(default)s)")
    p.add_argument("--users", type=number(int, 1), default=8, help="closed-loop Locust users (default: %(default)s)")
    p.add_argument("--run-time", type=number(float, 0, above_low=True), default=20.0,
                   help="seconds per server (default: %(default)s)")
    p.add_argument("--cache-mb", type=number(int, 1), default=64,
                   help="the cached server's cache, in MiB (default: %(default)s)")
    p.add_argument("--photos", default="jpeg", choices=ENCODINGS, help="(default: %(default)s)")
    p.add_argument("--seed", type=number(int, *SEEDS), default=0, help="a 64-bit signed integer (default: %(default)s)")
    p.add_argument("--out", default="benchmarks/results/response_cache", help="(default: %(default)s)")
    return p


def main(args: argparse.Namespace) -> list[Row]:
    from benchmarks.overload import run_users, use_gevent

    use_gevent()
    from benchmarks.locust_run import ensemble_name
    from benchmarks.workload import load_photos
    from serving.cache import cache_args, repository_cache_mb
    from serving.server import TritonServer

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    repos = write_repositories(Path(args.model_repository), out, args.cache_mb)
    model = ensemble_name(args.model_repository)
    images = distinct_images(list(load_photos(args.photos).values()), args.distinct, args.seed)
    rows, probabilities = [], {}
    for config in CONFIGS:
        extra = cache_args(repository_cache_mb(repos[config]))
        with TritonServer(repos[config], log_file=out / f"{config}_tritonserver.log", extra_args=extra) as server:
            outcomes = run_users(server.http_url, model, images, args.users, args.run_time, seed=args.seed, top_k=5)
            hits, misses = cache_counts(metrics_text(server.metrics_url), model)
            probabilities[config] = answers(server.grpc_url, images)
        ok = outcomes.count("accepted")
        rows.append(Row(config, ok, outcomes.count("busy") + outcomes.count("error"), ok / outcomes.seconds,
                        outcomes.percentile_ms("accepted", 50), outcomes.percentile_ms("accepted", 99), hits, misses))
        r = rows[-1]
        print(f"{config:8s} {r.rps:7.1f} req/s  p50 {r.p50_ms:6.1f}  p99 {r.p99_ms:6.1f} ms  {r.requests} requests, "
              f"{r.errors} failed (busy {outcomes.count('busy')}, other {dict(outcomes.errors) or 0}), "
              f"cache hits {r.hits} misses {r.misses}", flush=True)
    same_top1 = float(np.mean(probabilities["cached"].argmax(1) == probabilities["uncached"].argmax(1)))
    max_diff = float(np.abs(probabilities["cached"] - probabilities["uncached"]).max())
    by = {r.config: r for r in rows}
    lines = [f"{args.distinct} distinct images, {args.users} closed-loop users, {args.run_time:g} s per server, "
             f"cache {args.cache_mb} MiB on the ensemble, HTTP", "",
             "| server | req/s | p50 ms | p99 ms | requests | failed | cache hits | misses | hit rate |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r.config} | {r.rps:.1f} | {r.p50_ms:.1f} | {r.p99_ms:.1f} | {r.requests} | {r.errors} | {r.hits} | "
              f"{r.misses} | {r.hit_rate:.1%} |" for r in rows]
    lines += ["", f"- cached / uncached: throughput {by['cached'].rps / by['uncached'].rps:.2f}x, "
                  f"p99 {by['cached'].p99_ms / by['uncached'].p99_ms:.2f}x",
              f"- answers: same top-1 for {same_top1:.0%} of the {args.distinct} images, largest probability "
              f"difference {max_diff:.2e}"]
    print(write_report(rows, lines, out).read_text())
    return rows


def write_report(rows: list[Row], lines: list[str], out: Path) -> Path:
    """response_cache.csv (one row per server) and response_cache.md (the machine, then `lines`)."""
    write_csv(out / "response_cache.csv", [x.name for x in dataclasses.fields(Row)] + ["hit_rate"],
              ({**dataclasses.asdict(r), "hit_rate": r.hit_rate} for r in rows))
    return write_markdown(out / "response_cache.md", "\n".join(lines) + "\n")


if __name__ == "__main__":
    try:
        main(get_args_parser().parse_args())
    except (OSError, RuntimeError, ValueError) as exc:
        sys.exit(f"benchmarks.response_cache: {exc}")
