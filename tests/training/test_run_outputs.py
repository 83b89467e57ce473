"""What a real (tiny) run leaves behind and what the later stages make of it: EMA and raw accuracy in
the logs, evaluation and export of a run whose validation images sit in subfolders (one unreadable),
--resume of an early-stopped run and from best.pt, and one-line errors for files that are not checkpoints."""
from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from training import evaluate, export, train
from training.checkpoint import BEST, LAST, load_checkpoint

ROOT = Path(__file__).resolve().parents[2]
BROKEN = "-broken.png"  # sorts before the digits' NNNN.png: the first file of its class


def _argv(train_dir, val_dir, out, *extra: str) -> list[str]:
    return [
        "--data-dir", str(train_dir), "--val-dir", str(val_dir), "--output-dir", str(out),
        "--model", "timm/mobilenetv3_small_050", "--crop-size", "32", "--resize-size", "32", "--batch-size", "16",
        "--workers", "0", "--threads", "2", "--no-progress", "--no-tensorboard", *extra,
    ]


def _args(train_dir, val_dir, out, *extra: str):
    return train.get_args_parser().parse_args(_argv(train_dir, val_dir, out, *extra))


@pytest.fixture(scope="module")
def nested_ema_run(small_digits, tmp_path_factory):
    """2 epochs with EMA on train/<class>/ and val/<class>/batch1/<image> (+ an unreadable val image in 3)."""
    train_dir, val_dir = small_digits
    root = tmp_path_factory.mktemp("nested")
    for class_dir in sorted(val_dir.iterdir()):
        shutil.copytree(class_dir, root / "val" / class_dir.name / "batch1")
    (root / "val" / "3" / "batch1" / BROKEN).write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    out = root / "run"
    summary = train.main(_args(train_dir, root / "val", out, "--epochs", "2", "--steps-per-epoch", "2",
                               "--model-ema", "--model-ema-decay", "0.5"))
    return root, out, summary


def test_ema_run_logs_the_raw_weights_accuracy_too(nested_ema_run, tmp_path):
    root, out, summary = nested_ema_run
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1] and all(r["val_top1"] == r["ema_val_top1"] for r in rows)
    last = load_checkpoint(out, prefer=LAST)
    assert last["epoch"] == 1 and last["deploy"] == "model_ema"
    for weights, key in (("model", "model_val_top1"), ("model_ema", "val_top1")):
        report = evaluate.main(evaluate.get_args_parser().parse_args(
            ["--checkpoint", str(out / LAST), "--weights", weights, "--output-dir", str(tmp_path / weights)]))
        assert report["eval_top1"] == pytest.approx(rows[-1][key]), weights
    with open(out / "metrics.csv") as f:
        assert [float(r["model_val_top1"]) for r in csv.DictReader(f)] == pytest.approx([r["model_val_top1"] for r in rows])


def test_evaluate_and_export_a_run_with_nested_val_folders(nested_ema_run, tmp_path):
    root, out, summary = nested_ema_run
    assert [Path(p).name for p in summary["skipped_images"]] == [BROKEN]
    report = evaluate.main(evaluate.get_args_parser().parse_args(["--checkpoint", str(out), "--output-dir", str(tmp_path / "eval")]))
    assert report["eval_images"] == 40 and [Path(p).name for p in report["unreadable"]] == [BROKEN]
    assert report["eval_top1"] == pytest.approx(summary["best"]["val_top1"])
    assert sum(row["support"] for row in report["per_class"]) == 40 and all(r["support"] == 4 for r in report["per_class"])

    result = export.export_checkpoint(out, tmp_path / "artifacts", parity_count=12)
    parity = result.metadata["parity"]
    assert parity["images"] == "validation images of the run" and parity["passed"]
    assert [name.split("/")[0] for name in parity["photos"]] == [str(d) for d in range(10)] + ["0", "1"]
    assert not any(BROKEN in name for name in parity["photos"])


def test_resume_an_early_stopped_run_and_from_best(small_digits, tmp_path):
    train_dir, val_dir = small_digits
    out = tmp_path / "run"
    common = ("--epochs", "4", "--steps-per-epoch", "1", "--early-stop-patience", "1", "--early-stop-min-delta", "1.0")
    assert train.main(_args(train_dir, val_dir, out, *common, "--session-epochs", "1"))["epochs_run"] == 1
    shutil.copy(out / LAST, tmp_path / "epoch0.pt")
    stopped = train.main(_args(train_dir, val_dir, out, *common, "--resume", str(out)))
    assert stopped["epochs_run"] == 1 and stopped["last_epoch"] == 1  # no top-1 gain of 1.0: stopped early

    with pytest.raises(ValueError, match=r"another LR schedule.*'total_steps': \(4, 6\)"):
        train.main(_args(train_dir, val_dir, out, *common[2:], "--epochs", "6", "--resume", str(out)))  # was: LR 0
    again = train.main(_args(train_dir, val_dir, out, *common, "--resume", str(out)))
    assert again["epochs_run"] == 0  # was one more epoch, then a second "early stop"
    assert load_checkpoint(out, prefer=LAST)["epoch"] == 1

    # resuming an earlier checkpoint replaces the later epochs' records instead of repeating them
    redo = train.main(_args(train_dir, val_dir, out, "--epochs", "4", "--steps-per-epoch", "1",
                            "--resume", str(tmp_path / "epoch0.pt"), "--session-epochs", "1"))
    assert redo["epochs_run"] == 1 and redo["last_epoch"] == 1
    with open(out / "metrics.csv") as f:
        assert [row["epoch"] for row in csv.DictReader(f)] == ["0", "1"]
    assert [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [0, 1]
    assert (out / BEST).is_file()


def test_cli_says_in_one_line_that_a_file_is_no_checkpoint(tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"this is not a checkpoint")
    for module in ("training.evaluate", "training.export"):
        done = subprocess.run([sys.executable, "-m", module, "--checkpoint", str(junk)], cwd=ROOT,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 1, done.stderr
        lines = done.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: {junk} is not a readable training.train checkpoint")


def _run(module: str, *args: str) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return done


def test_training_ends_with_the_next_command_and_evaluation_shows_progress(small_digits, tmp_path):
    out = tmp_path / "mine"
    argv = _argv(*small_digits, out, "--epochs", "2", "--steps-per-epoch", "1")
    first = _run("training.train", *argv, "--session-epochs", "1")
    assert first.stdout.splitlines()[-1].startswith(f"next: the same command with --resume {out} added")
    done = _run("training.train", *argv, "--resume", str(out))
    last = done.stdout.splitlines()[-1]
    assert last.startswith(f"next: make export-run RUN={out}, then make engines ARTIFACTS=artifacts/mine")

    evaluated = _run("training.evaluate", "--checkpoint", str(out), "--output-dir", str(tmp_path / "eval"))
    assert re.search(r"evaluate: +\d+%.* \d/1 ", evaluated.stderr), evaluated.stderr  # a tqdm bar; 40 images: 1 batch
    quiet = _run("training.evaluate", "--checkpoint", str(out), "--output-dir", str(tmp_path / "eval"), "--no-progress")
    assert "evaluate:" not in quiet.stderr and "top-1" in quiet.stdout
