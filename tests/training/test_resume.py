"""Checkpoint / --resume round trip: stopping after epoch 0 and resuming gives bit-identical
weights to an uninterrupted run (model, EMA, optimizer, LR schedule and RNG state all restored)."""
from __future__ import annotations

import argparse
import csv
import json
import shutil

import pytest
import torch

from training import train
from training.checkpoint import BEST, LAST, load_checkpoint, model_from_checkpoint, save_checkpoint
from training.distributed import state_digest
from training.state import unpack_paths


def _args(small_digits, out, epochs: int, *extra: str):
    train_dir, val_dir = small_digits
    return train.get_args_parser().parse_args([
        "--data-dir", str(train_dir), "--val-dir", str(val_dir), "--output-dir", str(out),
        "--crop-size", "32", "--resize-size", "32", "--batch-size", "16", "--steps-per-epoch", "3",
        "--epochs", str(epochs), "--workers", "0", "--threads", "2", "--model-ema", "--model-ema-decay", "0.9",
        "--lr-warmup-epochs", "0.5", "--no-progress", "--no-tensorboard", *extra,
    ])


@pytest.mark.slow
def test_resume_matches_an_uninterrupted_run(small_digits, tmp_path):
    straight = train.main(_args(small_digits, tmp_path / "straight", 2))
    interrupted = train.main(_args(small_digits, tmp_path / "resumed", 2, "--session-epochs", "1"))
    assert interrupted["epochs_run"] == 1
    first = load_checkpoint(tmp_path / "resumed", prefer=LAST)
    assert first["epoch"] == 0 and first["args"]["epochs"] == 2 and first["classes"] == [str(d) for d in range(10)]
    resumed = train.main(_args(small_digits, tmp_path / "resumed", 2, "--resume", str(tmp_path / "resumed")))
    assert resumed["epochs_run"] == 1 and resumed["last_epoch"] == 1

    a, b = (load_checkpoint(tmp_path / name, prefer=LAST) for name in ("straight", "resumed"))
    assert b["args"]["resume"] == str(tmp_path / "resumed") and b["epoch"] == 1
    assert b["lr_scheduler"]["last_epoch"] == a["lr_scheduler"]["last_epoch"] == 6
    for key in ("model", "model_ema"):
        assert a[key].keys() == b[key].keys()
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), f"{key} differs after resume"
    assert b["deploy"] == "model_ema"
    assert state_digest(model_from_checkpoint(b, "model")) == resumed["rank_weight_digests"][0]
    assert any(not torch.equal(first["model"][k], b["model"][k]) for k in first["model"])  # epoch 1 trained

    with open(tmp_path / "resumed" / "metrics.csv") as f:
        assert [row["epoch"] for row in csv.DictReader(f)] == ["0", "1"]
    assert straight["best"]["val_top1"] == pytest.approx(resumed["best"]["val_top1"])
    assert (tmp_path / "resumed" / BEST).is_file()



@pytest.mark.slow
def test_loader_workers_and_resume_do_not_change_the_weights(small_digits, tmp_path):
    """Augmentation is seeded per sample and epoch, not by worker processes: a run with 2 loader workers,
    stopped after epoch 0 and resumed, ends bit-identical to an uninterrupted run without workers."""
    common = ("--auto-augment", "trivialaugment", "--mixup-alpha", "0.2")
    straight = train.main(_args(small_digits, tmp_path / "straight", 2, *common))
    sliced = _args(small_digits, tmp_path / "sliced", 2, *common, "--workers", "2", "--session-epochs", "1")
    train.main(sliced)
    sliced.resume, sliced.session_epochs = str(tmp_path / "sliced"), 0
    resumed = train.main(sliced)
    assert resumed["finished"] and resumed["epochs_run"] == 1
    a, b = (load_checkpoint(tmp_path / name, prefer=LAST) for name in ("straight", "sliced"))
    assert b["args"]["workers"] == 2 and a["args"]["workers"] == 0
    for key in ("model", "model_ema"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), f"{key} differs"
    assert straight["best"]["val_top1"] == pytest.approx(resumed["best"]["val_top1"])

