"""Locust runs' percentiles (benchmarks/locust_run.py) from the successful requests' latencies the
locustfile writes, not Locust's bucket-rounded figures over every request; the runs themselves are in
test_bench_served.py."""
import numpy as np
import pytest

from benchmarks import locust_run


def test_percentiles_come_from_the_successes_unrounded():
    # Locust's own figures for these runs: rounded to its buckets (110 for a p99 of 104.3) and with
    # the failures' 2 ms answers in them
    locust = locust_run.LocustResult("FastAPIUser", 8, 1000, 100, 50.0, 60.0, 82.0, 110.0, 55.0)
    ms = np.random.default_rng(0).normal(60, 19, 900)
    result = locust_run.with_success_latencies(locust, list(ms))
    assert result.p99_ms == pytest.approx(np.percentile(ms, 99)) and result.p99_ms != 110.0
    assert result.p50_ms == pytest.approx(np.percentile(ms, 50)) and result.avg_ms == pytest.approx(ms.mean())
    assert (result.requests, result.failures, result.throughput) == (1000, 100, 50.0)  # Locust's counts kept
    none = locust_run.with_success_latencies(locust, [])
    assert (none.p50_ms, none.p99_ms, none.avg_ms) == (0.0, 0.0, 0.0)
