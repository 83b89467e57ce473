"""The one preprocessing definition: encoded bytes -> RGB image -> normalised tensor.

Imported by export (parity check), calibration, validation, the clients' local reference path,
training evaluation, and the Triton `preprocess` model (the build copies this file and
common/contract.py into `model_repository/preprocess/1/`, so it must depend on nothing but numpy,
Pillow and that file).

The transform is torchvision's eval preset: resize the shorter side to `resize` (bilinear,
antialiased), centre-crop `crop` x `crop`, scale to [0, 1], subtract `mean`, divide by `std`.
`preprocess.json` (written at export, read everywhere) holds these numbers for each model.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import io
import json
import math
import numbers
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import PIL
from PIL import Image, ImageOps, UnidentifiedImageError

try:
    from common.contract import ImageLimits
except ImportError:  # inside a model repository: contract.py sits next to this file
    from contract import ImageLimits

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LAYOUTS = ("NCHW", "NHWC")
INTERPOLATIONS = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}

# The formats an image may be in, as Pillow's format IDs, each with the Pillow module that registers its
# opener: what browsers, phones and cameras upload. `Image.open` tries these openers only, so a file in
# any other format (EPS, whose decoder runs Ghostscript in a subprocess; IPTC, ICNS, ICO, JPEG 2000,
# AVIF, PSD, Netpbm, TGA, ...) is refused from its first bytes, before a plugin of its own parses it.
# The JPEG opener also returns MPO (a JPEG with more images after it, as phones write). docs/serving.md
# (Bad input) says why.
IMAGE_FORMATS = {
    "JPEG": "JpegImagePlugin",
    "PNG": "PngImagePlugin",
    "WEBP": "WebPImagePlugin",
    "GIF": "GifImagePlugin",
    "BMP": "BmpImagePlugin",
    "TIFF": "TiffImagePlugin",
}


def _register_plugins(formats: dict[str, str]) -> None:
    """Register the Pillow plugins of `formats` now, at import, in the importing thread. Left to itself
    Pillow imports and registers plugins on the first `Image.open` that needs them, which decoding threads
    (the served models' pool) would race on. MpoImagePlugin: the JPEG opener imports it on the first MPO."""
    Image.preinit()  # Pillow's common plugins; every later call (one per Image.open) returns at once
    for module in (*formats.values(), "MpoImagePlugin"):
        importlib.import_module(f"PIL.{module}")
    missing = sorted(set(formats) - set(Image.OPEN))
    if missing:
        raise ImportError(f"Pillow {PIL.__version__} registers no opener for the image formats {missing}")


_register_plugins(IMAGE_FORMATS)


class ImageError(ValueError):
    """An input that is not a usable image. The message is meant for the user who sent it."""


class PreprocessFault(RuntimeError):
    """An item that failed for another reason than its being a bad image: a fault of the server's, which fails
    that item's request (INTERNAL in the served models), never the others of its batch."""


@dataclasses.dataclass(frozen=True)
class PreprocessConfig:
    resize: int = 256  # shorter side after resizing
    crop: int = 224  # centre crop, square
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"
    layout: str = "NCHW"

    def __post_init__(self):
        """Each value of its type, as preprocess.json is read: a bad file fails its model's load, in one line
        naming the key, not every batch it would have preprocessed."""
        for key in ("resize", "crop"):
            value = getattr(self, key)
            if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
                raise ValueError(f"preprocess {key} must be an integer >= 1, got {value!r}")
            object.__setattr__(self, key, int(value))
        if self.crop > self.resize:
            raise ValueError(f"crop ({self.crop}) must not exceed resize ({self.resize})")
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout {self.layout!r} is not one of {LAYOUTS}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation {self.interpolation!r} is not one of {sorted(INTERPOLATIONS)}")
        for key in ("mean", "std"):
            values = getattr(self, key)
            if (not isinstance(values, (list, tuple)) or len(values) != 3
                    or not all(isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v) for v in values)
                    or (key == "std" and min(values) <= 0)):
                need = "3 finite numbers" + (", each > 0" if key == "std" else "")
                raise ValueError(f"preprocess {key} must be {need}, got {values!r}")
            object.__setattr__(self, key, tuple(float(v) for v in values))

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """Shape of one preprocessed image (no batch axis)."""
        c, s = 3, self.crop
        return (c, s, s) if self.layout == "NCHW" else (s, s, c)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "PreprocessConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown preprocess keys {sorted(unknown)}; valid: {sorted(known)}")
        return cls(**data)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "PreprocessConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))


