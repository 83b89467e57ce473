"""`make soak`: a long Locust run with good and bad images; failures, server errors, p99 drift and RSS growth.

    python -m benchmarks.soak --duration 10m                  # own server on model_repository
    python -m benchmarks.soak --duration 30 --bucket 5         # a short run (the tests)
    python -m benchmarks.soak --url 127.0.0.1:8000 --server-pid 1234 --duration 1h
    python -m benchmarks.soak --duration 10m --server-env MALLOC_ARENA_MAX=2   # the server's allocator only

Locust runs the users of benchmarks/soak_users.py (closed loops, no wait) for --duration; each request
is logged. Per --bucket (a minute by default): requests, good requests that failed, server errors
(5xx / INTERNAL), busy answers, bad images answered with a client error (4xx), p50/p99 of the good
requests, and the memory of tritonserver and its stubs (RSS summed over the processes, and PSS, which
counts their shared pages once, per process kind). The first --warmup buckets are
left out of the drift figures. Writes soak.json, soak.md and soak.png to --out.

With --kill-stubs (own server only) the soak also kills -9 each python-backend stub in turn, spread over
the run, with serving/watchdog.py watching: per kill, the seconds until its readiness is back, the
requests that failed meanwhile, and those that failed after it (none should).
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import re
import shutil
import subprocess
import sys
import threading
import time
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import psutil

from serving.health import number

USERS_FILE = Path(__file__).with_name("soak_users.py")


class SoakError(RuntimeError):
    pass


class DurationError(ValueError, argparse.ArgumentTypeError):
    """A duration parse_duration refuses: a ValueError, whose message argparse prints as it is."""


def parse_duration(text: str) -> int:
    """'600', '90s', '10m', '1h' -> seconds, at least 1 (Locust's `-t 0s` would run without end)."""
    match = re.fullmatch(r"(\d+)([smh]?)", str(text).strip())
    if not match:
        raise DurationError(f"duration {text!r}: use seconds or a number with s, m or h (600, 10m, 1h)")
    seconds = int(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[match.group(2)]
    if seconds < 1:
        raise DurationError(f"duration {text!r}: must be at least 1 s")
    return seconds


@dataclasses.dataclass
class TreeMemory:
    """One sample of a serving tree's memory. `rss_mb` sums each process's RSS, so pages that several processes
    map (shared libraries; a stub's shared memory, mapped by tritonserver too) count once per process.
    `pss_mb` sums the proportional set sizes (psutil's memory_full_info): each shared page split between the
    processes that map it, so the tree's own pages count once. `pss_by_role`: per server / model's stubs."""

    rss_mb: float = 0.0
    pss_mb: float | None = 0.0
    pss_by_role: dict[str, float] = dataclasses.field(default_factory=dict)


def tree_memory(pid: int) -> TreeMemory:
    from benchmarks.procstats import tree_roles

    sample = TreeMemory()
    for member, role in tree_roles(pid).items():
        try:
            memory = psutil.Process(member).memory_full_info()  # rss, and pss from smaps_rollup on Linux
        except psutil.Error:
            continue
        sample.rss_mb += memory.rss / 2**20
        pss = getattr(memory, "pss", None)
        if pss is None or sample.pss_mb is None:  # not Linux: RSS only
            sample.pss_mb = None
            continue
        sample.pss_mb += pss / 2**20
        sample.pss_by_role[role] = sample.pss_by_role.get(role, 0.0) + pss / 2**20
    return sample


@dataclasses.dataclass
class Bucket:
    start_s: float
    requests: int = 0
    good: int = 0
    good_failed: int = 0
    bad: int = 0
    bad_client_error: int = 0
    server_errors: int = 0
    busy: int = 0
    p50_ms: float | None = None
    p99_ms: float | None = None
    rss_mb: float | None = None  # the largest sample in the bucket, of each figure
    pss_mb: float | None = None
    pss_by_role: dict[str, float] = dataclasses.field(default_factory=dict)


def read_log(path: Path) -> list[tuple[float, str, str, float, str, str]]:
    with open(path, newline="") as f:
        return [(float(t), kind, name, float(ms), result, status)
                for t, kind, name, ms, result, status in csv.reader(f)]


def buckets(rows, memory: list[tuple[float, TreeMemory]], t0: float, bucket_s: float,
            duration_s: float) -> list[Bucket]:
    """Per bucket_s of the run (what finished after duration_s, as Locust stops, counts in the last)."""
    count = max(1, int(np.ceil(duration_s / bucket_s)))
    out = [Bucket(i * bucket_s) for i in range(count)]
    latencies: list[list[float]] = [[] for _ in range(count)]
    for t, kind, _, ms, result, _ in rows:
        b = out[min(count - 1, max(0, int((t - t0) // bucket_s)))]
        b.requests += 1
        b.server_errors += result == "server_error"
        b.busy += result == "busy"
        if kind == "good":
            b.good += 1
            b.good_failed += result != "ok"
            if result == "ok":
                latencies[out.index(b)].append(ms)
        else:
            b.bad += 1
            b.bad_client_error += result == "client_error"
    for b, ms in zip(out, latencies):
        if ms:
            b.p50_ms, b.p99_ms = (round(float(v), 1) for v in np.percentile(ms, [50, 99]))
    for b in out:
        last = b is out[-1]
        inside = [m for t, m in memory if b.start_s <= t - t0 and (last or t - t0 < b.start_s + bucket_s)]
        if not inside:
            continue
        b.rss_mb = round(max(m.rss_mb for m in inside), 1)
        if all(m.pss_mb is not None for m in inside):
            b.pss_mb = round(max(m.pss_mb for m in inside), 1)
            b.pss_by_role = {role: round(max(m.pss_by_role.get(role, 0.0) for m in inside), 1)
                             for role in sorted({r for m in inside for r in m.pss_by_role})}
    return out


def summarize(rows, per_bucket: list[Bucket], warmup: int) -> dict:
    steady = [b for b in per_bucket[warmup:] if b.requests] or [b for b in per_bucket if b.requests]
    p99 = [b.p99_ms for b in steady if b.p99_ms is not None]
    rss = [b.rss_mb for b in steady if b.rss_mb is not None]
    pss = [b for b in steady if b.pss_mb is not None]
    return {
        "requests": len(rows), "good": sum(b.good for b in per_bucket),
        "good_failed": sum(b.good_failed for b in per_bucket),
        "bad": sum(b.bad for b in per_bucket), "bad_client_error": sum(b.bad_client_error for b in per_bucket),
        "server_errors": sum(b.server_errors for b in per_bucket), "busy": sum(b.busy for b in per_bucket),
        "outcomes": {f"{kind} {result} {status}".strip(): n for (kind, result, status), n in
                     sorted(_count((r[1], r[4], r[5]) for r in rows).items())},
        "p99_first_ms": p99[0] if p99 else None, "p99_last_ms": p99[-1] if p99 else None,
        "p99_drift_ratio": round(p99[-1] / p99[0], 3) if len(p99) > 1 and p99[0] else None,
        "rss_first_mb": rss[0] if rss else None, "rss_last_mb": rss[-1] if rss else None,
        "rss_growth_percent": round(100 * (rss[-1] - rss[0]) / rss[0], 2) if len(rss) > 1 and rss[0] else None,
        "pss_first_mb": pss[0].pss_mb if pss else None, "pss_last_mb": pss[-1].pss_mb if pss else None,
        "pss_growth_percent": round(100 * (pss[-1].pss_mb - pss[0].pss_mb) / pss[0].pss_mb, 2)
        if len(pss) > 1 and pss[0].pss_mb else None,
        "pss_growth_by_role_mb": {role: round(pss[-1].pss_by_role.get(role, 0.0) - first, 1)
                                  for role, first in pss[0].pss_by_role.items()} if len(pss) > 1 else {},
    }


def _count(items) -> dict:
    counts: dict = {}
    for item in items:
        counts[item] = counts.get(item, 0) + 1
    return counts


def write_report(out: Path, summary: dict, per_bucket: list[Bucket], args: argparse.Namespace) -> None:
    data = {"summary": summary, "buckets": [dataclasses.asdict(b) for b in per_bucket],
            "args": {k: v for k, v in vars(args).items()}}
    (out / "soak.json").write_text(json.dumps(data, indent=2))
    server_env = " ".join(f"{k}={v}" for k, v in getattr(args, "server_env", []))
    lines = [f"# Soak: {args.duration} s, {args.users} {args.protocol} users, {args.bad_share:.0%} bad images"
             + (f", server environment {server_env}" if server_env else ""), "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in summary.items() if k not in ("outcomes", "stub_kills")]
    lines += ["", "RSS sums each process's resident memory (shared libraries and the stubs' shared memory once per "
              "process that maps them); PSS counts every page of the tree once (docs/operations.md)."]
    if summary.get("stub_kills"):
        lines += ["", "Stubs killed (kill -9) during the run, the watchdog reloading their model:", "",
                  "| model | instance | seconds until ready | failed while degraded | requests after | failed after |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {f['model']} | {f['instance']} | {f['seconds_until_ready']} | {f['failed_while_degraded']} | "
                  f"{f['requests_after']} | {f['failed_after']} |" for f in summary["stub_kills"]]
    lines += ["", f"Per {args.bucket:g} s (the first {args.warmup} left out of the drift figures):", "",
              "| from s | requests | good failed | server errors | busy | bad -> 4xx | p50 ms | p99 ms | RSS MB | PSS MB "
              "| PSS by process MB |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {b.start_s:g} | {b.requests} | {b.good_failed} | {b.server_errors} | {b.busy} | "
              f"{b.bad_client_error}/{b.bad} | {b.p50_ms} | {b.p99_ms} | {b.rss_mb} | {b.pss_mb} | "
              f"{', '.join(f'{r} {v:g}' for r, v in b.pss_by_role.items())} |" for b in per_bucket]
    lines += ["", "Outcomes: " + ", ".join(f"{k}: {v}" for k, v in summary["outcomes"].items())]
    (out / "soak.md").write_text("\n".join(lines) + "\n")
    plot(out / "soak.png", per_bucket, args.bucket)


def plot(path: Path, per_bucket: list[Bucket], bucket_s: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [b.start_s / 60 for b in per_bucket]
    fig, axes = plt.subplots(3, 1, figsize=(8, 8), sharex=True)
    axes[0].plot(x, [b.p50_ms for b in per_bucket], "o-", label="p50")
    axes[0].plot(x, [b.p99_ms for b in per_bucket], "o-", label="p99")
    axes[0].set_ylabel("good requests, ms")
    axes[0].legend()
    axes[1].plot(x, [b.rss_mb for b in per_bucket], "o-", color="tab:purple", label="RSS, summed")
    roles = sorted({r for b in per_bucket for r in b.pss_by_role})
    if roles:
        axes[1].stackplot(x, *[[b.pss_by_role.get(r, 0.0) for b in per_bucket] for r in roles],
                          labels=[f"PSS {r}" for r in roles], alpha=0.5)
    axes[1].set_ylabel("server + stubs, MB")
    axes[1].legend(fontsize="small", loc="lower right")
    axes[2].bar(x, [b.good_failed for b in per_bucket], width=bucket_s / 60 * 0.4, label="good failed")
    axes[2].bar([v + bucket_s / 60 * 0.4 for v in x], [b.server_errors for b in per_bucket],
                width=bucket_s / 60 * 0.4, label="server errors", color="tab:red")
    axes[2].set_ylim(0, max([1] + [b.good_failed for b in per_bucket] + [b.server_errors for b in per_bucket]) * 1.1)
    axes[2].set_ylabel(f"per {bucket_s:g} s")
    axes[2].set_xlabel("minutes into the soak")
    axes[2].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


@dataclasses.dataclass
class Fault:
    model: str
    instance: int
    pid: int
    killed_at: float  # unix time
    ready_at: float | None = None  # the watchdog's readiness back (None: not within the run)


class StubKiller:
    """Kills each stub of `models` in turn at evenly spread times of the run; waits for the watchdog."""

    def __init__(self, watchdog, models: dict[str, int], duration_s: float):
        self.watchdog, self.duration_s = watchdog, duration_s
        self.victims = [(m, i) for m, n in models.items() for i in range(n)]
        self.faults: list[Fault] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stub-killer", daemon=True)

    def _run(self) -> None:
        import os
        import signal

        from serving.watchdog import serving_stubs

        start = time.monotonic()
        counts = {m: sum(1 for v in self.victims if v[0] == m) for m, _ in self.victims}
        for k, (model, index) in enumerate(self.victims):
            at = start + self.duration_s * (k + 1) / (len(self.victims) + 1)
            if self._stop.wait(max(0.0, at - time.monotonic())):
                return
            victim = serving_stubs(self.watchdog.server_pid, model, counts[model])[index]
            fault = Fault(model, index, victim.pid, time.time())
            os.kill(victim.pid, signal.SIGKILL)
            self.faults.append(fault)
            seen_degraded = False
            while not self._stop.is_set():
                ready = self.watchdog.readiness()[0]
                seen_degraded |= not ready
                if seen_degraded and ready:
                    fault.ready_at = time.time()
                    break
                time.sleep(0.05)

    def start(self) -> "StubKiller":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def fault_figures(rows, faults: list[Fault], end: float) -> list[dict]:
    """Per fault: seconds until ready; failed requests that were in flight between the kill and readiness
    back; requests started after that and done before the next kill, and how many of them failed."""
    started = [(t - ms / 1000, t, kind, result) for t, kind, _, ms, result, _ in rows]
    failed = lambda kind, result: result != ("ok" if kind == "good" else "client_error")  # noqa: E731
    figures = []
    for k, f in enumerate(faults):
        back = f.ready_at or end
        following = faults[k + 1].killed_at if k + 1 < len(faults) else end
        figures.append({"model": f.model, "instance": f.instance, "pid": f.pid,
                        "seconds_until_ready": round(back - f.killed_at, 2) if f.ready_at else None,
                        "failed_while_degraded": sum(1 for s, e, kind, r in started
                                                     if s < back and e > f.killed_at and failed(kind, r)),
                        "requests_after": sum(1 for s, e, _, _ in started if back <= s and e < following),
                        "failed_after": sum(1 for s, e, kind, r in started
                                            if back <= s and e < following and failed(kind, r))})
    return figures


def run_locust(url: str, server_pid: int, args: argparse.Namespace, log: Path) -> list[tuple[float, TreeMemory]]:
    """Locust for args.duration; the server tree's memory every few seconds meanwhile: [(unix time, sample)]."""
    from tqdm import tqdm

    binary = shutil.which("locust", path=str(Path(sys.executable).parent)) or "locust"
    user = "SoakGrpcUser" if args.protocol == "grpc" else "SoakHttpUser"
    cmd = [binary, "-f", str(USERS_FILE), "--headless", "--host", url, "-u", str(args.users), "-r", str(args.users),
           "-t", f"{args.duration}s", "--stop-timeout", "10", "--only-summary", "--loglevel", "WARNING",
           "--soak-log", str(log), "--bad-share", str(args.bad_share), "--triton-model", args.triton_model, user]
    rss: list[tuple[float, TreeMemory]] = []
    with open(log.with_suffix(".locust.log"), "w") as out:
        process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        start = time.monotonic()
        try:
            with tqdm(total=args.duration, unit="s", desc="soak", disable=not sys.stderr.isatty()) as bar:
                while process.poll() is None and time.monotonic() - start < args.duration + 90:
                    try:
                        rss.append((time.time(), tree_memory(server_pid)))
                    except psutil.NoSuchProcess:
                        raise SoakError(f"the server (pid {server_pid}) exited during the soak") from None
                    time.sleep(min(2.0, args.bucket / 4))
                    bar.n = min(args.duration, int(time.monotonic() - start))
                    bar.refresh()
            if process.poll() is None:
                raise SoakError(f"locust ran past {args.duration + 90} s")
        finally:  # whatever stopped the soak, Locust does not go on without it
            if process.poll() is None:
                process.kill()
                process.wait()
    if not log.exists():
        raise SoakError(f"locust logged no request (exit {process.returncode}); see {log.with_suffix('.locust.log')}")
    return rss


def env_setting(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        raise argparse.ArgumentTypeError(f"{text!r}: NAME=VALUE, e.g. MALLOC_ARENA_MAX=2")
    return name, value


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=parse_duration, default="600",
                   help="600, 10m, 1h; at least 1 s (default: 600 s)")
    p.add_argument("--users", type=number(int, 1), default=8, help="closed-loop users (default: %(default)s)")
    p.add_argument("--protocol", choices=("http", "grpc"), default="http", help="(default: %(default)s)")
    p.add_argument("--bad-share", type=number(float, 0, 1), default=0.1,
                   help="share of bad images, 0 to 1 (default: %(default)s)")
    p.add_argument("--bucket", type=number(float, 0, above_low=True), default=60.0,
                   help="seconds per reported row (default: %(default)s)")
    p.add_argument("--warmup", type=number(int, 0), default=1,
                   help="buckets left out of drift figures (default: %(default)s)")
    p.add_argument("--url", default=None, help="a running server's host:port for --protocol (default: start one)")
    p.add_argument("--server-pid", type=number(int, 1), default=None,
                   help="that server's pid, for its RSS (with --url)")
    p.add_argument("--model-repository", default="model_repository", help="served without --url (default: %(default)s)")
    p.add_argument("--triton-model", default=None, help="ensemble to call (default: the repository's)")
    p.add_argument("--server-env", action="append", default=[], metavar="NAME=VALUE", type=env_setting,
                   help="an environment variable for the soak's own server and its stubs only, not for Locust "
                        "(e.g. an allocator setting: MALLOC_ARENA_MAX=2); repeatable")
    p.add_argument("--kill-stubs", action="store_true",
                   help="kill -9 each python-backend stub in turn during the run, with the watchdog (own server)")
    p.add_argument("--out", default="benchmarks/results/soak", help="report folder (default: %(default)s)")
    return p


def main(args: argparse.Namespace) -> dict:
    from benchmarks.locust_run import ensemble_name
    from serving.server import SERVE_EXTRA_ARGS, TritonServer

    if args.url and (args.kill_stubs or args.server_env):
        raise ValueError("--kill-stubs and --server-env act on the soak's own server (no --url)")
    if args.url and args.server_pid is None:
        raise ValueError("--url needs --server-pid (the RSS is measured on that process and its stubs)")
    if args.server_pid is not None and not psutil.pid_exists(args.server_pid):
        raise ValueError(f"--server-pid {args.server_pid}: no such process (`make serve` records its server's "
                         "in .run/tritonserver.json)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    args.triton_model = args.triton_model or ensemble_name(args.model_repository)
    log = out / "requests.csv"
    log.unlink(missing_ok=True)
    with ExitStack() as stack:
        url, pid = args.url, args.server_pid
        if url is None:
            server = stack.enter_context(TritonServer(args.model_repository, log_file=out / "tritonserver.log",
                                                      extra_args=SERVE_EXTRA_ARGS, env=dict(args.server_env)))
            url, pid = (server.grpc_url if args.protocol == "grpc" else server.http_url), server.process.pid
        killer = watchdog = None
        if args.kill_stubs:
            from serving.watchdog import TritonAdmin, Watchdog

            admin = TritonAdmin(server.http_url, lambda: {})
            watchdog = stack.enter_context(Watchdog(pid, admin, interval_s=0.1))
            models = {m: admin.instances(m) for m, _ in sorted(set(watchdog.tracker.known.values()))}
            killer = StubKiller(watchdog, models, args.duration)
        t0 = time.time()
        if killer:
            killer.start()
        try:
            rss = run_locust(url, pid, args, log)
        finally:
            if killer:
                killer.stop()
                status = watchdog.status()
                try:
                    stubs = [s for s in watchdog.tracker.scan() if not s.dead]
                except psutil.Error:  # the server has exited: Triton 2.51 aborts on some stub kills
                    stubs = None
    rows = read_log(log)
    if not rows:
        raise SoakError(f"no requests were made; see {log.with_suffix('.locust.log')}")
    per_bucket = buckets(rows, rss, t0, args.bucket, args.duration)
    summary = summarize(rows, per_bucket, args.warmup)
    if killer:
        summary["stub_kills"] = fault_figures(rows, killer.faults, time.time())
        summary["server_exited"] = stubs is None
        summary["stubs_alive_at_end"] = len(stubs or [])
        summary["stubs_retired"] = len(status["retired_stubs"])
        windows = [(f.killed_at, f.ready_at or float("inf")) for f in killer.faults]
        summary["server_errors_outside_kills"] = sum(  # not in flight between a kill and readiness back
            1 for t, _, _, ms, result, _ in rows
            if result == "server_error" and not any(t - ms / 1000 < b and t > a for a, b in windows))
    write_report(out, summary, per_bucket, args)
    print(json.dumps({k: v for k, v in summary.items()}, indent=2))
    print(f"report: {out}/soak.md, soak.json, soak.png")
    return summary


if __name__ == "__main__":
    try:
        main(get_args_parser().parse_args())
    except (RuntimeError, OSError, ValueError) as exc:  # RuntimeError: SoakError, the server's ServerError
        sys.exit(f"benchmarks.soak: {exc}")
