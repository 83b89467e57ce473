"""`make bench-scenario`: MLPerf's Server scenario on the served pipeline: the highest rate of requests arriving
at random (Poisson) that it answers within a p99 latency budget, beside its closed-loop capacity.

    python -m benchmarks.scenario                            # the repository make engines built, p99 budget 100 ms
    python -m benchmarks.scenario --p99-budget-ms 50 --protocol http --resolution 0.02
    python -m benchmarks.scenario --runs 3 --against /tmp/int8_repository   # two configurations, alternated

A closed-loop load (perf_analyzer's concurrency: a new request when one is answered) never offers more than the
server takes, so its p99 says nothing of the queue that forms when requests come as users send them. Here, as
in MLPerf's Server scenario, perf_analyzer sends requests open loop (`--async`) with exponential gaps between
them at a fixed mean rate (drawn here from the seed, the same draw at every rate), answered or not, and a rate
passes when every request is answered, the p99 over the run is within --p99-budget-ms and the answers keep up
with the rate (at least 85 % of it: a load generator or server that fell behind did not offer the rate). One
tritonserver on --model-repository (its queue policies as built: a request the server turns away as busy fails
the rate, as a lost query fails an MLPerf run). First the closed-loop capacity at --capacity-concurrency
(MLPerf's Offline figure); then the rate is searched: half the capacity, halved until one passes (down to a
sixteenth), or the capacity and 1.5x past it until one fails; then bisection until the passing and the failing
rate are --resolution of the capacity apart, at most --max-points runs. Each run is three windows of at least
--measurement-ms and at least --min-requests requests each, merged.

One search is not enough to compare configurations on a noisy machine (the answer moves by a third between
runs on a 2-core guest). --runs N searches each repository N times, and --against searches other repositories
alike: each round searches every repository once, one server at a time, the order rotated from round to round,
all with the gaps of the round's seed (--seed + round - 1); the report gives each repository's medians and
ranges over the rounds and each other repository against the first, round by round. Writes scenario.md (the
machine first), scenario.csv, scenario.json and scenario.png (p99 against the offered rate) to --out, and each
search's perf_analyzer files and server log in --out itself (one search) or in --out/round<r>-<repository>.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import re
import statistics
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


@dataclasses.dataclass(frozen=True)
class Run:
    """One search on one repository: its closed-loop capacity, then the rates measured."""
    repository: str  # its label in the report
    round: int  # 1, 2, ...
    seed: int  # the draw of the gaps, the same for every repository in a round
    capacity: float  # img/s closed loop
    capacity_p99_ms: float
    points: tuple[Point, ...]

    @property
    def found(self) -> Point | None:
        return best(list(self.points))


@dataclasses.dataclass(frozen=True)
class Spread:
    """A figure over the rounds: its median and range, and in how many rounds it exists."""
    values: tuple[float, ...]
    of: int  # rounds

    @property
    def median(self) -> float | None:
        return statistics.median(self.values) if self.values else None

    def text(self, spec: str) -> str:
        if not self.of:
            return "not searched"
        if not self.values:
            return f"none in {self.of} rounds"
        inside = "" if len(self.values) == 1 else f" ({min(self.values):{spec}}-{max(self.values):{spec}})"
        missing = "" if len(self.values) == self.of else f", {self.of - len(self.values)} of {self.of} rounds none"
        return f"{self.median:{spec}}{inside}{missing}"


def labels(repositories: list[str]) -> list[str]:
    """Each repository's name in the report: its directory's name, or its path where two names clash."""
    if len(set(map(_resolved, repositories))) < len(repositories):
        raise ValueError(f"a repository is given twice: {' '.join(repositories)}")
    names = [Path(r).resolve().name or str(r) for r in repositories]
    return names if len(set(names)) == len(names) else [str(r) for r in repositories]


def _resolved(path: str) -> str:
    return str(Path(path).resolve())


def schedule(count: int, runs: int) -> list[tuple[int, int]]:
    """(round, repository index) in the order to measure: every repository once a round, round r starting
    at repository r - 1 (mod their count), so no repository always goes first while the machine drifts."""
    return [(r + 1, (r + i) % count) for r in range(runs) for i in range(count)]


def spreads(runs: list[Run], repository: str) -> dict[str, Spread]:
    """One repository's capacity, highest passing rate and its share of the capacity over its rounds."""
    mine = [r for r in runs if r.repository == repository]
    found = [(r, r.found) for r in mine if r.found is not None]
    return {"capacity": Spread(tuple(r.capacity for r in mine), len(mine)),
            "rate": Spread(tuple(f.rate for _, f in found), len(mine)),
            "share": Spread(tuple(f.rate / r.capacity for r, f in found), len(mine))}


