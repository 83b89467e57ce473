"""`make tune`: search instance counts, batching and threads with perf_analyzer; write the winner back.

    python -m benchmarks.tune                              # reads and rewrites configs/deployment.json
    python -m benchmarks.tune --quick --write-spec /tmp/tuned.json
    python -m benchmarks.tune --p99-budget-ms 150 --concurrency 16 --no-write

Greedy coordinate search from the current spec: one knob at a time (in the order of --grid), every
value of it is tried on the best configuration so far; a candidate wins if its p99 stays within
--p99-budget-ms and its throughput beats the best by more than --min-gain. Each candidate is a
fresh repository (build.repository.write_repository) served by a fresh tritonserver and measured
by perf_analyzer on the ensemble, over gRPC, with the real photos, at --concurrency. The table of
everything tried is printed and saved (tune.csv / tune.json); `make engines` then uses the result.
"""
from __future__ import annotations

import argparse
import copy
import csv
import dataclasses
import json
from pathlib import Path

from benchmarks.perf import DEFAULT_VENV, PerfAnalyzer, PerfAnalyzerError, write_input_data
from benchmarks.workload import ENCODINGS, load_photos
from build.spec import DEFAULT_SPEC_PATH, DeploymentSpec

# knob -> values tried; a knob is "<stage>.<field>" or a top-level field of the spec
FULL_GRID = {
    "pipeline": ["ensemble", "fused"],
    "fused.instances": [1, 2, 3],
    "fused.threads": [1, 2],
    "preprocess.instances": [1, 2, 3],
    "classifier.instances": [1, 2],
    "classifier.threads": [1, 2],
    "preprocess.threads": [1, 2],
    "classifier.preferred_batch_sizes": [[4, 8], [8, 16], [16, 32]],
    "classifier.max_queue_delay_us": [0, 2000, 8000],
    "preprocess.max_queue_delay_us": [0, 2000],
}
QUICK_GRID = {
    "pipeline": ["ensemble", "fused"],
    "fused.instances": [2, 3],
    "preprocess.instances": [1, 2],
    "classifier.instances": [1, 2],
    "classifier.max_queue_delay_us": [0, 2000],
}


@dataclasses.dataclass
class Trial:
    knob: str
    settings: dict  # the knobs' values of this candidate
    throughput: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    feasible: bool = False
    chosen: bool = False
    error: str = ""


def knob_value(spec: DeploymentSpec, knob: str):
    owner, _, field = knob.rpartition(".")
    return getattr(getattr(spec, owner) if owner else spec, field)


def with_knob(spec: DeploymentSpec, knob: str, value) -> DeploymentSpec:
    owner, _, field = knob.rpartition(".")
    new = copy.deepcopy(spec)
    setattr(getattr(new, owner) if owner else new, field, copy.deepcopy(value))
    new.check()
    return new


def measure_spec(spec: DeploymentSpec, backend: str, repo: Path, tool: PerfAnalyzer, inputs: Path,
                 concurrency: int, measurement_ms: int, log: Path):
    """Build `spec` into `repo`, serve it, perf_analyzer the ensemble once. Returns a PerfResult."""
    from build.repository import write_repository
    from serving.server import TritonServer

    write_repository(spec, backend, repo, spec_source="benchmarks.tune candidate")
    with TritonServer(repo, log_file=log) as server:
        return tool.measure(spec.ensemble_name, server.grpc_url, "grpc", concurrency,
                            repo.parent / "perf.csv", inputs, measurement_ms)


def search(spec: DeploymentSpec, grid: dict, measure, budget_ms: float, min_gain: float,
           max_candidates: int) -> tuple[DeploymentSpec | None, list[Trial]]:
    """Greedy coordinate search. `measure(spec) -> PerfResult` (raises on failure). Returns the best
    spec whose p99 is within budget (None if none is) and every trial."""
    settings = lambda s: {k: knob_value(s, k) for k in grid}  # noqa: E731
    trials, best, best_trial = [], spec, None

    def attempt(candidate: DeploymentSpec, knob: str) -> Trial:
        trial = Trial(knob, settings(candidate))
        try:
            r = measure(candidate)
            trial.throughput, trial.p50_ms, trial.p99_ms = r.throughput, r.p50_ms, r.p99_ms
            trial.feasible = r.p99_ms <= budget_ms
        except Exception as exc:  # a candidate that fails to load or serve is recorded, not fatal
            trial.error = str(exc).splitlines()[0][:200]
        trials.append(trial)
        print(describe(trial), flush=True)
        return trial

    best_trial = attempt(spec, "baseline")
    for knob, values in grid.items():
        current = knob_value(best, knob)
        for value in values:
            if value == current or len(trials) >= max_candidates:
                continue
            candidate = with_knob(best, knob, value)
            trial = attempt(candidate, knob)
            if beats(trial, best_trial, min_gain):
                best, best_trial = candidate, trial
    if not best_trial.feasible:
        return None, trials
    best_trial.chosen = True
    return best, trials


