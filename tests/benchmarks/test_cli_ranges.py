"""The numeric options of every benchmarks command, the Locust users' own options (benchmarks/locustfile.py,
benchmarks/soak_users.py) included, are range-checked when parsed (serving.health.number, as the training and
serving commands'; soak's --duration and overload's CPU lists by their own types): a bad value ends the command
with argparse's usage error naming the option and the range, before any server, model or file is touched."""
from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import (bench, compression, fastapi_service, guard, inprocess, locust_run, overload, perf, precision,
                        preprocess_dali, profile, response_cache, rollout_bench, scenario, soak, stall, tune,
                        workload)
from serving import health

ROOT = Path(__file__).resolve().parents[2]
SEED_RANGE = f"[{-2**63}, {2**63 - 1}]"
# the commands with numeric options (benchmarks.workload and the helpers have none)
NUMERIC = (bench, compression, fastapi_service, guard, inprocess, locust_run, overload, perf, precision,
           preprocess_dali, profile, response_cache, rollout_bench, scenario, soak, stall, tune)
LOCUST_FILES = ("locustfile", "soak_users")  # options added to Locust's parser; importing them patches with gevent

# what each command needs besides the option under test
REQUIRED = {compression: ["--artifacts", "x"]}


@pytest.mark.parametrize("command, argv, message", [
    (bench, ["--concurrency", "2", "0"], "--concurrency: must be at least 1, got 0"),  # perf_analyzer, Locust 0 users
    (bench, ["--measurement-ms", "0"], "--measurement-ms: must be at least 1, got 0"),
    (bench, ["--locust-run-time", "0"], "--locust-run-time: must be at least 1, got 0"),  # -t 0s: no time limit
    (bench, ["--rounds", "-1"], "--rounds: must be at least 0, got -1"),  # 0: none
    (compression, ["--threads", "-1"], "--threads: must be at least 0, got -1"),  # 0: ONNX Runtime's default
    (compression, ["--rounds", "0"], "--rounds: must be at least 1, got 0"),  # the median of no rounds
    (compression, ["--seconds", "nan"], "--seconds: must be above 0, got nan"),
    (compression, ["--views", "0"], "--views: must be at least 1, got 0"),
    (fastapi_service, ["--port", "0"], "--port: must be in [1, 65535], got 0"),  # a port no one is told of
    (fastapi_service, ["--port", "65536"], "--port: must be in [1, 65535], got 65536"),
    (fastapi_service, ["--intra-op-threads", "-1"], "--intra-op-threads: must be at least 0, got -1"),
    (fastapi_service, ["--workers", "0"], "--workers: must be at least 1, got 0"),
    (inprocess, ["--batch", "8", "0"], "--batch: must be at least 1, got 0"),  # a ValueError after the model loaded
    (inprocess, ["--images", "0"], "--images: must be at least 1, got 0"),
    (inprocess, ["--decode-threads", "0"], "--decode-threads: must be at least 1, got 0"),  # ThreadPoolExecutor(0)
    (inprocess, ["--intra-op-threads", "-2"], "--intra-op-threads: must be at least 0, got -2"),
    (locust_run, ["--users", "8", "0"], "--users: must be at least 1, got 0"),  # 'recorded no requests'
    (locust_run, ["--run-time", "0"], "--run-time: must be at least 1, got 0"),  # ran past the 90 s deadline
    (locust_run, ["--seed", str(2**63)], f"--seed: must be in {SEED_RANGE}, got {2**63}"),  # locust's own refusal
    (overload, ["--loads", "1", "0"], "--loads: must be above 0, got 0"),  # a ZeroDivisionError after the servers
    (overload, ["--loads", "nan"], "--loads: must be above 0, got nan"),
    (overload, ["--run-time", "-5"], "--run-time: must be above 0, got -5"),
    (overload, ["--saturation-users", "0"], "--saturation-users: must be at least 1, got 0"),
    (overload, ["--p99-budget-ms", "0"], "--p99-budget-ms: must be above 0, got 0"),
    (overload, ["--pacing-s", "inf"], "--pacing-s: must be a finite number, got inf"),
    (overload, ["--seed", str(2**63)], f"--seed: must be in {SEED_RANGE}, got {2**63}"),
    (overload, ["--seed", "1.5"], "--seed: invalid int value: '1.5'"),
    (overload, ["--server-cpus", "3-1"], "--server-cpus: '3-1': the range 3-1 runs backwards"),  # pinned nothing
    (guard, ["--rounds", "0"], "--rounds: must be at least 1, got 0"),  # the median of no rounds
    (scenario, ["--resolution", "0"], "--resolution: must be above 0, got 0"),
    (scenario, ["--seed", "-1"], "--seed: must be at least 0, got -1"),  # numpy's generator takes none below 0
    (scenario, ["--max-points", "0"], "--max-points: must be at least 1, got 0"),
    (scenario, ["--runs", "0"], "--runs: must be at least 1, got 0"),
    (guard, ["--concurrency", "4", "0"], "--concurrency: must be at least 1, got 0"),
    (perf, ["--concurrency", "0"], "--concurrency: must be at least 1, got 0"),
    (perf, ["--measurement-ms", "-1"], "--measurement-ms: must be at least 1, got -1"),
    (precision, ["--threads", "-1"], "--threads: must be at least 0, got -1"),
    (precision, ["--rounds", "0"], "--rounds: must be at least 1, got 0"),
    (precision, ["--seconds", "0"], "--seconds: must be above 0, got 0"),  # 0 img/s, then x fp32 divided by 0
    (precision, ["--views", "0"], "--views: must be at least 1, got 0"),
    (precision, ["--max-float-layers", "-1"], "--max-float-layers: must be at least 0, got -1"),
    (preprocess_dali, ["--batch-size", "0"], "--batch-size: must be at least 1, got 0"),
    (preprocess_dali, ["--repeat", "0"], "--repeat: must be at least 1, got 0"),  # the median of no runs
    (profile, ["--concurrency", "0"], "--concurrency: must be at least 1, got 0"),
    (profile, ["--seconds", "inf"], "--seconds: must be a finite number, got inf"),
    (response_cache, ["--distinct", "0"], "--distinct: must be at least 1, got 0"),  # a choice among no images
    (response_cache, ["--users", "0"], "--users: must be at least 1, got 0"),
    (response_cache, ["--run-time", "0"], "--run-time: must be above 0, got 0"),
    (response_cache, ["--cache-mb", "0"], "--cache-mb: must be at least 1, got 0"),  # 'cached' without a cache
    (response_cache, ["--seed", str(-2**63 - 1)], f"--seed: must be in {SEED_RANGE}, got {-2**63 - 1}"),
    (rollout_bench, ["--cycles", "0"], "--cycles: must be at least 1, got 0"),  # no switch measured
    (rollout_bench, ["--users", "0"], "--users: must be at least 1, got 0"),
    (rollout_bench, ["--settle", "0"], "--settle: must be above 0, got 0"),
    (soak, ["--duration", "0"], "--duration: duration '0': must be at least 1 s"),  # -t 0s: no time limit
    (soak, ["--duration", "0m"], "--duration: duration '0m': must be at least 1 s"),
    (soak, ["--duration", "-5"],  # was 'invalid parse_duration value'
     "--duration: duration '-5': use seconds or a number with s, m or h (600, 10m, 1h)"),
    (soak, ["--duration", "nan"], "--duration: duration 'nan': use seconds or a number with s, m or h (600, 10m, 1h)"),
    (soak, ["--users", "0"], "--users: must be at least 1, got 0"),
    (soak, ["--bad-share", "1.5"], "--bad-share: must be in [0, 1], got 1.5"),
    (soak, ["--bad-share", "nan"], "--bad-share: must be in [0, 1], got nan"),
    (soak, ["--bucket", "0"], "--bucket: must be above 0, got 0"),  # a ZeroDivisionError after the soak
    (soak, ["--warmup", "-1"], "--warmup: must be at least 0, got -1"),  # drift taken from the last bucket alone
    (soak, ["--server-pid", "0"], "--server-pid: must be at least 1, got 0"),
    (stall, ["--seconds", "0"], "--seconds: must be above 0, got 0"),
    (stall, ["--clients", "0"], "--clients: must be at least 1, got 0"),
    (stall, ["--stall-ms", "nan"], "--stall-ms: must be above 0, got nan"),
    (tune, ["--concurrency", "0"], "--concurrency: must be at least 1, got 0"),
    (tune, ["--p99-budget-ms", "0"], "--p99-budget-ms: must be above 0, got 0"),  # nothing within the budget
    (tune, ["--min-gain", "-0.01"], "--min-gain: must be at least 0, got -0.01"),
    (tune, ["--min-gain", "inf"], "--min-gain: must be a finite number, got inf"),
    (tune, ["--max-candidates", "0"], "--max-candidates: must be at least 1, got 0"),
    (tune, ["--confirm-pairs", "-1"], "--confirm-pairs: must be at least 0, got -1"),  # was main()'s ValueError
    (tune, ["--passes", "0"], "--passes: must be at least 1, got 0"),  # only the starting spec measured
    (tune, ["--measurement-ms", "0"], "--measurement-ms: must be at least 1, got 0"),
], ids=lambda v: getattr(v, "__name__", None))
def test_options_are_range_checked_at_parsing(command, argv, message, parse_error):
    line = parse_error(command.get_args_parser(), [*REQUIRED.get(command, []), *argv])
    assert line.endswith(f"error: argument {message}")


