"""perf_analyzer for the benchmark tests: the tests that drive it skip, naming `make perf-setup`,
where .venv-perf is not set up."""
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
