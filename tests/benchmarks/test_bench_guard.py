"""`make bench-guard` (benchmarks/guard.py): its ratios, and a bounded run (slow) of perf_analyzer through the
supervisor's HTTP guard and beside it on the tiny model, which skips without .venv-perf (`make perf-setup`)."""
from __future__ import annotations

import json

import pytest

from benchmarks.guard import Row, ratio_table


def test_ratios_put_the_guarded_path_over_the_direct_one():
    rows = [Row("direct", 2, 3, 100.0, 10.0, 20.0, 1.0, None), Row("guarded", 2, 3, 90.0, 11.0, 30.0, 9.0, 1.25)]
    assert "| 2 | 0.900 | 1.100 | 1.500 | 1.25 |" in ratio_table(rows)


@pytest.mark.slow
@pytest.mark.parametrize("tensor_format", ["binary", "json"])
def test_both_paths_measured_and_the_guard_forwards_every_request(perf_tool, perf_venv, tiny_artifacts, tmp_path,
                                                                  names_this_machine, tensor_format):
    """binary: the photos to the ensemble; json: JSON tensors (random data) to the classifier, which the guard
    parses and checks whole."""
    from benchmarks.guard import get_args_parser, main
    from build.repository.spec import DeploymentSpec
    from build.repository.writer import write_repository

    repo = tmp_path / "model_repository"
    write_repository(DeploymentSpec(artifacts=str(tiny_artifacts)), "python-onnxruntime", repo, "tests")
    out = tmp_path / "guard"
    rows = main(get_args_parser().parse_args([
        "--model-repository", str(repo), "--concurrency", "1", "--rounds", "2", "--measurement-ms", "500",
        "--perf-venv", str(perf_venv), "--out", str(out), "--tensor-format", tensor_format]))
    by = {r.path: r for r in rows}
    assert set(by) == {"direct", "guarded"} and all(r.rounds == 2 and r.img_s > 0 for r in rows)
    # requests through the guard were counted by its /status; none went through it on the direct path
    assert by["direct"].cpu_ms_per_forwarded is None and by["guarded"].cpu_ms_per_forwarded > 0
    doc = json.loads((out / "guard.json").read_text())
    markdown = (out / "guard.md").read_text()
    names_this_machine(doc, markdown)
    assert "| 1 | " in markdown.split("img/s guarded/direct")[1]
    assert doc["forwarded"] >= 1 and doc["supervisor_rss_mb"]["at_end"] > 0
    assert doc["tensor_format"] == tensor_format
    assert doc["model"] == ("classifier" if tensor_format == "json" else "image_classifier"), doc["model"]
    assert ("JSON tensors" in markdown) == (tensor_format == "json")