def decode_image(data: bytes, limits: ImageLimits = ImageLimits(), draft_size: int | None = None) -> Image.Image:
    """Encoded bytes in one of IMAGE_FORMATS -> upright RGB image; any other format is refused unread.

    EXIF orientation is applied; grayscale, palette, CMYK and 16-bit images become RGB; alpha is
    composited onto white. With `draft_size`, JPEGs are decoded at the smallest DCT scale whose
    both sides are still >= draft_size (much faster for large photos). Raises ImageError.
    """
    if isinstance(data, np.ndarray):  # a 0-d object array from Triton
        data = data.item()
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ImageError(f"expected encoded image bytes, got {type(data).__name__}")
    size = len(data)
    if size == 0:
        raise ImageError("empty input: 0 bytes (expected an encoded image)")
    if size > limits.max_image_bytes:
        raise ImageError(f"image is {size} bytes; the limit is {limits.max_image_bytes} bytes")
    try:
        image = Image.open(io.BytesIO(data), formats=list(IMAGE_FORMATS))  # reads the header only
    except UnidentifiedImageError:
        raise ImageError(f"not a recognised image format ({size} bytes; header {bytes(data[:8])!r}; accepted: "
                         f"{', '.join(IMAGE_FORMATS)})") from None
    except Image.DecompressionBombError as exc:  # Pillow's own guard, at twice its MAX_IMAGE_PIXELS
        raise ImageError(f"decompression bomb refused before decoding: {exc}") from None
    except Exception as exc:  # Pillow plugins raise a variety of errors on malformed headers
        raise ImageError(f"unreadable image header: {exc}") from None
    _check_size(image.size, limits)
    if image.format == "TIFF":
        _check_tiff_tiles(image)
    try:  # animated GIF/WebP/PNG, multi-page TIFF: the first frame, where open() left it (the others unread)
        if draft_size and image.format in ("JPEG", "MPO"):  # MPO: a JPEG with more images after it (phones)
            image.draft("RGB", (draft_size, draft_size))
        declared = image.size
        image.load()
        if image.im.size != declared:  # an embedded image not the size its container said (IPTC, ICNS did)
            _check_size(image.im.size, limits, declared)
        image = ImageOps.exif_transpose(image)
        return _to_rgb(image)
    except ImageError:
        raise
    except Exception as exc:
        raise ImageError(f"corrupt or truncated {image.format or 'image'} data: {exc}") from None


def _check_size(size: tuple[int, int], limits: ImageLimits, declared: tuple[int, int] | None = None) -> None:
    """The limits on the size the header declares or, given that, on the size the image decoded to."""
    width, height = size
    when = "refused before decoding" if declared is None else f"decoded; its header said {declared[0]}x{declared[1]}"
    if width * height > limits.max_image_pixels:
        raise ImageError(
            f"image {'is' if declared else 'declares'} {width}x{height} = {width * height} pixels; the limit is "
            f"{limits.max_image_pixels} ({when})"
        )
    if min(width, height) < limits.min_image_side:
        raise ImageError(f"image is {width}x{height}; both sides must be at least {limits.min_image_side} pixels")
    if max(width, height) > limits.max_image_aspect_ratio * min(width, height):
        raise ImageError(
            f"image is {width}x{height}, an aspect ratio of {max(width, height) / min(width, height):.0f}:1; the "
            f"limit is {limits.max_image_aspect_ratio:g}:1 ({when})"
        )


