"""The benchmark's one table, its ratios and its plot, from a list of measured points.

    points -> table(points) (text), ratios(points) (goals), plot(points, png), write(results, folder)

Every benchmark writes its JSON and markdown through write_json and write_markdown, which name the
machine it ran on: a "machine" object (common.cpu.machine) in the JSON, a first line in the markdown.

A Point is one measured load level of one system: `concurrency` is requests in flight
(perf_analyzer concurrency, Locust users) or, for the in-process bound, the batch size.
"""
from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

from common import cpu

# system names, in table order
INPROCESS = "in-process bound"
PREPROCESS = "preprocess alone (gRPC, perf_analyzer)"
CLASSIFIER = "classifier alone (gRPC, perf_analyzer)"
ENSEMBLE_GRPC = "Triton ensemble gRPC (perf_analyzer)"
ENSEMBLE_HTTP = "Triton ensemble HTTP (perf_analyzer)"
LOCUST_GRPC = "Triton ensemble gRPC (Locust)"
LOCUST_HTTP = "Triton ensemble HTTP (Locust)"
FUSED_GRPC = "Triton fused pipeline gRPC (perf_analyzer)"
FUSED_ALONE = "fused model alone (gRPC, perf_analyzer)"
FUSED_HTTP = "Triton fused pipeline HTTP (Locust)"
FASTAPI = "FastAPI + ONNX Runtime (Locust)"
SYSTEMS = (INPROCESS, PREPROCESS, CLASSIFIER, ENSEMBLE_GRPC, ENSEMBLE_HTTP, LOCUST_GRPC, LOCUST_HTTP, FUSED_ALONE,
           FUSED_GRPC, FUSED_HTTP, FASTAPI)


@dataclasses.dataclass
class Point:
    system: str
    concurrency: int  # requests in flight (or batch size for the in-process bound)
    throughput: float  # images per second
    p50_ms: float
    p90_ms: float
    p99_ms: float
    requests: int = 0
    failures: int = 0
    server_cpu_percent: float | None = None  # CPU of the serving process tree, 100 = one core
    server_peak_rss_mb: float | None = None
    client_cpu_percent: float | None = None  # the load generator's CPU (same cores)

    @property
    def cpu_ms_per_image(self) -> float | None:
        """Serving CPU time per image: comparable across systems even when others share the cores."""
        if not self.server_cpu_percent or not self.throughput:
            return None
        return 10.0 * self.server_cpu_percent / self.throughput


@dataclasses.dataclass(frozen=True)
class Ratio:
    name: str
    value: float | None
    goal: float | None
    detail: str

    @property
    def verdict(self) -> str:
        if self.value is None:
            return "n/a"
        return "-" if self.goal is None else ("met" if self.value >= self.goal else "MISSED")


def by_system(points: list[Point]) -> dict[str, list[Point]]:
    grouped = {}
    for p in sorted(points, key=lambda p: (SYSTEMS.index(p.system) if p.system in SYSTEMS else 99, p.concurrency)):
        grouped.setdefault(p.system, []).append(p)
    return grouped


def best(points: list[Point], system: str, max_p99_ms: float | None = None) -> Point | None:
    """The highest-throughput point of `system` (with p99 <= max_p99_ms if given); points that served
    nothing or had failures never count."""
    mine = [p for p in points if p.system == system and p.failures == 0 and p.throughput > 0
            and (max_p99_ms is None or p.p99_ms <= max_p99_ms)]
    return max(mine, key=lambda p: p.throughput, default=None)


def machine_line(machine: dict) -> str:
    """A report's first line: the CPU, its speed flags and cores, from common.cpu.machine()."""
    return (f"Machine: {machine['cpu']}; flags: {' '.join(machine['flags']) or 'none of the speed flags'}; "
            f"{machine['cores']} cores, {machine['cores_usable']} usable by this run")


def write_csv(path: str | Path, fieldnames: list[str], rows) -> Path:
    """`rows` (dicts) as CSV with these columns; keys outside them are left out."""
    path = Path(path)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fieldnames, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_json(path: str | Path, doc: dict) -> Path:
    """`doc` as JSON, with a "machine" object first."""
    path = Path(path)
    path.write_text(json.dumps({"machine": cpu.machine(), **doc}, indent=2) + "\n")
    return path