@pytest.mark.slow
def test_distill_resumes_each_student_from_its_own_run(small_digits, tmp_path):
    """training.distill --resume continues each student from its own checkpoint: time-sliced in one-epoch
    sessions it ends with the same distilled student as an uninterrupted run, and reports only then."""
    from training import distill

    teacher = tmp_path / "teacher"
    train.main(_args(small_digits, teacher, 1))

    def run(*extra: str) -> dict:
        args = _args(small_digits, tmp_path / "distill", 2, "--teacher", str(teacher), "--session-epochs", "1", *extra)
        return distill.main(args)

    first = run()  # student_alone: epoch 0, then this session ends
    assert first == {"finished": False, "runs": {"student_alone": str(tmp_path / "distill" / "student_alone")}}
    assert not (tmp_path / "distill" / "student_distilled").exists()
    with pytest.raises(ValueError, match="--output-dir of an earlier training.distill run"):
        run("--resume", str(teacher))
    second = run("--resume", str(tmp_path / "distill"))  # student_alone epoch 1; student_distilled epoch 0
    assert not second["finished"] and not (tmp_path / "distill" / "distill_report.json").exists()
    report = run("--resume", str(tmp_path / "distill"))  # student_distilled epoch 1
    assert report["finished"] and (tmp_path / "distill" / "distill_report.json").is_file()
    for name in distill.RUNS:
        assert load_checkpoint(tmp_path / "distill" / name, prefer=LAST)["epoch"] == 1
        with open(tmp_path / "distill" / name / "metrics.csv") as f:
            assert [row["epoch"] for row in csv.DictReader(f)] == ["0", "1"]

    straight = train.main(_args(small_digits, tmp_path / "straight", 2, "--teacher", str(teacher)))
    resumed = load_checkpoint(tmp_path / "distill" / "student_distilled", prefer=LAST)
    expected = load_checkpoint(tmp_path / "straight", prefer=LAST)
    assert all(torch.equal(expected["model"][k], resumed["model"][k]) for k in expected["model"])
    assert report["student_distilled_val_top1"] == pytest.approx(straight["best"]["val_top1"])


def _one_session(small_digits, out):
    """Epoch 0 of 2 of a small timm run: a checkpoint with epochs left to --resume."""
    args = _args(small_digits, out, 2, "--model", "timm/mobilenetv3_small_050", "--session-epochs", "1")
    assert train.main(args)["epochs_run"] == 1
    return args


def test_resume_refuses_a_changed_recipe_and_rewrites_nothing(small_digits, tmp_path):
    """A changed crop, --lr, --weight-decay, augmentation or val split was accepted: the optimizer kept
    the old LR while args.json and preprocess.json described the new settings."""
    out = tmp_path / "run"
    args = _one_session(small_digits, out)
    changed = {"crop_size": 48, "resize_size": 48, "lr": 0.5, "weight_decay": 0.9, "auto_augment": "randaugment",
               "val_dir": str(small_digits[0]), "session_epochs": 0, "resume": str(out)}
    resumed = argparse.Namespace(**{**vars(args), **changed})
    with pytest.raises(ValueError) as refused:
        train.main(resumed)
    message = str(refused.value)
    assert "\n" not in message and message.startswith(f"{out / LAST} was trained with other settings")
    for expected in ("--lr 0.001 -> 0.5", "--weight-decay 0.05 -> 0.9", "--auto-augment trivialaugment -> randaugment",
                     f"--val-dir {small_digits[1]} -> {small_digits[0]}", "preprocess crop 32 -> 48"):
        assert expected in message
    assert json.loads((out / "args.json").read_text())["lr"] == 0.001
    assert json.loads((out / "preprocess.json").read_text())["crop"] == 32

    # what a later session may change: how long it runs, early stopping, workers, threads, logging
    args.resume, args.session_epochs, args.workers, args.threads = str(out), 0, 1, 1
    args.early_stop_patience, args.tensorboard = 3, True
    assert train.main(args)["finished"]