def beats(trial: Trial, best: Trial, min_gain: float) -> bool:
    """Within budget and faster by min_gain (or the first within budget); while nothing is within
    budget, a candidate at least as fast with a lower p99 moves the search towards the budget."""
    if trial.error:
        return False
    if trial.feasible:
        return not best.feasible or trial.throughput > best.throughput * (1 + min_gain)
    return not best.feasible and trial.p99_ms < best.p99_ms and trial.throughput >= best.throughput


def describe(t: Trial) -> str:
    knobs = " ".join(f"{k.replace('_batch_sizes', '').replace('max_queue_delay_us', 'delay_us')}="
                     f"{','.join(map(str, v)) if isinstance(v, list) else v}" for k, v in t.settings.items())
    result = f"ERROR {t.error}" if t.error else (f"{t.throughput:6.1f} img/s p50 {t.p50_ms:6.1f} p99 {t.p99_ms:6.1f} ms"
                                                 f"{'' if t.feasible else ' (over budget)'}")
    return f"{'*' if t.chosen else ' '} {t.knob:34s} {result:48s} {knobs}"


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--spec", default=str(DEFAULT_SPEC_PATH), help="starting spec (default: %(default)s)")
    p.add_argument("--write-spec", default=None, help="where to save the winner (default: --spec)")
    p.add_argument("--no-write", action="store_true", help="only print what was tried and the winner")
    p.add_argument("--quick", action="store_true", help=f"small grid: {QUICK_GRID}")
    p.add_argument("--concurrency", type=int, default=4, help="ensemble requests in flight (default: %(default)s)")
    p.add_argument("--p99-budget-ms", type=float, default=100.0, help="p99 budget (default: %(default)s)")
    p.add_argument("--min-gain", type=float, default=0.03, help="throughput gain to switch (default: %(default)s)")
    p.add_argument("--max-candidates", type=int, default=16, help="servers started at most (default: %(default)s)")
    p.add_argument("--measurement-ms", type=int, default=2000, help="perf_analyzer window (default: %(default)s)")
    p.add_argument("--artifacts", default=None, help="exported model (default: the spec's)")
    p.add_argument("--photos", default="jpeg", choices=ENCODINGS, help="photo encoding (default: %(default)s)")
    p.add_argument("--perf-venv", default=DEFAULT_VENV, help="(default: %(default)s)")
    p.add_argument("--out", default="benchmarks/results/tune", help="work and results folder (default: %(default)s)")
    return p


def main(args: argparse.Namespace) -> DeploymentSpec:
    from build import capabilities

    spec = DeploymentSpec.load(args.spec) if Path(args.spec).exists() else DeploymentSpec()
    if args.artifacts:
        spec = spec.replace(artifacts=args.artifacts)
    backend, _ = capabilities.resolve_backend(spec.backend, capabilities.detect())
    tool = PerfAnalyzer.locate(args.perf_venv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    inputs = write_input_data(list(load_photos(args.photos).values()), out / "ensemble.input.json", "IMAGE")
    grid = dict(QUICK_GRID if args.quick else FULL_GRID)
    if backend != "python-onnxruntime":  # the fused pipeline exists for the python classifier only
        grid = {k: v for k, v in grid.items() if k != "pipeline" and not k.startswith("fused.")}
    print(f"tune: ensemble over gRPC at concurrency {args.concurrency}, p99 budget {args.p99_budget_ms} ms, "
          f"backend {backend}, knobs {list(grid)}", flush=True)
    measure = lambda s: measure_spec(s, backend, out / "model_repository", tool, inputs,  # noqa: E731
                                     args.concurrency, args.measurement_ms, out / "tritonserver.log")
    best, trials = search(spec, grid, measure, args.p99_budget_ms, args.min_gain, args.max_candidates)

    print("\ntried (* = chosen):")
    for t in trials:
        print(describe(t))
    with open(out / "tune.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[x.name for x in dataclasses.fields(Trial)])
        writer.writeheader()
        writer.writerows({**dataclasses.asdict(t), "settings": json.dumps(t.settings)} for t in trials)
    (out / "tune.json").write_text(json.dumps({"args": vars(args), "best": best.to_dict() if best else None,
                                               "trials": [dataclasses.asdict(t) for t in trials]}, indent=2) + "\n")
    if best is None:
        raise RuntimeError(f"no configuration kept p99 within {args.p99_budget_ms} ms at concurrency "
                           f"{args.concurrency} (tried {len(trials)}); nothing written. Raise --p99-budget-ms "
                           "or lower --concurrency")
    if not args.no_write:
        target = Path(args.write_spec or args.spec)
        best.save(target)
        print(f"wrote {target}: run `make engines SPEC={target}` to build it")
    return best


if __name__ == "__main__":
    import sys

    try:
        main(get_args_parser().parse_args())
    except (PerfAnalyzerError, OSError, RuntimeError, ValueError) as exc:
        sys.exit(f"benchmarks.tune: {exc}")
