"""Fixtures for the training tests: the real digits dataset, written once per session."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from common.digits import write_digits_imagefolder


@pytest.fixture(scope="session")
def digits(tmp_path_factory) -> tuple[Path, Path]:
    """(train_dir, val_dir) of scikit-learn's digits at 32 px: 1,438 / 359 images, 10 classes."""
    return write_digits_imagefolder(tmp_path_factory.mktemp("digits"), size=32)


@pytest.fixture(scope="session")
def small_digits(digits, tmp_path_factory) -> tuple[Path, Path]:
    """A subset of the digits (12 train / 4 val images per class) for runs that test mechanics."""
    root = tmp_path_factory.mktemp("small_digits")
    for source, split, count in ((digits[0], "train", 12), (digits[1], "val", 4)):
        for class_dir in sorted(p for p in source.iterdir() if p.is_dir()):
            target = root / split / class_dir.name
            target.mkdir(parents=True)
            for image in sorted(class_dir.glob("*.png"))[:count]:
                shutil.copy(image, target / image.name)
    return root / "train", root / "val"
