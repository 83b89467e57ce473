"""`make bench-overload`: what a bounded queue does past saturation, measured with Locust.

    python -m benchmarks.overload                         # the repository make engines built, loads 1x 2x 4x
    python -m benchmarks.overload --loads 1 2 4 --run-time 20 --saturation-users 8

Five repositories are written from the served repository's spec: `bounded` (the spec's queue policy,
DeploymentSpec.queue_policy: a full queue or a request past its queue timeout is answered "busy",
HTTP 503 / gRPC UNAVAILABLE; its stubs' priorities, DeploymentSpec.nice), `unbounded` (no queue limit,
no timeout: every request waits), `same-priority` (bounded, but every python stub at tritonserver's
own priority: what lowering the stubs does for the busy answers) and `flat-stubs` (bounded, the
preprocess stubs at the classifier's priority rather than below it: what that does for the requests
turned away after preprocessing) and `budget-door` (bounded, but the door, the first model's queue,
holds only what the server answers within --p99-budget-ms at the saturating rate: the upper bound
docs/operations.md gives a door for a latency budget, against the deployed door that takes bursts). Locust runs in this process: FastHttpUser greenlets, one connection each, posting Triton's HTTP binary-tensor
request (one real photo, top-k asked as JSON); an answer counts as accepted (200 with k predictions),
busy (503 naming the full queue or the queue timeout) or error (anything else).

The saturating rate R is the accepted req/s of `--saturation-users` closed-loop users (no wait) on the
unbounded server (on a bounded one, users answered "busy" would send again at once). Load k offers k x R req/s open loop: `ceil(k R x --pacing-s)` users, each starting one
request every `--pacing-s` seconds on a grid of its own, at a phase drawn at random, so that requests
arrive spread over time (users in step send one burst of every user per period, which a bounded queue
mostly turns away while the server idles between bursts: Locust's constant_pacing counts its first
period from the user's creation, so it brings randomly started users back into step after one period);
a user whose request takes longer than a period skips the slots it missed, so the rate actually sent
(every request started, those still unanswered when Locust stops included) is reported beside the
rate offered, and so is the largest burst (requests started in any 100 ms). Between loads, the server's
queues drain (its pending-request gauge reaches 0). Writes overload.csv, overload.md (the machine,
figures and ratios) and overload.png to --out.

On one machine Locust takes CPU from the server it measures, and how long a "busy" answer takes is then
partly Locust's wait for a core. `--server-cpus 0 --client-cpus 1` pins them apart (the server and its
stubs on CPU 0, Locust on CPU 1), as if the load came from another machine; the saturating rate is then
that of the server's CPUs.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import csv
import dataclasses
import math
import os
import random
import json
import re
import struct
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np

from benchmarks.report import write_markdown
from common import contract
from serving.health import SEEDS, number

CONFIGS = ("bounded", "unbounded", "same-priority", "flat-stubs", "budget-door")
OUTCOMES = ("accepted", "busy", "error")
BURST_WINDOW_S = 0.1


def use_gevent() -> None:
    """Locust's gevent (it patches the standard library when imported): call first in a command."""
    import locust  # noqa: F401


@dataclasses.dataclass
class Outcomes:
    """Latencies (seconds) by outcome, and the messages of errors, from one Locust run."""

    seconds: float = 0.0
    latencies: dict[str, list[float]] = dataclasses.field(default_factory=lambda: {k: [] for k in OUTCOMES})
    errors: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    busy: dict[str, list[float]] = dataclasses.field(  # the busy latencies by kind
        default_factory=lambda: {"queue full": [], "queue timeout": []})
    sends: list[float] = dataclasses.field(default_factory=list)  # when each request started (perf_counter)

    def count(self, outcome: str) -> int:
        return len(self.latencies[outcome])

    @property
    def sent(self) -> int:
        """Every request started, answered or not (those still waiting when Locust quit have no latency)."""
        return len(self.sends)

    @property
    def answered(self) -> int:
        return sum(len(v) for v in self.latencies.values())

    def largest_burst(self, window_s: float = BURST_WINDOW_S) -> int:
        """The most requests started within any `window_s` seconds."""
        sends = np.sort(np.asarray(self.sends))
        return int((np.searchsorted(sends, sends + window_s) - np.arange(len(sends))).max()) if len(sends) else 0

    def percentile_ms(self, outcome: str, q: float) -> float:
        values = self.latencies[outcome]
        return float(np.percentile(values, q) * 1000) if values else float("nan")


