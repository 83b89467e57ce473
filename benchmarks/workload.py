"""What every benchmark sends: the bundled real photos, as encoded bytes.

    python -m benchmarks.workload            # list the photos and their sizes

`jpeg` (the default) re-encodes each bundled photo once as an RGB JPEG (quality 90, what a camera or
a browser uploads); `original` sends the files as they ship (PNG and JPEG, some grayscale or with
alpha). Every load generator (perf_analyzer, Locust, the in-process bound) uses the same list.
"""
from __future__ import annotations

import argparse
import io

from PIL import Image

from common.samples import sample_photos

ENCODINGS = ("jpeg", "original")


def load_photos(encoding: str = "jpeg", names: list[str] | None = None, quality: int = 90) -> dict[str, bytes]:
    """{name: encoded bytes} of the bundled photos, in a stable order."""
    if encoding not in ENCODINGS:
        raise ValueError(f"photo encoding {encoding!r} is not one of {ENCODINGS}")
    photos = {}
    for name, path in sample_photos(names).items():
        data = path.read_bytes()
        if encoding == "jpeg":
            with Image.open(io.BytesIO(data)) as image:
                rgb = image.convert("RGB")
            buffer = io.BytesIO()
            rgb.save(buffer, format="JPEG", quality=quality)
            data = buffer.getvalue()
        photos[name] = data
    if not photos:
        raise FileNotFoundError("no bundled sample photos are installed (run `make setup`)")
    return photos


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="List the photos the benchmarks send.")
    p.add_argument("--photos", default="jpeg", choices=ENCODINGS, help="photo encoding (default: %(default)s)")
    return p


def main(args: argparse.Namespace) -> None:
    photos = load_photos(args.photos)
    for name, data in photos.items():
        with Image.open(io.BytesIO(data)) as image:
            print(f"{name:14s} {image.format:5s} {image.size[0]:5d}x{image.size[1]:<5d} {len(data):8d} bytes")
    print(f"{len(photos)} photos, {sum(map(len, photos.values())) / len(photos) / 1024:.0f} KiB on average")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