def write_markdown(path: str | Path, text: str) -> Path:
    """`text` as markdown, under a first line naming the machine."""
    path = Path(path)
    path.write_text(machine_line(cpu.machine()) + "\n\n" + text)
    return path


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(points: list[Point]) -> str:
    """Markdown table: one row per system and load level."""
    head = ("| system | conc. | img/s | p50 ms | p90 ms | p99 ms | failures | server CPU% | CPU ms/img "
            "| server peak RSS MB | client CPU% |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n")
    rows = []
    for system, mine in by_system(points).items():
        for p in mine:
            rows.append(f"| {system} | {p.concurrency} | {p.throughput:.1f} | {p.p50_ms:.1f} | {p.p90_ms:.1f} | "
                        f"{p.p99_ms:.1f} | {p.failures} | {_fmt(p.server_cpu_percent, '.0f')} | "
                        f"{_fmt(p.cpu_ms_per_image, '.1f')} | "
                        f"{_fmt(p.server_peak_rss_mb, '.0f')} | {_fmt(p.client_cpu_percent, '.0f')} |")
    return head + "\n".join(rows) + "\n"


def ratios(points: list[Point], cores: int = 2) -> list[Ratio]:
    """The goals: Triton vs the in-process bound, vs its slowest member, vs FastAPI at <= p99; and
    the same in CPU time per image (robust to other load on the machine)."""
    out = []
    ens, bound = best(points, ENSEMBLE_GRPC), best(points, INPROCESS)
    if ens and bound:
        out.append(Ratio("Triton / in-process bound", ens.throughput / bound.throughput, 0.9,
                         f"{ens.throughput:.1f} img/s (c={ens.concurrency}) / {bound.throughput:.1f} img/s "
                         f"(batch {bound.concurrency})"))
    else:
        out.append(Ratio("Triton / in-process bound", None, 0.9, "needs perf_analyzer and the in-process rows"))
    members = [m for m in (best(points, PREPROCESS), best(points, CLASSIFIER)) if m]
    # What the ensemble spends per image (server, preprocess and classifier processes, as measured in
    # it) caps it on `cores` cores, where the slowest member alone has every core for its own work.
    # (Not the members' costs measured alone, added up: alone, the classifier's server also decodes
    # its 600 KB input tensor from gRPC, so that sum can exceed the ensemble's own cost.)
    ceiling = 1000.0 * cores / ens.cpu_ms_per_image if ens and ens.cpu_ms_per_image else None
    if ens and len(members) == 2:
        slowest = min(members, key=lambda m: m.throughput)
        detail = f"{ens.throughput:.1f} / {slowest.throughput:.1f} img/s ({slowest.system.split(' (')[0]})"
        if ceiling and ceiling < 0.9 * slowest.throughput:
            detail += (f"; out of reach on {cores} cores at this cost: the ensemble spends "
                       f"{ens.cpu_ms_per_image:.1f} ms of CPU per image (server and both members), so it cannot "
                       f"pass {ceiling:.0f} img/s = {ceiling / slowest.throughput:.2f} of the slowest, which alone "
                       f"has every core for its own work")
        out.append(Ratio("ensemble / slowest member", ens.throughput / slowest.throughput, 0.9, detail))
    else:
        out.append(Ratio("ensemble / slowest member", None, 0.9, "needs perf_analyzer rows"))
    if ens and bound and ens.cpu_ms_per_image and bound.cpu_ms_per_image:
        out.append(Ratio("CPU efficiency, in-process / Triton (CPU ms per image)",
                         bound.cpu_ms_per_image / ens.cpu_ms_per_image, None,
                         f"{bound.cpu_ms_per_image:.1f} / {ens.cpu_ms_per_image:.1f} ms: what the ratio above "
                         "would be with the same cores free for both"))
    fused, fused_alone = best(points, FUSED_GRPC), best(points, FUSED_ALONE)
    if fused and bound:
        out.append(Ratio("Triton fused pipeline / in-process bound", fused.throughput / bound.throughput, 0.9,
                         f"{fused.throughput:.1f} img/s (c={fused.concurrency}) / {bound.throughput:.1f} img/s"))
    if fused and fused_alone:
        out.append(Ratio("fused pipeline / its member alone", fused.throughput / fused_alone.throughput, 0.9,
                         f"{fused.throughput:.1f} / {fused_alone.throughput:.1f} img/s: what the ensemble step costs"))
    if fused and bound and fused.cpu_ms_per_image and bound.cpu_ms_per_image:
        out.append(Ratio("CPU efficiency, in-process / fused pipeline (CPU ms per image)",
                         bound.cpu_ms_per_image / fused.cpu_ms_per_image, None,
                         f"{bound.cpu_ms_per_image:.1f} / {fused.cpu_ms_per_image:.1f} ms"))
    if fused and ens:
        out.append(Ratio("fused pipeline / ensemble", fused.throughput / ens.throughput, None,
                         f"{fused.throughput:.1f} / {ens.throughput:.1f} img/s, both gRPC perf_analyzer"))
    fastapi = best(points, FASTAPI)
    labels = {LOCUST_HTTP: "HTTP", LOCUST_GRPC: "gRPC", FUSED_HTTP: "fused pipeline, HTTP"}
    for system in (LOCUST_HTTP, LOCUST_GRPC, FUSED_HTTP):
        name = f"Triton / FastAPI ({labels[system]}, p99 <= FastAPI's)"
        triton = best(points, system, max_p99_ms=fastapi.p99_ms) if fastapi else None
        if fastapi and triton:
            goal = 1.5 if system != LOCUST_GRPC else None
            detail = (f"{triton.throughput:.1f} img/s p99 {triton.p99_ms:.0f} ms (u={triton.concurrency}) / "
                      f"{fastapi.throughput:.1f} img/s p99 {fastapi.p99_ms:.0f} ms (u={fastapi.concurrency})")
            if goal and bound and goal * fastapi.throughput > bound.throughput:
                detail += (f"; out of reach on this machine: {goal} x FastAPI = {goal * fastapi.throughput:.0f} "
                           f"img/s is more than the in-process bound ({bound.throughput:.0f} img/s) for the same work")
            out.append(Ratio(name, triton.throughput / fastapi.throughput, goal, detail))
        elif fastapi and any(p.system == system for p in points):
            out.append(Ratio(name, 0.0, 1.5 if system != LOCUST_GRPC else None,
                             f"no Triton point has p99 <= FastAPI's {fastapi.p99_ms:.0f} ms"))
    return out