def infer_body(image: bytes, top_k: int) -> tuple[bytes, dict[str, str]]:
    """One image as Triton's HTTP binary-tensor request (a JSON header, then the BYTES element: its
    4-byte little-endian length and the bytes), asking for the top-k as JSON; and its headers."""
    header = json.dumps({
        "inputs": [{"name": contract.IMAGE, "datatype": "BYTES", "shape": [1, 1],
                    "parameters": {"binary_data_size": len(image) + 4}}],
        "outputs": [{"name": contract.PROBABILITIES, "parameters": {"classification": top_k, "binary_data": False}}],
    }).encode()
    return header + struct.pack("<I", len(image)) + image, {
        "Inference-Header-Content-Length": str(len(header)), "Content-Type": "application/octet-stream"}


def classify_outcome(status: int, body: bytes, top_k: int) -> tuple[str, str]:
    """(accepted | busy | error, detail) of one HTTP answer of the ensemble."""
    from clients.client import BUSY_MESSAGES

    text = body.decode(errors="replace")
    if status == 200:
        outputs = json.loads(text).get("outputs", [])
        if outputs and len(outputs[0].get("data", [])) == top_k:
            return "accepted", ""
        return "error", f"200 without {top_k} predictions: {text[:120]}"
    busy = [m for m in BUSY_MESSAGES if m in text]
    if status == 503 and busy:
        return "busy", "queue timeout" if "timeout" in busy[0] else "queue full"
    return "error", f"HTTP {status}: {text[:120]}"


def run_users(host: str, model: str, images: list[bytes], users: int, seconds: float, pacing_s: float = 0.0,
              seed: int = 0, top_k: int = 1) -> Outcomes:
    """`users` Locust users (FastHttpUser, one connection each) for `seconds` against Triton's HTTP
    `host`, each starting a request every `pacing_s` seconds at a phase of its own (0: as soon as the last
    one answered), photos drawn at random from `images`."""
    import gevent
    from locust import FastHttpUser, task
    from locust.env import Environment

    outcomes, rng = Outcomes(), random.Random(seed)
    bodies = [infer_body(image, top_k) for image in images]
    path = f"/v2/models/{model}/infer"

    class Sender(FastHttpUser):
        network_timeout = connection_timeout = 120.0

        def on_start(self) -> None:
            self.slot = time.perf_counter() + rng.uniform(0, pacing_s)
            gevent.sleep(max(0.0, self.slot - time.perf_counter()))

        def wait_time(self) -> float:
            """Until this user's next slot (slots `pacing_s` apart from its phase; missed ones skipped)."""
            if not pacing_s:
                return 0.0
            now = time.perf_counter()
            self.slot += pacing_s * max(1, math.ceil((now - self.slot) / pacing_s))
            return self.slot - now

        @task
        def send(self) -> None:
            body, headers = rng.choice(bodies)
            start = time.perf_counter()
            outcomes.sends.append(start)
            with self.client.post(path, data=body, headers=headers, name="infer", catch_response=True) as response:
                elapsed = time.perf_counter() - start
                outcome, detail = classify_outcome(response.status_code, response.content or b"", top_k)
                if outcome == "error":
                    response.failure(detail)
                    outcomes.errors[detail[:120]] += 1
                else:
                    response.success()
                    if outcome == "busy":
                        outcomes.busy[detail].append(elapsed)
            outcomes.latencies[outcome].append(elapsed)

    environment = Environment(user_classes=[Sender], host=f"http://{host}")
    runner = environment.create_local_runner()
    runner.start(users, spawn_rate=users)
    started = time.perf_counter()
    gevent.sleep(seconds)
    runner.quit()
    outcomes.seconds = time.perf_counter() - started
    return outcomes


