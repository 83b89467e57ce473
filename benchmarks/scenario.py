"""`make bench-scenario`: MLPerf's Server scenario on the served pipeline: the highest rate of requests arriving
at random (Poisson) that it answers within a p99 latency budget, beside its closed-loop capacity.

    python -m benchmarks.scenario                            # the repository make engines built, p99 budget 100 ms
    python -m benchmarks.scenario --p99-budget-ms 50 --protocol http --resolution 0.02

A closed-loop load (perf_analyzer's concurrency: a new request when one is answered) never offers more than the
server takes, so its p99 says nothing of the queue that forms when requests come as users send them. Here, as
in MLPerf's Server scenario, perf_analyzer sends requests open loop (`--async`) with exponential gaps between
them at a fixed mean rate (drawn here from --seed, the same draw at every rate), answered or not, and a rate passes when every request is answered, the p99 over
the run is within --p99-budget-ms and the answers keep up with the rate (at least 85 % of it: a load generator
or server that fell behind did not offer the rate). One tritonserver on --model-repository (its queue
policies as built: a request the server turns away as busy fails the rate, as a lost query fails an MLPerf
run). First the closed-loop capacity at --capacity-concurrency (MLPerf's Offline figure); then the rate is
searched: half the capacity, halved until one passes (down to a sixteenth), or the capacity and 1.5x past
it until one fails; then bisection until the passing and the failing rate are --resolution of the capacity
apart, at most --max-points runs. Each run is three windows of at least --measurement-ms and at least
--min-requests requests each, merged. Writes scenario.md (the machine first), scenario.csv, scenario.json
and scenario.png (p99 against the offered rate) to --out.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import re
import sys
from pathlib import Path
from typing import Callable

from benchmarks.report import write_csv, write_json, write_markdown
from serving.health import number

KEEP_UP = 0.85  # answers per second / offered rate below which the rate was not really offered
THREAD_ERROR = re.compile(r"^Thread \[\d+\] had error: ")  # how perf_analyzer starts a request's error
BUSY = ("Exceeds maximum queue size", "Request timeout expired", "Server is busy", "UNAVAILABLE")


@dataclasses.dataclass(frozen=True)
class Point:
    rate: float  # requests per second offered
    passed: bool
    reason: str
    throughput: float | None = None  # images per second answered
    p50_ms: float | None = None
    p99_ms: float | None = None
    window_ms: int | None = None


def search(measure: Callable[[float], Point], capacity: float, resolution: float, max_points: int) -> list[Point]:
    """The rates measured (by `measure`), in order: half of `capacity`, halved while it fails (not below a
    sixteenth), or the capacity and on by 1.5x while it passes; then bisection between the highest passing
    and the lowest failing rate until they are `resolution` (a share of `capacity`) apart or `max_points`
    rates were measured."""
    points: list[Point] = []

    def run(rate: float) -> bool:
        points.append(measure(rate))
        return points[-1].passed

    passing = failing = None
    rate = capacity / 2
    while passing is None and len(points) < max_points and rate >= capacity / 16:
        if run(rate):
            passing = rate
        else:
            failing, rate = rate, rate / 2
    if passing is None:
        return points
    rate = capacity
    while failing is None and len(points) < max_points:
        if run(rate):
            passing, rate = rate, rate * 1.5
        else:
            failing = rate
    while failing is not None and failing - passing > resolution * capacity and len(points) < max_points:
        rate = (passing + failing) / 2
        if run(rate):
            passing = rate
        else:
            failing = rate
    return points


def best(points: list[Point]) -> Point | None:
    """The highest rate that passed below every rate that failed (the search's answer), or None."""
    ceiling = min((p.rate for p in points if not p.passed), default=math.inf)
    return max((p for p in points if p.passed and p.rate < ceiling), key=lambda p: p.rate, default=None)


def failure(rate: float, message: str) -> Point:
    """A rate perf_analyzer could not finish, with why: the server turned requests away (busy), the
    latency kept growing, or perf_analyzer's own first line."""
    first = message.splitlines()[0] if message else "no output"
    if any(word in message for word in BUSY):
        line = next(line.strip() for line in reversed(message.splitlines()) if any(word in line for word in BUSY))
        return Point(rate, False, f"the server turned requests away: {THREAD_ERROR.sub('', line)}")
    if "stable measurement" in message:
        return Point(rate, False, "the latency did not settle (a queue that kept growing)")
    return Point(rate, False, first)


def judge(rate: float, throughput: float, p50_ms: float, p99_ms: float, budget_ms: float, window_ms: int) -> Point:
    """A rate that perf_analyzer finished passes when its p99 is within the budget and its answers kept up."""
    figures = dict(throughput=throughput, p50_ms=p50_ms, p99_ms=p99_ms, window_ms=window_ms)
    if p99_ms > budget_ms:
        return Point(rate, False, f"p99 {p99_ms:.1f} ms over the {budget_ms:g} ms budget", **figures)
    if throughput < KEEP_UP * rate:
        return Point(rate, False, f"answered {throughput:.1f}/s of {rate:.1f}/s offered", **figures)
    return Point(rate, True, f"p99 {p99_ms:.1f} ms within the {budget_ms:g} ms budget", **figures)


def window_for(rate: float, measurement_ms: int, min_requests: int) -> int:
    """A window of at least `measurement_ms` that holds about `min_requests` requests at `rate`."""
    return max(measurement_ms, math.ceil(1000 * min_requests / rate))


def plot(points: list[Point], capacity: float, budget_ms: float, title: str, path: Path) -> Path:
    """PNG: each rate's p99 against the rate offered, passed and failed apart (a failed run without figures at
    the top edge), its p50 in grey, the budget and the closed-loop capacity as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    measured = [p.p99_ms for p in points if p.p99_ms is not None]
    top = max([budget_ms * 2, *measured])
    for passed, colour, label in ((True, "tab:green", "passed"), (False, "tab:red", "failed")):
        mine = [p for p in points if p.passed == passed]
        if mine:
            ax.scatter([p.rate for p in mine], [p.p99_ms if p.p99_ms is not None else top for p in mine],
                       color=colour, label=label, zorder=3)
    answered = [p for p in points if p.p50_ms is not None]
    if answered:
        ax.scatter([p.rate for p in answered], [p.p50_ms for p in answered], color="grey", marker="x", label="p50")
    for i, p in enumerate(points, 1):
        ax.annotate(str(i), (p.rate, p.p99_ms if p.p99_ms is not None else top), textcoords="offset points",
                    xytext=(4, 4), fontsize=8)
    ax.axhline(budget_ms, color="black", linestyle="--", label=f"p99 budget {budget_ms:g} ms")
    ax.axvline(capacity, color="tab:blue", linestyle=":", label=f"closed-loop capacity {capacity:.1f}/s")
    ax.set_xlabel("requests per second offered (Poisson arrivals)")
    ax.set_ylabel("latency (ms)")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def points_table(points: list[Point]) -> str:
    fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    lines = ["| # | offered req/s | answered img/s | p50 ms | p99 ms | window ms | verdict |",
             "|---:|---:|---:|---:|---:|---:|---|"]
    lines += [f"| {i} | {p.rate:.2f} | {fmt(p.throughput, '.2f')} | {fmt(p.p50_ms, '.1f')} | {fmt(p.p99_ms, '.1f')} "
              f"| {fmt(p.window_ms, 'd')} | {'PASS' if p.passed else 'FAIL'}: {p.reason} |"
              for i, p in enumerate(points, 1)]
    return "\n".join(lines)


def get_args_parser() -> argparse.ArgumentParser:
    from benchmarks.perf import DEFAULT_VENV
    from benchmarks.workload import ENCODINGS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-repository", default="model_repository", help="(default: %(default)s)")
    p.add_argument("--model", default=None, help="the model to load (default: the repository's ensemble)")
    p.add_argument("--protocol", default="grpc", choices=("grpc", "http"), help="(default: %(default)s)")
    p.add_argument("--p99-budget-ms", type=number(float, 0, above_low=True), default=100.0,
                   help="the latency bound a rate must hold at its 99th percentile (default: %(default)s)")
    p.add_argument("--capacity-concurrency", type=number(int, 1), default=8,
                   help="closed-loop requests in flight for the capacity (default: %(default)s)")
    p.add_argument("--resolution", type=number(float, 0, above_low=True), default=0.05,
                   help="stop when the passing and failing rates are this share of the capacity apart "
                        "(default: %(default)s)")
    p.add_argument("--max-points", type=number(int, 1), default=10, help="rates measured at most (default: %(default)s)")
    p.add_argument("--measurement-ms", type=number(int, 1), default=4000,
                   help="shortest perf_analyzer window (default: %(default)s)")
    p.add_argument("--min-requests", type=number(int, 1), default=100,
                   help="requests a window holds at least, at the rate measured (default: %(default)s)")
    p.add_argument("--seed", type=number(int, 0), default=0,
                   help="the draw of the gaps between requests, the same at every rate (default: %(default)s)")
    p.add_argument("--photos", default="jpeg", choices=ENCODINGS, help="(default: %(default)s)")
    p.add_argument("--perf-venv", default=DEFAULT_VENV, help="tool environment (default: %(default)s)")
    p.add_argument("--out", default="benchmarks/results/scenario", help="(default: %(default)s)")
    return p


def main(args: argparse.Namespace) -> Point | None:
    from benchmarks.locust_run import ensemble_name
    from benchmarks.perf import PerfAnalyzer, PerfAnalyzerError, photo_inputs, takes_photos
    from benchmarks.workload import load_photos
    from serving.server import TritonServer

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tool = PerfAnalyzer.locate(args.perf_venv)
    model = args.model or ensemble_name(args.model_repository)
    with TritonServer(args.model_repository, log_file=out / "tritonserver.log") as server:
        url = server.grpc_url if args.protocol == "grpc" else server.http_url
        inputs = photo_inputs(list(load_photos(args.photos).values()), out) \
            if takes_photos(url, args.protocol, model) else None
        tool.warm_up(model, url, args.protocol, args.capacity_concurrency, out / "warm_up.csv", inputs)
        closed = tool.measure(model, url, args.protocol, args.capacity_concurrency, out / "capacity.csv", inputs,
                              args.measurement_ms)
        if closed.throughput <= 0:
            raise RuntimeError(f"{model} answered nothing in the closed-loop run; see {out / 'tritonserver.log'}")
        print(f"closed loop, concurrency {args.capacity_concurrency}: {closed.throughput:.1f} img/s, "
              f"p99 {closed.p99_ms:.1f} ms", flush=True)

        def measure(rate: float) -> Point:
            window = window_for(rate, args.measurement_ms, args.min_requests)
            try:
                r = tool.measure_rate(model, url, args.protocol, rate, out / f"rate_{rate:.2f}.csv", inputs, window,
                                      seed=args.seed)
                point = judge(rate, r.throughput, r.p50_ms, r.p99_ms, args.p99_budget_ms, window)
            except PerfAnalyzerError as exc:
                point = dataclasses.replace(failure(rate, str(exc)), window_ms=window)
            print(f"{rate:8.2f} req/s offered: {'PASS' if point.passed else 'FAIL'} ({point.reason})", flush=True)
            return point

        points = search(measure, closed.throughput, args.resolution, args.max_points)
    found = best(points)
    title = (f"{model}, Poisson arrivals over {args.protocol}, p99 budget {args.p99_budget_ms:g} ms")
    verdict = (f"Highest rate within the budget: **{found.rate:.2f} requests/s** (p50 {found.p50_ms:.1f} ms, p99 "
               f"{found.p99_ms:.1f} ms, {found.throughput:.2f} answered/s), {found.rate / closed.throughput:.2f} of "
               f"the closed-loop capacity." if found else
               f"No rate passed: the lowest tried, {min(p.rate for p in points):.2f} requests/s, is "
               f"{min(p.rate for p in points) / closed.throughput:.3f} of the closed-loop capacity.")
    text = (f"# Server scenario: {title}\n\nClosed-loop capacity (concurrency {args.capacity_concurrency}): "
            f"{closed.throughput:.2f} img/s, p99 {closed.p99_ms:.1f} ms.\n\n{verdict}\n\n{points_table(points)}\n")
    write_markdown(out / "scenario.md", text)
    write_csv(out / "scenario.csv", [f.name for f in dataclasses.fields(Point)], [dataclasses.asdict(p) for p in points])
    write_json(out / "scenario.json", {
        "model": model, "protocol": args.protocol, "p99_budget_ms": args.p99_budget_ms,
        "capacity": {"concurrency": args.capacity_concurrency, "throughput": closed.throughput,
                     "p99_ms": closed.p99_ms},
        "best": dataclasses.asdict(found) if found else None, "points": [dataclasses.asdict(p) for p in points]})
    plot(points, closed.throughput, args.p99_budget_ms, title, out / "scenario.png")
    print(text)
    return found


if __name__ == "__main__":
    try:
        main(get_args_parser().parse_args())
    except (OSError, ValueError, RuntimeError) as exc:
        sys.exit(f"benchmarks.scenario: {exc}")
