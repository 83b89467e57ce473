"""`make bench-scenario` (benchmarks/scenario.py): the search for the highest Poisson rate within a p99 budget,
how a rate's run is judged, and bounded runs (slow) of perf_analyzer open loop against a real tritonserver."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from benchmarks.scenario import (KEEP_UP, Point, Run, Spread, best, failure, judge, labels, paired, report_text,
                                 schedule, search, spreads, window_for)

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


def test_rounds_rotate_the_order_and_every_repository_is_searched_once_a_round():
    assert schedule(1, 1) == [(1, 0)]
    assert schedule(2, 3) == [(1, 0), (1, 1), (2, 1), (2, 0), (3, 0), (3, 1)]
    assert schedule(3, 2) == [(1, 0), (1, 1), (1, 2), (2, 1), (2, 2), (2, 0)]


def test_repositories_are_named_by_directory_unless_two_names_clash(tmp_path):
    assert labels(["model_repository", "/tmp/int8_repository"]) == ["model_repository", "int8_repository"]
    assert labels(["a/model_repository", "b/model_repository"]) == ["a/model_repository", "b/model_repository"]
    assert labels([".", str(tmp_path / "x")]) == [Path.cwd().name, "x"]
    with pytest.raises(ValueError, match="a repository is given twice"):
        labels([str(tmp_path / "r"), str(tmp_path / "x" / ".." / "r")])


def _run(name, round_, capacity, passing):
    """A search whose highest passing rate is `passing` (None: nothing passed) below a failure 10 % higher."""
    points = (Point(capacity / 2, False, "over"),) if passing is None else (
        Point(passing, True, "within", passing, 10.0, 50.0), Point(passing * 1.1, False, "over"))
    return Run(name, round_, round_ - 1, capacity, 500.0, points)


def test_rounds_give_medians_ranges_and_each_repository_against_the_first_round_by_round():
    """The ratio is taken within each round (measured minutes apart), not between the medians; a round where a
    repository passed nothing has no rate and no ratio, and the report says so."""
    runs = [_run("fp32", 1, 100.0, 50.0), _run("fp32", 2, 110.0, 60.0), _run("fp32", 3, 90.0, 40.0),
            _run("int8", 1, 120.0, 75.0), _run("int8", 2, 130.0, 66.0), _run("int8", 3, 125.0, None)]
    fp32, int8 = spreads(runs, "fp32"), spreads(runs, "int8")
    assert fp32["rate"].values == (50.0, 60.0, 40.0) and fp32["rate"].median == 50.0
    assert fp32["capacity"].text(".1f") == "100.0 (90.0-110.0)"
    assert fp32["share"].median == pytest.approx(0.5)
    assert int8["rate"].values == (75.0, 66.0) and int8["rate"].text(".2f") == "70.50 (66.00-75.00), 1 of 3 rounds none"
    pair = paired(runs, "int8", "fp32")
    assert pair["rate"].values == pytest.approx((1.5, 1.1)) and pair["rate"].of == 3
    assert pair["capacity"].values == pytest.approx((1.2, 130 / 110, 125 / 90))
    assert Spread((), 2).text(".2f") == "none in 2 rounds" and Spread((), 2).median is None
    assert Spread((), 0).text(".2f") == "not searched"
    text = report_text(runs, ["fp32", "int8"], "t", 8)
    assert "| fp32 | 100.0 (90.0-110.0) | **50.00 (40.00-60.00)** | 0.50 (0.44-0.55) |" in text
    assert "| int8 / fp32 | **1.30 (1.10-1.50), 1 of 3 rounds none** |" in text and "| 1.50, 1.10 |" in text
    assert text.count("## ") == 6 and "## int8, round 3 (seed 2)" in text and "No rate passed" in text
    single = report_text(runs[:1], ["fp32"], "t", 8)
    assert "Highest rate within the budget: **50.00 requests/s**" in single and "round" not in single


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


def _search(repo, out, perf_venv, *extra):
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
    [run] = _search(tiny_repository, out, perf_venv, "--p99-budget-ms", "60000", "--max-points", "4")
    doc = json.loads((out / "scenario.json").read_text())
    markdown = (out / "scenario.md").read_text()
    names_this_machine(doc, markdown)
    [recorded] = doc["runs"]
    capacity = recorded["capacity"]
    points = [Point(**p) for p in recorded["points"]]
    assert capacity > 0 and points[0].rate == pytest.approx(capacity / 2) and points[0].passed, points[0]
    assert run.found == best(points) and recorded["best"]["rate"] == run.found.rate
    assert f"**{run.found.rate:.2f} requests/s**" in markdown and (out / "scenario.png").stat().st_size > 0
    for p in points:
        if p.passed:  # the answers kept up with what was offered, within the budget
            assert p.p99_ms <= 60000 and p.throughput >= KEEP_UP * p.rate, p
        else:  # a refusal or a run that never settled: as perf_analyzer said it
            assert p.reason.startswith(("the server turned requests away", "the latency did not settle", "answered")), p
        gaps = (out / f"rate_{p.rate:.2f}.intervals.txt").read_text().split()
        assert sum(map(int, gaps)) / len(gaps) == pytest.approx(1e6 / p.rate, rel=1e-3), "the run offered the rate"

    out = tmp_path / "impossible"
    assert _search(tiny_repository, out, perf_venv, "--p99-budget-ms", "0.001")[0].found is None
    [recorded] = json.loads((out / "scenario.json").read_text())["runs"]
    assert recorded["best"] is None and len(recorded["points"]) == 4
    assert not any(p["passed"] for p in recorded["points"])
    assert all(p["reason"].endswith("over the 0.001 ms budget") or p["reason"].startswith(
        ("the server turned requests away", "the latency did not settle", "answered")) for p in recorded["points"])
    assert f"No rate passed: the lowest tried, {recorded['points'][-1]['rate']:.2f} requests/s, is 0.062 of the" in (
        out / "scenario.md").read_text()


@pytest.mark.slow
def test_rounds_alternate_two_real_repositories_and_pair_them_round_by_round(perf_tool, perf_venv, tiny_repository,
                                                                              tmp_path):
    """Two rounds of two repositories (one search each, at half its own capacity, which a 60 s budget passes):
    four servers in the rotated order, each search's files apart, each round with its own draw of gaps, and
    the report's ratio of passing rates per round that of the two searches the round measured."""
    other = tmp_path / "second_repository"
    shutil.copytree(tiny_repository, other)
    out = tmp_path / "rounds"
    runs = _search(tiny_repository, out, perf_venv, "--against", str(other), "--runs", "2", "--seed", "5",
                   "--p99-budget-ms", "60000", "--max-points", "1")
    assert [(r.repository, r.round, r.seed) for r in runs] == [
        ("model_repository", 1, 5), ("model_repository", 2, 6), ("second_repository", 1, 5),
        ("second_repository", 2, 6)]
    doc = json.loads((out / "scenario.json").read_text())
    assert doc["repositories"]["second_repository"]["path"] == str(other)
    for r in runs:
        here = out / f"round{r.round}-{r.repository}"
        assert r.found and r.found.rate == pytest.approx(r.capacity / 2) and (here / "tritonserver.log").is_file()
        assert (here / f"rate_{r.found.rate:.2f}.intervals.txt").is_file()
    by = {(r.repository, r.round): r for r in runs}

    def gaps(name, n):
        return np.array((out / f"round{n}-{name}" / f"rate_{by[name, n].found.rate:.2f}.intervals.txt").read_text()
                        .split(), dtype=float)

    same_draw = np.corrcoef(gaps("model_repository", 1)[:50], gaps("second_repository", 1)[:50])[0, 1]
    other_draw = np.corrcoef(gaps("model_repository", 1)[:50], gaps("model_repository", 2)[:50])[0, 1]
    assert same_draw > 0.999 and other_draw < 0.6, "one draw in a round (scaled to each rate), another the next"
    ratios = [by["second_repository", n].found.rate / by["model_repository", n].found.rate for n in (1, 2)]
    assert doc["against"]["second_repository"]["rate"]["values"] == pytest.approx(ratios)
    assert doc["summary"]["model_repository"]["capacity"]["values"] == [runs[0].capacity, runs[1].capacity]
    markdown = (out / "scenario.md").read_text()
    assert "| second_repository / model_repository |" in markdown and markdown.count("## ") == 4
    assert (out / "scenario.png").stat().st_size > 0
    assert sum(1 for line in (out / "scenario.csv").read_text().splitlines()[1:]) == 4


