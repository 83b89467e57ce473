"""Image sets for calibration and validation, through the one serving preprocessing.

Default sets come from the bundled photos, split so that validation never sees a calibration
photo: CALIBRATION_PHOTOS feed calibration, HELD_OUT_PHOTOS feed the accuracy gate. Each photo is
expanded into deterministic augmented views (seeded random-resized crop, flip, brightness and
contrast), then resized, cropped and normalised exactly as the server does.
"""
from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance

from common.labels import read_labels
from common.preprocessing import ImageError, PreprocessConfig, decode_image, normalize, resize_and_crop
from common.samples import sample_photos

CALIBRATION_PHOTOS = ("astronaut", "rocket", "motorcycle", "horse", "hubble", "camera", "moon", "china")
HELD_OUT_PHOTOS = ("chelsea", "coffee", "retina", "coins", "grace_hopper", "flower")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


@dataclasses.dataclass
class ImageSet:
    """uint8 crops (N, crop, crop, 3) plus where they came from."""

    crops: np.ndarray
    names: list[str]
    description: str
    files: dict[str, str] = dataclasses.field(default_factory=dict)  # source file -> sha256 of its bytes

    def __len__(self) -> int:
        return len(self.crops)

    def fingerprint(self) -> str:
        """sha256 of the uint8 crops: which images, resized and cropped. Normalisation (mean, std,
        layout) comes later, so build.precision.calibrate.staleness compares the preprocessing itself too."""
        return hashlib.sha256(self.crops.tobytes()).hexdigest()

    def batches(self, config: PreprocessConfig, batch_size: int):
        """Normalised float32 batches, ready for the model."""
        for start in range(0, len(self.crops), batch_size):
            yield normalize(self.crops[start : start + batch_size], config)


def augment(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """One deterministic view: random-resized crop (area 30-100%, aspect 3/4-4/3), flip, jitter."""
    width, height = image.size
    area = width * height * rng.uniform(0.3, 1.0)
    aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
    w = int(min(width, round(np.sqrt(area * aspect))))
    h = int(min(height, round(np.sqrt(area / aspect))))
    left, top = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
    view = image.crop((left, top, left + w, top + h))
    if rng.random() < 0.5:
        view = view.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    view = ImageEnhance.Brightness(view).enhance(rng.uniform(0.8, 1.2))
    return ImageEnhance.Contrast(view).enhance(rng.uniform(0.8, 1.2))


AUGMENTATION = ("random-resized crop (area 0.3-1.0, aspect 3/4-4/3), horizontal flip p=0.5, "
                "brightness and contrast x0.8-1.2")


def augmented_photos(names: tuple[str, ...], views: int, seed: int, config: PreprocessConfig) -> ImageSet:
    """`views` augmented views of each named bundled photo (the first view is the photo itself)."""
    rng = np.random.default_rng(seed)
    crops, labels = [], []
    for name, path in sample_photos(list(names)).items():
        image = decode_file(path)
        for view in range(views):
            crops.append(resize_and_crop(image if view == 0 else augment(image, rng), config))
            labels.append(f"{name}#{view}")
    description = (f"{len(names)} bundled photos ({', '.join(names)}) x {views} views: the original + "
                   f"{AUGMENTATION}, seed {seed}")
    return ImageSet(np.stack(crops), labels, description, file_digests(bundled_paths(names)))


def decode_file(path: Path, draft_size: int | None = None) -> Image.Image:
    try:
        return decode_image(path.read_bytes(), draft_size=draft_size)
    except ImageError as exc:
        raise ImageError(f"{path}: {exc} (remove it or give another folder)") from None


def folder_paths(folder: str | Path, limit: int | None = None) -> list[Path]:
    """The image files under `folder` (recursively, sorted) that folder_images reads."""
    paths = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)[:limit]
    if not paths:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {folder}")
    return paths


def bundled_paths(names: tuple[str, ...]) -> list[Path]:
    return list(sample_photos(list(names)).values())


def file_digests(paths: list[Path]) -> dict[str, str]:
    """{path: sha256 of the file's bytes}: a copy under another name has the same digest."""
    return {str(p): hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in paths}


def folder_images(folder: str | Path, config: PreprocessConfig, limit: int | None = None) -> ImageSet:
    """Every image under `folder` (recursively, sorted), no augmentation."""
    paths = folder_paths(folder, limit)
    crops = [resize_and_crop(decode_file(p, draft_size=config.resize), config) for p in paths]
    return ImageSet(np.stack(crops), [str(p) for p in paths], f"{len(paths)} images from {folder}", file_digests(paths))


IMAGENET_CLASSES = 1000


def bundled_photos_warning(labels_file: str | Path, folders: dict[str, str | None]) -> str | None:
    """One line when the bundled ImageNet photos stand in for a model that does not classify ImageNet's
    1000 classes: calibration ranges from photos of other things are a guess, and agreement with FP32 on
    them says little (a model with random weights agrees with itself anywhere). `folders`: the command's
    flag for each image set -> the folder given (None: the bundled photos). None otherwise."""
    missing = [flag for flag, folder in folders.items() if folder is None]
    classes = len(read_labels(labels_file)) if Path(labels_file).exists() else IMAGENET_CLASSES
    if not missing or classes == IMAGENET_CLASSES:
        return None
    return (f"warning: this model has {classes} classes, not ImageNet's {IMAGENET_CLASSES}, but the bundled ImageNet "
            f"photos stand in for its images; pass {' and '.join(f'{m} DIR' for m in missing)} with images of its "
            "own classes (an ImageFolder for --held-out adds true accuracy)")


def calibration_set(config: PreprocessConfig, folder: str | None = None, views: int = 16, seed: int = 0) -> ImageSet:
    return folder_images(folder, config) if folder else augmented_photos(CALIBRATION_PHOTOS, views, seed, config)


def held_out_set(config: PreprocessConfig, folder: str | None = None, views: int = 40, seed: int = 1) -> ImageSet:
    return folder_images(folder, config) if folder else augmented_photos(HELD_OUT_PHOTOS, views, seed, config)


def calibration_files(folder: str | None = None) -> dict[str, str]:
    """calibration_set's source files -> sha256, without decoding them."""
    return file_digests(folder_paths(folder) if folder else bundled_paths(CALIBRATION_PHOTOS))


def held_out_files(folder: str | None = None) -> dict[str, str]:
    """held_out_set's source files -> sha256, without decoding them."""
    return file_digests(folder_paths(folder) if folder else bundled_paths(HELD_OUT_PHOTOS))


class OverlappingImages(ValueError):
    """Held-out images that calibration saw: the gate would score them and overstate agreement."""


def overlap(calibration: dict[str, str], held_out: dict[str, str]) -> list[str]:
    """The held-out files whose bytes are those of a calibration file (whatever their names)."""
    seen = set(calibration.values())
    return [path for path, digest in held_out.items() if digest in seen]


def overlap_refusal(calibration: dict[str, str], held_out: dict[str, str], calibration_source: str) -> str | None:
    """One line when some held-out files are calibration images (`calibration_source` says where the
    calibration images were named), else None."""
    shared = overlap(calibration, held_out)
    if not shared:
        return None
    few = ", ".join(shared[:3]) + (", ..." if len(shared) > 3 else "")
    return (f"{len(shared)} of the {len(held_out)} held-out images are calibration images ({calibration_source}), "
            f"byte for byte: {few}; the gate would score images calibration saw and overstate agreement: give "
            "--held-out and the calibration images disjoint folders")
