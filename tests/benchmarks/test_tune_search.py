"""The configuration search's logic (benchmarks/tune.py), on a made-up cost model so every step is
known; the served search (a real tritonserver and perf_analyzer) is in test_bench_served.py."""
import dataclasses

import pytest

from benchmarks import tune
from build.spec import DeploymentSpec


@dataclasses.dataclass
class Result:
    throughput: float
    p50_ms: float
    p99_ms: float


def cost_model(spec: DeploymentSpec) -> Result:
    """Fused beats ensemble; for the fused stage, batches of 2 and 2 instances are best."""
    if spec.pipeline == "fused":
        f = spec.fused
        rate = 150 + (20 if f.preferred_batch_sizes == [2] else 0) + (10 if f.instances == 2 else 0)
    else:
        rate = 100 + 5 * spec.classifier.instances
    return Result(rate, 40.0, 4000.0 / rate)


def test_knobs_of_stages_the_pipeline_does_not_serve_are_not_tried():
    spec = DeploymentSpec()  # ensemble, fused defaults
    tried = []

    def measure(s):
        tried.append(s)
        return cost_model(s)

    best, trials = tune.search(spec, tune.FULL_GRID, measure, budget_ms=100, min_gain=0.01, max_candidates=100)
    assert best.pipeline == "fused"
    # after switching to fused, no ensemble-stage knob was tried
    knobs = [t.knob for t in trials]
    switched = knobs.index("pipeline")
    assert not any(k.split(".")[0] in ("classifier", "preprocess") for k in knobs[switched + 1:])
    assert best.fused.preferred_batch_sizes == [2] and best.fused.instances == 2
    assert len(tried) == len(trials) and sum(t.chosen for t in trials) == 1


def test_select_knobs_by_name_or_stage():
    grid = tune.select_knobs(tune.FULL_GRID, ["fused", "classifier.layout"])
    assert set(grid) == {k for k in tune.FULL_GRID if k.startswith("fused.")} | {"classifier.layout"}
    assert tune.select_knobs(tune.FULL_GRID, None) == tune.FULL_GRID
    with pytest.raises(ValueError, match="unknown knob"):
        tune.select_knobs(tune.FULL_GRID, ["fuse"])


def test_nothing_within_budget_returns_none():
    best, trials = tune.search(DeploymentSpec(), {"classifier.layout": [[1, 2], [2, 1]]},
                               lambda s: Result(100, 50, 500), budget_ms=100, min_gain=0.0, max_candidates=5)
    assert best is None and trials and not any(t.feasible for t in trials)