def test_the_bounds_themselves_parse_where_they_are_included():
    b = bench.get_args_parser().parse_args(["--concurrency", "1", "--rounds", "0", "--measurement-ms", "1"])
    assert (b.concurrency, b.rounds, b.measurement_ms) == ([1], 0, 1)
    c = compression.get_args_parser().parse_args(["--artifacts", "x", "--threads", "0", "--seconds", "1e-3"])
    assert (c.threads, c.seconds) == (0, 1e-3)
    for port in ("1", "65535"):
        assert fastapi_service.get_args_parser().parse_args(["--port", port]).port == int(port)
    assert fastapi_service.get_args_parser().parse_args(["--intra-op-threads", "0"]).intra_op_threads == 0
    i = inprocess.get_args_parser().parse_args(["--batch", "1", "16", "--images", "1", "--intra-op-threads", "0"])
    assert (i.batch, i.images, i.intra_op_threads) == ([1, 16], 1, 0)
    for seed in (-2**63, 2**63 - 1):
        assert overload.get_args_parser().parse_args(["--seed", str(seed)]).seed == seed
        assert response_cache.get_args_parser().parse_args(["--seed", str(seed)]).seed == seed
        assert locust_run.get_args_parser().parse_args(["--seed", str(seed)]).seed == seed
        command = locust_run.locust_command("TritonHttpUser", "h:1", 1, 1, Path("p"), "jpeg", seed=seed)
        assert command[command.index("--seed") + 1] == str(seed)  # passed on to the locustfile
    o = overload.get_args_parser().parse_args(["--loads", "0.5", "1", "--server-cpus", "0", "--client-cpus", "1-1"])
    assert (o.loads, o.server_cpus, o.client_cpus) == ([0.5, 1.0], {0}, {1})
    assert precision.get_args_parser().parse_args(["--max-float-layers", "0", "--threads", "0"]).max_float_layers == 0
    for share in ("0", "1"):
        assert soak.get_args_parser().parse_args(["--bad-share", share]).bad_share == float(share)
    s = soak.get_args_parser().parse_args(["--duration", "1s", "--warmup", "0", "--server-pid", "1"])
    assert (s.duration, s.warmup, s.server_pid) == (1, 0, 1)
    t = tune.get_args_parser().parse_args(["--min-gain", "0", "--confirm-pairs", "0", "--max-candidates", "1"])
    assert (t.min_gain, t.confirm_pairs, t.max_candidates) == (0.0, 0, 1)
    with pytest.raises(ValueError, match="at least 1 s"):  # still a ValueError for callers (tests/serving)
        soak.parse_duration("0h")


