"""`make bench-scenario` (benchmarks/scenario.py): the search for the highest Poisson rate within a p99 budget,
how a rate's run is judged, and bounded runs (slow) of perf_analyzer open loop against a real tritonserver."""
import json

import pytest

from benchmarks.scenario import KEEP_UP, Point, best, failure, judge, search, window_for

CAPACITY = 100.0


def queue_like(threshold: float, base_ms: float = 10.0, budget_ms: float = 100.0):
    """A stand-in server whose p99 grows as a queue's does, crossing the budget at `threshold` requests/s."""
    ceiling = threshold / (1 - base_ms / budget_ms)

    def measure(rate: float) -> Point:
        p99 = base_ms / (1 - rate / ceiling) if rate < ceiling else float("inf")
        return judge(rate, rate, base_ms, p99, budget_ms, 1000)

    return measure


@pytest.mark.parametrize("threshold", [7.0, 20.0, 49.0, 50.5, 80.0, 99.0, 140.0, 300.0])
def test_search_brackets_the_threshold_and_bisects_to_within_the_resolution(threshold):
    """Below half the closed-loop capacity it halves down, above it it climbs to the capacity and 1.5x past it
    (a closed loop of too few requests in flight underestimates); the answer is the highest rate that passed,
    within the resolution of the highest rate that holds the budget."""
    points = search(queue_like(threshold), CAPACITY, resolution=0.05, max_points=12)
    found = best(points)
    assert found is not None and found.passed
    assert found.rate <= threshold < found.rate + 0.05 * CAPACITY, [p.rate for p in points]
    assert all(p.passed == (p.rate <= threshold) for p in points)
    assert len({p.rate for p in points}) == len(points) <= 12, "no rate measured twice"


def test_search_gives_up_below_a_sixteenth_of_the_capacity_and_stops_at_max_points():
    points = search(queue_like(CAPACITY / 20), CAPACITY, resolution=0.05, max_points=12)
    assert [p.rate for p in points] == [50.0, 25.0, 12.5, 6.25] and best(points) is None
    points = search(queue_like(63.0), CAPACITY, resolution=0.001, max_points=4)
    assert len(points) == 4 and best(points).rate <= 63.0


def test_best_is_the_highest_pass_below_every_failure():
    """A noisy pass above a failed rate is not the answer: the search bisected below the failure."""
    points = [Point(50, True, ""), Point(100, False, ""), Point(75, True, ""), Point(87.5, False, ""),
              Point(120, True, "")]
    assert best(points).rate == 75
    assert best([Point(50, False, "")]) is None


def test_a_rate_fails_over_budget_or_when_the_answers_fall_behind():
    assert judge(10, 10, 5, 99.9, 100, 1000).passed
    over = judge(10, 10, 5, 100.1, 100, 1000)
    assert not over.passed and over.reason == "p99 100.1 ms over the 100 ms budget" and over.p99_ms == 100.1
    behind = judge(10, KEEP_UP * 10 - 0.1, 5, 50, 100, 1000)
    assert not behind.passed and behind.reason.startswith("answered 8.4/s of 10.0/s offered")
    assert window_for(2.0, 4000, 100) == 50000 and window_for(200.0, 4000, 100) == 4000


def test_perf_analyzers_failures_are_named():
    """perf_analyzer stops at the first request the server refuses; the text is perf_analyzer 2.51's against a
    bounded queue (seen on this project's default repository past capacity)."""
    busy = failure(30.0, "perf_analyzer failed (exit 99: Thread [3] had error: in ensemble 'image_classifier', "
                         "[request id: 33] Exceeds maximum queue size) on image_classifier at 30 requests/s:\n"
                         "Failed to retrieve results from inference request.\n"
                         "Thread [0] had error: in ensemble 'image_classifier', [request id: 33] Exceeds maximum "
                         "queue size")
    assert not busy.passed and busy.reason == ("the server turned requests away: in ensemble 'image_classifier', "
                                               "[request id: 33] Exceeds maximum queue size")
    timeout = failure(30.0, "x\nThread [1] had error: in ensemble 'image_classifier', Request timeout expired")
    assert timeout.reason == "the server turned requests away: in ensemble 'image_classifier', Request timeout expired"
    unsettled = failure(30.0, "perf_analyzer failed (exit 2: Failed to obtain stable measurement.) on m")
    assert unsettled.reason == "the latency did not settle (a queue that kept growing)"
    other = failure(30.0, "perf_analyzer failed (exit 1: no such model) on m\nmore")
    assert other.reason == "perf_analyzer failed (exit 1: no such model) on m"


@pytest.fixture
def tiny_repository(tiny_artifacts, tmp_path):
    from build.repository.spec import DeploymentSpec
    from build.repository.writer import write_repository

    repo = tmp_path / "model_repository"
    write_repository(DeploymentSpec(artifacts=str(tiny_artifacts)), "python-onnxruntime", repo, "tests")
    return repo


def _run(repo, out, perf_venv, *extra):
    from benchmarks.scenario import get_args_parser, main

    return main(get_args_parser().parse_args([
        "--model-repository", str(repo), "--measurement-ms", "500", "--min-requests", "20",
        "--perf-venv", str(perf_venv), "--out", str(out), *extra]))


@pytest.mark.slow
def test_open_loop_runs_against_a_real_server_and_the_report_says_what_passed(perf_tool, perf_venv, tiny_repository,
                                                                               tmp_path, names_this_machine):
    """A budget no answer can miss (60 s): half the capacity passes, and the search climbs; each rate's run is
    perf_analyzer's, open loop with the gaps drawn here, and every verdict follows from its own figures. A
    budget no answer can meet (1 us): nothing passes, down to a sixteenth of the capacity, and the report
    says so."""
    out = tmp_path / "generous"
    found = _run(tiny_repository, out, perf_venv, "--p99-budget-ms", "60000", "--max-points", "4")
    doc = json.loads((out / "scenario.json").read_text())
    markdown = (out / "scenario.md").read_text()
    names_this_machine(doc, markdown)
    capacity = doc["capacity"]["throughput"]
    points = [Point(**p) for p in doc["points"]]
    assert capacity > 0 and points[0].rate == pytest.approx(capacity / 2) and points[0].passed, points[0]
    assert found == best(points) and doc["best"]["rate"] == found.rate
    assert f"**{found.rate:.2f} requests/s**" in markdown and (out / "scenario.png").stat().st_size > 0
    for p in points:
        if p.passed:  # the answers kept up with what was offered, within the budget
            assert p.p99_ms <= 60000 and p.throughput >= KEEP_UP * p.rate, p
        else:  # a refusal or a run that never settled: as perf_analyzer said it
            assert p.reason.startswith(("the server turned requests away", "the latency did not settle", "answered")), p
        gaps = (out / f"rate_{p.rate:.2f}.intervals.txt").read_text().split()
        assert sum(map(int, gaps)) / len(gaps) == pytest.approx(1e6 / p.rate, rel=1e-3), "the run offered the rate"

    out = tmp_path / "impossible"
    assert _run(tiny_repository, out, perf_venv, "--p99-budget-ms", "0.001") is None
    doc = json.loads((out / "scenario.json").read_text())
    assert doc["best"] is None and len(doc["points"]) == 4
    assert not any(p["passed"] for p in doc["points"])
    assert all(p["reason"].endswith("over the 0.001 ms budget") or p["reason"].startswith(
        ("the server turned requests away", "the latency did not settle", "answered")) for p in doc["points"])
    assert f"No rate passed: the lowest tried, {doc['points'][-1]['rate']:.2f} requests/s, is 0.062 of the" in (
        out / "scenario.md").read_text()
