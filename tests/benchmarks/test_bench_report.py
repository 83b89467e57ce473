"""The table, ratios and plot writer, from a small real in-process run (tiny ONNX model)."""
import json

from benchmarks import inprocess, report
from benchmarks.procstats import ProcessTreeMonitor
from benchmarks.workload import load_photos


def test_report_files_from_a_small_real_run(tiny_artifacts, tmp_path):
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


def test_process_monitor_sees_cpu_and_memory():
    import os

    with ProcessTreeMonitor(os.getpid(), interval_s=0.05) as monitor:
        sum(i * i for i in range(2_000_000))
    assert monitor.cpu_percent > 10 and monitor.peak_rss_mb > 10
