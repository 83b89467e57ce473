"""The numeric options of training.prune, training.qat, training.evaluate, training.export, training.demo and
common.digits (and training.train's --seed; its other options: test_recipe.py) are range-checked when parsed (serving.health.number,
as the serving commands'): a bad value ends the command with argparse's usage error
naming the option and the range, before any checkpoint, model or image is read."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from serving import health
from common import digits
from training import demo, evaluate, export, prune, qat, train

ROOT = Path(__file__).resolve().parents[2]


# what each command needs besides the option under test
REQUIRED = {prune: ["--checkpoint", "x.pt"], qat: ["--checkpoint", "x.pt"], evaluate: ["--checkpoint", "x.pt"],
            export: [], demo: [], train: ["--data-dir", "x"], digits: ["out"]}


@pytest.mark.parametrize("command, argv, message", [
    (prune, ["--ratio", "0"], "--ratio: must be in (0, 0.9], got 0"),  # pruned nothing, then fine-tuned
    (prune, ["--ratio", "1.5"], "--ratio: must be in (0, 0.9], got 1.5"),
    (prune, ["--target-flops-reduction", "1"], "--target-flops-reduction: must be in (0, 0.99], got 1"),
    (prune, ["--ratio-step", "0"], "--ratio-step: must be in (0, 0.9], got 0"),
    (prune, ["--importance-batches", "0"], "--importance-batches: must be at least 1, got 0"),
    (prune, ["--round-to", "0"], "--round-to: must be at least 1, got 0"),
    (prune, ["--fine-tune-epochs", "-1"], "--fine-tune-epochs: must be at least 0, got -1"),
    (prune, ["--lr", "0"], "--lr: must be above 0, got 0"),  # fine-tuned without learning
    (prune, ["--lr", "nan"], "--lr: must be above 0, got nan"),
    (prune, ["--batch-size", "0"], "--batch-size: must be at least 1, got 0"),
    (prune, ["--steps-per-epoch", "-1"], "--steps-per-epoch: must be at least 0, got -1"),
    (prune, ["--workers", "-1"], "--workers: must be at least 0, got -1"),
    (prune, ["--threads", "-2"], "--threads: must be at least 0, got -2"),
    (qat, ["--batch-size", "0"], "--batch-size: must be at least 1, got 0"),
    (qat, ["--workers", "-1"], "--workers: must be at least 0, got -1"),
    (qat, ["--epochs", "0"], "--epochs: must be at least 1, got 0"),  # an IndexError after the PTQ files were made
    (qat, ["--lr", "0"], "--lr: must be above 0, got 0"),
    (qat, ["--lr", "inf"], "--lr: must be a finite number, got inf"),
    (qat, ["--steps-per-epoch", "-1"], "--steps-per-epoch: must be at least 0, got -1"),
    (qat, ["--observer-epochs", "-1"], "--observer-epochs: must be at least 0, got -1"),
    (qat, ["--seed", str(2**64)], f"--seed: must be in [{-2**63}, {2**63 - 1}], got {2**64}"),  # torch: 'Overflow'
    (qat, ["--seed", "1.5"], "--seed: invalid int value: '1.5'"),
    (qat, ["--threads", "-1"], "--threads: must be at least 0, got -1"),
    (evaluate, ["--batch-size", "0"], "--batch-size: must be at least 1, got 0"),
    (evaluate, ["--workers", "-1"], "--workers: must be at least 0, got -1"),
    (evaluate, ["--top-misclassified", "-1"], "--top-misclassified: must be at least 0, got -1"),  # listed all but the last
    (evaluate, ["--threads", "-1"], "--threads: must be at least 0, got -1"),
    (export, ["--atol", "0"], "--atol: must be above 0, got 0"),  # CPU kernels differ in the last bits: never met
    (export, ["--atol", "-0.001"], "--atol: must be above 0, got -0.001"),
    (export, ["--opset", "6"], "--opset: must be in [7, 23], got 6"),
    (export, ["--opset", "24"], "--opset: must be in [7, 23], got 24"),  # torch: 'Unsupported onnx_opset_version'
    (export, ["--parity-images", "0"], "--parity-images: must be at least 1, got 0"),  # silently the sample photos
    (export, ["--input-size", "0"], "--input-size: must be at least 1, got 0"),
    (export, ["--resize-size", "-256"], "--resize-size: must be at least 1, got -256"),
    (export, ["--mean", "0.5", "1.5", "0.5"], "--mean: must be in [0, 1], got 1.5"),
    (export, ["--mean", "nan", "0.5", "0.5"], "--mean: must be in [0, 1], got nan"),
    (export, ["--std", "0.2", "0", "0.2"], "--std: must be above 0, got 0"),
    (train, ["--seed", str(2**64)], f"--seed: must be in [{-2**63}, {2**63 - 1}], got {2**64}"),  # torch: 'Overflow'
    (train, ["--seed", "x"], "--seed: invalid int value: 'x'"),
    (demo, ["--image-size", "8"], "--image-size: must be at least 16, got 8"),  # common.digits refuses it too, later
    (demo, ["--crop-size", "0"], "--crop-size: must be at least 1, got 0"),
    (demo, ["--epochs", "0"], "--epochs: must be at least 1, got 0"),
    (demo, ["--steps-per-epoch", "-1"], "--steps-per-epoch: must be at least 0, got -1"),
    (demo, ["--batch-size", "0"], "--batch-size: must be at least 1, got 0"),
    (demo, ["--lr", "0"], "--lr: must be above 0, got 0"),
    (demo, ["--workers", "-1"], "--workers: must be at least 0, got -1"),
    (demo, ["--threads", "-1"], "--threads: must be at least 0, got -1"),
    (demo, ["--seed", str(-2**63 - 1)], f"--seed: must be in [{-2**63}, {2**63 - 1}], got {-2**63 - 1}"),
    (demo, ["--request-batch", "0"], "--request-batch: must be at least 1, got 0"),  # range() step 0
    (demo, ["--target", "95"], "--target: must be in [0, 1], got 95"),  # a percentage never met
    (digits, ["--size", "15"], "--size: must be at least 16, got 15"),
    (digits, ["--val-fraction", "1"], "--val-fraction: must be in (0, 1), got 1"),
    (digits, ["--val-fraction", "0"], "--val-fraction: must be in (0, 1), got 0"),
    (digits, ["--seed", "-1"], "--seed: must be at least 0, got -1"),  # numpy: 'expected non-negative integer'
], ids=lambda v: getattr(v, "__name__", None))
def test_options_are_range_checked_at_parsing(command, argv, message, parse_error):
    line = parse_error(command.get_args_parser(), [*REQUIRED[command], *argv])
    assert line.endswith(f"error: argument {message}")


def test_the_bounds_themselves_parse_where_they_are_included():
    p = prune.get_args_parser().parse_args(["--checkpoint", "x", "--ratio", "0.9", "--fine-tune-epochs", "0",
                                            "--steps-per-epoch", "0", "--workers", "0", "--round-to", "1"])
    assert (p.ratio, p.fine_tune_epochs, p.steps_per_epoch, p.workers, p.round_to) == (0.9, 0, 0, 0, 1)
    assert prune.get_args_parser().parse_args(["--checkpoint", "x", "--target-flops-reduction", "0.99"]).ratio is None
    q = qat.get_args_parser().parse_args(["--checkpoint", "x", "--observer-epochs", "0", "--seed", "-1", "--epochs", "1"])
    assert (q.observer_epochs, q.seed, q.epochs) == (0, -1, 1)
    assert evaluate.get_args_parser().parse_args(["--checkpoint", "x", "--top-misclassified", "0"]).top_misclassified == 0
    for opset in ("7", "23"):
        assert export.get_args_parser().parse_args(["--opset", opset]).opset == int(opset)
    for seed in (-2**63, 2**63 - 1):
        assert train.get_args_parser().parse_args(["--data-dir", "x", "--seed", str(seed)]).seed == seed
    d = demo.get_args_parser().parse_args(["--image-size", "16", "--target", "1", "--steps-per-epoch", "0"])
    assert (d.image_size, d.target, d.steps_per_epoch) == (16, 1.0, 0)
    e = export.get_args_parser().parse_args(["--mean", "0", "0.5", "1", "--atol", "1e-6"])
    assert (e.mean, e.atol, e.opset) == ([0.0, 0.5, 1.0], 1e-6, 17)


def test_the_opsets_are_those_torch_onnx_exports():
    from torch.onnx import _constants

    assert export.OPSETS == (_constants.ONNX_MIN_OPSET, _constants.ONNX_MAX_OPSET), torch.__version__


def test_one_number_type_for_every_training_command():
    assert not hasattr(train, "_number")
    for module in (train, prune, qat, evaluate, export, demo, digits):
        assert module.number is health.number
    assert train.SEEDS is qat.SEEDS is demo.SEEDS is health.SEEDS


@pytest.mark.parametrize("module, argv, message", [
    ("training.prune", ["--ratio", "1.5"], "prune.py: error: argument --ratio: must be in (0, 0.9], got 1.5"),
    ("training.qat", ["--epochs", "0"], "qat.py: error: argument --epochs: must be at least 1, got 0"),
    ("training.evaluate", ["--batch-size", "0"], "evaluate.py: error: argument --batch-size: must be at least 1, got 0"),
    ("training.export", ["--opset", "24"], "export.py: error: argument --opset: must be in [7, 23], got 24"),
])
def test_a_bad_number_ends_the_command_before_the_checkpoint_is_read(module, argv, message, tmp_path):
    """The checkpoint does not exist: had it been looked for, the command would have said so (exit 1)."""
    done = subprocess.run([sys.executable, "-m", module, "--checkpoint", "no/such.pt", *argv], cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.splitlines()[-1] == message
    assert not list(tmp_path.iterdir())
