"""Paired rounds: the goal ratios measured again, every system in each round, so each ratio is taken
between measurements seconds apart rather than minutes.

`make bench` measures each system's sweep once, one system after another, over several minutes; on a
shared VM the machine itself speeds up and slows down in that time (docs/benchmarks.md), and a goal
line can flip within it. After the sweeps, each round measures every system once more, back to back
(the order rotated from round to round, so no system always goes first), and each ratio is taken
within its round: the in-process bound at its best batch and layout, the served systems at the
sweep's highest concurrency (see benchmarks.bench.bench_rounds). The median over the rounds is the
figure; the spread says how far the noise reaches, and a goal is met when it holds in every round.

    measures -> run_rounds(measures, n) -> paired_ratios(rounds) -> rounds_text(...)
"""
from __future__ import annotations

import dataclasses
import statistics
from typing import Callable

from benchmarks import report

# (name, numerator, denominators (the slowest of them), goal): the throughput goals, as in report.ratios
GOALS = (("Triton / in-process bound", report.ENSEMBLE_GRPC, (report.INPROCESS,), 0.9),
         ("ensemble / slowest member", report.ENSEMBLE_GRPC, (report.PREPROCESS, report.CLASSIFIER), 0.9),
         ("Triton fused pipeline / in-process bound", report.FUSED_GRPC, (report.INPROCESS,), 0.9),
         ("fused pipeline / its member alone", report.FUSED_GRPC, (report.FUSED_ALONE,), 0.9))
SYSTEMS = (report.INPROCESS, report.ENSEMBLE_GRPC, report.PREPROCESS, report.CLASSIFIER, report.FUSED_GRPC,
           report.FUSED_ALONE)  # what the goals above need


@dataclasses.dataclass(frozen=True)
class Measure:
    """One system to measure in each round: `run()` measures it once at `concurrency` and returns the
    point; it may raise one of `failures` (run_rounds tries it once more, then skips it in that round only)."""
    system: str
    concurrency: int
    run: Callable[[], report.Point]


@dataclasses.dataclass(frozen=True)
class PairedRatio:
    name: str
    goal: float
    values: tuple[float, ...]  # one per round that measured both sides

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    @property
    def verdict(self) -> str:
        met = sum(v >= self.goal for v in self.values)
        if met == len(self.values):
            return "met in every round"
        return "MISSED in every round" if met == 0 else f"met in {met} of {len(self.values)} rounds"


def point_label(system: str, concurrency: int) -> str:
    return f"batch {concurrency}" if system == report.INPROCESS else f"c={concurrency}"


def run_rounds(measures: list[Measure], rounds: int, failures: tuple[type[BaseException], ...] = (),
               log: Callable[[str], None] = print) -> list[dict[str, report.Point]]:
    """`rounds` rounds of every measure, round r starting at measure r (mod their count); one
    {system: point} per round. A measure that raises one of `failures` is tried once more at the end of its
    round (after the others: a stall of the machine has passed by then, and the pairing holds within the
    round); only when that fails too is it left out of that round."""
    results = []
    for r in range(rounds):
        start = r % len(measures) if measures else 0
        got: dict[str, report.Point] = {}

        def attempt(m: Measure, again: bool) -> bool:
            try:
                got[m.system] = point = m.run()
            except failures as exc:
                log(f"  round {r + 1}, {m.system}: " + ("skipped, failed twice: " if again else
                                                        "failed, tried again at the end of the round: ")
                    + _first_line(exc))
                return False
            log(f"  round {r + 1}, {m.system} ({point_label(m.system, m.concurrency)})"
                + (", tried again" if again else "") + f": {point.throughput:.1f} img/s, p99 {point.p99_ms:.1f} ms")
            return True

        failed = [m for m in measures[start:] + measures[:start] if not attempt(m, False)]
        for m in failed:
            attempt(m, True)
        results.append(got)
    return results


def _first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else repr(exc)


def paired_ratios(results: list[dict[str, report.Point]]) -> list[PairedRatio]:
    """Each goal's ratio within each round that measured its numerator and every denominator."""
    out = []
    for name, top, bottoms, goal in GOALS:
        values = tuple(r[top].throughput / min(r[b].throughput for b in bottoms) for r in results
                       if top in r and all(b in r and r[b].throughput > 0 for b in bottoms))
        if values:
            out.append(PairedRatio(name, goal, values))
    return out


def rounds_text(results: list[dict[str, report.Point]], measures: list[Measure]) -> str:
    """Markdown: the img/s of each system in each round, then each goal's paired ratio (median, range,
    verdict over the rounds). Empty without rounds."""
    if not results or not measures:
        return ""
    head = "| system | " + " | ".join(f"round {i + 1}" for i in range(len(results))) + " |\n"
    head += "|---|" + "---:|" * len(results) + "\n"
    rows = []
    for m in measures:
        label = f"{m.system}, {point_label(m.system, m.concurrency)}"
        rows.append(f"| {label} | " + " | ".join(_cell(r.get(m.system)) for r in results) + " |")
    lines = [f"- {p.name}: median {p.median:.2f} ({min(p.values):.2f}-{max(p.values):.2f} over {len(p.values)} "
             f"round(s); goal >= {p.goal}) {p.verdict}: " + ", ".join(f"{v:.2f}" for v in p.values)
             for p in paired_ratios(results)]
    intro = (f"Paired rounds ({len(results)}): every system again (the bound at its best batch, the served systems "
             "at the sweep's highest concurrency), back to back, the order rotated each round; each ratio is taken "
             "within one round (img/s, and in brackets the serving CPU ms per image, which rises when the machine "
             "slows down):\n\n")
    return intro + head + "\n".join(rows) + "\n\n" + ("\n".join(lines) + "\n" if lines else "")


def _cell(point: report.Point | None) -> str:
    if point is None:
        return "-"
    ms = point.cpu_ms_per_image
    return f"{point.throughput:.1f}" + (f" ({ms:.1f})" if ms else "")


def to_json(results: list[dict[str, report.Point]]) -> dict:
    return {"rounds": [{s: dataclasses.asdict(p) for s, p in r.items()} for r in results],
            "ratios": [dict(name=p.name, goal=p.goal, values=list(p.values), median=p.median, verdict=p.verdict)
                       for p in paired_ratios(results)]}


def plot(results: list[dict[str, report.Point]], path) -> "Path | None":
    """PNG: each goal's ratio in each round (dots), its median (bar) and the goal (dashed line); None
    without paired ratios."""
    from pathlib import Path

    ratios = paired_ratios(results)
    if not ratios:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    for i, p in enumerate(ratios):
        ax.bar(i, p.median, width=0.6, color="tab:blue" if p.median >= p.goal else "tab:orange", alpha=0.35)
        ax.scatter([i] * len(p.values), p.values, color="black", zorder=3, s=18)
        ax.hlines(p.goal, i - 0.35, i + 0.35, colors="red", linestyles="--")
        ax.annotate(f"{p.median:.2f}", (i, p.median), textcoords="offset points", xytext=(0, 4), ha="center",
                    fontsize=8)
    ax.set_xticks(range(len(ratios)), [p.name.replace(" / ", " /\n") for p in ratios], fontsize=8)
    ax.set_ylabel("ratio (throughput)")
    ax.set_title(f"goal ratios in {len(results)} paired round(s): dots per round, bar the median, "
                 "dashed the goal", fontsize=9)
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
