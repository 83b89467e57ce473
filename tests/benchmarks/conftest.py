"""perf_analyzer for the benchmark tests: the tests that drive it skip, naming `make perf-setup`,
where .venv-perf is not set up. `names_this_machine` checks a written report against /proc/cpuinfo."""
import re
from pathlib import Path

import pytest

PERF_VENV = Path(__file__).resolve().parents[2] / ".venv-perf"


@pytest.fixture(scope="session")
def perf_venv() -> Path:
    return PERF_VENV


@pytest.fixture(scope="session")
def perf_tool(perf_venv):
    from benchmarks.perf import PerfAnalyzer, PerfAnalyzerError

    try:
        return PerfAnalyzer.locate(perf_venv)
    except PerfAnalyzerError as exc:
        pytest.skip(f"perf_analyzer is not set up ({exc}); `make perf-setup` installs it")


@pytest.fixture(scope="session")
def names_this_machine():
    """check(doc, markdown): the report's JSON has a "machine" object and its markdown a first line, each
    with the CPU model and the speed flags (AVX2, AVX-512, VNNI, AMX) that /proc/cpuinfo gives, read here
    apart from common.cpu."""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        pytest.skip("no /proc/cpuinfo to check the report's machine against")
    model = re.search(r"^model name\s*:\s*(.*\S)", cpuinfo, re.M)
    if not model:
        pytest.skip("/proc/cpuinfo names no CPU model")
    flags = re.search(r"^(?:flags|Features)\s*:(.*)$", cpuinfo, re.M)
    speed = {f for f in (flags.group(1).split() if flags else [])
             if f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni") or f.startswith("amx")}

    def check(doc: dict | None = None, markdown: str | None = None) -> None:
        if doc is not None:
            machine = doc["machine"]
            assert machine["cpu"] == model.group(1)
            assert isinstance(machine["flags"], list) and speed <= set(machine["flags"])
            assert machine["cores"] >= machine["cores_usable"] >= 1
        if markdown is not None:
            first = markdown.splitlines()[0]
            assert first.startswith("Machine: ") and model.group(1) in first
            assert all(f" {f} " in first.replace(";", " ") for f in speed), (first, speed)

    return check