def test_resume_refuses_pruned_qat_and_stateless_checkpoints(small_digits, tmp_path):
    """Such checkpoints hold no optimizer or LR-schedule state: resuming them was a KeyError traceback."""
    from training import prune

    out = tmp_path / "run"
    args = _one_session(small_digits, out)
    prune.main(prune.get_args_parser().parse_args([
        "--checkpoint", str(out), "--output-dir", str(tmp_path / "pruned"), "--ratio", "0.25", "--round-to", "1",
        "--fine-tune-epochs", "0", "--workers", "0", "--threads", "2", "--no-progress"]))
    checkpoint = load_checkpoint(out, prefer=LAST)
    del checkpoint["optimizer"], checkpoint["lr_scheduler"]
    save_checkpoint(checkpoint, tmp_path / "stateless.pt")
    save_checkpoint({**checkpoint, "qat": {"source": str(out / LAST)}}, tmp_path / "qat.pt")  # as training.qat saves
    for source, message in ((tmp_path / "pruned", "is a training.prune run: it holds no optimizer"),
                            (tmp_path / "qat.pt", "is a training.qat run: it holds no optimizer"),
                            (tmp_path / "stateless.pt", "holds no optimizer or LR-schedule state, so it cannot be resumed")):
        args.resume = str(source)
        with pytest.raises(ValueError, match=message):
            train.main(args)


def test_resume_from_moved_data_folders_that_hold_the_run_s_images(small_digits, tmp_path, capsys):
    """Data folders moved to another path (another machine, another mount point) were refused as a changed
    --data-dir. The checkpoint now records its images by path within the folders: the run resumes from folders
    holding the same images in the same split; other images (in the moved folders or in the same ones), or a
    checkpoint from before that record, are refused saying why."""
    before, after = tmp_path / "disk1" / "digits", tmp_path / "disk2" / "digits"
    shutil.copytree(small_digits[0].parent, before)
    out = tmp_path / "run"
    args = _one_session((before / "train", before / "val"), out)
    recorded = load_checkpoint(out, prefer=LAST)["data"]["relative_files"]
    train_paths, val_paths = unpack_paths(recorded["train"]), unpack_paths(recorded["val"])
    assert len(train_paths) == 120 and len(val_paths) == 40 and val_paths[0].startswith("0/")
    after.parent.mkdir()
    before.rename(after)
    args.data_dir, args.val_dir, args.resume, args.session_epochs = str(after / "train"), str(after / "val"), str(out), 0
    moved = f"--data-dir {before / 'train'} -> {after / 'train'}, --val-dir {before / 'val'} -> {after / 'val'}"

    old = load_checkpoint(out, prefer=LAST)  # as written before checkpoints recorded their images' paths
    del old["data"]["relative_files"]
    save_checkpoint(old, tmp_path / "old.pt")
    with pytest.raises(ValueError) as refused:
        train.main(argparse.Namespace(**{**vars(args), "resume": str(tmp_path / "old.pt")}))
    assert f"{moved} (the checkpoint predates the record of its images' paths" in str(refused.value)

    # another split (a training image moved to val) and an image the run did not have
    taken = sorted((after / "train" / "3").iterdir())[0]
    taken.rename(after / "val" / "3" / taken.name)
    shutil.copy(sorted((after / "train" / "4").iterdir())[0], after / "train" / "4" / "new.png")
    with pytest.raises(ValueError) as refused:
        train.main(args)
    message = str(refused.value)
    assert "\n" not in message and message.startswith(f"{out / LAST} was trained with other settings")
    assert (f"{moved} (other images than the run's: train: 1 of the run's missing (e.g. 3/{taken.name}), 1 not in "
            f"the run (e.g. 4/new.png); val: 1 not in the run (e.g. 3/{taken.name}))") in message
    assert json.loads((out / "args.json").read_text())["data_dir"] == str(before / "train")

    (after / "val" / "3" / taken.name).rename(taken)
    (after / "train" / "4" / "new.png").unlink()
    capsys.readouterr()
    resumed = train.main(args)
    assert resumed["finished"] and resumed["epochs_run"] == 1 and resumed["last_epoch"] == 1
    assert f"data folders moved ({moved}): the run's 120 train / 40 val images are all there" in capsys.readouterr().out
    last = load_checkpoint(out, prefer=LAST)
    assert last["data"]["train_dir"] == str(after / "train") and last["data"]["relative_files"] == recorded
    assert json.loads((out / "args.json").read_text())["data_dir"] == str(after / "train")

    # the same folders with an image added since: refused as well, before anything is trained
    shutil.copy(sorted((after / "train" / "4").iterdir())[0], after / "train" / "4" / "added.png")
    with pytest.raises(ValueError) as refused:
        train.main(args)
    assert ("the data folders (other images than the run's: train: 1 not in the run (e.g. 4/added.png))"
            in str(refused.value))
