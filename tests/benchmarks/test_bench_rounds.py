"""Paired rounds (benchmarks.rounds): every system the goals compare, measured again in each round,
each ratio taken within its round; and bench_rounds against real servers and perf_analyzer."""
import json

import pytest

from benchmarks import report, rounds


def test_paired_rounds_rotate_the_order_and_take_each_ratio_within_its_round(tmp_path):
    # throughput of each system in rounds 1..3: the machine slows down in round 2 and everything with it,
    # so the paired ratio stays put while the unpaired best-of-run ratio would not
    schedule = {report.INPROCESS: [200.0, 150.0, 210.0], report.ENSEMBLE_GRPC: [170.0, 135.0, 168.0],
                report.PREPROCESS: [400.0, 300.0, 390.0], report.CLASSIFIER: [220.0, 150.0, 200.0],
                report.FUSED_GRPC: [196.0, 148.0, 205.0], report.FUSED_ALONE: [190.0, 160.0, 200.0]}
    # each system's attempts in order; None fails: the fused member fails in round 2 and again when tried at
    # the end of it (left out of round 2), preprocess fails once in round 3 and is measured when tried again
    attempts = {s: list(v) for s, v in schedule.items()}
    attempts[report.FUSED_ALONE] = [190.0, None, None, 200.0]
    attempts[report.PREPROCESS] = [400.0, 300.0, None, 390.0]
    calls = []

    def measure(system):
        def run():
            calls.append(system)
            throughput = attempts[system].pop(0)
            if throughput is None:
                raise TimeoutError(f"{system}: no stable window")
            cpu = 190.0 if system == report.ENSEMBLE_GRPC else None  # 190 % at 170 img/s: 11.2 ms per image
            return report.Point(system, 8, throughput, 10, 20, 30, server_cpu_percent=cpu)
        return rounds.Measure(system, 8, run)

    measures = [measure(s) for s in schedule]
    log = []
    results = rounds.run_rounds(measures, 3, failures=(TimeoutError,), log=log.append)
    assert len(results) == 3 and not any(attempts.values())
    # round r starts at measure r (no system always goes first); a failed measure is tried again at its round's end
    assert [calls[0], calls[6], calls[13]] == [report.INPROCESS, report.ENSEMBLE_GRPC, report.PREPROCESS]
    assert calls[12] == report.FUSED_ALONE and calls[19] == report.PREPROCESS and len(calls) == 20
    assert report.FUSED_ALONE not in results[1] and results[2][report.PREPROCESS].throughput == 390.0
    assert sum("failed, tried again at the end of the round" in line for line in log) == 2
    assert f"  round 3, {report.PREPROCESS} (c=8), tried again: 390.0 img/s, p99 30.0 ms" in log
    assert [line for line in log if "skipped" in line] == [
        f"  round 2, {report.FUSED_ALONE}: skipped, failed twice: {report.FUSED_ALONE}: no stable window"]

    ratios = {p.name: p for p in rounds.paired_ratios(results)}
    bound = ratios["Triton / in-process bound"]
    assert bound.values == pytest.approx((0.85, 0.9, 168 / 210)) and bound.median == pytest.approx(0.85)
    assert bound.verdict == "met in 1 of 3 rounds"
    member = ratios["ensemble / slowest member"]  # the classifier is the slower member in every round
    assert member.values == pytest.approx((170 / 220, 0.9, 0.84)) and member.verdict == "met in 1 of 3 rounds"
    assert ratios["Triton fused pipeline / in-process bound"].verdict == "met in every round"
    alone = ratios["fused pipeline / its member alone"]  # round 2 failed for the member: two values
    assert alone.values == pytest.approx((196 / 190, 205 / 200)) and alone.verdict == "met in every round"

    text = rounds.rounds_text(results, measures)
    assert "| in-process bound, batch 8 | 200.0 | 150.0 | 210.0 |" in text
    assert f"| {report.FUSED_ALONE}, c=8 | 190.0 | - | 200.0 |" in text
    assert f"| {report.ENSEMBLE_GRPC}, c=8 | 170.0 (11.2) | 135.0 (14.1) | 168.0 (11.3) |" in text
    assert "- Triton / in-process bound: median 0.85 (0.80-0.90 over 3 round(s); goal >= 0.9) met in 1 of 3" in text
    doc = rounds.to_json(results)
    assert len(doc["rounds"]) == 3 and {r["name"] for r in doc["ratios"]} == set(ratios)
    json.dumps(doc)
    assert rounds.plot(results, tmp_path / "rounds.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert rounds.plot([], tmp_path / "none.png") is None and not (tmp_path / "none.png").exists()

    missed = rounds.PairedRatio("x", 0.9, (0.5, 0.6))
    assert missed.verdict == "MISSED in every round"
    assert rounds.rounds_text([], measures) == "" and rounds.paired_ratios([{}]) == []


@pytest.mark.slow
def test_bench_rounds_measure_every_system_of_both_pipelines(perf_tool, tiny_artifacts, photos, tmp_path):
    """Real rounds: the in-process bound with the layout that won its sweep, and perf_analyzer on both
    pipelines' models, two servers up for all the rounds."""
    from benchmarks.bench import bench_inprocess, bench_rounds, pipeline_repositories
    from benchmarks.perf import photo_inputs
    from build.repository.writer import write_repository
    from build.repository.spec import DeploymentSpec

    repo = tmp_path / "model_repository"
    write_repository(DeploymentSpec(artifacts=str(tiny_artifacts)), "python-onnxruntime", repo)
    build = json.loads((repo / "BUILD.json").read_text())
    repos = pipeline_repositories(repo, build, tmp_path / "out")
    images = list(photos.values())[:3]
    layouts = {}
    points = bench_inprocess(tiny_artifacts, images, [1, 2], 8, chosen=layouts)
    assert set(layouts) == {1, 2}
    inputs = photo_inputs(images, tmp_path / "perf")
    perf_runs = {"ensemble": [(report.ENSEMBLE_GRPC, "image_classifier", "grpc", inputs),
                              (report.PREPROCESS, "preprocess", "grpc", inputs),
                              (report.CLASSIFIER, "classifier", "grpc", None),
                              (report.ENSEMBLE_HTTP, "image_classifier", "http", inputs)],
                 "fused": [(report.FUSED_GRPC, "image_classifier", "grpc", inputs),
                           (report.FUSED_ALONE, "classifier", "grpc", inputs)]}
    # the sweep's points pick each served system's concurrency: the highest one it served without
    # failures, not its best (stand-ins: the sweep itself is bench_perf)
    for system, c, throughput, failures in (
            (report.ENSEMBLE_GRPC, 2, 100.0, 0), (report.PREPROCESS, 1, 100.0, 0),
            (report.CLASSIFIER, 1, 100.0, 0), (report.CLASSIFIER, 2, 90.0, 0), (report.CLASSIFIER, 4, 80.0, 3),
            (report.ENSEMBLE_HTTP, 2, 100.0, 0), (report.FUSED_GRPC, 2, 100.0, 0), (report.FUSED_ALONE, 1, 100.0, 0)):
        points.append(report.Point(system, c, throughput, 1, 2, 3, failures=failures))
    top = report.best(points, report.INPROCESS)
    bound = (tiny_artifacts / "model.onnx", tiny_artifacts / "preprocess.json", images, 8, layouts[top.concurrency])
    measures, results = bench_rounds(2, points, repos, perf_tool, perf_runs, bound, 300, tmp_path / "out")

    assert [m.system for m in measures] == [report.INPROCESS, report.ENSEMBLE_GRPC, report.PREPROCESS,
                                            report.CLASSIFIER, report.FUSED_GRPC, report.FUSED_ALONE]
    assert [m.concurrency for m in measures] == [top.concurrency, 2, 1, 2, 2, 1]  # HTTP is not a goal's system
    assert len(results) == 2
    for got in results:
        assert set(got) == set(rounds.SYSTEMS)
        assert all(p.throughput > 0 and p.failures == 0 for p in got.values())
        assert got[report.ENSEMBLE_GRPC].server_cpu_percent > 0  # the serving tree is measured
    assert {p.name for p in rounds.paired_ratios(results)} == {g[0] for g in rounds.GOALS}
    assert all(len(p.values) == 2 for p in rounds.paired_ratios(results))
