"""ImageFolder data: `root/<class>/<image>` -> samples, splits, datasets, samplers and loaders.

Images are decoded with `common.preprocessing.decode_image`, the serving decoder (EXIF, colour
modes, alpha, size limits), so training sees each file as the server will. A file that does not decode is
reported by path and reason and dropped from its batch (`collate_skipping`); the epoch goes on.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from common.contract import ImageLimits
from common.preprocessing import ImageError, decode_image

# the files of the formats decode_image accepts (common.preprocessing.IMAGE_FORMATS)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
# folder names of a dataset's splits: an ImageFolder whose "classes" are these is the folder above the splits
SPLIT_NAMES = ("train", "val", "validation", "test")


@dataclasses.dataclass
class Split:
    """Labeled files of one split: `samples[i] = (path, class index)`; `classes[k]` names class k."""

    classes: list[str]
    samples: list[tuple[str, int]]

    @property
    def targets(self) -> np.ndarray:
        return np.array([label for _, label in self.samples], dtype=np.int64)

    def class_counts(self) -> np.ndarray:
        return np.bincount(self.targets, minlength=len(self.classes))

    def relative_paths(self, root: str | Path) -> list[str]:
        """Each sample's path relative to `root` (the folder it was scanned from), `/`-separated, in order."""
        return [Path(path).relative_to(root).as_posix() for path, _ in self.samples]


def find_classes(root: str | Path) -> list[str]:
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if len(classes) < 2:
        raise ValueError(f"{root} has {len(classes)} class folder(s) {classes}: a classifier needs at least 2 "
                         f"({root}/<class>/<image>)")
    if set(classes) <= set(SPLIT_NAMES) and all(any(p.is_dir() for p in (root / c).iterdir()) for c in classes):
        train = "train" if "train" in classes else classes[0]
        val = next((c for c in ("val", "validation") if c in classes and c != train), None)
        raise ValueError(f"{root} holds the split folders {classes}, not class folders: point at one split, "
                         f"e.g. --data-dir {root / train}" + (f" --val-dir {root / val}" if val else ""))
    return classes