def pending_requests(metrics_url: str) -> int:
    """Requests queued or executing in the server, all models (Triton's pending-request gauge)."""
    with urllib.request.urlopen(metrics_url, timeout=10) as response:
        text = response.read().decode()
    return int(sum(float(v) for v in re.findall(r"^nv_inference_pending_request_count\{[^}]*\} (\S+)$", text, re.M)))


def successes(metrics_url: str) -> collections.Counter:
    """{model: requests it has answered} (Triton's nv_inference_request_success, all versions)."""
    with urllib.request.urlopen(metrics_url, timeout=10) as response:
        text = response.read().decode()
    counts: collections.Counter = collections.Counter()
    for labels, value in re.findall(r"^nv_inference_request_success\{([^}]*)\} (\S+)$", text, re.M):
        counts[dict(re.findall(r'(\w+)="([^"]*)"', labels)).get("model", "?")] += int(float(value))
    return counts


def settled_successes(metrics_url: str, timeout_s: float = 5.0) -> collections.Counter:
    """successes() once two reads 0.2 s apart agree: Triton counts a request when it releases it, which
    may follow its answer and the pending gauge's return to 0."""
    counts, deadline = successes(metrics_url), time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        time.sleep(0.2)
        again = successes(metrics_url)
        if again == counts:
            break
        counts = again
    return counts


def turned_away_after_preprocess(answered: collections.Counter) -> int:
    """Of the requests a load sent through the ensemble, those preprocess answered that the classifier did
    not (its queue was full, or they waited past its timeout): busy answers that cost preprocessing first.
    `answered` = successes() after the load (drained) minus before; 0 for the fused pipeline."""
    if contract.PREPROCESS not in answered:
        return 0
    return answered[contract.PREPROCESS] - answered[contract.CLASSIFIER]


def drain(metrics_url: str, timeout_s: float = 180.0) -> None:
    deadline = time.monotonic() + timeout_s
    while pending_requests(metrics_url) > 0:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the server still holds requests {timeout_s:.0f} s after the load stopped")
        time.sleep(0.5)


def unbounded(spec):
    """The same spec with no queue limit and no queue timeout on any model (Triton's default)."""
    open_queue = dict(max_queue_size=0, queue_timeout_us=0)
    return spec.replace(preprocess=dataclasses.replace(spec.preprocess, **open_queue),
                        classifier=dataclasses.replace(spec.classifier, **open_queue),
                        fused=dataclasses.replace(spec.fused, **open_queue))


def with_nice(spec, preprocess: int, others: int):
    """The same spec with these nice increments for the preprocess stubs and for the others'."""
    return spec.replace(preprocess=dataclasses.replace(spec.preprocess, nice=preprocess),
                        classifier=dataclasses.replace(spec.classifier, nice=others),
                        fused=dataclasses.replace(spec.fused, nice=others))


def with_door(spec, size: int):
    """The same spec with the door (the first model's queue: preprocess, or the fused classifier) bounded at `size`."""
    door = spec.served_stages()[0]
    return spec.replace(**{door: dataclasses.replace(getattr(spec, door), max_queue_size=size)})


def budget_door(saturating_rps: float, budget_ms: float) -> int:
    """A door that holds what the server answers within the budget at its saturating rate (at least 1)."""
    return max(1, int(saturating_rps * budget_ms / 1000))


def write_repositories(repository: Path, out: Path, names: tuple[str, ...] = CONFIGS,
                       door: int | None = None) -> dict[str, Path]:
    """{config: path} for `names` of CONFIGS, from the served repository's spec and backend; budget-door needs
    `door`, its door's size."""
    from build.repository.spec import DeploymentSpec
    from build.repository.writer import read_manifest, write_variants

    build = read_manifest(repository)
    spec = DeploymentSpec.from_dict(build["spec"])
    variants = {"bounded": spec, "unbounded": unbounded(spec), "same-priority": with_nice(spec, 0, 0),
                "flat-stubs": with_nice(spec, spec.nice("classifier"), spec.nice("classifier")),
                "budget-door": with_door(spec, door) if door else None}
    missing = [name for name in names if variants[name] is None]
    if missing:
        raise ValueError(f"{missing[0]} needs its door's size")
    return write_variants(build, {name: variants[name] for name in names}, out, "benchmarks.overload")