@pytest.mark.slow
def test_a_search_whose_server_cannot_start_leaves_the_report_of_the_searches_done(perf_tool, perf_venv,
                                                                                     tiny_repository, tmp_path):
    """The second repository's classifier cannot load (an opset ONNX Runtime does not have): the server's
    failure stops the run as it did, and the first repository's search, done by then, is in the report with why
    the rest was not searched."""
    import onnx

    from serving.server import ServerError

    broken = tmp_path / "broken_repository"
    shutil.copytree(tiny_repository, broken)
    served = broken / "classifier" / "1" / "model.onnx"
    model = onnx.load(str(served))
    model.opset_import[0].version = 999
    onnx.save(model, str(served))
    out = tmp_path / "stopped"
    with pytest.raises(ServerError):
        _search(tiny_repository, out, perf_venv, "--against", str(broken), "--p99-budget-ms", "60000",
                "--max-points", "1")
    doc = json.loads((out / "scenario.json").read_text())
    assert [r["repository"] for r in doc["runs"]] == ["model_repository"] and doc["runs"][0]["best"]
    assert doc["stopped"].startswith("Stopped after 1 of 2 searches, at broken_repository, round 1: "), doc["stopped"]
    markdown = (out / "scenario.md").read_text()
    assert f"**{doc['stopped']}**" in markdown and "Highest rate within the budget" in markdown
    assert (out / "scenario.png").stat().st_size > 0