def scan_image_folder(root: str | Path, classes: Sequence[str] | None = None) -> Split:
    """Every image file under `root/<class>/` (recursively, sorted). With `classes`, the folder must
    have exactly those class folders (e.g. a val folder checked against the train classes)."""
    root = Path(root)
    found = find_classes(root)
    if classes is not None and list(classes) != found:
        missing, extra = sorted(set(classes) - set(found)), sorted(set(found) - set(classes))
        raise ValueError(f"{root} has classes {found}; expected {list(classes)} (missing {missing}, extra {extra})")
    samples = []
    for index, name in enumerate(found):
        files = sorted(p for p in (root / name).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        samples += [(str(p), index) for p in files]
    empty = [name for index, name in enumerate(found) if not any(label == index for _, label in samples)]
    if empty:
        raise ValueError(f"{root}: class folders without images {empty} (extensions: {', '.join(IMAGE_EXTENSIONS)})")
    return Split(classes=found, samples=samples)


def stratified_split(split: Split, val_fraction: float, seed: int) -> tuple[Split, Split]:
    """(train, val): round(val_fraction * n) of every class to val (at least 1), chosen with `seed`."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val fraction must be in (0, 1), got {val_fraction}")
    rng = np.random.default_rng(seed)
    targets = split.targets
    val_indices: set[int] = set()
    for label, name in enumerate(split.classes):
        members = np.flatnonzero(targets == label)
        if len(members) < 2:
            raise ValueError(f"class {name!r} has {len(members)} image(s): cannot split it into train and val")
        count = min(max(1, int(round(val_fraction * len(members)))), len(members) - 1)
        val_indices.update(rng.permutation(members)[:count].tolist())
    train = [s for i, s in enumerate(split.samples) if i not in val_indices]
    val = [s for i, s in enumerate(split.samples) if i in val_indices]
    return Split(split.classes, train), Split(split.classes, val)


def load_splits(train_dir: str | Path, val_dir: str | Path | None, val_fraction: float, seed: int) -> tuple[Split, Split]:
    """A given val folder (same classes as train), or a stratified split of the train folder."""
    train = scan_image_folder(train_dir)
    if val_dir is not None:
        return train, scan_image_folder(val_dir, train.classes)
    return stratified_split(train, val_fraction, seed)


class ImageFolderDataset(Dataset):
    """item i -> (tensor, label, i), or (None, label, i) when the file does not decode. Item (i, seed),
    as ShardedSampler(item_seeds=True) yields them, runs the (random) transform on its own RNG seeded
    with `seed`: augmentation then depends on the seed alone, not on which process draws it or how
    many draws came before (the same with 0 or 8 loader workers, and after --resume)."""

    def __init__(self, split: Split, transform: Callable, draft_size: int | None = None,
                 limits: ImageLimits = ImageLimits()):
        self.split, self.transform, self.draft_size, self.limits = split, transform, draft_size, limits

    def __len__(self) -> int:
        return len(self.split.samples)

    def __getitem__(self, key: int | tuple[int, int]):
        index, seed = key if isinstance(key, tuple) else (key, None)
        path, label = self.split.samples[index]
        try:
            image = self._decode(path)
        except (ImageError, OSError):
            return None, label, index
        if seed is None:
            return self.transform(image), label, index
        with torch.random.fork_rng(devices=[]):  # the caller's RNG (the training loop's, with 0 workers) is untouched
            torch.manual_seed(seed)
            return self.transform(image), label, index

    def _decode(self, path: str):
        return decode_image(Path(path).read_bytes(), self.limits, draft_size=self.draft_size)

    def why_unreadable(self, index: int) -> str:
        """The decoder's reason for skipping item `index` (decoded again: batches carry only the indices)."""
        try:
            self._decode(self.split.samples[index][0])
        except (ImageError, OSError) as exc:
            return str(exc)
        return "it failed to load once but reads now"


def collate_skipping(items):
    """-> (images (n, 3, H, W), labels (n,), indices of good items (n,), indices of bad items (m,))."""
    good = [item for item in items if item[0] is not None]
    bad = torch.tensor([item[2] for item in items if item[0] is None], dtype=torch.int64)
    if not good:
        return None, None, torch.zeros(0, dtype=torch.int64), bad
    images = torch.stack([item[0] for item in good])
    labels = torch.tensor([item[1] for item in good], dtype=torch.int64)
    return images, labels, torch.tensor([item[2] for item in good], dtype=torch.int64), bad


class ShardedSampler(Sampler):
    """This rank's share of an epoch: shuffled (seed + epoch) or in order, optionally drawn with
    replacement by per-sample `weights` (a weighted sampler for imbalanced classes). Training
    shards are padded to equal length (DDP needs the same number of steps on every rank);
    evaluation shards (`pad=False`) cover every sample exactly once across ranks. With `item_seeds`
    it yields (index, seed): one augmentation seed per position of the epoch (seed, epoch), so every
    rank and every repeat of a sample gets its own."""

    def __init__(self, size: int, rank: int = 0, world_size: int = 1, shuffle: bool = True, seed: int = 0,
                 weights: np.ndarray | None = None, pad: bool = True, item_seeds: bool = False):
        self.size, self.rank, self.world_size = size, rank, world_size
        self.shuffle, self.seed, self.pad, self.epoch, self.item_seeds = shuffle, seed, pad, 0, item_seeds
        self.weights = None if weights is None else torch.as_tensor(weights, dtype=torch.float64)
        self.per_rank = math.ceil(size / world_size) if pad else len(range(rank, size, world_size))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _order(self) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        if self.weights is not None:
            return torch.multinomial(self.weights, self.size, replacement=True, generator=generator).tolist()
        if self.shuffle:
            return torch.randperm(self.size, generator=generator).tolist()
        return list(range(self.size))

    def __iter__(self):
        order = self._order()
        if self.pad:
            total = self.per_rank * self.world_size
            order = (order * math.ceil(total / max(1, len(order))))[:total]
        if not self.item_seeds:
            return iter(order[self.rank::self.world_size])
        entropy = [self.seed % 2**64, self.epoch]  # SeedSequence takes non-negative integers (--seed -1 too)
        seeds = np.random.SeedSequence(entropy).generate_state(len(order), np.uint64).tolist()
        return iter(list(zip(order, seeds))[self.rank::self.world_size])

    def __len__(self) -> int:
        return self.per_rank


def make_loader(dataset: Dataset, sampler: Sampler, batch_size: int, workers: int, pin_memory: bool,
                drop_last: bool = False) -> DataLoader:
    return DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, pin_memory=pin_memory,
        drop_last=drop_last, collate_fn=collate_skipping, persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
        generator=torch.Generator().manual_seed(0),  # workers' base seed: not drawn from the training RNG
    )


def class_weights(counts: np.ndarray) -> np.ndarray:
    """Inverse-frequency weights n / (C * n_c) (scikit-learn's "balanced"): mean 1 over the training images."""
    if (counts == 0).any():
        raise ValueError(f"every class needs at least one training image; counts {counts.tolist()}")
    return counts.sum() / (len(counts) * counts.astype(np.float64))
