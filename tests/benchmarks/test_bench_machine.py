"""Every benchmark's report names the machine it ran on (CPU model, speed flags, cores): its writers,
fed made-up figures, no server; and bench-preprocess refuses artifacts without preprocess.json."""
import json

import pytest

from benchmarks import locust_run, overload, perf, preprocess_dali, profile, response_cache, tune
from build.repository.spec import DeploymentSpec


def test_perf_summary(tmp_path, names_this_machine):
    result = perf.PerfResult("image_classifier", "grpc", 2, 50.0, 30.0, 35.0, 40.0, 31.0, 5.0, 20.0)
    csv_path, json_path = perf.write_summary([result], tmp_path, "grpc")
    assert csv_path.read_text().startswith("model,protocol,concurrency")
    doc = json.loads(json_path.read_text())
    assert doc["results"][0]["throughput"] == 50.0
    names_this_machine(doc)


def test_locust_summary(tmp_path, names_this_machine):
    result = locust_run.LocustResult("TritonHttpUser", 8, 400, 0, 40.0, 150.0, 180.0, 200.0, 155.0)
    doc = json.loads(locust_run.write_summary([result], tmp_path).read_text())
    assert doc["results"][0]["users"] == 8
    names_this_machine(doc)


def test_tune_trials(tmp_path, names_this_machine):
    trials = [tune.Trial("baseline", {"classifier.layout": "2x1"}, 60.0, 40.0, 80.0, runs=1, feasible=True,
                         chosen=True)]
    tune.write_trials(trials, DeploymentSpec(), tune.get_args_parser().parse_args([]), tmp_path)
    doc = json.loads((tmp_path / "tune.json").read_text())
    assert doc["trials"][0]["knob"] == "baseline" and doc["best"] and doc["args"]["concurrency"] == 8
    assert (tmp_path / "tune.csv").read_text().startswith("knob,settings")
    names_this_machine(doc)


def test_overload_report(tmp_path, names_this_machine):
    rows = [overload.Row("bounded", load, 8, 20.0 * load, 20.0 * load, 20.0, 400, 10, 10, 0, 90.0, 150.0,
                         2.0, 5.0, 5.0) for load in (1.0, 2.0)]
    md = overload.write_report(rows, ["saturating rate: 20.0 accepted req/s"], tmp_path).read_text()
    assert "| bounded | 2x |" in md
    names_this_machine(markdown=md)


def test_response_cache_report(tmp_path, names_this_machine):
    rows = [response_cache.Row("uncached", 400, 0, 20.0, 90.0, 150.0, 0, 0),
            response_cache.Row("cached", 800, 0, 40.0, 40.0, 90.0, 750, 50)]
    md = response_cache.write_report(rows, ["50 distinct images", "", "| server | req/s |"], tmp_path).read_text()
    assert "50 distinct images" in md and (tmp_path / "response_cache.csv").exists()
    names_this_machine(markdown=md)


def test_profile_report(tmp_path, names_this_machine):
    p = profile.Profile("fused", 100, 2.0, {"classifier": {"ONNX Runtime": 3.0}}, 0.5)
    profile.write([p], "Serving CPU per image by library group (ms):\n", tmp_path)
    doc = json.loads((tmp_path / "profile.json").read_text())
    assert [x["pipeline"] for x in doc["profiles"]] == ["fused"]
    names_this_machine(doc, (tmp_path / "profile.md").read_text())


def test_preprocess_dali_report(tmp_path, names_this_machine):
    result = {"pillow": {"ms_per_image": 4.0, "images_per_s_per_core": 250.0, "runs_s": [0.02]},
              "dali_cpu": {"ms_per_image": 5.0, "images_per_s_per_core": 200.0, "runs_s": [0.025]},
              "dali_cpu_vs_pillow": 0.8}
    setup = {"preprocess_json": "artifacts/x/preprocess.json", "preprocess": {}, "photos": 5, "repeat": 1,
             "batch_size": 8, "threads": 1}
    json_path, md_path = preprocess_dali.write(result, setup, tmp_path / "out")
    doc = json.loads(json_path.read_text())
    assert doc["dali_cpu_vs_pillow"] == 0.8 and doc["photos"] == 5
    md = md_path.read_text()
    assert "| pillow | 4.00 | 250.0 |" in md and "0.80x" in md
    names_this_machine(doc, md)
    assert preprocess_dali.get_args_parser().parse_args([]).out == "benchmarks/results/preprocess_dali"


def test_preprocess_dali_needs_the_exported_preprocess_json(tmp_path):
    args = preprocess_dali.get_args_parser().parse_args(["--artifacts", str(tmp_path), "--out", str(tmp_path / "o")])
    with pytest.raises(FileNotFoundError, match=r"preprocess\.json not found: run `make export`"):
        preprocess_dali.main(args)
    assert not (tmp_path / "o").exists()
