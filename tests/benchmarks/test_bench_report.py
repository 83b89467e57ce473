"""The table, ratios and plot writer, from a small real in-process run (tiny ONNX model)."""
import dataclasses
import json

from benchmarks import inprocess, report
from benchmarks.procstats import ProcessTreeMonitor
from benchmarks.workload import load_photos


def test_report_files_from_a_small_real_run(tiny_artifacts, tmp_path, names_this_machine):
    photos = list(load_photos("jpeg", ["chelsea", "coffee", "rocket"]).values())
    points = []
    results = inprocess.measure(tiny_artifacts, photos, batches=[1, 2], images=8, decode_threads=2,
                                intra_op_threads=1)
    results += inprocess.measure(tiny_artifacts, photos, batches=[2], images=8, decode_threads=2,
                                 intra_op_threads=1, strategy="parallel")
    for r in results:
        assert r.images == 8 and r.throughput > 0 and r.p50_ms <= r.p99_ms
        points.append(report.Point(report.INPROCESS, r.batch, r.throughput, r.p50_ms, r.p90_ms, r.p99_ms, r.images))
    # stand-ins for the served rows, so every ratio has its inputs
    base = points[0]
    for system, scale in ((report.ENSEMBLE_GRPC, 0.5), (report.PREPROCESS, 1.0), (report.CLASSIFIER, 0.8),
                          (report.LOCUST_HTTP, 0.5), (report.FASTAPI, 0.25)):
        points.append(report.Point(system, 2, base.throughput * scale, 10.0, 20.0, 30.0))

    files = report.write(points, tmp_path, {"note": "test"})
    assert all(path.stat().st_size > 0 for path in files.values())
    assert files["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    doc = json.loads(files["json"].read_text())
    assert doc["note"] == "test" and len(doc["points"]) == len(points)
    names = {r["name"]: r for r in doc["ratios"]}
    best = max(p.throughput for p in points if p.system == report.INPROCESS)
    assert abs(names["Triton / in-process bound"]["value"] - base.throughput * 0.5 / best) < 1e-9
    assert abs(names["ensemble / slowest member"]["value"] - 0.5 / 0.8) < 1e-9
    assert abs(names["Triton / FastAPI (HTTP, p99 <= FastAPI's)"]["value"] - 2.0) < 1e-9
    text = files["md"].read_text()
    assert report.INPROCESS in text and "MISSED" in text and "met" in text
    names_this_machine(doc, text)


def test_process_monitor_sees_cpu_and_memory():
    import os

    with ProcessTreeMonitor(os.getpid(), interval_s=0.05) as monitor:
        sum(i * i for i in range(2_000_000))
    assert monitor.cpu_percent > 0 and monitor.peak_rss_mb > 10


def test_fused_ratios_and_goals_out_of_reach():
    """The fused pipeline gets its own goal lines; a goal above what the in-process bound allows
    (1.5x a FastAPI that is already near the bound) is said to be out of reach, with the arithmetic."""
    P = report.Point
    points = [P(report.INPROCESS, 1, 200.0, 9, 12, 14, server_cpu_percent=190),
              P(report.PREPROCESS, 8, 400.0, 20, 30, 40, server_cpu_percent=150),
              P(report.CLASSIFIER, 8, 220.0, 30, 40, 50, server_cpu_percent=170),
              P(report.ENSEMBLE_GRPC, 8, 150.0, 50, 60, 80, server_cpu_percent=175),
              P(report.FUSED_ALONE, 8, 190.0, 40, 45, 50, server_cpu_percent=190),
              P(report.FUSED_GRPC, 8, 185.0, 40, 45, 50, server_cpu_percent=190),
              P(report.FUSED_HTTP, 4, 170.0, 20, 30, 40),
              P(report.LOCUST_HTTP, 8, 140.0, 50, 60, 70),
              P(report.FASTAPI, 8, 160.0, 50, 70, 90)]
    rs = {r.name: r for r in report.ratios(points, cores=2)}
    assert abs(rs["Triton fused pipeline / in-process bound"].value - 185 / 200) < 1e-9
    assert rs["Triton fused pipeline / in-process bound"].verdict == "met"
    assert abs(rs["fused pipeline / its member alone"].value - 185 / 190) < 1e-9
    fastapi = rs["Triton / FastAPI (fused pipeline, HTTP, p99 <= FastAPI's)"]
    assert fastapi.verdict == "MISSED" and "out of reach" in fastapi.detail and "240" in fastapi.detail
    # the ensemble spends 175 % CPU at 150 img/s = 11.7 ms/img -> at most 171 img/s on 2 cores, below 0.9 x 220
    member = rs["ensemble / slowest member"]
    assert member.verdict == "MISSED" and "out of reach on 2 cores" in member.detail
    assert "11.7 ms of CPU per image" in member.detail and "pass 171 img/s = 0.78 of the slowest" in member.detail
    # where the ensemble is cheaper per image, the same shortfall is not called out of reach
    cheap = [p if p.system != report.ENSEMBLE_GRPC else dataclasses.replace(p, server_cpu_percent=120)
             for p in points]
    member = {r.name: r for r in report.ratios(cheap, cores=2)}["ensemble / slowest member"]
    assert member.verdict == "MISSED" and "out of reach" not in member.detail


def test_a_point_that_served_nothing_is_never_a_ratios_denominator():
    """A system whose every point served 0 img/s (a stalled run) has no best point: its ratio lines
    say what is missing instead of dividing by zero."""
    P = report.Point
    points = [P(report.INPROCESS, 1, 0.0, 0, 0, 0), P(report.PREPROCESS, 8, 0.0, 0, 0, 0),
              P(report.CLASSIFIER, 8, 220.0, 30, 40, 50), P(report.ENSEMBLE_GRPC, 8, 150.0, 50, 60, 80),
              P(report.FUSED_GRPC, 8, 185.0, 40, 45, 50), P(report.FUSED_ALONE, 8, 0.0, 0, 0, 0),
              P(report.LOCUST_HTTP, 8, 140.0, 50, 60, 70), P(report.FASTAPI, 8, 0.0, 0, 0, 0)]
    assert report.best(points, report.INPROCESS) is None
    rs = {r.name: r for r in report.ratios(points, cores=2)}
    assert rs["Triton / in-process bound"].value is None
    assert rs["ensemble / slowest member"].value is None
    assert "fused pipeline / its member alone" not in rs
    assert abs(rs["fused pipeline / ensemble"].value - 185 / 150) < 1e-9
    assert report.ratio_lines(list(rs.values()))


def test_bench_builds_the_other_pipeline_from_the_same_spec(tiny_artifacts, tmp_path):
    from benchmarks.bench import pipeline_repositories
    from build.repository.writer import write_repository
    from build.repository.spec import DeploymentSpec

    for built in ("ensemble", "fused"):
        repo = tmp_path / built / "model_repository"
        write_repository(DeploymentSpec(artifacts=str(tiny_artifacts), pipeline=built), "python-onnxruntime", repo)
        build = json.loads((repo / "BUILD.json").read_text())
        repos = pipeline_repositories(repo, build, tmp_path / built / "out")
        assert set(repos) == {"ensemble", "fused"} and repos[built] == repo
        other = repos["fused" if built == "ensemble" else "ensemble"]
        assert json.loads((other / "BUILD.json").read_text())["spec"]["pipeline"] != built
        assert (other / "preprocess").is_dir() == (built == "fused")  # only the ensemble has a preprocess model


def test_drift_line_says_how_far_the_same_measurement_moved():
    from benchmarks.bench import drift_line

    line = drift_line(200.0, 180.0, 2, 8)
    assert "200.0 img/s (batch 2) at the start" in line and "180.0 img/s (batch 8) at the end" in line
    assert "10 % apart" in line
    assert "0 % apart" in drift_line(150.0, 150.0, 1, 1)
    assert "gave 2.5 % of these cores' time to other guests" in drift_line(200.0, 180.0, 2, 2, steal=0.025)


def test_steal_fraction_from_the_machines_cpu_counters(tmp_path):
    from benchmarks.procstats import machine_cpu_times, steal_fraction

    stat = tmp_path / "stat"
    stat.write_text("cpu  100 0 50 800 10 0 5 35 0 0\ncpu0 50 0 25 400 5 0 2 18 0 0\n")
    before = machine_cpu_times(str(stat))
    stat.write_text("cpu  160 0 70 900 10 0 10 55 0 0\n")
    assert abs(steal_fraction(before, machine_cpu_times(str(stat))) - 20 / 205) < 1e-12
    assert machine_cpu_times(str(tmp_path / "absent")) is None and steal_fraction(None, before) is None
    live = machine_cpu_times()  # this machine's own counters, where Linux has them
    if live is not None:
        assert set(live) >= {"user", "idle", "steal"} and all(v >= 0 for v in live.values())


def test_role_of_names_stub_processes_after_their_model():
    from benchmarks.procstats import CORE, role_of

    stub = ["/venv/share/tritonserver/backends/python/triton_python_backend_stub",
            "/srv/model_repository/preprocess/1/model.py", "triton_python_backend_shm_region_x", "1048576"]
    assert role_of(stub, is_root=False) == "preprocess"
    assert role_of(["/venv/bin/tritonserver", "--model-repository=/srv/repo"], is_root=True) == CORE
    assert role_of(["/usr/bin/python3", "-c", "pass"], is_root=False) == "python3"


def test_cpu_split_per_image_and_the_cost_of_the_second_step():
    from benchmarks.bench import cpu_split, cpu_split_line, hop_cost_text

    ensemble = cpu_split({"cpu_s": {"classifier": 3.3, "server": 0.5, "preprocess": 1.7},
                          "processes": {"server": 1, "classifier": 2, "preprocess": 3}}, images=500)
    assert list(ensemble["ms_per_image"]) == ["server", "classifier", "preprocess"]  # server first, then by cost
    assert abs(ensemble["ms_per_image"]["classifier"] - 6.6) < 1e-9
    line = cpu_split_line(ensemble)
    assert "classifier 6.60 ms (2 processes)" in line and "server 1.00 ms +" in line and "= 11.00 ms" in line
    fused = cpu_split({"cpu_s": {"server": 0.25, "classifier": 4.5}, "processes": {"server": 1, "classifier": 2}},
                      images=500)
    text = hop_cost_text({"ens": {"8": ensemble, "2": ensemble}, "fused": {"8": fused}}, "ens", "fused")
    assert "concurrency 8: the ensemble spent 11.00 ms of CPU per image, the fused pipeline 9.50" in text
    assert "+1.50 ms (+0.50 ms in the server, +1.00 ms in the model processes)" in text
    assert cpu_split({"cpu_s": {"server": 1.0}, "processes": {}}, images=0) is None
    assert hop_cost_text({"ens": {"8": ensemble}}, "ens", "fused") == ""
