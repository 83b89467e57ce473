"""A row of the overload table (benchmarks/overload.py) from constructed outcomes; the Locust runs
themselves are tested in tests/serving/test_overload.py."""
import pytest

from benchmarks.overload import Outcomes, Row


def test_sent_counts_every_request_started_not_only_those_answered():
    """The unbounded server at 4x (docs/results/2026-12-03-overload.md): 2776 requests started in 20 s,
    1900 answered, 876 still queued when Locust quit. Sent is 138.8/s, not the 95/s answered."""
    o = Outcomes(seconds=20.0)
    o.latencies["accepted"] = [8.4] * 1800
    o.latencies["busy"] = [0.01] * 100
    o.sends = [i * 20.0 / 2776 for i in range(2776)]
    row = Row.of("unbounded", 4.0, 876, 438.0, o)
    assert row.sent_rps == pytest.approx(2776 / 20) and row.answered_rps == pytest.approx(1900 / 20)
    assert row.accepted_rps == pytest.approx(1800 / 20) and (row.accepted, row.busy) == (1800, 100)
