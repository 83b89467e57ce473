"""GET /metrics of the supervisor's (and the stub watchdog's) endpoint, in Prometheus' text format.

What Triton's own metrics cannot say: that the server was started again (its counters just start over), that a
python-backend stub died and was reloaded, that /ready answers 503. Read from the probe's `status()` at each
scrape (prometheus_client's custom-collector interface), so they never disagree with /status:

    triton_supervisor_ready                   1 while /ready answers 200
    triton_supervisor_live                    1 while /live answers 200
    triton_supervisor_server_starts_total     tritonserver processes started (supervisor only)
    triton_supervisor_server_exits_total      of those, ended by themselves or stopped as not live (supervisor only)
    triton_supervisor_restarts_left           what --restarts has left (supervisor only)
    triton_supervisor_stub_crashes_total      python-backend stubs that died, by model, since the supervisor started
                                              (every python model whose stubs it saw has a series from the start,
                                              so that increase() sees the first crash; serving.watchdog.crash_counts)
    triton_supervisor_stub_reloads_total      models reloaded after a stub died
    triton_supervisor_stubs_down              crashes whose model is not serving at full strength again yet
    triton_supervisor_guard_forwarded_total   requests the HTTP guard handed to Triton (--http-guard only)
    triton_supervisor_guard_refused_total     requests it answered itself, by reason (serving/http_guard.py)

deploy/monitoring scrapes it as job="triton-supervisor"; its alerts: docs/operations.md.
"""
from __future__ import annotations

from typing import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

PREFIX = "triton_supervisor_"
# serving.http_guard's reasons, each with a series from the start (increase() then sees the first refusal)
REFUSALS = ("too_deep", "not_json", "not_kserve_v2", "too_large", "content_encoding", "binary_header", "slow_body")


class ProbeCollector:
    """A prometheus_client collector over a probe's status(): serving.watchdog.Watchdog or
    serving.supervise.Supervisor (the keys one of them lacks give no metric)."""

    def __init__(self, probe):
        self.probe = probe

    def collect(self):
        status = self.probe.status()
        yield GaugeMetricFamily(PREFIX + "ready", "1 while /ready answers 200", value=float(bool(status["ready"])))
        yield GaugeMetricFamily(PREFIX + "live", "1 while /live answers 200", value=float(bool(status["live"])))
        if "starts" in status:
            yield CounterMetricFamily(PREFIX + "server_starts", "tritonserver processes started",
                                      value=status["starts"])
            yield CounterMetricFamily(PREFIX + "server_exits", "tritonserver processes that ended by themselves or "
                                      "were stopped as not live", value=len(status["server_exits"]))
            yield GaugeMetricFamily(PREFIX + "restarts_left", "server restarts --restarts has left",
                                    value=status["restarts_left"])
        crashes = CounterMetricFamily(PREFIX + "stub_crashes", "python-backend stubs that died", labels=["model"])
        for model, n in sorted(status.get("crash_counts", {}).items()):
            crashes.add_metric([model], n)
        yield crashes
        yield CounterMetricFamily(PREFIX + "stub_reloads", "models reloaded after a stub died",
                                  value=status["reloads_total"])
        down = sum(1 for c in status.get("crashes", []) if c.get("recovered_at") is None and not c.get("unloaded"))
        yield GaugeMetricFamily(PREFIX + "stubs_down", "crashes whose model does not serve at full strength yet",
                                value=down)
        if "http_guard" in status:
            guard = status["http_guard"]
            yield CounterMetricFamily(PREFIX + "guard_forwarded", "requests the HTTP guard handed to Triton",
                                      value=guard["forwarded"])
            refused = CounterMetricFamily(PREFIX + "guard_refused", "requests the HTTP guard answered itself",
                                          labels=["reason"])
            for reason in REFUSALS:
                refused.add_metric([reason], guard["refused"].get(reason, 0))
            yield refused


def metrics_page(probe) -> Callable[[], tuple[bytes, str]]:
    """What answers GET /metrics for `probe`: a function giving the body and its Content-Type (the registry is
    built once, here; each call reads the probe's status)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ProbeCollector(probe))
    return lambda: (generate_latest(registry), CONTENT_TYPE_LATEST)
