"""`make demo`'s last step: start a real tritonserver, classify the bundled photos over HTTP and
gRPC, print the top-5, check the answers, stop the server. Exits non-zero if any check fails.

    python -m clients.demo --model-repository model_repository [--http-port 8100 --grpc-port 8101 --metrics-port 8102]

Its server takes free loopback ports unless told which, so it runs beside a server `make serve` started.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from clients.client import ClassificationError, ImageClassifierClient, Prediction
from common.samples import CAT_CLASSES, ESPRESSO, sample_photos
from serving.health import number, port_number
from serving.server import Ports, ServerError, TritonServer

PHOTOS = ["chelsea", "coffee", "astronaut", "rocket", "motorcycle", "horse", "grace_hopper", "china", "flower"]


def check(name: str, top: list[Prediction]) -> str | None:
    """What the bundled ImageNet model must say; None if fine, else what is wrong."""
    indices = [p.index for p in top]
    if name == "chelsea" and not CAT_CLASSES & set(indices[:3]):
        return f"chelsea: no cat class {sorted(CAT_CLASSES)} in the top 3 {indices[:3]}"
    if name == "coffee" and indices[0] != ESPRESSO:
        return f"coffee: top-1 is {indices[0]} ({top[0].label}), expected {ESPRESSO} (espresso)"
    return None


def run_demo(server: TritonServer, photos: dict[str, Path], top_k: int, check_answers: bool) -> list[str]:
    names, images = list(photos), [p.read_bytes() for p in photos.values()]
    problems, answers = [], {}
    for protocol, url in (("http", server.http_url), ("grpc", server.grpc_url)):
        with ImageClassifierClient(url, protocol) as client:
            start = time.perf_counter()
            results = client.classify(images, top_k=top_k)  # one request, all photos
            elapsed = time.perf_counter() - start
        print(f"\n== {protocol.upper()} {url}: {len(images)} photos in one request, {elapsed * 1000:.0f} ms")
        for name, top in zip(names, results):
            print(f"{name}")
            for p in top:
                print(f"    {p.score:7.2%}  {p.index:4d}  {p.label}")
            if check_answers and (problem := check(name, top)):
                problems.append(f"{protocol}: {problem}")
        answers[protocol] = [[p.index for p in top] for top in results]
    if answers["http"] != answers["grpc"]:
        problems.append("HTTP and gRPC returned different top-k classes")
    return problems


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-repository", default="model_repository", help="(default: %(default)s)")
    p.add_argument("--top-k", type=number(int, 1), default=5, help="(default: %(default)s)")
    p.add_argument("--no-check", dest="check", action="store_false",
                   help="skip the ImageNet answer checks (for models trained on other classes)")
    p.add_argument("--log-file", default=".run/demo-tritonserver.log", help="(default: %(default)s)")
    for name in ("http", "grpc", "metrics"):
        p.add_argument(f"--{name}-port", type=port_number, default=None, help="(default or 0: a free port)")
    return p


def demo_ports(args: argparse.Namespace) -> Ports:
    """The ports asked for; free loopback ports for the others."""
    free = Ports.free()
    return Ports(args.http_port or free.http, args.grpc_port or free.grpc, args.metrics_port or free.metrics)


def main(args: argparse.Namespace) -> int:
    photos = sample_photos([n for n in PHOTOS if n in sample_photos()])
    Path(args.log_file).parent.mkdir(parents=True, exist_ok=True)
    print(f"starting tritonserver on {args.model_repository} (log: {args.log_file}) ...")
    with TritonServer(args.model_repository, demo_ports(args), log_file=args.log_file) as server:
        print(f"ready: HTTP {server.http_url}, gRPC {server.grpc_url}, metrics {server.metrics_url}")
        problems = run_demo(server, photos, args.top_k, args.check)
    print("\nserver stopped.")
    if problems:
        print("DEMO FAILED:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 1
    print("demo OK: " + ("checks passed (chelsea -> cat in top 3, coffee -> espresso), " if args.check else "")
          + "HTTP and gRPC agree.")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(get_args_parser().parse_args()))
    except (ServerError, ClassificationError, OSError) as exc:
        sys.exit(f"clients.demo: {exc}")
