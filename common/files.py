"""Files written whole: the bytes go to a temporary file beside the target, which then replaces it, so a
reader (Prometheus watching a target file, the next rollout command, a build reusing a cache) sees the old
file or the new one, never half of one."""
from __future__ import annotations

import os
from pathlib import Path


def write_whole(path: str | Path, data: bytes | str) -> Path:
    """Write `data` (text as UTF-8) to `path` through `.<name>.tmp` beside it and os.replace."""
    path = Path(path)
    staging = path.with_name(f".{path.name}.tmp")
    staging.write_bytes(data.encode() if isinstance(data, str) else data)
    os.replace(staging, path)
    return path
