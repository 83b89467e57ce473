"""`make tune`: search instance counts, batching and threads with perf_analyzer; write the winner back.

    python -m benchmarks.tune                              # reads and rewrites configs/deployment.json
    python -m benchmarks.tune --quick --write-spec /tmp/tuned.json
    python -m benchmarks.tune --p99-budget-ms 150 --concurrency 16 --no-write
    python -m benchmarks.tune --pipeline fused --knobs fused   # tune the fused pipeline, keep the spec's choice

Greedy coordinate search from the current spec: one knob at a time (in the order of the grid: the
pipeline, each stage's whole `shape`, then its `layout` and `batching`), every value of it is tried on
the best configuration so far (knobs of stages the pipeline does not serve are passed over), in up
to --passes sweeps. A candidate that beats the best (p99 within --p99-budget-ms, throughput higher by
more than --min-gain) is not believed at once: the best and the candidate are measured again in up to
--confirm-pairs pairs (3), back to back, the order alternating, and the candidate wins only if it
beats the best in most of them (on a shared VM one run can be well off the next, and one repeat let
such noise through: docs/benchmarks.md; the table shows the mean of each configuration's runs, and
whether it is within budget by the median of their p99s, which one slow repeat cannot flip). Each
candidate is a fresh repository (build.repository.write_repository) served by a fresh
tritonserver, warmed up, and measured by perf_analyzer on the ensemble, over gRPC, with the real
photos, at --concurrency. The table of
everything tried is printed and saved (tune.csv / tune.json); `make engines` then uses the result.
Candidates serve the classifier file `make engines` will serve: the artifacts' model.onnx for FP32
ONNX, else the variant or plan recorded in --model-repository/BUILD.json for the same artifacts,
backend and precision (build it first: `make engines PRECISION=int8 && make tune PRECISION=int8`).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import json
import statistics
from pathlib import Path

from benchmarks import report
from benchmarks.perf import DEFAULT_VENV, PerfAnalyzer, PerfAnalyzerError, photo_inputs
from benchmarks.workload import ENCODINGS, load_photos
from build.repository.spec import BACKENDS, DEFAULT_SPEC_PATH, PRECISIONS, DeploymentSpec
from serving.health import number

# knob -> values tried. A knob is a top-level field of the spec ("pipeline") or "<stage>.<name>", where
# <name> is a field of the stage or one of the COMPOUND knobs, which move fields that only pay off
# together: `layout` is [instances, threads], `batching` is [preferred batch sizes, queue delay in us]
# and `shape` is all four at once. (On a small CPU, two 1-thread instances sent batches of 2 at once
# can beat one 2-thread instance with batches of 8-16 while neither half of that change alone does;
# in the two-model ensemble the classifier's shape pays off fully only once the preprocess model has
# the same shape, so the search moves whole shapes first and then fine-tunes their halves.)
# Small batches win on CPU: ONNX Runtime's time per image rises with the batch, and a large preferred
# size hands one instance the queue while another idles. Figures: docs/results/, read with
# docs/benchmarks.md.
COMPOUND = {"layout": ("instances", "threads"), "batching": ("preferred_batch_sizes", "max_queue_delay_us"),
            "shape": ("instances", "threads", "preferred_batch_sizes", "max_queue_delay_us")}
FULL_GRID = {
    "pipeline": ["ensemble", "fused"],
    "fused.shape": [[2, 1, [2], 0], [1, 2, [2], 0], [2, 1, [4, 8], 2000]],
    "fused.layout": [[2, 1], [3, 1], [1, 2], [2, 2]],
    "fused.batching": [[[1], 0], [[2], 0], [[4], 0], [[4, 8], 2000]],
    "classifier.shape": [[2, 1, [2], 0], [1, 2, [2], 0], [1, 2, [8, 16], 2000], [2, 1, [4], 0]],
    "preprocess.shape": [[2, 1, [2], 0], [1, 2, [4], 0], [2, 1, [4, 8], 2000], [2, 1, [4], 0]],
    "classifier.layout": [[1, 2], [2, 1], [1, 1], [3, 1]],
    "classifier.batching": [[[1], 0], [[2], 0], [[4], 0], [[4, 8], 2000]],
    "preprocess.layout": [[1, 1], [2, 1], [3, 1], [1, 2]],
    "preprocess.batching": [[[2], 0], [[4], 0], [[4, 8], 2000]],
}
QUICK_GRID = {
    "pipeline": ["ensemble", "fused"],
    "fused.batching": [[[2], 0], [[4, 8], 2000]],
    "classifier.shape": [[2, 1, [2], 0], [1, 2, [8, 16], 2000]],
    "preprocess.shape": [[2, 1, [2], 0], [2, 1, [4, 8], 2000]],
}
# the stages each pipeline serves: a knob of another stage changes nothing and is not tried
PIPELINE_STAGES = {"ensemble": ("preprocess", "classifier"), "fused": ("fused",)}


def applies(spec: DeploymentSpec, knob: str) -> bool:
    """Whether `knob` changes what `spec` serves (a fused.* knob does nothing to the ensemble)."""
    owner = knob.rpartition(".")[0]
    return not owner or owner in PIPELINE_STAGES[spec.pipeline]


def select_knobs(grid: dict, wanted: list[str] | None) -> dict:
    """The part of `grid` named by `wanted`: a knob ("fused.layout") or a stage ("fused")."""
    if not wanted:
        return dict(grid)
    unknown = [w for w in wanted if not any(k == w or k.startswith(w + ".") for k in FULL_GRID)]
    if unknown:
        raise ValueError(f"unknown knob(s) {unknown}; knobs: {list(FULL_GRID)} or a stage name")
    return {k: v for k, v in grid.items() if any(k == w or k.startswith(w + ".") for w in wanted)}


@dataclasses.dataclass
class Trial:
    knob: str
    settings: dict  # the knobs' values of this candidate
    throughput: float = 0.0  # means over `runs` measurements
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    runs: int = 0
    p99_runs: list = dataclasses.field(default_factory=list)  # each run's p99; `feasible` judges their median
    feasible: bool = False
    chosen: bool = False
    error: str = ""  # the first line of why its first run failed
    detail: str = ""  # the end of that failure's whole text (perf_analyzer's own output): tune.json

    def add(self, result, budget_ms: float) -> None:
        """Fold one more measurement into the means. Within budget is judged by the median of the runs'
        p99s, not their mean: from three runs on, one slow window (on a shared VM) cannot push a
        configuration over the budget, as it could push the mean (of two runs the median is the mean)."""
        n = self.runs
        mean = lambda old, new: (old * n + new) / (n + 1)  # noqa: E731
        self.throughput = mean(self.throughput, result.throughput)
        self.p50_ms, self.p99_ms = mean(self.p50_ms, result.p50_ms), mean(self.p99_ms, result.p99_ms)
        self.runs = n + 1
        self.p99_runs = [*self.p99_runs, result.p99_ms]
        self.feasible = self.p99_median_ms <= budget_ms

    @property
    def p99_median_ms(self) -> float:
        return statistics.median(self.p99_runs) if self.p99_runs else float("nan")


def _fields(knob: str) -> tuple[str, tuple[str, ...]]:
    owner, _, name = knob.rpartition(".")
    return owner, COMPOUND.get(name, (name,)) if owner else (name,)


def knob_value(spec: DeploymentSpec, knob: str):
    owner, fields = _fields(knob)
    target = getattr(spec, owner) if owner else spec
    values = [getattr(target, f) for f in fields]
    return values if len(fields) > 1 else values[0]


def with_knob(spec: DeploymentSpec, knob: str, value) -> DeploymentSpec:
    owner, fields = _fields(knob)
    new = copy.deepcopy(spec)
    target = getattr(new, owner) if owner else new
    for field, v in zip(fields, value if len(fields) > 1 else [value]):
        setattr(target, field, copy.deepcopy(v))
    new.check()
    return new


def classifier_model(spec: DeploymentSpec, backend: str, repository: Path) -> Path | None:
    """The classifier file the candidates serve, so that the search measures what `make engines` will
    deploy: None (the artifacts' model.onnx) for FP32 ONNX; otherwise the file recorded in
    `repository`/BUILD.json when that build has the spec's artifacts, backend and precision (the
    variant passed the accuracy gate there). Raises ValueError, saying how to build it, when none does."""
    if spec.precision == "fp32" and backend != "tensorrt":
        return None
    from build.repository.writer import MARKER, deployed_model_file, read_manifest

    manifest = repository / MARKER
    try:
        build = read_manifest(repository)
    except FileNotFoundError:
        build = {}
    same = (bool(build) and Path(build["spec"]["artifacts"]).resolve() == Path(spec.artifacts).resolve()
            and build.get("backend") == backend and build.get("precision") == spec.precision)
    if same:
        return deployed_model_file(build)
    found = (f"{manifest} was built with precision {build.get('precision')}, backend {build.get('backend')}, "
             f"artifacts {build.get('spec', {}).get('artifacts')}" if build else f"there is no {manifest}")
    raise ValueError(f"tuning a {spec.precision} classifier on the {backend} backend needs the file `make engines` "
                     f"deploys for it, and {found}: run `make engines PRECISION={spec.precision}` first")


def measure_spec(spec: DeploymentSpec, backend: str, repo: Path, tool: PerfAnalyzer, inputs: Path,
                 concurrency: int, measurement_ms: int, log: Path, model_file: Path | None = None):
    """Build `spec` into `repo` (classifier: `model_file`, default the artifacts' model.onnx), serve
    it, perf_analyzer the ensemble once. Returns a PerfResult."""
    from build.repository.writer import write_repository
    from serving.server import TritonServer

    write_repository(spec, backend, repo, spec_source="benchmarks.tune candidate", model_file=model_file)
    with TritonServer(repo, log_file=log) as server:
        tool.warm_up(spec.ensemble_name, server.grpc_url, "grpc", concurrency, repo.parent / "warmup.csv", inputs)
        return tool.measure(spec.ensemble_name, server.grpc_url, "grpc", concurrency,
                            repo.parent / "perf.csv", inputs, measurement_ms)


def search(spec: DeploymentSpec, grid: dict, measure, budget_ms: float, min_gain: float,
           max_candidates: int, passes: int = 2, confirm: int = 3) -> tuple[DeploymentSpec | None, list[Trial]]:
    """Greedy coordinate search: up to `passes` sweeps over the knobs, another only if the last one
    moved. `measure(spec) -> PerfResult` (raises on failure). With `confirm` pairs, a candidate that
    beats the best is measured again against it (see `confirmed`) and wins only if it beats it in
    most of the pairs (trials report the mean of their runs; within budget is the median of their p99s,
    Trial.add). Returns the best spec if its p99 is within budget, else the fastest configuration tried
    that is (None if none is), and every trial; no configuration is a candidate twice, and at most
    `max_candidates` are tried. A candidate with a caution the best has not (DeploymentSpec.cautions: one
    instance at the door, which then has no queue bound) is passed over, saying so."""
    settings = lambda s: {k: knob_value(s, k) for k in grid}  # noqa: E731
    trials, specs, best, best_trial = [], [], spec, None  # specs[i]: what trials[i] measured

    def run(trial: Trial, candidate: DeploymentSpec) -> Trial | None:
        """Measure once more; fold the run into `trial` and return it alone as a Trial."""
        try:
            result = measure(candidate)
        except Exception as exc:  # a candidate that fails to load or serve is recorded, not fatal
            text = str(exc).strip() or repr(exc)
            if not trial.runs:  # (a failed repeat of a measured configuration leaves its means alone)
                trial.error, trial.detail = text.splitlines()[0][:200], text[-2000:]
            return None
        trial.add(result, budget_ms)
        alone = Trial(trial.knob, trial.settings)
        alone.add(result, budget_ms)
        return alone

    def attempt(candidate: DeploymentSpec, knob: str) -> Trial:
        trial = Trial(knob, settings(candidate))
        run(trial, candidate)
        trials.append(trial)
        specs.append(candidate)
        print(describe(trial), flush=True)
        tail = [line.strip() for line in trial.detail.splitlines()[1:] if line.strip()][-3:]
        if tail:  # what perf_analyzer itself said last, where the first line gives only its exit code
            print("    " + "\n    ".join(tail), flush=True)
        return trial

    best_trial = attempt(spec, "baseline")
    seen = {json.dumps(spec.to_dict(), sort_keys=True)}
    for _ in range(passes):
        moved = False
        for knob, values in grid.items():
            if not applies(best, knob):
                continue
            for value in values:
                try:
                    candidate = with_knob(best, knob, value)
                except ValueError as exc:  # e.g. a preferred batch size above this spec's max_batch_size
                    print(f"  {knob}={_show(knob, value)}: not tried, {exc}", flush=True)
                    continue
                key = json.dumps(candidate.to_dict(), sort_keys=True)
                if key in seen or len(trials) >= max_candidates:
                    continue
                seen.add(key)
                added = [c for c in candidate.cautions() if c not in best.cautions()]
                if added:  # e.g. one instance at the door: unbounded, as a bound would stall it
                    print(f"  {knob}={_show(knob, value)}: not tried, caution: {added[0]}", flush=True)
                    continue
                trial = attempt(candidate, knob)
                if not beats(trial, best_trial, min_gain):
                    continue
                if confirm and best_trial.runs and not confirmed(
                        functools.partial(run, best_trial, best), functools.partial(run, trial, candidate), confirm,
                        min_gain):
                    continue
                best, best_trial, moved = candidate, trial, True
        if not moved:
            break
    if best_trial.error or not best_trial.feasible:  # e.g. its repeats took it over the budget
        within = [i for i, t in enumerate(trials) if t.runs and not t.error and t.feasible]
        if not within:
            return None, trials
        i = max(within, key=lambda i: trials[i].throughput)  # the fastest configuration tried within budget
        best, best_trial = specs[i], trials[i]
    best_trial.chosen = True
    return best, trials


def confirmed(best_again, candidate_again, pairs: int, min_gain: float) -> bool:
    """Whether a would-be winner beats the best in most of up to `pairs` back-to-back pairs of runs,
    the order alternating (best first, then candidate first, ...) so that neither side always runs
    second on a machine that drifts. `best_again()` / `candidate_again()` measure once more and
    return that run alone as a Trial, or None if it failed (a failed repeat is no win to believe).
    Stops as soon as the majority is decided; prints each pair and the verdict."""
    need, wins, losses, seen = pairs // 2 + 1, 0, 0, []
    for i in range(pairs):
        first, second = (best_again, candidate_again) if i % 2 == 0 else (candidate_again, best_again)
        a = first()
        b = second() if a else None
        if b is None:
            print(f"  again, pair {i + 1}: a run failed: not confirmed", flush=True)
            return False
        old, new = (a, b) if i % 2 == 0 else (b, a)
        won = beats(new, old, min_gain)
        wins, losses = wins + won, losses + (not won)
        seen.append(f"{old.throughput:.1f} / {new.throughput:.1f}{'' if won else ' (lost)'}")
        if wins >= need or losses > pairs - need:
            break
    verdict = wins >= need
    print(f"  again, back to back (best / candidate img/s): {', '.join(seen)}: won {wins} of {wins + losses}, "
          f"{'confirmed' if verdict else 'not confirmed'}", flush=True)
    return verdict


def beats(trial: Trial, best: Trial, min_gain: float) -> bool:
    """Within budget and faster by min_gain (or the first within budget); while nothing is within
    budget, a candidate at least as fast with a lower p99 moves the search towards the budget."""
    if trial.error:
        return False
    if trial.feasible:
        return not best.feasible or trial.throughput > best.throughput * (1 + min_gain)
    return not best.feasible and trial.p99_ms < best.p99_ms and trial.throughput >= best.throughput


def _show(knob: str, value) -> str:
    name = knob.rpartition(".")[2]
    if name == "layout":
        return f"{value[0]}x{value[1]}"
    if name == "batching":
        return f"{','.join(map(str, value[0])) or '-'}/{value[1]}us"
    if name == "shape":
        return f"{value[0]}x{value[1]}:{','.join(map(str, value[2])) or '-'}/{value[3]}us"
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


def settings_text(settings: dict) -> str:
    """'fused.shape=3x1:2/0us': a candidate's knobs (a stage's layout and batching are in its shape)."""
    shaped = {k.rpartition(".")[0] for k in settings if k.endswith(".shape")}  # its halves say nothing more
    return " ".join(f"{k}={_show(k, v)}" for k, v in settings.items()
                    if not (k.rpartition(".")[0] in shaped and k.rpartition(".")[2] in ("layout", "batching")))


def describe(t: Trial) -> str:
    knobs = settings_text(t.settings)
    result = f"ERROR {t.error}" if t.error else (f"{t.throughput:6.1f} img/s p50 {t.p50_ms:6.1f} p99 {t.p99_ms:6.1f} ms"
                                                 f"{f' x{t.runs}, p99 median {t.p99_median_ms:.1f}' if t.runs > 1 else ''}"
                                                 f"{'' if t.feasible else ' (over budget)'}")
    return f"{'*' if t.chosen else ' '} {t.knob:20s} {result:52s} {knobs}"


def write_trials(trials: list[Trial], best: DeploymentSpec | None, args: argparse.Namespace, out: Path) -> None:
    """tune.csv (one row per trial) and tune.json (the machine, args, best spec, trials)."""
    columns = [x.name for x in dataclasses.fields(Trial) if x.name != "detail"]  # a failure's text: tune.json
    report.write_csv(out / "tune.csv", columns,
                     ({**dataclasses.asdict(t), "settings": json.dumps(t.settings)} for t in trials))
    report.write_json(out / "tune.json", {"args": vars(args), "best": best.to_dict() if best else None,
                                          "trials": [dataclasses.asdict(t) for t in trials]})


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--spec", default=str(DEFAULT_SPEC_PATH), help="starting spec (default: %(default)s)")
    p.add_argument("--write-spec", default=None, help="where to save the winner (default: --spec)")
    p.add_argument("--no-write", action="store_true", help="only print what was tried and the winner")
    p.add_argument("--quick", action="store_true", help=f"small grid: {QUICK_GRID}")
    p.add_argument("--knobs", nargs="+", default=None,
                   help="search only these knobs or stages, e.g. `fused` or `classifier.layout` (default: all)")
    p.add_argument("--pipeline", default=None, choices=("ensemble", "fused"),
                   help="tune this pipeline's stages; the spec keeps its own pipeline unless `pipeline` is "
                        "among the knobs searched (default: the spec's)")
    p.add_argument("--concurrency", type=number(int, 1), default=8,
                   help="ensemble requests in flight (default: %(default)s)")
    p.add_argument("--p99-budget-ms", type=number(float, 0, above_low=True), default=100.0,
                   help="p99 budget (default: %(default)s)")
    p.add_argument("--min-gain", type=number(float, 0), default=0.03,
                   help="throughput gain to switch, 0.03 = 3%% (default: %(default)s)")
    p.add_argument("--max-candidates", type=number(int, 1), default=30,
                   help="configurations tried at most, the starting spec included (default: %(default)s)")
    p.add_argument("--confirm-pairs", type=number(int, 0), default=3,
                   help="a would-be winner and the best are measured again in up to this many back-to-back "
                        "pairs, the order alternating; it must win most of them; 0: believe one run "
                        "(default: %(default)s)")
    p.add_argument("--no-confirm", action="store_true", help="believe a single measurement (--confirm-pairs 0)")
    p.add_argument("--passes", type=number(int, 1), default=2,
                   help="sweeps over the knobs at most (default: %(default)s)")
    p.add_argument("--measurement-ms", type=number(int, 1), default=2000,
                   help="perf_analyzer window (default: %(default)s)")
    p.add_argument("--artifacts", default=None,
                   help="exported model to tune with; not written to the spec (default: the spec's)")
    p.add_argument("--precision", default=None, choices=PRECISIONS,
                   help="tune this classifier precision; not written to the spec, like `make engines "
                        "PRECISION=` (default: the spec's)")
    p.add_argument("--backend", default=None, choices=BACKENDS,
                   help="classifier backend to tune with; not written to the spec, like `make engines "
                        "BACKEND=` (default: the spec's)")
    p.add_argument("--model-repository", default="model_repository",
                   help="where `make engines` recorded the variant to serve (BUILD.json) (default: %(default)s)")
    p.add_argument("--photos", default="jpeg", choices=ENCODINGS, help="photo encoding (default: %(default)s)")
    p.add_argument("--perf-venv", default=DEFAULT_VENV, help="(default: %(default)s)")
    p.add_argument("--out", default="benchmarks/results/tune", help="work and results folder (default: %(default)s)")
    return p


def main(args: argparse.Namespace) -> DeploymentSpec:
    from build.repository import capabilities

    spec, _ = DeploymentSpec.load_or_default(args.spec)
    kept = {k: getattr(spec, k) for k in ("artifacts", "precision", "backend")}
    served_pipeline = spec.pipeline
    if args.artifacts:
        spec = spec.replace(artifacts=args.artifacts)
    if args.precision:
        spec = spec.replace(precision=args.precision)
    if args.backend:
        spec = spec.replace(backend=args.backend)
    if args.pipeline:
        spec = spec.replace(pipeline=args.pipeline)
    backend, _ = capabilities.resolve_backend(spec.backend, capabilities.detect(), spec.pipeline)
    model_file = classifier_model(spec, backend, Path(args.model_repository))
    tool = PerfAnalyzer.locate(args.perf_venv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    inputs = photo_inputs(list(load_photos(args.photos).values()), out)
    grid = select_knobs(QUICK_GRID if args.quick else FULL_GRID, args.knobs)
    if backend != "python-onnxruntime":  # the fused pipeline exists for the python classifier only
        grid = {k: v for k, v in grid.items() if k != "pipeline" and applies(spec.replace(pipeline="ensemble"), k)}
    if "pipeline" not in grid and grid and not any(applies(spec, k) for k in grid):
        raise ValueError(f"none of the knobs {list(grid)} applies to the spec's pipeline {spec.pipeline!r}: "
                         "add `pipeline` to --knobs or set the pipeline in the spec")
    print(f"tune: ensemble over gRPC at concurrency {args.concurrency}, p99 budget {args.p99_budget_ms} ms, "
          f"backend {backend}, classifier {model_file or Path(spec.artifacts) / 'model.onnx'}, knobs {list(grid)}",
          flush=True)
    measure = lambda s: measure_spec(s, backend, out / "model_repository", tool, inputs,  # noqa: E731
                                     args.concurrency, args.measurement_ms, out / "tritonserver.log", model_file)
    best, trials = search(spec, grid, measure, args.p99_budget_ms, args.min_gain, args.max_candidates, args.passes,
                          confirm=0 if args.no_confirm else args.confirm_pairs)

    print("\ntried (* = chosen):")
    for t in trials:
        print(describe(t))
    write_trials(trials, best, args, out)
    if not any(t.runs for t in trials):
        raise RuntimeError(f"every configuration tried failed to serve or to measure ({len(trials)}; the first: "
                           f"{trials[0].error}); nothing written. Server log: {out / 'tritonserver.log'}")
    if best is None:
        raise RuntimeError(f"no configuration kept p99 within {args.p99_budget_ms} ms at concurrency "
                           f"{args.concurrency} (tried {len(trials)}); nothing written. Raise --p99-budget-ms "
                           "or lower --concurrency")
    keeps = ""
    if "pipeline" not in grid and best.pipeline != served_pipeline:
        best = best.replace(pipeline=served_pipeline)  # --pipeline tuned the stages, not the choice
        keeps = f"the {args.pipeline} pipeline's knobs; the spec keeps \"pipeline\": \"{served_pipeline}\""
    # --artifacts, --precision and --backend picked the model to tune with, as they do for `make engines`:
    # the spec keeps its own
    best = best.replace(**kept)
    chosen = next((t for t in trials if t.chosen), None)
    winner = settings_text(chosen.settings) if chosen else "the starting spec"
    winner += ", the starting spec" if chosen and chosen.knob == "baseline" else ""
    if args.no_write:
        print(f"tune: --no-write, nothing written; the winner: {winner}" + (f"; {keeps}" if keeps else ""))
    else:
        target = Path(args.write_spec or args.spec)
        best.save(target)
        print(f"wrote {target} ({winner}" + (f"; {keeps}" if keeps else "") +
              f"): run `make engines SPEC={target}` to build it")
    return best


if __name__ == "__main__":
    import sys

    try:
        main(get_args_parser().parse_args())
    except (PerfAnalyzerError, OSError, RuntimeError, ValueError) as exc:
        sys.exit(f"benchmarks.tune: {exc}")
