"""Classify image files with a running Triton server.

    python -m clients.classify cat.jpg dog.png --protocol grpc --top-k 5
    python -m clients.classify photos/*.jpg --batch          # all images in one request
    python -m clients.classify photos/*.jpg --async          # one request per image, concurrently

Prints label and probability per image; exits non-zero if any image failed, naming it.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
from pathlib import Path

from clients.client import (DEFAULT_MODEL, DEFAULT_URLS, PROTOCOLS, AsyncImageClassifierClient,
                            ClassificationError, ImageClassifierClient, Prediction)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Classify images with the Triton image_classifier ensemble.")
    p.add_argument("images", nargs="+", help="image files (JPEG, PNG, WebP, BMP, GIF, TIFF)")
    p.add_argument("--url", default=None, help="host:port (default: %s)" % DEFAULT_URLS)
    p.add_argument("--protocol", default="http", choices=PROTOCOLS, help="(default: %(default)s)")
    p.add_argument("--model", default=DEFAULT_MODEL, help="(default: %(default)s)")
    p.add_argument("--top-k", type=int, default=5, help="(default: %(default)s)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--batch", action="store_true", help="send all images in one request")
    mode.add_argument("--async", dest="use_async", action="store_true",
                      help="one request per image, sent concurrently with asyncio")
    p.add_argument("--json", action="store_true", help="print JSON lines instead of a table")
    return p


Outcome = list[Prediction] | ClassificationError
Outcomes = list[tuple[str, Outcome]]  # one per argument, in order: a path given twice is classified twice


def read_images(paths: list[str]) -> list[tuple[str, bytes | ClassificationError]]:
    """(path, bytes) per argument; a file that cannot be read is that image's failure, not the run's."""
    images = []
    for name in paths:
        try:
            images.append((name, Path(name).read_bytes()))
        except OSError as exc:
            images.append((name, ClassificationError(f"cannot read the file: {exc.strerror or exc}", "local")))
    return images


def classify_files(args: argparse.Namespace) -> Outcomes:
    images = read_images(args.images)
    readable = [data for _, data in images if isinstance(data, bytes)]
    results = iter(_classify(args, readable) if readable else [])
    return [(name, next(results) if isinstance(data, bytes) else data) for name, data in images]


def _classify(args: argparse.Namespace, images: list[bytes]) -> list[Outcome]:
    """One outcome per image, in order, as the chosen mode (one by one, --batch or --async) sends them."""
    if args.use_async:
        return asyncio.run(_classify_async(args, images))
    with ImageClassifierClient(args.url, args.protocol, args.model) as client:
        if args.batch:
            try:
                return client.classify(images, args.top_k)
            except ClassificationError as exc:
                return _blame(len(images), exc)
        outcomes: list[Outcome] = []
        for image in images:
            try:
                outcomes.append(client.classify([image], args.top_k)[0])
            except ClassificationError as exc:
                outcomes.append(exc)
        return outcomes


def _blame(count: int, exc: ClassificationError) -> list[Outcome]:
    """A batched request failed: the server's message names the bad items ("image 2: ...")."""
    bad = {int(i) for i in re.findall(r"image (\d+):", str(exc))}
    innocent = ClassificationError("not classified: another image in the same request failed", exc.status)
    return [exc if (i in bad or not bad) else innocent for i in range(count)]


async def _classify_async(args: argparse.Namespace, images: list[bytes]) -> list[Outcome]:
    async with AsyncImageClassifierClient(args.url, args.protocol, args.model) as client:
        async def one(image: bytes) -> Outcome:
            try:
                return (await client.classify([image], args.top_k))[0]
            except ClassificationError as exc:
                return exc

        return list(await asyncio.gather(*(one(image) for image in images)))


def report(outcomes: Outcomes, as_json: bool) -> int:
    failures = 0
    for name, outcome in outcomes:
        if isinstance(outcome, ClassificationError):
            failures += 1
            if as_json:
                print(json.dumps({"image": name, "error": str(outcome), "status": outcome.status}))
            else:
                print(f"{name}: ERROR ({outcome.status}): {outcome}", file=sys.stderr)
            continue
        if as_json:
            print(json.dumps({"image": name, "top": [vars(p) for p in outcome]}))
        else:
            print(name)
            for p in outcome:
                print(f"  {p.score:7.2%}  {p.index:5d}  {p.label}")
    return failures


def main(args: argparse.Namespace) -> int:
    return report(classify_files(args), args.json)


if __name__ == "__main__":
    try:
        failed = main(get_args_parser().parse_args())
    except (OSError, ClassificationError, ValueError) as exc:
        sys.exit(f"clients.classify: {exc}")
    sys.exit(1 if failed else 0)