# A TIFF tile may overhang its image (encoders use one tile size, 256 or 512, for every image), but by no more
# than this on a side or the image's own side rounded up to whole 16-pixel units: libtiff inflates and
# holds a whole tile whatever the image's size, so a 64x64 image in one 16384x16384 tile, 255 KB of
# deflate, cost 256 MB and a second of CPU (docs/serving.md, Bad input). Strips need no such check:
# libtiff reads no more rows of a strip than the image has, whatever RowsPerStrip says.
MAX_TIFF_TILE_SIDE = 1024
TIFF_TILE_WIDTH, TIFF_TILE_LENGTH = 322, 323


def _check_tiff_tiles(image: Image.Image) -> None:
    width, height = image.size
    tile = image.tag_v2.get(TIFF_TILE_WIDTH), image.tag_v2.get(TIFF_TILE_LENGTH)
    if tile == (None, None):  # strips
        return
    allowed = tuple(max(MAX_TIFF_TILE_SIDE, -(-side // 16) * 16) for side in (width, height))
    if not all(isinstance(t, int) for t in tile) or tile[0] > allowed[0] or tile[1] > allowed[1]:
        raise ImageError(f"TIFF tiles of {tile[0]}x{tile[1]} for a {width}x{height} image; a tile may be at most "
                         f"{allowed[0]}x{allowed[1]} for it (refused before decoding)")


def _to_rgb(image: Image.Image) -> Image.Image:
    mode = image.mode
    # tRNS (PNG, GIF): one grey, one RGB colour or some palette entries are transparent
    transparency = image.info.get("transparency")
    if mode == "RGB" and transparency is None:
        return image
    if mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):  # 16-bit / float grayscale
        # By the mode's depth, never by the image's own values: the same 16-bit value is the same grey in
        # every image (a 12-bit scan stays dark, as in any viewer). Integer modes hold 16-bit data (PNG and
        # TIFF), v -> v // 257 (what v * 255 / 65535 truncates to, exactly); "F" is taken as 0-255. In the
        # image's own type: a float64 copy cost 8 bytes a pixel for each step.
        values = np.asarray(image)
        if mode == "F":
            gray = np.clip(values, 0, 255).astype(np.uint8)
        else:
            gray = values.clip(0, 65535)
            gray //= 257
            gray = gray.astype(np.uint8)
        gray = Image.fromarray(gray)
        if transparency is None:
            return gray.convert("RGB")
        alpha = Image.fromarray(np.where(values == transparency, 0, 255).astype(np.uint8))
        image = Image.merge("LA", (gray, alpha)).convert("RGBA")
    elif mode in ("1", "L", "P", "RGB"):
        if transparency is not None:
            image = image.convert("RGBA")
    elif mode in ("LA", "La", "PA", "RGBa"):
        image = image.convert("RGBA")
    if image.mode == "RGBA":
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image, mask=image.getchannel("A"))
        return background
    return image.convert("RGB")


def resize_and_crop(image: Image.Image, config: PreprocessConfig) -> np.ndarray:
    """RGB image -> uint8 array (crop, crop, 3): shorter side to `resize`, centre crop.

    Matches torchvision's `Resize(resize)` + `CenterCrop(crop)` on PIL images: the longer side is
    int(resize * long / short), and the crop offset is int(round((side - crop) / 2)).
    """
    width, height = image.size
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = config.resize, int(config.resize * long / short)
    size = (new_short, new_long) if width <= height else (new_long, new_short)
    if size != image.size:
        image = image.resize(size, INTERPOLATIONS[config.interpolation])
    left = int(round((size[0] - config.crop) / 2.0))
    top = int(round((size[1] - config.crop) / 2.0))
    image = image.crop((left, top, left + config.crop, top + config.crop))
    return np.asarray(image, dtype=np.uint8)


def normalize(batch: np.ndarray, config: PreprocessConfig) -> np.ndarray:
    """uint8 (N, H, W, 3) -> float32 (N, 3, H, W) or (N, H, W, 3) per `config.layout`."""
    if batch.ndim != 4 or batch.shape[-1] != 3:
        raise ValueError(f"expected a uint8 batch of shape (N, H, W, 3), got {batch.shape}")
    if batch.dtype != np.uint8:
        raise ValueError(f"expected a uint8 batch, got {batch.dtype}")
    table = _normalize_table(config.mean, config.std)
    n, h, w, _ = batch.shape
    out = np.empty((n, 3, h, w) if config.layout == "NCHW" else (n, h, w, 3), np.float32)
    for c in range(3):  # one 256-entry lookup per channel, written straight into its place
        np.take(table[:, c], batch[..., c], out=out[:, c] if config.layout == "NCHW" else out[..., c])
    return out


@functools.lru_cache(maxsize=16)
def _normalize_table(mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """(256, 3) float32: (v - 255 mean) / (255 std) for every byte value v, computed in float32
    exactly as the elementwise formula would be, so the lookup is bit-identical to it."""
    values = np.arange(256, dtype=np.float32)[:, None]
    table = (values - np.asarray(mean, np.float32) * 255.0) / (np.asarray(std, np.float32) * 255.0)
    table.setflags(write=False)
    return table


def image_to_uint8(data: bytes, config: PreprocessConfig, limits: ImageLimits = ImageLimits()) -> np.ndarray:
    """Encoded bytes -> uint8 (crop, crop, 3), with JPEG draft decoding at `config.resize`."""
    return resize_and_crop(decode_image(data, limits, draft_size=config.resize), config)


def load_batch(
    images: Sequence[bytes], config: PreprocessConfig, limits: ImageLimits = ImageLimits()
) -> np.ndarray:
    """Encoded images -> the float32 model input batch. Raises ImageError naming the bad item."""
    crops = []
    for index, data in enumerate(images):
        try:
            crops.append(image_to_uint8(data, config, limits))
        except ImageError as exc:
            raise ImageError(f"image {index}: {exc}") from None
    return normalize(np.stack(crops), config)


def preprocess_requests(
    requests: Sequence[Sequence[bytes]], config: PreprocessConfig, limits: ImageLimits, pool=None
) -> tuple[np.ndarray | None, list[tuple[int, int] | ImageError | PreprocessFault]]:
    """A server's dynamic batch: several requests of several images each -> one normalised batch.

    Returns the float32 batch of every image of every *good* request (None if there is none) and,
    per request, either its (start, stop) rows in that batch or the error that fails it, naming each
    failed item: ImageError for bad input, PreprocessFault where any item failed otherwise (a bug).
    Decoding may run on `pool` (a concurrent.futures executor; Pillow releases the GIL); normalisation
    runs once, vectorised, for the whole batch.
    """

    def crop(data):
        # Each error as its message only: the raised one's traceback holds the failed decode's frames (the image
        # bytes, Pillow's objects) in reference cycles that only the cyclic collector frees, late.
        try:
            return image_to_uint8(data, config, limits)
        except ImageError as exc:
            return ImageError(str(exc))
        except Exception as exc:  # not the image's fault: its request fails, the batch carries on
            return PreprocessFault(f"{type(exc).__name__}: {exc}")

    flat = [data for items in requests for data in items]
    crops = list(pool.map(crop, flat)) if pool is not None else [crop(d) for d in flat]
    good, outcomes, start = [], [], 0
    for items in requests:
        mine = crops[start : start + len(items)]
        start += len(items)
        failed = [f"image {i}: {c}" for i, c in enumerate(mine) if isinstance(c, Exception)]
        if len(items) == 0:  # no rows to answer with (the server passed an IMAGE of shape [0, 1] on)
            outcomes.append(ImageError("bad input: the request holds no images (IMAGE of shape [0, 1]); send 1 or more"))
        elif any(isinstance(c, PreprocessFault) for c in mine):
            outcomes.append(PreprocessFault("internal error preprocessing " + "; ".join(failed)))
        elif failed:
            outcomes.append(ImageError("bad input: " + "; ".join(failed)))
        else:
            outcomes.append((len(good), len(good) + len(mine)))
            good.extend(mine)
    return (normalize(np.stack(good), config) if good else None), outcomes


def load_files(paths: Iterable[str | Path], config: PreprocessConfig) -> np.ndarray:
    return load_batch([Path(p).read_bytes() for p in paths], config)
