"""`make profile`: where each pipeline's serving CPU goes, per image, by process and by library (Linux perf).

    python -m benchmarks.profile                          # both pipelines, concurrency 8, 12 s each
    python -m benchmarks.profile --pipelines fused --seconds 5

For each pipeline (the repository as `make engines` built it, and the same spec with the other
pipeline, as `make bench` does): serve it, warm it up, hold --concurrency requests on the ensemble
with perf_analyzer (gRPC, the bundled photos) and meanwhile sample every CPU with `perf record -a -e
cpu-clock` for --seconds. Each sample's CPU time goes to the serving process it hit (the server, or
the model whose python-backend stub it is) and to a group of libraries (ONNX Runtime, JPEG decoding,
Pillow, numpy, the Python interpreter, libc, the kernel, Triton's own code); dividing by the images
the ensemble finished in the same window (Triton's statistics) gives CPU ms per image. The load
generator and anything else on the machine are left out. Prints one table per pipeline and, with
two pipelines, the difference per library group; writes profile.{md,json}, each naming the machine,
to --out.

Needs Linux perf (`apt-get install linux-perf`) and the right to sample all CPUs (root, or
kernel.perf_event_paranoid <= 0): says which is missing otherwise. Sampling costs a little CPU of
its own; compare pipelines within one run.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from benchmarks import report
from benchmarks.procstats import tree_roles
from serving.health import number

# library group -> patterns of the shared-object path, first match wins (Triton's wheel lives under
# site-packages, so it comes before anything that could match a python path); kernel samples are "[kernel...]"
GROUPS = (
    ("ONNX Runtime", ("onnxruntime",)),
    ("JPEG decoding", ("libjpeg", "libturbojpeg")),
    ("Pillow (resize, convert)", ("/PIL/", "_imaging")),
    ("numpy", ("numpy", "openblas")),
    ("Triton (server, backends, stub)", ("tritonserver", "libtriton", "triton_python_backend_stub")),
    ("Python interpreter", ("libpython", "/bin/python")),
    ("libc, libstdc++ (memcpy, malloc)", ("libc.so", "libm.so", "libstdc++", "ld-linux", "libgcc")),
    ("kernel (page faults, scheduling, I/O)", ("[kernel", "[vdso]")),
)
OTHER = "other"
SAMPLE = re.compile(r"^\s*(\d+)/\d+\s+(\d+)\s+\S+\s+\((.*)\)\s*$")


class ProfilerUnavailable(RuntimeError):
    """Linux perf is missing or may not sample all CPUs here."""


def group_of(dso: str) -> str:
    for group, patterns in GROUPS:
        if any(p in dso for p in patterns):
            return group
    return OTHER


def require_perf(perf: str = "perf") -> str:
    """The perf binary, checked by a 0.1 s system-wide recording. Raises ProfilerUnavailable saying why."""
    binary = shutil.which(perf)
    if binary is None:
        raise ProfilerUnavailable(f"Linux perf ({perf}) is not installed: apt-get install linux-perf")
    with tempfile.TemporaryDirectory() as tmp:
        done = subprocess.run([binary, "record", "-a", "-e", "cpu-clock", "-F", "99", "-o", f"{tmp}/probe.data",
                               "--", "sleep", "0.1"], capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        reason = (done.stderr or done.stdout).strip().splitlines()
        raise ProfilerUnavailable(f"perf may not sample all CPUs here (run as root, or set "
                                  f"kernel.perf_event_paranoid <= 0): {reason[0] if reason else done.returncode}")
    return binary


def record(perf: str, seconds: float, data: Path) -> None:
    """Sample every CPU's time (software cpu-clock: the period of each sample is in ns) for `seconds`."""
    subprocess.run([perf, "record", "-a", "-e", "cpu-clock", "-F", "499", "-o", str(data), "--", "sleep",
                    str(seconds)], check=True, capture_output=True, timeout=seconds + 60)


def samples(perf: str, data: Path) -> collections.Counter:
    """{(pid, shared object): CPU ns} of a recording."""
    out = subprocess.run([perf, "script", "-i", str(data), "-F", "pid,tid,period,ip,dso", "-G"],
                         check=True, capture_output=True, text=True, timeout=600).stdout
    return parse_script(out)


