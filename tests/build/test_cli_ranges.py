"""The numeric options of the build commands (build.precision.calibrate, build.precision.validate, build.engines,
build.precision.plans) are range-checked when parsed (serving.health.number, as the training and serving
commands'): a bad value ends the command with argparse's usage error naming the option and the range, before
any model, cache or image is read. Before, calibrate's `--views 0` ended in numpy's "need at least one array to
stack" and its `--batch-size 0` in a ZeroDivisionError traceback, after the model was loaded; `--min-agreement-int8 99`
(a percentage) made every INT8 file fail the gate."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from build import engines
from build.precision import calibrate, plans, validate
from serving import health

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("command, argv, message", [
    (calibrate, ["--percentile", "0"], "--percentile: must be in (0, 100], got 0"),
    (calibrate, ["--percentile", "100.5"], "--percentile: must be in (0, 100], got 100.5"),
    (calibrate, ["--percentile", "nan"], "--percentile: must be in (0, 100], got nan"),
    (calibrate, ["--views", "0"], "--views: must be at least 1, got 0"),
    (calibrate, ["--batch-size", "0"], "--batch-size: must be at least 1, got 0"),
    (validate, ["--views", "-1"], "--views: must be at least 1, got -1"),
    (validate, ["--min-agreement-fp16", "99.5"], "--min-agreement-fp16: must be in [0, 1], got 99.5"),
    (validate, ["--min-agreement-int8", "-0.1"], "--min-agreement-int8: must be in [0, 1], got -0.1"),
    (validate, ["--max-accuracy-drop", "inf"], "--max-accuracy-drop: must be a finite number, got inf"),
    (validate, ["--batch-size", "0"], "--batch-size: must be at least 1, got 0"),
    (engines, ["--min-agreement-fp16", "nan"], "--min-agreement-fp16: must be in [0, 1], got nan"),
    (engines, ["--min-agreement-int8", "99"], "--min-agreement-int8: must be in [0, 1], got 99"),
    (engines, ["--max-accuracy-drop", "2"], "--max-accuracy-drop: must be in [0, 1], got 2"),
    (engines, ["--int8-max-float-layers", "-1"], "--int8-max-float-layers: must be at least 0, got -1"),
    (engines, ["--int8-max-float-layers", "1.5"], "--int8-max-float-layers: invalid int value: '1.5'"),
    (plans, ["--workspace-mib", "0"], "--workspace-mib: must be at least 1, got 0"),
    (plans, ["--optimization-level", "6"], "--optimization-level: invalid choice: 6 (choose from 0, 1, 2, 3, 4, 5)"),
], ids=lambda v: getattr(v, "__name__", None))
def test_options_are_range_checked_at_parsing(command, argv, message, parse_error):
    assert parse_error(command.get_args_parser(), argv).endswith(f"error: argument {message}")


def test_the_bounds_themselves_parse_where_they_are_included():
    c = calibrate.get_args_parser().parse_args(["--percentile", "100", "--views", "1", "--batch-size", "1"])
    assert (c.percentile, c.views, c.batch_size) == (100.0, 1, 1)
    v = validate.get_args_parser().parse_args(["--min-agreement-fp16", "1", "--min-agreement-int8", "0",
                                               "--max-accuracy-drop", "0"])
    assert (v.min_agreement_fp16, v.min_agreement_int8, v.max_accuracy_drop) == (1.0, 0.0, 0.0)
    e = engines.get_args_parser().parse_args(["--int8-max-float-layers", "0", "--min-agreement-int8", "0.9"])
    assert (e.int8_max_float_layers, e.min_agreement_int8) == (0, 0.9)
    assert plans.get_args_parser().parse_args(["--workspace-mib", "1"]).workspace_mib == 1


def test_the_defaults_are_within_their_own_bounds():
    for command in (calibrate, validate, engines, plans):
        parser = command.get_args_parser()
        for action in parser._actions:
            if action.type is not None and action.default is not None and not isinstance(action.default, str):
                assert action.type(str(action.default)) == action.default, (command.__name__, action.dest)


def test_one_number_type_for_the_build_commands():
    for module in (calibrate, validate, engines, plans):
        assert module.number is health.number, module.__name__


@pytest.mark.parametrize("module, argv, message", [
    ("build.precision.calibrate", ["--views", "0"], "calibrate.py: error: argument --views: must be at least 1, got 0"),
    ("build.precision.validate", ["--min-agreement-int8", "99"],
     "validate.py: error: argument --min-agreement-int8: must be in [0, 1], got 99"),
    ("build.engines", ["--int8-max-float-layers", "-1"],
     "engines.py: error: argument --int8-max-float-layers: must be at least 0, got -1"),
])
def test_a_bad_number_ends_the_command_before_the_artifacts_are_read(module, argv, message, tmp_path):
    """The artifacts folder does not exist: had it been looked for, the command would have said so (exit 1)."""
    done = subprocess.run([sys.executable, "-m", module, "--artifacts", "no/such", *argv], cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.splitlines()[-1] == message
    assert not list(tmp_path.iterdir())