@dataclasses.dataclass(frozen=True)
class Row:
    config: str
    load: float
    users: int
    offered_rps: float
    sent_rps: float
    accepted_rps: float
    accepted: int
    busy: int
    busy_full: int  # of busy: the queue was full (answered at once); the rest waited past the queue timeout
    errors: int
    accepted_p50_ms: float
    accepted_p99_ms: float
    busy_p50_ms: float
    busy_p99_ms: float
    full_p99_ms: float  # busy answers for a full queue
    busy_after_preprocess: int = 0  # of busy: turned away by the classifier, after preprocessing
    largest_burst: int = 0  # requests started within any BURST_WINDOW_S: how spread the arrivals were
    answered_rps: float = 0.0  # accepted + busy + errors; sent_rps less this: still waiting when Locust quit

    @classmethod
    def of(cls, config: str, load: float, users: int, offered: float, o: Outcomes,
           after_preprocess: int = 0) -> "Row":
        return cls(config, load, users, offered, o.sent / o.seconds, o.count("accepted") / o.seconds,
                   o.count("accepted"), o.count("busy"), len(o.busy["queue full"]), o.count("error"),
                   o.percentile_ms("accepted", 50), o.percentile_ms("accepted", 99),
                   o.percentile_ms("busy", 50), o.percentile_ms("busy", 99),
                   float(np.percentile(o.busy["queue full"], 99) * 1000) if o.busy["queue full"] else float("nan"),
                   after_preprocess, o.largest_burst(), o.answered / o.seconds)


# the servers whose stubs' priorities differ from bounded's: what each comparison shows, and its extra figures
PRIORITY_COMPARISONS = (("same-priority", "stubs lowered / not", {"queue_full": True}),
                        ("flat-stubs", "preprocess below the classifier / level with it", {"after_preprocess": True}))


def versus(load: float, b: Row, other: Row, name: str, meaning: str, queue_full: bool = False,
           after_preprocess: bool = False) -> str:
    """One ratio line: `b`'s busy and accepted figures over `other`'s at the same load."""
    parts = [f"busy p50 {b.busy_p50_ms / other.busy_p50_ms:.2f}", f"busy p99 {b.busy_p99_ms / other.busy_p99_ms:.2f}"]
    if queue_full:
        parts.append(f"queue-full p99 {b.full_p99_ms / other.full_p99_ms:.2f}")
    parts += [f"accepted p99 {b.accepted_p99_ms / other.accepted_p99_ms:.2f}",
              f"accepted req/s {b.accepted_rps / max(other.accepted_rps, 1e-9):.2f}"]
    line = f"{load:g}x: {b.config} / {name} ({meaning}): " + ", ".join(parts)
    if after_preprocess:
        line += f"; turned away after preprocessing {b.busy_after_preprocess} / {other.busy_after_preprocess}"
    return line


def ratios(rows: list[Row]) -> list[str]:
    """The comparisons the results page reports, as lines."""
    by = {(r.config, r.load): r for r in rows}
    loads = sorted({r.load for r in rows})
    base, lines = loads[0], []
    for config in CONFIGS:
        ref = by.get((config, base))
        for load in loads[1:]:
            r = by.get((config, load))
            if ref and r and ref.accepted_p99_ms:
                share = r.busy / max(r.accepted + r.busy + r.errors, 1)
                lines.append(f"{config}: accepted p99 at {load:g}x / at {base:g}x = "
                             f"{r.accepted_p99_ms / ref.accepted_p99_ms:.2f}; busy share {share:.1%}")
    for load in loads:
        b, u = by.get(("bounded", load)), by.get(("unbounded", load))
        if b and u and u.accepted_p99_ms:
            lines.append(f"{load:g}x: bounded / unbounded accepted p99 = {b.accepted_p99_ms / u.accepted_p99_ms:.2f}, "
                         f"accepted req/s = {b.accepted_rps / max(u.accepted_rps, 1e-9):.2f}")
        if b and b.busy and b.accepted_p50_ms:
            lines.append(f"{load:g}x bounded: busy answers p99 {b.busy_p99_ms:.1f} ms = "
                         f"{b.busy_p99_ms / b.accepted_p50_ms:.2f} x the accepted p50; those for a full queue "
                         f"({b.busy_full} of {b.busy}): p99 {b.full_p99_ms:.1f} ms; turned away by the classifier "
                         f"after preprocessing: {b.busy_after_preprocess} of {b.busy}")
        for name, meaning, extra in PRIORITY_COMPARISONS:
            other = by.get((name, load))
            if b and other and b.busy and other.busy:
                lines.append(versus(load, b, other, name, meaning, **extra))
        door = by.get(("budget-door", load))
        if b and door and b.busy and door.busy:
            lines.append(versus(load, door, b, "bounded", "a door sized to the latency budget / as deployed",
                                queue_full=True))
    return lines


