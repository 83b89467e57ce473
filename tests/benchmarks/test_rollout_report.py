"""`make bench-rollout`'s report (benchmarks/rollout_bench.py) from constructed switch times: only
switches that ended within Locust's run time are claimed as under load."""
from benchmarks import rollout_bench


def report(ended: list[float], load_s: float) -> dict:
    switches = [{"action": a, "version": v, "seconds": 20.0, "ended_s": e}
                for (a, v), e in zip([("rollout", 2), ("rollback", 1), ("rollout", 3), ("rollback", 1)], ended)]
    return {"cpu": "test cpu", "users": 2, "locust_requests": 900, "locust_failures": 0, "failures_by_error": {},
            "p50_ms": 40.0, "p99_ms": 90.0, "load_s": load_s, "switches": rollout_bench.mark_under_load(switches, load_s),
            "classifier_requests_by_version": {"v1": 600.0, "v2": 300.0}}


def test_switches_that_ended_after_the_load_are_marked_not_claimed():
    late = rollout_bench.markdown(report([30.0, 55.0, 150.0, 175.5], load_s=145))
    assert "switches included" not in late
    assert "switches 3, 4 ended after Locust's 145 s: not under load" in late
    assert "| 3 | rollout | 3 | 20.0 | 150.0 (after the load) |" in late and "| 2 | rollback | 1 | 20.0 | 55.0 |" in late
    assert "switches included" in rollout_bench.markdown(report([30.0, 55.0, 80.0, 145.0], load_s=145))