def ratio_lines(rs: list[Ratio]) -> str:
    return "\n".join(f"- {r.name}: {_fmt(r.value, '.2f')}"
                     f"{'' if r.goal is None else f' (goal >= {r.goal})'} {r.verdict}: {r.detail}" for r in rs) + "\n"


def plot(points: list[Point], path: str | Path, title: str = "latency vs throughput") -> Path:
    """PNG: p50 and p99 latency against throughput, one line per system, labelled by concurrency."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(14, 5.5), sharex=True)
    palette = plt.get_cmap("tab20").colors  # 20 colours: more systems than the default cycle's 10
    for i, (system, mine) in enumerate(by_system(points).items()):
        style = dict(color="black", linestyle="--", marker="s") if system == INPROCESS else dict(
            color=palette[(2 * i) % 20 + (2 * i) // 20 % 2], marker="o^vD"[i % 4])
        for ax, key in zip(axes, ("p50_ms", "p99_ms")):
            xs, ys = [p.throughput for p in mine], [getattr(p, key) for p in mine]
            (line,) = ax.plot(xs, ys, label=system, **style)
            for p, x, y in zip(mine, xs, ys):
                ax.annotate(str(p.concurrency), (x, y), textcoords="offset points", xytext=(3, 3),
                            fontsize=7, color=line.get_color())
    for ax, name in zip(axes, ("p50", "p99")):
        ax.set_xlabel("throughput (images/s)")
        ax.set_ylabel(f"{name} latency (ms)")
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
        ax.set_title(f"{name} latency (labels: concurrency, or batch for the in-process bound)", fontsize=9)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write(points: list[Point], folder: str | Path, extra: dict | None = None, name: str = "bench",
          cores: int = 2) -> dict[str, Path]:
    """bench.csv (points), bench.json (machine, points, ratios, extra), bench.md (machine, table, ratios),
    bench.png."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    files = {k: folder / f"{name}.{k}" for k in ("csv", "json", "md", "png")}
    write_csv(files["csv"], [x.name for x in dataclasses.fields(Point)], (dataclasses.asdict(p) for p in points))
    rs = ratios(points, cores)
    write_json(files["json"], {"points": [dataclasses.asdict(p) for p in points],
                               "ratios": [dict(dataclasses.asdict(r), verdict=r.verdict) for r in rs], **(extra or {})})
    write_markdown(files["md"], table(points) + "\n" + ratio_lines(rs))
    plot(points, files["png"])
    return files
