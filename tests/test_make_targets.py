"""Every `make` target's `python -m <module> ...` lines parse with that module's own argument parser, as
`make -n` prints them with the default variables: a flag renamed in a module, or a variable that two mk/
files define differently (`DURATION=10m` reaching `serving.rollout ab run --duration`), fails here
rather than in the user's first run. Real make, real parsers; nothing is run."""
from __future__ import annotations

import contextlib
import importlib
import io
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHELL_WORDS = {"&&", "||", ";", "|", ">", ">>", "2>&1", "<", "}"}
REQUIRED = {"publish": ["S3_URL=s3://bucket/prefix"], "pull": ["S3_URL=s3://bucket/prefix"]}  # variables a
# target refuses to run without


def make(*args: str) -> str:
    command = ["make", "--no-print-directory", "-C", str(ROOT), f"VENV={Path(sys.executable).parent.parent}",
               "STAMP=", *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    return done.stdout


def targets() -> list[str]:
    return sorted({line.split()[1] for line in make("help").splitlines() if line.startswith("  make ")})


def module_calls(target: str, *variables: str) -> list[tuple[str, list[str]]]:
    """(module, argv) of each `<python> -m module ...` that `make -n target` prints."""
    text = make("-n", target, *REQUIRED.get(target, []), *variables).replace("\\\n", " ")
    calls = []
    for line in text.splitlines():
        line = re.sub(r"\$\([^()]*\)", "photo.jpg", line)  # a command substitution stands for its output
        try:
            words = shlex.split(line)
        except ValueError:
            continue
        for i, word in enumerate(words[:-2]):
            if word.endswith("/python") and words[i + 1] == "-m":
                argv = []
                for arg in words[i + 3:]:
                    if arg in SHELL_WORDS:
                        break
                    argv.append(arg)
                calls.append((words[i + 2], argv))
    return calls


def test_every_targets_module_takes_the_arguments_make_passes():
    checked, problems = [], []
    for target in targets():
        for module_name, argv in module_calls(target):
            if module_name in ("pip", "pytest", "venv"):
                continue
            module = importlib.import_module(module_name)
            if not hasattr(module, "get_args_parser"):
                if not argv:  # takes no arguments
                    continue
                problems.append(f"make {target}: {module_name} has no get_args_parser() to check its arguments by")
                continue
            stderr = io.StringIO()
            try:
                with contextlib.redirect_stderr(stderr):
                    module.get_args_parser().parse_args(argv)
            except SystemExit as exc:
                if exc.code:
                    problems.append(f"make {target}: python -m {module_name} {shlex.join(argv)}: "
                                    f"{stderr.getvalue().strip().splitlines()[-1]}")
            checked.append(f"{target}: {module_name}")
    assert not problems, "\n".join(problems)
    # the check saw the targets that matter (a make that printed nothing would pass vacuously)
    for expected in ("engines: build.engines", "ab-run: serving.rollout", "soak: benchmarks.soak",
                     "bench-precision: benchmarks.precision", "serve: serving.server"):
        assert expected in checked, checked


@pytest.mark.parametrize("target, flag", [("bench-precision", "--out"), ("bench-compression", "--out"),
                                          ("bench-rollout", "--out"), ("soak", "--out"),
                                          ("bench-preprocess", "--out")])
def test_benchmark_targets_write_where_bench_out_says(target, flag, tmp_path):
    argv = [argv for module, argv in module_calls(target) if module.startswith("benchmarks.")]
    assert argv, f"make -n {target} runs no benchmark"
    text = make("-n", target, f"BENCH_OUT={tmp_path}")
    assert f"{flag} {tmp_path}" in text, text