def plot(rows: list[Row], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(15, 4))
    styles = dict(zip(CONFIGS, ("o-", "s--", "^-.", "v:", "D-")))
    for config in dict.fromkeys(r.config for r in rows):
        mine = sorted((r for r in rows if r.config == config), key=lambda r: r.load)
        color = f"C{CONFIGS.index(config)}"
        left.plot([r.load for r in mine], [r.accepted_p99_ms for r in mine], styles[config], color=color, label=config)
        if any(r.busy for r in mine):
            middle.plot([r.load for r in mine], [r.busy_p50_ms for r in mine], styles[config], color=color,
                        label=f"{config}: p50")
            middle.plot([r.load for r in mine], [r.busy_p99_ms for r in mine], styles[config], color=color, alpha=0.4,
                        label=f"{config}: p99")
    left.set(xlabel="offered load (x saturating rate)", ylabel="ms", yscale="log", title="accepted answers, p99")
    middle.set(xlabel="offered load (x saturating rate)", ylabel="ms", yscale="log", title="busy answers")
    for axes in (left, middle):
        axes.legend(fontsize=8)
    shown = [c for c in dict.fromkeys(r.config for r in rows) if c != "unbounded"]  # the servers that say busy
    loads = sorted({r.load for r in rows})
    width = 0.8 / max(1, len(shown))
    for i, config in enumerate(shown):
        mine = {r.load: r for r in rows if r.config == config}
        x = [loads.index(load) + (i - (len(shown) - 1) / 2) * width for load in mine]
        accepted = [r.accepted_rps for r in mine.values()]
        turned = [r.answered_rps - r.accepted_rps for r in mine.values()]  # busy (+ error) req/s
        late = [t * r.busy_after_preprocess / r.busy if r.busy else 0.0 for t, r in zip(turned, mine.values())]
        first = i == 0  # one legend entry per kind
        right.bar(x, accepted, width, color="C0", edgecolor="white", label="accepted" if first else None)
        right.bar(x, [t - x_ for t, x_ in zip(turned, late)], width, bottom=accepted, color="C1", edgecolor="white",
                  label="busy at the door (+ errors)" if first else None)
        right.bar(x, late, width, bottom=[a + t - x_ for a, t, x_ in zip(accepted, turned, late)], color="C3",
                  edgecolor="white", label="busy after preprocessing" if first else None)
        for xi in x:
            right.annotate(config, (xi, 0), rotation=90, fontsize=7, ha="center", va="bottom", color="white")
    right.set_xticks(range(len(loads)), [f"{load:g}x" for load in loads])
    right.set(xlabel="offered load (bars: the bounded servers)", ylabel="req/s", title="what the servers answered")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(rows: list[Row], header: list[str], out: Path) -> Path:
    with open(out / "overload.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[x.name for x in dataclasses.fields(Row)])
        writer.writeheader()
        writer.writerows(dataclasses.asdict(r) for r in rows)
    table = ["| queue | load | users | offered req/s | sent req/s | accepted req/s | accepted | busy (queue full) | "
             "errors | accepted p50 / p99 ms | busy p50 / p99 ms | queue-full p99 ms | busy after preprocess | "
             f"largest burst ({BURST_WINDOW_S * 1000:g} ms) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    table += [f"| {r.config} | {r.load:g}x | {r.users} | {r.offered_rps:.1f} | {r.sent_rps:.1f} | "
              f"{r.accepted_rps:.1f} | {r.accepted} | {r.busy} ({r.busy_full}) | {r.errors} | "
              f"{r.accepted_p50_ms:.1f} / {r.accepted_p99_ms:.1f} | "
              f"{r.busy_p50_ms:.1f} / {r.busy_p99_ms:.1f} | {r.full_p99_ms:.1f} | {r.busy_after_preprocess} | "
              f"{r.largest_burst} |" for r in rows]
    report = write_markdown(out / "overload.md",
                            "\n".join(header + [""] + table + ["", *(f"- {line}" for line in ratios(rows))]) + "\n")
    plot(rows, out / "overload.png")
    return report


def get_args_parser() -> argparse.ArgumentParser:
    from benchmarks.workload import ENCODINGS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-repository", default="model_repository",
                   help="the built repository whose spec and model are measured (default: %(default)s)")
    p.add_argument("--loads", nargs="+", type=number(float, 0, above_low=True), default=[1.0, 2.0, 4.0],
                   help="offered loads, multiples of the saturating rate (default: %(default)s)")
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS, help="(default: %(default)s)")
    p.add_argument("--run-time", type=number(float, 0, above_low=True), default=20.0,
                   help="seconds per load (default: %(default)s)")
    p.add_argument("--saturation-users", type=number(int, 1), default=16,
                   help="closed-loop users that saturate the server (default: %(default)s)")
    p.add_argument("--p99-budget-ms", type=number(float, 0, above_low=True), default=100.0,
                   help="budget-door's door holds saturating rate x this (default: %(default)s, the alert's "
                        "and make tune's)")
    p.add_argument("--pacing-s", type=number(float, 0, above_low=True), default=2.0,
                   help="each open-loop user starts a request this often (default: %(default)s)")
    p.add_argument("--photos", default="jpeg", choices=ENCODINGS, help="(default: %(default)s)")
    p.add_argument("--seed", type=number(int, *SEEDS), default=0, help="a 64-bit signed integer (default: %(default)s)")
    p.add_argument("--server-cpus", type=cpu_list, default=None,
                   help="CPUs the servers run on, e.g. 0 or 0-3 (default: all; with --client-cpus the load "
                        "generator does not take the server's cores, as if it ran on another machine)")
    p.add_argument("--client-cpus", type=cpu_list, default=None, help="CPUs Locust runs on, e.g. 1 (default: all)")
    p.add_argument("--out", default="benchmarks/results/overload", help="(default: %(default)s)")
    return p


