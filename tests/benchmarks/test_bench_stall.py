"""benchmarks.stall: each variant changes only the classifier's instances and queue policy, and a short
real run against tritonserver reports every request it sent."""
from __future__ import annotations

import json

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from benchmarks import stall


def test_stalls_that_end_together_are_one_event():
    # (start, latency s): two clients stalled together at 1 s, one alone at 5 s, the rest fast
    samples = [(0.0, 0.004), (0.5, 0.503), (0.501, 0.502), (2.0, 0.003), (4.5, 0.6), (6.0, 0.01)]
    assert stall.stall_events(samples, 0.25) == 2
    assert stall.stall_events(samples, 0.55) == 1 and stall.stall_events(samples, 1.0) == 0
    row = stall.summarize("one-both", stall.VARIANTS["one-both"], samples, 30.0, 250.0)
    assert (row.requests, row.stalls, row.events, row.max_ms) == (6, 3, 2, pytest.approx(600.0))
    assert row.events_per_minute == pytest.approx(4.0)
    with pytest.raises(RuntimeError, match="no request completed"):
        stall.summarize("one-none", stall.VARIANTS["one-none"], [], 30.0, 250.0)


@pytest.mark.slow
def test_variants_differ_only_in_the_classifiers_queue_and_a_short_run_counts_every_request(tiny_artifacts,
                                                                                              tmp_path):
    from build.repository.spec import DeploymentSpec
    from build.repository.writer import write_repository

    served = tmp_path / "served"
    write_repository(DeploymentSpec(artifacts=str(tiny_artifacts)), "python-onnxruntime", served, "tests")
    names = ["one-none", "one-both", "two-both"]
    repos, spec = stall.write_repositories(served, tmp_path / "repos", names)

    def config(name: str, model: str) -> model_config_pb2.ModelConfig:
        return text_format.Parse((repos[name] / model / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())

    for name in names:
        instances, size, timeout = stall.VARIANTS[name]
        got = config(name, "classifier")
        assert got.instance_group[0].count == instances
        policy = got.dynamic_batching.default_queue_policy
        assert (policy.max_queue_size, policy.default_timeout_microseconds) == (size, timeout)
        assert got.dynamic_batching.HasField("default_queue_policy") == bool(size or timeout)
        for model in ("preprocess", "image_classifier"):
            assert config(name, model) == config("one-none", model), (name, model)
    base = config("one-none", "classifier")
    other = config("two-both", "classifier")
    other.instance_group[0].count = 1
    other.dynamic_batching.ClearField("default_queue_policy")
    assert other == base

    args = stall.get_args_parser().parse_args(["--model-repository", str(served), "--out", str(tmp_path / "out"),
                                               "--variants", "one-none,two-both", "--seconds", "2"])
    rows = stall.main(args)
    assert [r.variant for r in rows] == ["one-none", "two-both"]
    for r in rows:
        assert r.requests > 0 and 0 <= r.events <= r.stalls <= r.requests and r.p50_ms <= r.p99_ms <= r.max_ms
    doc = json.loads((tmp_path / "out" / "stall.json").read_text())
    assert [r["requests"] for r in doc["rows"]] == [r.requests for r in rows] and "integer path" in doc["cpu"]
    assert "| one-none | 1 | 0 | 0 |" in (tmp_path / "out" / "stall.md").read_text()
    assert (tmp_path / "out" / "stall.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(SystemExit, match="unknown"):
        stall.main(stall.get_args_parser().parse_args(["--variants", "three-none", "--out", str(tmp_path / "x")]))