@pytest.mark.parametrize("command", NUMERIC, ids=lambda m: m.__name__)
def test_the_defaults_are_within_the_bounds(command):
    """argparse applies a type to string defaults only: each numeric default is put through its own type."""
    parser = command.get_args_parser()
    args = parser.parse_args(REQUIRED.get(command, []))
    for action in parser._actions:
        default = getattr(args, action.dest, None)
        if action.type is None or default is None or isinstance(action.type, type):  # str, Path
            continue
        values = default if isinstance(default, list) else [default]
        assert [action.type(str(v)) for v in values] == values, action.dest


def test_one_number_type_for_every_benchmark_command():
    for module in NUMERIC:
        assert module.number is health.number, module.__name__
    # every option's type, read from the source (the Locust files too, which this process does not import):
    # number(...), or one of the types that are no number
    custom = {"str", "Path", "parse_duration", "env_setting", "cpu_list"}
    typed = set()
    for path in sorted((ROOT / "benchmarks").glob("*.py")):
        tree = ast.parse(path.read_text())
        for call in ast.walk(tree):
            if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute)
                    and call.func.attr == "add_argument"):
                continue
            for kind in (k.value for k in call.keywords if k.arg == "type"):
                if isinstance(kind, ast.Call) and isinstance(kind.func, ast.Name) and kind.func.id == "number":
                    typed.add(path.stem)
                else:
                    assert isinstance(kind, ast.Name) and kind.id in custom, f"{path.name}: {ast.unparse(call)}"
        if path.stem in typed:
            assert any(isinstance(node, ast.ImportFrom) and node.module == "serving.health"
                       and "number" in [a.name for a in node.names] for node in tree.body), path.name
    assert typed == {m.__name__.rpartition(".")[2] for m in NUMERIC} | set(LOCUST_FILES)