def cpu_list(text: str) -> set[int]:
    """'0', '0-3', '0,2,4-5' -> the set of CPU numbers (as taskset -c takes them)."""
    cpus: set[int] = set()
    for part in text.split(","):
        first, _, last = part.strip().partition("-")
        if not first.isdigit() or (last and not last.isdigit()):
            raise argparse.ArgumentTypeError(f"{text!r}: CPU numbers and ranges, e.g. 0 or 0-3 or 0,2")
        if last and int(last) < int(first):  # an empty range would pin nothing, silently
            raise argparse.ArgumentTypeError(f"{text!r}: the range {part.strip()} runs backwards")
        cpus.update(range(int(first), int(last or first) + 1))
    return cpus


@contextlib.contextmanager
def cpus(chosen: set[int] | None):
    """Run this process (and what it starts meanwhile) on `chosen` CPUs; the former set afterwards."""
    if not chosen:
        yield
        return
    before = os.sched_getaffinity(0)
    missing = chosen - before
    if missing:
        raise ValueError(f"CPU(s) {sorted(missing)} not available here (this process may use {sorted(before)})")
    os.sched_setaffinity(0, chosen)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def main(args: argparse.Namespace) -> list[Row]:
    use_gevent()
    from tqdm import tqdm

    from benchmarks.locust_run import ensemble_name
    from benchmarks.workload import load_photos
    from build.repository.spec import DeploymentSpec
    from build.repository.writer import read_manifest
    from serving.server import TritonServer

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # the saturating rate is measured on the unbounded server: on a bounded one, closed-loop users answered "busy"
    # send again at once, and a tight queue then turns the measurement into a flood of rejections
    late = ("budget-door",)  # sized from the saturating rate, written once it is measured
    repos = write_repositories(Path(args.model_repository), out,
                               tuple(c for c in dict.fromkeys([*args.configs, "unbounded"]) if c not in late))
    spec = DeploymentSpec.from_dict(read_manifest(Path(args.model_repository))["spec"])
    model, images = ensemble_name(args.model_repository), list(load_photos(args.photos).values())
    rows = []
    steps = tqdm(total=1 + len(args.configs) * (len(args.loads) + 1), desc="overload", unit="run")
    if bool(args.server_cpus) != bool(args.client_cpus) or (args.server_cpus and args.server_cpus & args.client_cpus):
        raise ValueError("--server-cpus and --client-cpus go together, and share no CPU")
    with cpus(args.server_cpus):
        server = TritonServer(repos["unbounded"], log_file=out / "saturation_tritonserver.log").start()
    with server, cpus(args.client_cpus):
        run_users(server.http_url, model, images, args.saturation_users, min(5.0, args.run_time), seed=args.seed)
        drain(server.metrics_url)
        measured = run_users(server.http_url, model, images, args.saturation_users, args.run_time, seed=args.seed)
        saturating = measured.count("accepted") / measured.seconds
    door = budget_door(saturating, args.p99_budget_ms)
    if "budget-door" in args.configs:
        repos.update(write_repositories(Path(args.model_repository), out, late, door=door))
    steps.update()
    for config in args.configs:
        with cpus(args.server_cpus):  # the server and its stubs inherit it
            server = TritonServer(repos[config], log_file=out / f"{config}_tritonserver.log").start()
        with server, cpus(args.client_cpus):
            run_users(server.http_url, model, images, args.saturation_users, min(5.0, args.run_time), seed=args.seed)
            drain(server.metrics_url)
            steps.update()
            for load in args.loads:
                offered = load * saturating
                users = max(1, math.ceil(offered * args.pacing_s))
                before = settled_successes(server.metrics_url)
                outcomes = run_users(server.http_url, model, images, users, args.run_time, users / offered, args.seed)
                drain(server.metrics_url)
                answered = settled_successes(server.metrics_url)
                answered.subtract(before)
                rows.append(Row.of(config, load, users, offered, outcomes, turned_away_after_preprocess(answered)))
                steps.update()
                r = rows[-1]
                tqdm.write(f"{config:9s} {load:g}x: sent {r.sent_rps:6.1f}/s, accepted {r.accepted_rps:6.1f}/s "
                           f"p50 {r.accepted_p50_ms:6.1f} p99 {r.accepted_p99_ms:7.1f} ms; busy {r.busy} "
                           f"({r.busy_full} queue full, p99 {r.full_p99_ms:.1f} ms) "
                           f"p99 {r.busy_p99_ms:5.1f} ms [{r.busy_after_preprocess} after preprocess]; errors {r.errors} {dict(outcomes.errors) or ''}; "
                           f"largest burst {r.largest_burst} in {BURST_WINDOW_S * 1000:g} ms")
    steps.close()
    header = [f"saturating rate: {saturating:.1f} accepted req/s with {args.saturation_users} closed-loop users "
              f"(unbounded server), run time {args.run_time:g} s per load, photos {args.photos}, HTTP",
              f"CPUs: server {_cpus_text(args.server_cpus)}, Locust {_cpus_text(args.client_cpus)}; "
              f"python stubs at tritonserver's nice + {spec.nice('preprocess')} (preprocess), + "
              f"{spec.nice('classifier')} (classifier, fused); same-priority: + 0; flat-stubs: preprocess at "
              f"the classifier's; budget-door: the door holds {door} (saturating rate x {args.p99_budget_ms:g} ms)"]
    report = write_report(rows, header, out)
    print(report.read_text())
    print(f"wrote {report}, {out / 'overload.csv'}, {out / 'overload.png'}")
    return rows


def _cpus_text(chosen: set[int] | None) -> str:
    return ",".join(map(str, sorted(chosen))) if chosen else f"all {len(os.sched_getaffinity(0))} (shared)"


if __name__ == "__main__":
    try:
        main(get_args_parser().parse_args())
    except (OSError, RuntimeError, ValueError) as exc:
        sys.exit(f"benchmarks.overload: {exc}")
