"""Locust runs' percentiles (benchmarks/locust_run.py) from the successful requests' latencies the
locustfile writes, not Locust's bucket-rounded figures over every request; the runs themselves are in
test_bench_served.py. Its request counts and req/s come from the totals the locustfile writes at quit,
checked against a real Locust run on a stand-in /classify."""
import json
import re
import threading
from http.server import ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import numpy as np
import pytest

from benchmarks import locust_run
from serving.health import JsonHandler


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


def test_totals_give_req_s_over_the_reset_to_the_last_request(tmp_path):
    path = tmp_path / "u8_totals.json"
    path.write_text(json.dumps({"requests": 1000, "failures": 100, "start": 1000.0, "end": 1020.0}))
    result = locust_run.parse_totals(path, "FastAPIUser", 8)
    assert (result.user_class, result.users, result.requests, result.failures) == ("FastAPIUser", 8, 1000, 100)
    assert result.throughput == pytest.approx(50.0)
    path.write_text(json.dumps({"requests": 0, "failures": 0, "start": 1000.0, "end": None}))  # nothing answered
    assert locust_run.parse_totals(path, "FastAPIUser", 8).throughput == 0.0


class _Classify(JsonHandler):
    """POST /classify?top_k=k: k predictions; every 4th request a 503."""

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        with self.server.lock:
            self.server.seen += 1
            refused = self.server.seen % 4 == 0
        if refused:
            self._send(503, {"error": "refused"})
        else:
            self._send(200, {"predictions": [[1, 0.5]] * int(parse_qs(urlparse(self.path).query)["top_k"][0])})


@pytest.mark.slow
def test_counts_are_locusts_final_totals_and_the_latencies(tmp_path):
    """A real Locust run: its requests are the successes' latencies plus the failures and Locust's own
    final summary, requests finished in the last second and while stopping included (the `_stats.csv`
    it was read from before misses them)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Classify)
    server.lock, server.seen = threading.Lock(), 0
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        result, _ = locust_run.run("FastAPIUser", f"http://127.0.0.1:{server.server_address[1]}", users=2,
                                   run_time_s=2, out=tmp_path)
    finally:
        server.shutdown()
        server.server_close()
    latencies = (tmp_path / "FastAPIUser_u2_latencies.txt").read_text().split()
    assert result.failures > 0 and result.requests == len(latencies) + result.failures
    summary = re.search(r"^\s*Aggregated\s+(\d+)\s+(\d+)\(.*\|\s*([\d.]+)\s+[\d.]+\s*$",
                        (tmp_path / "FastAPIUser_u2.log").read_text(), re.M)
    assert summary, "no final summary in Locust's output"
    assert (result.requests, result.failures) == (int(summary[1]), int(summary[2]))
    assert result.throughput == pytest.approx(float(summary[3]), abs=0.01)  # the same window as Locust's
