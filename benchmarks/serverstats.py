"""Where the time goes inside Triton: queue vs compute per model, from the statistics extension.

    before = snapshot(url, "grpc"); ...load...; after = snapshot(url, "grpc")
    for row in stage_table(before, after, wall_s): print(row)

Triton counts per request (queue, compute) and per batch execution (`batch_stats`). From the
difference of two snapshots this gives, per model: requests, average dynamic-batch size, average
queue and compute time per request, and `busy`: batch-execution time / wall time, i.e. how many
instances were executing on average (near the instance count = that stage is saturated).
"""
from __future__ import annotations

import dataclasses

_COMPUTE = ("compute_input", "compute_infer", "compute_output")


@dataclasses.dataclass(frozen=True)
class StageStats:
    model: str
    requests: int
    executions: int
    inferences: int
    queue_ms: float  # average per request
    compute_ms: float  # average per request (the batch's compute time, seen by each request in it)
    busy: float  # batch-execution seconds per wall second (instances busy on average)

    @property
    def avg_batch(self) -> float:
        return self.inferences / self.executions if self.executions else 0.0

    def line(self, with_busy: bool = True) -> str:
        return (f"{self.model:18s} requests {self.requests:6d}  batch {self.avg_batch:5.2f}  "
                f"queue {self.queue_ms:7.2f} ms  compute {self.compute_ms:7.2f} ms"
                + (f"  busy {self.busy:4.2f}" if with_busy else "  (end to end)"))


def snapshot(url: str, protocol: str = "grpc", admin_key: str | None = None) -> dict[str, dict]:
    """{model name: its statistics as JSON} of every loaded model. A server that restricts statistics
    (`make serve`'s) needs its `admin_key` (serving/access.py)."""
    from serving.access import key_headers

    if protocol == "grpc":
        import tritonclient.grpc as module
    elif protocol == "http":
        import tritonclient.http as module
    else:
        raise ValueError(f"protocol {protocol!r} is not one of ('http', 'grpc')")
    client = module.InferenceServerClient(url)
    try:
        headers = key_headers(admin_key, protocol) or None
        stats = client.get_inference_statistics(headers=headers, as_json=True) if protocol == "grpc" else \
            client.get_inference_statistics(headers=headers)
    finally:
        client.close()
    return {entry["name"]: entry for entry in stats.get("model_stats", [])}


def _ns(entry: dict, *keys: str) -> int:
    for key in keys:
        entry = entry.get(key, {})
    return int(entry) if not isinstance(entry, dict) else int(entry.get("ns", 0) or 0)


def _count(entry: dict, *keys: str) -> int:
    for key in keys:
        entry = entry.get(key, {})
    return int(entry.get("count", 0) or 0) if isinstance(entry, dict) else int(entry or 0)


def _batch_ns(entry: dict) -> int:
    return sum(_ns(b, phase) for b in entry.get("batch_stats", []) for phase in _COMPUTE)


def stage_stats(model: str, before: dict, after: dict, wall_s: float) -> StageStats:
    """What one model did between two snapshots of its statistics."""
    old = before.get(model, {})
    new = after.get(model, {})
    requests = _count(new, "inference_stats", "success") - _count(old, "inference_stats", "success")
    queue_ns = _ns(new, "inference_stats", "queue") - _ns(old, "inference_stats", "queue")
    compute_ns = sum(_ns(new, "inference_stats", p) - _ns(old, "inference_stats", p) for p in _COMPUTE)
    executions = int(new.get("execution_count", 0) or 0) - int(old.get("execution_count", 0) or 0)
    inferences = int(new.get("inference_count", 0) or 0) - int(old.get("inference_count", 0) or 0)
    busy_ns = _batch_ns(new) - _batch_ns(old)
    per = max(requests, 1)
    return StageStats(model, requests, executions, inferences, queue_ns / per / 1e6, compute_ns / per / 1e6,
                      busy_ns / 1e9 / wall_s if wall_s > 0 else 0.0)


def stage_table(before: dict, after: dict, wall_s: float, models: list[str] | None = None) -> list[StageStats]:
    """StageStats of each model that served requests (or of `models`), in snapshot order."""
    names = models or list(after)
    rows = [stage_stats(m, before, after, wall_s) for m in names]
    return [r for r in rows if models or r.requests > 0]


def limiting_stage(rows: list[StageStats], instances: dict[str, int]) -> StageStats | None:
    """The composing model closest to saturation (busy / instances), ensembles excluded."""
    members = [r for r in rows if r.executions > 0 and r.model in instances]
    if not members:
        return None
    return max(members, key=lambda r: r.busy / max(instances[r.model], 1))