def paired(runs: list[Run], repository: str, reference: str) -> dict[str, Spread]:
    """`repository` against `reference` round by round (measured minutes apart, not a whole series apart):
    the ratio of their highest passing rates (rounds where both passed one) and of their capacities."""
    rounds = sorted({r.round for r in runs})
    by = {(r.repository, r.round): r for r in runs}
    pairs = [(by[repository, n], by[reference, n]) for n in rounds if (repository, n) in by and (reference, n) in by]
    rates = tuple(a.found.rate / b.found.rate for a, b in pairs if a.found and b.found)
    return {"rate": Spread(rates, len(pairs)),
            "capacity": Spread(tuple(a.capacity / b.capacity for a, b in pairs), len(pairs))}


def plot(runs: list[Run], budget_ms: float, title: str, path: Path) -> Path:
    """PNG: each rate's p99 against the rate offered, a colour per repository, passed (dots) and failed
    (crosses; a failed run without figures at the top edge), the rounds' median closed-loop capacity of each
    as a dotted line and the budget as a dashed one; a single run also shows its p50 and the order measured."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    measured = [p.p99_ms for r in runs for p in r.points if p.p99_ms is not None]
    top = max([budget_ms * 2, *measured])
    names = list(dict.fromkeys(r.repository for r in runs))
    colours = plt.get_cmap("tab10")
    for i, name in enumerate(names):
        points = [p for r in runs if r.repository == name for p in r.points]
        for passed, marker, verdict in ((True, "o", "passed"), (False, "x", "failed")):
            mine = [p for p in points if p.passed == passed]
            if mine:
                ax.scatter([p.rate for p in mine], [p.p99_ms if p.p99_ms is not None else top for p in mine],
                           color=colours(i), marker=marker, label=f"{name}: {verdict}", zorder=3)
        capacity = spreads(runs, name)["capacity"].median
        ax.axvline(capacity, color=colours(i), linestyle=":", label=f"{name}: closed-loop capacity {capacity:.1f}/s")
    if len(runs) == 1:
        answered = [p for p in runs[0].points if p.p50_ms is not None]
        if answered:
            ax.scatter([p.rate for p in answered], [p.p50_ms for p in answered], color="grey", marker="+",
                       label="p50")
        for i, p in enumerate(runs[0].points, 1):
            ax.annotate(str(i), (p.rate, p.p99_ms if p.p99_ms is not None else top), textcoords="offset points",
                        xytext=(4, 4), fontsize=8)
    ax.axhline(budget_ms, color="black", linestyle="--", label=f"p99 budget {budget_ms:g} ms")
    ax.set_xlabel("requests per second offered (Poisson arrivals)")
    ax.set_ylabel("latency (ms)" if len(runs) == 1 else "p99 latency (ms)")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
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


def verdict(run: Run) -> str:
    found = run.found
    if found:
        return (f"Highest rate within the budget: **{found.rate:.2f} requests/s** (p50 {found.p50_ms:.1f} ms, p99 "
                f"{found.p99_ms:.1f} ms, {found.throughput:.2f} answered/s), {found.rate / run.capacity:.2f} of the "
                f"closed-loop capacity.")
    lowest = min(p.rate for p in run.points)
    return (f"No rate passed: the lowest tried, {lowest:.2f} requests/s, is {lowest / run.capacity:.3f} of the "
            f"closed-loop capacity.")


def report_text(runs: list[Run], names: list[str], title: str, concurrency: int) -> str:
    """The markdown: for one run its verdict and table; for several, each repository's medians and ranges over
    the rounds, each later repository against the first round by round, then every run's verdict and table."""
    if len(runs) == 1:
        run = runs[0]
        return (f"# Server scenario: {title}\n\nClosed-loop capacity (concurrency {concurrency}): {run.capacity:.2f} "
                f"img/s, p99 {run.capacity_p99_ms:.1f} ms.\n\n{verdict(run)}\n\n{points_table(list(run.points))}\n")
    rounds = max(r.round for r in runs)
    lines = [f"# Server scenario: {title}", "",
             f"{rounds} rounds, each repository once a round (the order rotated from round to round, the gaps drawn "
             f"from the round's seed); medians over the rounds, the range in brackets.", "",
             f"| repository | closed-loop capacity img/s (concurrency {concurrency}) | highest rate within the budget "
             f"req/s | share of capacity |", "|---|---:|---:|---:|"]
    for name in names:
        s = spreads(runs, name)
        lines.append(f"| {name} | {s['capacity'].text('.1f')} | **{s['rate'].text('.2f')}** "
                     f"| {s['share'].text('.2f')} |")
    if len(names) > 1:
        lines += ["", f"Against {names[0]}, round by round:", "",
                  "| repository | highest rate within the budget, ratio | closed-loop capacity, ratio | each round |",
                  "|---|---:|---:|---|"]
        for name in names[1:]:
            pair = paired(runs, name, names[0])
            values = ", ".join(f"{v:.2f}" for v in pair["rate"].values) or "-"
            lines.append(f"| {name} / {names[0]} | **{pair['rate'].text('.2f')}** | {pair['capacity'].text('.2f')} "
                         f"| {values} |")
    for run in runs:
        lines += ["", f"## {run.repository}, round {run.round} (seed {run.seed})", "",
                  f"Closed-loop capacity: {run.capacity:.2f} img/s, p99 {run.capacity_p99_ms:.1f} ms. {verdict(run)}",
                  "", points_table(list(run.points))]
    return "\n".join(lines) + "\n"


