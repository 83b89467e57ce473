"""A real labeled image dataset, offline: scikit-learn's handwritten digits as an ImageFolder.

    python -m common.digits data/digits            # -> data/digits/train/<digit>/*.png, val/<digit>/*.png

`load_digits()` ships 1,797 real 8x8 grayscale digits (10 classes, values 0..16) inside the
scikit-learn wheel. Each is upscaled to `size` x `size` (nearest neighbour: the strokes stay sharp;
the serving preprocess refuses images under 16 px a side), written as an RGB PNG (dark ink on white,
like a scan), and split per class with a fixed seed, so every class has the same val fraction.

Idempotent: a root whose `digits.json` matches the request and whose files are all present is left
as it is; anything else is rewritten from scratch.
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from serving.health import number

MANIFEST = "digits.json"
SPLITS = ("train", "val")


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (1797, 8, 8) with 0 = white paper and 255 = black ink, labels int (1797,))."""
    from sklearn.datasets import load_digits

    data = load_digits()
    ink = np.clip(data.images * (255.0 / 16.0), 0, 255).round().astype(np.uint8)
    return 255 - ink, data.target.astype(np.int64)


def stratified_split(labels: np.ndarray, val_fraction: float, seed: int) -> np.ndarray:
    """Boolean mask, True = validation: round(val_fraction * n_c) of each class, seeded."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    rng = np.random.default_rng(seed)
    is_val = np.zeros(len(labels), dtype=bool)
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        count = int(round(val_fraction * len(members)))
        if count == 0 or count == len(members):
            raise ValueError(f"class {label}: {len(members)} images cannot give a {val_fraction} split")
        is_val[rng.permutation(members)[:count]] = True
    return is_val


def _expected_files(root: Path, labels: np.ndarray, is_val: np.ndarray) -> list[Path]:
    return [
        root / SPLITS[int(v)] / str(label) / f"{index:04d}.png"
        for index, (label, v) in enumerate(zip(labels.tolist(), is_val.tolist()))
    ]


def _is_complete(root: Path, manifest: dict, files: list[Path]) -> bool:
    path = root / MANIFEST
    if not path.is_file():
        return False
    try:
        if json.loads(path.read_text()) != manifest:
            return False
    except json.JSONDecodeError:
        return False
    return all(f.is_file() for f in files)


def write_digits_imagefolder(
    root: str | Path, size: int = 32, val_fraction: float = 0.2, seed: int = 0
) -> tuple[Path, Path]:
    """Write `root/train/<digit>/NNNN.png` and `root/val/<digit>/NNNN.png`; return (train_dir, val_dir).

    NNNN is the index in `load_digits()`, so a file names its source sample. Skips the work if the
    root already holds exactly this request (size, split, seed); otherwise rewrites train/ and val/.
    """
    if size < 16:
        raise ValueError(f"size must be >= 16 (the serving preprocess refuses smaller images), got {size}")
    root = Path(root)
    images, labels = digits_arrays()
    is_val = stratified_split(labels, val_fraction, seed)
    files = _expected_files(root, labels, is_val)
    manifest = {
        "source": "sklearn.datasets.load_digits",
        "size": size,
        "upscale": "nearest",
        "val_fraction": val_fraction,
        "seed": seed,
        "counts": {split: int((is_val == (split == "val")).sum()) for split in SPLITS},
        "classes": [str(c) for c in np.unique(labels).tolist()],
    }
    train_dir, val_dir = root / "train", root / "val"
    if _is_complete(root, manifest, files):
        return train_dir, val_dir
    for split_dir in (train_dir, val_dir):
        shutil.rmtree(split_dir, ignore_errors=True)
    (root / MANIFEST).unlink(missing_ok=True)
    for path, pixels in zip(files, images):
        path.parent.mkdir(parents=True, exist_ok=True)
        gray = Image.fromarray(pixels, mode="L").resize((size, size), Image.Resampling.NEAREST)
        gray.convert("RGB").save(path, optimize=False)
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")  # last: marks completion
    return train_dir, val_dir


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, add_help=add_help,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("root", type=Path, help="output folder (gets train/ and val/)")
    p.add_argument("--size", type=number(int, 16), default=32,
                   help="side of the written PNGs in pixels, at least 16 (default: %(default)s)")
    p.add_argument("--val-fraction", type=number(float, 0, 1, above_low=True, below_high=True), default=0.2,
                   help="validation share per class (default: %(default)s)")
    p.add_argument("--seed", type=number(int, 0), default=0, help="split seed, at least 0 (default: %(default)s)")
    return p


def main(args: argparse.Namespace) -> tuple[Path, Path]:
    train_dir, val_dir = write_digits_imagefolder(args.root, args.size, args.val_fraction, args.seed)
    counts = json.loads((Path(args.root) / MANIFEST).read_text())["counts"]
    print(f"digits: {counts['train']} train images in {train_dir}, {counts['val']} val images in {val_dir}")
    return train_dir, val_dir


if __name__ == "__main__":
    try:
        main(get_args_parser().parse_args())
    except (ValueError, OSError) as exc:
        raise SystemExit(f"error: {exc}")