def parse_script(text: str) -> collections.Counter:
    """`perf script -F pid,tid,period,ip,dso` lines ("pid/tid period ip (dso)") -> {(pid, dso): ns}."""
    totals: collections.Counter = collections.Counter()
    for line in text.splitlines():
        m = SAMPLE.match(line)
        if m:
            totals[(int(m.group(1)), m.group(3))] += int(m.group(2))
    return totals


IDLE_PID = 0  # cpu-clock samples every CPU, idle ones too: those land on the idle task, pid 0


@dataclasses.dataclass
class Profile:
    pipeline: str
    images: int
    seconds: float
    ms_per_image: dict[str, dict[str, float]]  # role -> library group -> CPU ms per image
    outside_ms_per_image: float  # samples of other processes (the load generator, ...), not of idle CPUs

    def group_totals(self) -> dict[str, float]:
        totals: collections.Counter = collections.Counter()
        for groups in self.ms_per_image.values():
            totals.update(groups)
        return dict(totals)

    def total(self) -> float:
        return sum(self.group_totals().values())


def attribute(totals: collections.Counter, roles: dict[int, str], images: int, pipeline: str,
              seconds: float) -> Profile:
    """Turn {(pid, dso): ns} into CPU ms per image, per serving role and library group."""
    if images <= 0:
        raise ValueError(f"{pipeline}: no images finished while recording, nothing to divide by")
    per: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    outside = 0
    for (pid, dso), ns in totals.items():
        if pid in roles:
            per[roles[pid]][group_of(dso)] += ns
        elif pid != IDLE_PID:
            outside += ns
    ms = {role: {g: ns / 1e6 / images for g, ns in sorted(groups.items(), key=lambda kv: -kv[1])}
          for role, groups in per.items()}
    return Profile(pipeline, images, seconds, ms, outside / 1e6 / images)


def table(profiles: list[Profile]) -> str:
    """Markdown: one row per library group, one column per pipeline (CPU ms per image), and the
    difference of the last two when there are two."""
    groups = [g for g, _ in GROUPS] + [OTHER]
    header = "| library group | " + " | ".join(p.pipeline for p in profiles) + (" | difference |" if len(profiles) == 2 else " |")
    lines = [header, "|---|" + "---:|" * (len(profiles) + (len(profiles) == 2))]
    totals = [p.group_totals() for p in profiles]
    for g in groups:
        values = [t.get(g, 0.0) for t in totals]
        if not any(v >= 0.005 for v in values):
            continue
        diff = f" {values[0] - values[1]:+.2f} |" if len(values) == 2 else ""
        lines.append(f"| {g} | " + " | ".join(f"{v:.2f}" for v in values) + " |" + diff)
    sums = [p.total() for p in profiles]
    lines.append("| **all serving processes** | " + " | ".join(f"**{v:.2f}**" for v in sums) + " |"
                 + (f" **{sums[0] - sums[1]:+.2f}** |" if len(sums) == 2 else ""))
    by_role = "; ".join(f"{p.pipeline}: " + ", ".join(f"{r} {sum(g.values()):.2f}" for r, g in p.ms_per_image.items())
                        for p in profiles)
    return "\n".join(lines) + "\n\nBy process (CPU ms per image): " + by_role + "\n"