def get_args_parser() -> argparse.ArgumentParser:
    from benchmarks.perf import DEFAULT_VENV
    from benchmarks.workload import ENCODINGS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-repository", default="model_repository", help="(default: %(default)s)")
    p.add_argument("--against", nargs="+", default=[], metavar="REPOSITORY",
                   help="other repositories to search alike, alternated with --model-repository round by round "
                        "and reported against it")
    p.add_argument("--runs", type=number(int, 1), default=1,
                   help="rounds: searches of each repository, each with the gaps of seed --seed + its round - 1 "
                        "(default: %(default)s)")
    p.add_argument("--model", default=None, help="the model to load (default: each repository's ensemble)")
    p.add_argument("--protocol", default="grpc", choices=("grpc", "http"), help="(default: %(default)s)")
    p.add_argument("--p99-budget-ms", type=number(float, 0, above_low=True), default=100.0,
                   help="the latency bound a rate must hold at its 99th percentile (default: %(default)s)")
    p.add_argument("--capacity-concurrency", type=number(int, 1), default=8,
                   help="closed-loop requests in flight for the capacity (default: %(default)s)")
    p.add_argument("--resolution", type=number(float, 0, above_low=True), default=0.05,
                   help="stop when the passing and failing rates are this share of the capacity apart "
                        "(default: %(default)s)")
    p.add_argument("--max-points", type=number(int, 1), default=10,
                   help="rates measured at most (default: %(default)s)")
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


def search_one(args: argparse.Namespace, tool, repository: str, model: str, name: str, round_: int, seed: int,
               out: Path) -> Run:
    """One tritonserver on `repository`: `model`'s closed-loop capacity, then the search; perf_analyzer's files
    and the server's log in `out`."""
    from benchmarks.perf import PerfAnalyzerError, photo_inputs, takes_photos
    from benchmarks.workload import load_photos
    from serving.server import TritonServer

    out.mkdir(parents=True, exist_ok=True)
    with TritonServer(repository, log_file=out / "tritonserver.log") as server:
        url = server.grpc_url if args.protocol == "grpc" else server.http_url
        inputs = photo_inputs(list(load_photos(args.photos).values()), out) \
            if takes_photos(url, args.protocol, model) else None
        tool.warm_up(model, url, args.protocol, args.capacity_concurrency, out / "warm_up.csv", inputs)
        closed = tool.measure(model, url, args.protocol, args.capacity_concurrency, out / "capacity.csv", inputs,
                              args.measurement_ms)
        if closed.throughput <= 0:
            raise RuntimeError(f"{model} answered nothing in the closed-loop run; see {out / 'tritonserver.log'}")
        print(f"{name}, round {round_}: closed loop, concurrency {args.capacity_concurrency}: "
              f"{closed.throughput:.1f} img/s, p99 {closed.p99_ms:.1f} ms", flush=True)

        def measure(rate: float) -> Point:
            window = window_for(rate, args.measurement_ms, args.min_requests)
            try:
                r = tool.measure_rate(model, url, args.protocol, rate, out / f"rate_{rate:.2f}.csv", inputs, window,
                                      seed=seed)
                point = judge(rate, r.throughput, r.p50_ms, r.p99_ms, args.p99_budget_ms, window)
            except PerfAnalyzerError as exc:
                point = dataclasses.replace(failure(rate, str(exc)), window_ms=window)
            print(f"{rate:8.2f} req/s offered: {'PASS' if point.passed else 'FAIL'} ({point.reason})", flush=True)
            return point

        points = search(measure, closed.throughput, args.resolution, args.max_points)
    return Run(name, round_, seed, closed.throughput, closed.p99_ms, tuple(points))