def _run(argv: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=cwd, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.parametrize("module, argv, message", [
    ("benchmarks.soak", ["--duration", "0m"],
     "soak.py: error: argument --duration: duration '0m': must be at least 1 s"),
    ("benchmarks.overload", ["--loads", "1", "0"], "overload.py: error: argument --loads: must be above 0, got 0"),
    ("benchmarks.tune", ["--confirm-pairs", "-1"],
     "tune.py: error: argument --confirm-pairs: must be at least 0, got -1"),
    ("benchmarks.locust_run", ["--users", "0"], "locust_run.py: error: argument --users: must be at least 1, got 0"),
])
def test_a_bad_number_ends_the_command_before_anything_is_started(module, argv, message, tmp_path):
    """Run in an empty folder: a server's log or a results folder (benchmarks/results/... by default) would have
    left something in it."""
    done = _run([sys.executable, "-m", module, *argv], tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.splitlines()[-1] == message
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("users, argv, message", [
    ("locustfile", ["--top-k", "0"], "--top-k: must be at least 1, got 0"),  # every request a failure
    ("locustfile", ["--seed", str(2**63)], f"--seed: must be in {SEED_RANGE}, got {2**63}"),
    ("soak_users", ["--bad-share", "1.5"], "--bad-share: must be in [0, 1], got 1.5"),
    ("soak_users", ["--seed", str(-2**63 - 1)], f"--seed: must be in {SEED_RANGE}, got {-2**63 - 1}"),
])
def test_the_locust_users_options_are_range_checked_by_locust(users, argv, message, tmp_path):
    """Locust parses the options a locustfile adds with argparse, before it loads photos or starts a user (were a
    value let through, the run would end after its 1 s)."""
    locust = shutil.which("locust", path=str(Path(sys.executable).parent)) or "locust"
    done = _run([locust, "-f", str(ROOT / "benchmarks" / f"{users}.py"), "--headless", "-t", "1s", *argv], tmp_path,
                timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.splitlines()[-1] == f"locust: error: argument {message}"
    assert not list(tmp_path.iterdir())
