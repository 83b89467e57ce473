"""Data that cannot make a classifier stops the run with its cause; a few unreadable files do not (fast)."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from training import data, train
from training.checkpoint import BEST, LAST


def _folder(root, side: int, classes=("a", "b"), count: int = 4):
    for label, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(count):
            pixels = np.random.default_rng(10 * label + i).integers(0, 256, (side, side, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


def _args(train_dir, val_dir, out):
    return train.get_args_parser().parse_args([
        "--data-dir", str(train_dir), "--val-dir", str(val_dir), "--output-dir", str(out),
        "--model", "timm/mobilenetv3_small_050", "--crop-size", "32", "--resize-size", "32", "--batch-size", "4",
        "--epochs", "1", "--steps-per-epoch", "2", "--workers", "0", "--threads", "2", "--no-progress",
        "--no-tensorboard"])


def test_images_below_the_serving_limits_stop_the_run_with_the_reason(tmp_path):
    """12 px images are unreadable to the serving decoder (sides under 16 px): every training step was
    a zero-loss dummy step and the run finished with best.pt; now it stops before saving anything."""
    tiny = _folder(tmp_path / "tiny", side=12)
    with pytest.raises(ValueError, match=r"epoch 0: not one training image could be read \(first: .*\.png: "
                                         r"image is 12x12; both sides must be at least 16 pixels\)"):
        train.main(_args(tiny, tiny, tmp_path / "run"))
    assert not (tmp_path / "run" / BEST).exists() and not (tmp_path / "run" / LAST).exists()


def test_unreadable_validation_images_stop_the_run_and_a_few_bad_files_are_skipped_with_why(tmp_path, capsys):
    train_dir = _folder(tmp_path / "train", side=32)
    (train_dir / "a" / "0.png").unlink()
    (train_dir / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")  # 8 images: both batches
    val_dir = _folder(tmp_path / "val", side=12, count=2)
    with pytest.raises(ValueError, match=r"not one of the 4 validation images could be read \(first: .*\.png: "
                                         r"image is 12x12; both sides .*\); fix or remove them, or pass another --val-dir"):
        train.main(_args(train_dir, val_dir, tmp_path / "run"))
    assert not (tmp_path / "run" / BEST).exists()
    out = capsys.readouterr().out
    assert f"skipping unreadable image {train_dir / 'a' / 'broken.png'}: not a recognised image format" in out

    summary = train.main(_args(train_dir, _folder(tmp_path / "val32", side=32, count=2), tmp_path / "ok"))
    assert summary["finished"] and summary["skipped_images"] == [str(train_dir / "a" / "broken.png")]


def test_one_class_is_no_classifier(tmp_path):
    single = _folder(tmp_path / "single", side=32, classes=("a",))
    with pytest.raises(ValueError, match=r"has 1 class folder\(s\) \['a'\]: a classifier needs at least 2"):
        data.load_splits(single, None, 0.5, 0)