def write_report(out: Path, args: argparse.Namespace, repositories: list[str], names: list[str], models: list[str],
                 runs: list[Run], stopped: str | None = None) -> str:
    """scenario.md, .csv, .json and .png of the searches done (`runs`, each repository's rounds in order), and
    why the rest were not (`stopped`)."""
    title = (f"{', '.join(dict.fromkeys(models))}, Poisson arrivals over {args.protocol}, "
             f"p99 budget {args.p99_budget_ms:g} ms")
    text = report_text(runs, names, title, args.capacity_concurrency)
    if stopped:
        text = text.replace("\n\n", f"\n\n**{stopped}**\n\n", 1)
    write_markdown(out / "scenario.md", text)
    write_csv(out / "scenario.csv", ["repository", "round", "seed", *[f.name for f in dataclasses.fields(Point)]],
              [{"repository": r.repository, "round": r.round, "seed": r.seed, **dataclasses.asdict(p)}
               for r in runs for p in r.points])

    def figures(s: dict[str, Spread]) -> dict:
        return {k: {"median": v.median, "values": list(v.values), "rounds": v.of} for k, v in s.items()}

    write_json(out / "scenario.json", {
        "protocol": args.protocol, "p99_budget_ms": args.p99_budget_ms,
        "capacity_concurrency": args.capacity_concurrency, "stopped": stopped,
        "repositories": {n: {"path": r, "model": m} for n, r, m in zip(names, repositories, models)},
        "runs": [{"repository": r.repository, "round": r.round, "seed": r.seed, "capacity": r.capacity,
                  "capacity_p99_ms": r.capacity_p99_ms, "best": dataclasses.asdict(r.found) if r.found else None,
                  "points": [dataclasses.asdict(p) for p in r.points]} for r in runs],
        "summary": {name: figures(spreads(runs, name)) for name in names},
        "against": {name: figures(paired(runs, name, names[0])) for name in names[1:]}})
    plot(runs, args.p99_budget_ms, title, out / "scenario.png")
    return text


def main(args: argparse.Namespace) -> list[Run]:
    from benchmarks.locust_run import ensemble_name
    from benchmarks.perf import PerfAnalyzer

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    repositories = [args.model_repository, *args.against]
    names = labels(repositories)
    models = [args.model or ensemble_name(r) for r in repositories]
    tool = PerfAnalyzer.locate(args.perf_venv)
    order = schedule(len(repositories), args.runs)
    runs: list[Run] = []
    for round_, i in order:
        here = out if len(order) == 1 else out / f"round{round_}-{names[i].replace('/', '_')}"
        try:
            runs.append(search_one(args, tool, repositories[i], models[i], names[i], round_, args.seed + round_ - 1,
                                   here))
        except BaseException as exc:  # a server that would not start, a closed loop that answered nothing, Ctrl-C
            if runs:
                runs.sort(key=lambda r: (names.index(r.repository), r.round))
                why = str(exc).splitlines()[0].rstrip(":") if str(exc) else type(exc).__name__
                write_report(out, args, repositories, names, models, runs,
                             f"Stopped after {len(runs)} of {len(order)} searches, at {names[i]}, round {round_}: "
                             f"{why}")
                print(f"the {len(runs)} searches done are in {out / 'scenario.md'}", file=sys.stderr)
            raise
    runs.sort(key=lambda r: (names.index(r.repository), r.round))
    print(write_report(out, args, repositories, names, models, runs))
    return runs


if __name__ == "__main__":
    try:
        main(get_args_parser().parse_args())
    except (OSError, ValueError, RuntimeError) as exc:
        sys.exit(f"benchmarks.scenario: {exc}")
