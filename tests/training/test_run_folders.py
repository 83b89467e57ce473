"""What a run's folder holds and who may write it: a resumed run carries its best.pt into a new folder and
refuses a folder of another run, a new run refuses a folder that holds one (and --amp fp16 on CPU, a model
that cannot take the crop) before writing anything, training.qat refuses to write into its source run,
evaluation's confusion matrix reads back as CSV, a folder of splits is no folder of classes, and
training.prune fine-tunes with the run's class weights (fast)."""
from __future__ import annotations

import argparse
import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

from training import data, demo, distill, distributed, evaluate, prune, qat, train
from training.checkpoint import BEST, LAST, load_checkpoint, resolve_checkpoint_path, save_checkpoint
from training.state import load_data

CLASSES = ("goldfish", "great white shark", "tench, Tinca tinca")


def _folder(root, counts, classes=CLASSES):
    for label, (name, count) in enumerate(zip(classes, counts)):
        (root / name).mkdir(parents=True)
        for i in range(count):
            pixels = np.random.default_rng(10 * label + i).integers(0, 256, (32, 32, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


def _argv(train_dir, val_dir, out, *extra: str) -> list[str]:
    return [
        "--data-dir", str(train_dir), "--val-dir", str(val_dir), "--output-dir", str(out),
        "--model", "timm/test_resnet", "--crop-size", "32", "--resize-size", "32", "--batch-size", "4",
        "--epochs", "3", "--steps-per-epoch", "1", "--workers", "0", "--threads", "2", "--no-progress",
        "--no-tensorboard", *extra]


def _args(train_dir, val_dir, out, *extra: str) -> argparse.Namespace:
    return train.get_args_parser().parse_args(_argv(train_dir, val_dir, out, *extra))


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Three imbalanced classes (4 / 6 / 8 training images), one name with a comma."""
    root = tmp_path_factory.mktemp("fish")
    return _folder(root / "train", (4, 6, 8)), _folder(root / "val", (2, 2, 2))


@pytest.fixture(scope="module")
def run(images, tmp_path_factory):
    """A finished one-epoch run with --class-balance loss."""
    out = tmp_path_factory.mktemp("runs") / "fish"
    train.main(_args(*images, out, "--epochs", "1", "--class-balance", "loss"))
    return out


def test_resume_into_another_folder_carries_the_best_checkpoint(images, tmp_path):
    """Resumed into a new --output-dir, a run had no best.pt there, so export and evaluation silently took the
    last epoch while summary.json named an earlier one."""
    source = tmp_path / "run"
    train.main(_args(*images, source, "--session-epochs", "1"))
    checkpoint = load_checkpoint(source, prefer=LAST)
    checkpoint["early_stopping"]["best_seen"] = 1.0  # epoch 0 as if it scored 100 %: no later epoch beats it
    save_checkpoint({k: v for k, v in checkpoint.items() if k != "path"}, source / LAST)

    # from the best epoch itself (epoch 0 = the checkpoint resumed), into a new folder
    moved = train.main(_args(*images, tmp_path / "a", "--resume", str(source), "--session-epochs", "1"))
    assert moved["best"]["epoch"] == 0 and moved["last_epoch"] == 1
    assert resolve_checkpoint_path(tmp_path / "a") == tmp_path / "a" / BEST
    assert load_checkpoint(tmp_path / "a")["epoch"] == 0

    # from a later epoch: the source folder's best.pt comes along, with the metrics of the epochs before
    train.main(_args(*images, source, "--resume", str(source), "--session-epochs", "1"))
    done = train.main(_args(*images, tmp_path / "b", "--resume", str(source)))
    assert done["finished"] and done["best"]["epoch"] == 0 and done["last_epoch"] == 2
    assert (tmp_path / "b" / BEST).read_bytes() == (source / BEST).read_bytes()
    with open(tmp_path / "b" / "metrics.csv", newline="") as f:
        assert [row["epoch"] for row in csv.DictReader(f)] == ["0", "1", "2"]


def test_a_run_resumed_into_a_folder_of_another_run_is_refused_and_writes_nothing(images, tmp_path):
    """--resume A --output-dir B, B holding another run, trained on with A's checkpoint beside B's best.pt and
    metrics (carry_records keeps what B has): export of B shipped the other run's model."""
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    train.main(_args(*images, a, "--session-epochs", "1"))
    train.main(_args(*images, b, "--session-epochs", "1", "--seed", "1"))
    before = {path.name: path.read_bytes() for path in b.iterdir() if path.is_file()}
    with pytest.raises(ValueError) as refused:
        train.main(_args(*images, b, "--resume", str(a)))
    assert str(refused.value) == (f"{b} holds another run's files (checkpoint.pt, best.pt, metrics.csv, "
                                  f"metrics.jsonl, summary.json), not those of the run in {a}: choose another "
                                  f"--output-dir, or --resume {b} to continue the run there")
    assert before == {path.name: path.read_bytes() for path in b.iterdir() if path.is_file()}
    # a folder holding the same run (an earlier resume of A into it) is still resumed into
    train.main(_args(*images, c, "--resume", str(a), "--session-epochs", "1"))
    assert train.main(_args(*images, c, "--resume", str(a), "--session-epochs", "1"))["last_epoch"] == 1


def test_a_new_run_refuses_a_folder_that_holds_one_and_writes_nothing(run, images, tmp_path):
    """A new run in a run's folder wiped its metrics; --amp fp16 on CPU was refused only after args.json said
    fp16 beside a checkpoint trained without it."""
    before = {name: (run / name).read_bytes() for name in ("metrics.csv", "metrics.jsonl", "args.json", LAST)}
    with pytest.raises(ValueError) as refused:
        train.main(_args(*images, run, "--epochs", "1"))
    message = str(refused.value)
    assert "\n" not in message and message == (f"{run} already holds a run (checkpoint.pt, best.pt, metrics.csv, "
                                               f"metrics.jsonl, summary.json): --resume {run} to continue it, or "
                                               f"choose another --output-dir")
    with pytest.raises(ValueError, match="^--amp fp16 needs a GPU; on CPU use --amp bf16 or none$"):
        train.main(_args(*images, run, "--resume", str(run), "--amp", "fp16", "--device", "cpu"))
    assert before == {name: (run / name).read_bytes() for name in before}
    with pytest.raises(ValueError, match="^--amp fp16 needs a GPU"):
        train.main(_args(*images, tmp_path / "new", "--amp", "fp16", "--device", "cpu"))
    assert not (tmp_path / "new").exists()


def test_distill_refuses_an_earlier_distill_run_without_resume(run, images, tmp_path):
    """Each student's run refused its folder naming the student's folder; the whole distill run is what resumes."""
    train.main(_args(*images, tmp_path / "distill" / "student_alone", "--epochs", "1"))
    args = distill.get_args_parser().parse_args(_argv(*images, tmp_path / "distill", "--teacher", str(run)))
    with pytest.raises(ValueError, match=f"^{tmp_path / 'distill'} holds an earlier training.distill run: --resume "
                                         f"{tmp_path / 'distill'} to continue it, or choose another --output-dir$"):
        distill.main(args)


def test_the_demo_starts_its_own_run_afresh_and_leaves_others_alone(run, images, tmp_path):
    """`make train-demo` trains into runs/digits each time: a rerun clears its own earlier run's records."""
    assert not demo.clear_previous_run(run, tmp_path / "digits" / "train")  # another dataset's run
    assert (run / LAST).is_file()
    mine = tmp_path / "mine"
    train.main(_args(*images, mine, "--epochs", "1"))
    assert demo.clear_previous_run(mine, images[0])
    assert train.main(_args(*images, mine, "--epochs", "1"))["finished"]


def test_a_model_that_cannot_take_the_crop_size_is_one_line_before_any_file(images, tmp_path):
    """timm's test_vit3 is built for 160 px: at 32 px it was an AssertionError from inside the first epoch."""
    with pytest.raises(ValueError) as refused:
        train.main(_args(*images, tmp_path / "vit", "--model", "timm/test_vit3"))
    assert str(refused.value) == ("--model timm/test_vit3 cannot take 32x32 px inputs (--crop-size 32): Input height "
                                  "(32) doesn't match model (160).; choose another --crop-size or model")
    assert not (tmp_path / "vit").exists()


def test_qat_refuses_to_write_into_its_source_run(run, tmp_path):
    """--output-dir equal to the source run overwrote its checkpoint.pt; --artifacts are checked up front too."""
    checkpoint = (run / LAST).read_bytes()
    base = ["--checkpoint", str(run), "--baseline-artifacts", str(tmp_path / "ptq"), "--workers", "0"]
    cases = ((["--output-dir", str(run), "--artifacts", str(tmp_path / "qat")],
              f"--output-dir {run} is the source run: choose a new directory"),
             (["--output-dir", str(tmp_path / "run-qat"), "--artifacts", str(tmp_path / "ptq")],
              f"--artifacts {tmp_path / 'ptq'} is the source run's export (--baseline-artifacts): choose another"),
             (["--output-dir", str(tmp_path / "run-qat"), "--artifacts", str(run)],
              f"--artifacts {run} holds something other than an export of {tmp_path / 'run-qat' / LAST}: "
              f"choose another folder"))
    for argv, message in cases:
        with pytest.raises(ValueError) as refused:
            qat.main(qat.get_args_parser().parse_args(base + argv))
        assert str(refused.value) == message
    assert (run / LAST).read_bytes() == checkpoint
    assert not (tmp_path / "ptq").exists() and not (tmp_path / "run-qat").exists()


def test_confusion_matrix_csv_names_rows_and_columns(run, tmp_path):
    """np.savetxt wrote a '# '-prefixed header split at the comma in 'tench, Tinca tinca' and no row names."""
    evaluate.main(evaluate.get_args_parser().parse_args(
        ["--checkpoint", str(run), "--output-dir", str(tmp_path), "--workers", "0", "--no-progress"]))
    with open(tmp_path / "confusion_matrix.csv", newline="") as f:
        header, *rows = csv.reader(f)
    assert header == ["true \\ predicted", *CLASSES] and [row[0] for row in rows] == list(CLASSES)
    counts = np.array([row[1:] for row in rows], dtype=int)
    assert counts.shape == (3, 3) and counts.sum(1).tolist() == [2, 2, 2]


def test_a_folder_of_splits_is_refused_with_the_path_to_use(images, tmp_path):
    """--data-dir at the folder above train/ and val/ trained a 'train vs val' classifier without a word."""
    root = images[0].parent
    with pytest.raises(ValueError) as refused:
        data.load_splits(root, None, 0.2, 0)
    assert str(refused.value) == (f"{root} holds the split folders ['train', 'val'], not class folders: point at one "
                                  f"split, e.g. --data-dir {root / 'train'} --val-dir {root / 'val'}")
    flat = _folder(tmp_path / "flat", (3, 3), classes=("test", "train"))  # images in them: classes after all
    assert data.load_splits(flat, None, 0.4, 0)[0].classes == ["test", "train"]


def test_prune_fine_tunes_with_the_runs_class_weights(run):
    """training.prune built its loss from the label smoothing alone, dropping --class-balance loss."""
    args = prune.get_args_parser().parse_args(["--checkpoint", str(run), "--workers", "0"])
    rargs = prune.recipe_args(load_checkpoint(run), args)
    run_data = load_data(rargs, distributed.Context(device=torch.device("cpu")), lambda text: None)
    weights = prune.source_loss(rargs, run_data).class_weights
    assert rargs.class_balance == "loss" and len(set(weights.tolist())) == 3
    assert torch.equal(weights, torch.tensor(run_data.weights, dtype=torch.float32))
    assert json.loads((run / "args.json").read_text())["class_balance"] == "loss"
