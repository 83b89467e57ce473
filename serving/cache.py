"""Triton's response cache on a server the project starts (`make serve`, serving.supervise, benchmarks, tests).

A repository built with `"response_cache_mb": N` in the deployment spec marks its ensemble
`response_cache { enable: true }`; the server caches only when it is also started with a cache:
`--cache-config=local,size=<bytes>`. The launcher (serving.tritonserver) adds `--cache-directory` at the
pip wheel's `tritonserver/caches` (the server looks in /opt/tritonserver/caches otherwise, where the
container images have it).
"""
from __future__ import annotations

from pathlib import Path

from serving.triton_admin import built_spec


def cache_args(size_mb: int) -> list[str]:
    """tritonserver flags for a local response cache of `size_mb` MiB ([] for 0: no cache)."""
    if size_mb < 0:
        raise ValueError(f"cache size must be >= 0 MiB, got {size_mb}")
    if not size_mb:
        return []
    return [f"--cache-config=local,size={size_mb << 20}"]


def repository_cache_mb(repository: str | Path) -> int:
    """The response cache size the repository's spec asks for (0: none, or no BUILD.json)."""
    return int(built_spec(repository).get("response_cache_mb") or 0)