def profile_pipeline(repo: Path, pipeline: str, ensemble: str, tool, inputs: Path, concurrency: int,
                     seconds: float, perf: str, out: Path) -> Profile:
    """Serve `repo`, hold `concurrency` requests on the ensemble with perf_analyzer, record `seconds`."""
    from benchmarks.serverstats import snapshot, stage_stats
    from serving.server import Ports, TritonServer

    with TritonServer(repo, Ports.free(), log_file=out / f"tritonserver-{pipeline}.log") as server:
        tool.warm_up(ensemble, server.grpc_url, "grpc", concurrency, out / f"warmup-{pipeline}.csv", inputs)
        roles = tree_roles(server.process.pid)
        cmd = tool.command(ensemble, server.grpc_url, "grpc", concurrency, out / f"load-{pipeline}.csv", inputs,
                           measurement_ms=int((seconds + 30) * 1000), max_trials=1, stability=1000)
        load = subprocess.Popen(cmd, env=tool.env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        try:
            time.sleep(3)  # perf_analyzer's connections up, every instance busy
            if load.poll() is not None:
                raise RuntimeError(f"perf_analyzer exited early (code {load.returncode}): {' '.join(cmd)}")
            before, t0 = snapshot(server.grpc_url), time.monotonic()
            record(perf, seconds, out / f"perf-{pipeline}.data")
            after, wall = snapshot(server.grpc_url), time.monotonic() - t0
        finally:
            load.terminate()
            load.wait(30)
        images = images_recorded(stage_stats(ensemble, before, after, wall).requests, wall, seconds)
        return attribute(samples(perf, out / f"perf-{pipeline}.data"), roles, images, pipeline, seconds)


def images_recorded(requests: int, wall_s: float, recorded_s: float) -> int:
    """The images served while perf sampled: the snapshots around `perf record` span `wall_s`, its
    start-up and write-out included, while it samples only `recorded_s`; under the steady load the
    count scales with the time (one image per request)."""
    return round(requests * min(1.0, recorded_s / wall_s)) if wall_s > 0 else requests


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-repository", default="model_repository", help="(default: %(default)s)")
    p.add_argument("--pipelines", nargs="+", default=["ensemble", "fused"], choices=("ensemble", "fused"),
                   help="pipelines to profile, in this order (default: %(default)s)")
    p.add_argument("--concurrency", type=number(int, 1), default=8, help="requests in flight (default: %(default)s)")
    p.add_argument("--seconds", type=number(float, 0, above_low=True), default=12.0,
                   help="recording per pipeline (default: %(default)s)")
    p.add_argument("--photos", default="jpeg", help="photo encoding (default: %(default)s)")
    p.add_argument("--perf", default="perf", help="Linux perf binary (default: %(default)s)")
    p.add_argument("--perf-venv", default=".venv-perf", help="perf_analyzer environment (default: %(default)s)")
    p.add_argument("--out", default="benchmarks/results/profile", help="results folder (default: %(default)s)")
    return p


def main(args: argparse.Namespace) -> list[Profile]:
    from benchmarks.bench import pipeline_repositories
    from benchmarks.perf import PerfAnalyzer, photo_inputs
    from benchmarks.workload import load_photos
    from build.repository.writer import read_manifest

    perf = require_perf(args.perf)
    tool = PerfAnalyzer.locate(args.perf_venv)
    repo, out = Path(args.model_repository), Path(args.out)
    build = read_manifest(repo)
    out.mkdir(parents=True, exist_ok=True)
    repos = pipeline_repositories(repo, build, out)
    missing = [p for p in args.pipelines if p not in repos]
    if missing:
        raise ValueError(f"pipeline(s) {missing} cannot be built for the {build['backend']} backend")
    inputs = photo_inputs(list(load_photos(args.photos).values()), out)  # as make bench
    profiles = []
    for pipeline in args.pipelines:
        print(f"profile: {pipeline} ({repos[pipeline]}), concurrency {args.concurrency}, {args.seconds:.0f} s",
              flush=True)
        profiles.append(profile_pipeline(repos[pipeline], pipeline, build["spec"]["ensemble_name"], tool, inputs,
                                         args.concurrency, args.seconds, perf, out))
    text = (f"Serving CPU per image by library group (ms), perf_analyzer at concurrency {args.concurrency}, "
            f"classifier {build.get('variant', 'fp32')}, "
            + ", ".join(f"{p.pipeline} {p.images / p.seconds:.1f} img/s" for p in profiles) + ":\n\n"
            + table(profiles))
    print("\n" + text)
    write(profiles, text, out)
    print(f"wrote {out}/profile.md, profile.json")
    return profiles


def write(profiles: list[Profile], text: str, out: Path) -> None:
    """profile.md (the machine, then `text`) and profile.json (the machine and the profiles)."""
    report.write_markdown(out / "profile.md", text)
    report.write_json(out / "profile.json", {"profiles": [dataclasses.asdict(p) for p in profiles]})


if __name__ == "__main__":
    import sys

    try:
        main(get_args_parser().parse_args())
    except (ProfilerUnavailable, OSError, RuntimeError, ValueError) as exc:
        sys.exit(f"benchmarks.profile: {exc}")
